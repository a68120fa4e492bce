"""`worldlm bench` writes its measurements to files."""

from __future__ import annotations

import json
from pathlib import Path

from worldlm.bench import run_bench
from worldlm.cli import main


def test_bench_writes_results(tmp_path: Path) -> None:
    result = run_bench(tmp_path, preset="nano", steps=2, bf16=False)
    rows = result["training_loop"]
    assert rows and all(r["precision"] == "fp32" and r["tokens_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "results.json").read_text()) == result
    assert "tokens/s" in (tmp_path / "results.md").read_text()


def test_bench_unknown_preset_exits_2(tmp_path: Path) -> None:
    assert main(["bench", "--out", str(tmp_path), "--preset", "huge", "--quiet"]) == 2
