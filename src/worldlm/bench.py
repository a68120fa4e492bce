"""Benchmarks written to files (speed targets live here, not in timed tests).

`worldlm bench` currently measures the local training loop's throughput under the precision and
thread settings this CPU offers (fp32 vs bf16 autocast, 1 vs all threads), so the defaults are
chosen on numbers: results go to `bench/results.json` and `bench/results.md`.
"""

from __future__ import annotations

import contextlib
import platform
import time
from pathlib import Path
from typing import Any

import torch

from worldlm.errors import WorldLMError
from worldlm.io import atomic_write_json, atomic_write_text
from worldlm.model import GPT, PRESETS, gpt_config
from worldlm.train import ClientOptConfig, Schedule, make_client_opt, train_steps


def training_throughput(
    preset: str, vocab: int, seq_len: int, batch: int, steps: int, threads: int, bf16: bool
) -> float:
    """Tokens/s of the shared training loop on random tokens (after 2 warm-up steps)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT(gpt_config(preset, vocab, seq_len))
    opt = make_client_opt(model, ClientOptConfig())
    x = torch.randint(0, vocab, (batch, seq_len + 1))

    def batch_fn() -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, :-1], x[:, 1:]

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    schedule = Schedule(1e-3, 0.1, 1, steps + 2)
    with autocast:
        train_steps(model, opt, batch_fn, schedule, 0, 2, 1.0)
        t0 = time.perf_counter()
        stats = train_steps(model, opt, batch_fn, schedule, 2, steps, 1.0)
    return stats.tokens / (time.perf_counter() - t0)


def run_bench(out: Path, preset: str = "nano", steps: int = 20, bf16: bool = True) -> dict[str, Any]:
    if preset not in PRESETS:
        raise WorldLMError(f"unknown preset '{preset}'; valid: {', '.join(PRESETS)}")
    cores = torch.get_num_threads()
    rows = []
    for threads in sorted({1, cores}):
        for use_bf16 in (False, True) if bf16 else (False,):
            n = steps if not use_bf16 else max(2, steps // 10)  # bf16 is emulated on CPUs without it: slow
            tps = training_throughput(preset, 4096, 128, 8, n, threads, use_bf16)
            rows.append(
                {
                    "preset": preset,
                    "threads": threads,
                    "precision": "bf16-autocast" if use_bf16 else "fp32",
                    "tokens_per_s": round(tps, 1),
                    "steps": n,
                }
            )
    torch.set_num_threads(cores)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": cores, "torch": torch.__version__},
        "training_loop": rows,
    }
    atomic_write_json(out / "results.json", result)
    lines = ["| preset | threads | precision | tokens/s |", "|---|---:|---|---:|"]
    lines += [f"| {r['preset']} | {r['threads']} | {r['precision']} | {r['tokens_per_s']:,.0f} |" for r in rows]
    atomic_write_text(out / "results.md", "# worldlm bench\n\n" + "\n".join(lines) + "\n")
    return result
