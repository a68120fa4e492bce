#!/usr/bin/env bash
# The prepared GPU check: on one CUDA GPU, at most ~8 minutes: bf16 matmul peak, tokens/s and
# model FLOP/s utilisation at 75m/125m/250m, WorldLM vs FL on the 7-node languages tree at 75m; writes
# bench/gpu/results.json and .md. Without a GPU: one line, then a CPU dry run of the same code, exit 0.
# Run from the repository root after `make test` (or `make demo`, which also prepares data/languages).
set -euo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1
exec timeout 480 .venv/bin/worldlm gpu-check "$@"
