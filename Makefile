# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

.PHONY: demo test test-fast lint venv clean

venv: $(STAMP)

# torch is installed first and pinned so pip takes the local CPU wheel, never a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "torch==2.13.0"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/worldlm prepare configs/demo.toml
	$(BIN)/worldlm compare configs/demo.toml --methods worldlm,fl --out runs/demo --force
	@echo "What each leaf's WorldLM model writes (sampled: T 0.8, top-k 40, seed 0; greedy only repeats at this size):"
	$(BIN)/worldlm generate runs/demo/worldlm --node fr,it,uk,ru --max-new-tokens 32 --temperature 0.8 --top-k 40

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/lint-imports

# Everything CI runs: lint, then every test but the `slow` ones (minutes each: `pytest -m slow`).
test: $(STAMP) lint
	$(BIN)/pytest

# The developer's loop: unit tests only (no end-to-end runs), well under two minutes on 2 cores.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not e2e and not slow"

clean:
	rm -rf runs build *.egg-info
