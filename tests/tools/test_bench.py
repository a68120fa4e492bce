"""`worldlm bench` writes its measurements to files: structure and invariants, never timing thresholds."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from worldlm.cli import main
from worldlm.timing import PhaseTimer
from worldlm.tools.bench import complete_tree, run_bench

PHASES = {"training", "serialisation", "aggregation", "routing", "evaluation", "checkpoint", "other"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("bench")
    return out, run_bench(out, quick=True, note="test")


@pytest.mark.e2e
def test_results_files_hold_the_returned_results(quick: tuple[Path, dict[str, Any]]) -> None:
    out, result = quick
    assert json.loads((out / "results.json").read_text()) == result
    md = (out / "results.md").read_text()
    for heading in ("Training efficiency", "federation round", "Aggregation", "Peak memory", "Note: test"):
        assert heading in md


@pytest.mark.e2e
def test_training_rows_are_positive_and_fastest_is_one_of_them(quick: tuple[Path, dict[str, Any]]) -> None:
    te = quick[1]["training_efficiency"]
    rows = [r for r in te["rows"] if "error" not in r]
    assert rows and all(r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["matmul_fraction"] > 0 for r in rows)
    assert all(f > 0 for f in te["matmul_flops_per_s"].values())
    assert te["fastest"]["tokens_per_s"] == max(r["tokens_per_s"] for r in rows)
    assert {"fp32", "fp32-dp-sgd"} <= {r["setting"] for r in rows}  # a DP node's step beside the plain one


@pytest.mark.e2e
def test_round_split_sums_to_the_round(quick: tuple[Path, dict[str, Any]]) -> None:
    fed = quick[1]["federation"]
    phases = fed["phases"]
    assert set(phases) >= PHASES
    assert all(s >= 0 for name, s in phases.items() if name != "other")
    assert phases["other"] >= -1e-4  # phases never overlap: no second counted twice
    assert sum(phases.values()) == pytest.approx(fed["round_seconds"], abs=1e-4)
    assert 0 < fed["non_training_without_evaluation"] < fed["non_training_fraction"] < 1


@pytest.mark.e2e
def test_training_in_round_and_bytes_ratios(quick: tuple[Path, dict[str, Any]]) -> None:
    fed = quick[1]["federation"]
    assert fed["training"]["in_round_vs_raw"] > 0
    by = fed["bytes"]
    assert by["minimum"] == by["parameters"] * 4 * 2 * (fed["nodes"] - 1)
    assert by["sent"] >= by["minimum"] and by["ratio"] >= 1  # residuals ride on top of the models


@pytest.mark.e2e
def test_batched_aggregation_equals_the_naive_reference(quick: tuple[Path, dict[str, Any]]) -> None:
    rows = quick[1]["aggregation"]
    assert [r["children"] for r in rows] == [2, 16]
    assert all(r["same_picks"] and r["max_abs_diff"] <= 1e-5 and r["speedup"] > 0 for r in rows)


@pytest.mark.e2e
def test_memory_rows_cover_both_settings(quick: tuple[Path, dict[str, Any]]) -> None:
    rows = quick[1]["memory"]
    assert [(r["nodes"], r["offload"]) for r in rows] == [(3, False), (3, True)]
    assert all(r["peak_rss_mb"] >= r["before_mb"] > 0 and r["state_mb"] > 0 for r in rows)
    assert rows[0]["state_mb"] == rows[1]["state_mb"]  # the same states, wherever they are kept


def test_complete_tree_shapes() -> None:
    for branching, depth, n in ((2, 3, 7), (4, 3, 21), (4, 4, 85)):
        nodes = complete_tree(branching, depth)
        assert len(nodes) == n
        assert sum(1 for node in nodes if node.sources) == branching ** (depth - 1)


def test_phase_timer_charges_the_innermost_phase_only() -> None:
    timer = PhaseTimer()
    t0 = time.perf_counter()
    with timer.phase("outer"):
        time.sleep(0.01)
        with timer.phase("inner"):
            time.sleep(0.01)
    wall = time.perf_counter() - t0
    seconds = timer.take()
    assert set(seconds) == {"outer", "inner"} and sum(seconds.values()) <= wall
    assert seconds["inner"] >= 0.01 and seconds["outer"] >= 0.01
    assert timer.take() == {}


@pytest.mark.parametrize("bad", [["--preset", "huge"], ["--steps", "0"]])
def test_bench_bad_input_exits_2(tmp_path: Path, bad: list[str]) -> None:
    assert main(["bench", "--out", str(tmp_path), "--quiet", *bad]) == 2
