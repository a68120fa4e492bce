"""Behaviour pinned across refactors: the tiny runs' summary.json and final models hash to committed values.

Bitwise equality holds on one machine at one thread; another CPU (or another torch) rounds single
operations differently (README, "Same numbers"), so the committed hashes are keyed by the machine they
were measured on. Everywhere, the perplexities must match the committed ones to 1e-4 relative; where the
machine's key has committed hashes, summary and models must match them bit for bit.

To record this machine's hashes (after a deliberate change of behaviour, or on a new kind of CPU):
`.venv/bin/python tests/test_pinned.py` rewrites `tests/pinned.json`.
"""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tiny import make_prepared, summary_of, train_tiny

PINS = Path(__file__).parent / "pinned.json"
# name -> (method, --set overrides): the hierarchy, flat FL (its own engine plan), the parallel schedule
RUNS: dict[str, tuple[str, tuple[str, ...]]] = {
    "worldlm": ("worldlm", ()),
    "fl": ("fl", ()),
    "worldlm-parallel": ("worldlm", ("federation.schedule=parallel",)),
}

def machine_key() -> str:
    """What decides bitwise results: CPU model, the kernels torch picks for it, torch's version."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} | {torch.backends.cpu.get_cpu_capability()} | torch {torch.__version__}"


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def models_digest(run: Path) -> str:
    """SHA-256 over every final model's tensors, by node and parameter name (not the file bytes)."""
    h = hashlib.sha256()
    for path in sorted((run / "checkpoints" / "final").glob("*.safetensors")):
        for name, tensor in sorted(load_file(path).items()):
            h.update(f"{path.stem}/{name}/{tensor.dtype}/{tuple(tensor.shape)}".encode())
            h.update(tensor.contiguous().numpy().tobytes())
    return h.hexdigest()


def observe(tmp: Path, data: Path, name: str) -> dict[str, Any]:
    method, sets = RUNS[name]
    run = train_tiny(tmp, data, method, *sets)
    summary = summary_of(run)
    return {
        "ppl": {node: s["ppl"] for node, s in summary["nodes"].items()},
        "summary": digest(summary),
        "models": models_digest(run),
    }


@pytest.mark.e2e
@pytest.mark.parametrize("name", sorted(RUNS))
def test_tiny_run_matches_pinned(tmp_path: Path, data: Path, name: str) -> None:
    pinned = json.loads(PINS.read_text())[name]
    got = observe(tmp_path, data, name)
    assert got["ppl"] == pytest.approx(pinned["ppl"], rel=1e-4)
    exact = pinned["hashes"].get(machine_key())
    if exact is not None:  # a machine these values were measured on: bit for bit
        assert {"summary": got["summary"], "models": got["models"]} == exact


def record() -> None:
    """Measure every pinned run on this machine and write its values into tests/pinned.json."""
    import tempfile

    pins = json.loads(PINS.read_text()) if PINS.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_prepared(Path(tmp) / "data")
        for name in sorted(RUNS):
            got = observe(Path(tmp), data, name)
            entry = pins.setdefault(name, {"hashes": {}})
            entry["ppl"] = got["ppl"]
            entry["hashes"][machine_key()] = {"summary": got["summary"], "models": got["models"]}
    PINS.write_text(json.dumps(pins, indent=2, sort_keys=True) + "\n")
    print(f"recorded {len(RUNS)} runs for {machine_key()} in {PINS}")


if __name__ == "__main__":
    record()
