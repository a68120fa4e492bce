"""Experiment reports under the paper's protocol: "+ ft" rows, compute axis, round trace, method_set."""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tiny import make_prepared, tiny_config
from worldlm.cli import main
from worldlm.errors import ConfigError
from worldlm.experiments.markdown import markdown
from worldlm.experiments.report import reference_variants, targeted_rows, value_at
from worldlm.experiments.spec import load_experiment

EXPERIMENT = """
name = "proto"
base = "worldlm.toml"
methods = ["worldlm", "fl", "centralized"]
seeds = [0]
set = ["train.rounds=4", "train.local_steps=1", "train.threads=1", "eval.trace_round=1"]

[method_set]
fl = ["train.lr_max=2e-3"]

[variants.default]
set = []
"""


@pytest.fixture(scope="module")
def proto(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], str]:
    tmp = tmp_path_factory.mktemp("proto")
    tiny_config(tmp, make_prepared(tmp / "data"))
    (tmp / "proto.toml").write_text(EXPERIMENT)
    out_root = tmp / "results"
    assert main(["experiment", str(tmp / "proto.toml"), "--out-root", str(out_root), "--quiet"]) == 0
    out = out_root / "proto"
    return out, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


@pytest.mark.e2e
def test_method_set_applies_to_that_method_only(proto: tuple[Path, dict[str, Any], str]) -> None:
    out, _, _ = proto
    lr = {
        m: tomllib.loads((out / "runs" / "default" / m / "seed0" / "config.toml").read_text())["train"]["lr_max"]
        for m in ("worldlm", "fl")
    }
    assert lr == {"worldlm": 3e-3, "fl": 2e-3}


@pytest.mark.e2e
def test_fine_tuned_rows_come_from_the_same_runs(proto: tuple[Path, dict[str, Any], str]) -> None:
    out, report, md = proto
    stats = report["variants"]["default"]["methods"]
    fl_summary = json.loads((out / "runs" / "default" / "fl" / "seed0" / "summary.json").read_text())
    assert stats["fl + ft"]["mean_ppl"] == fl_summary["mean_ppl_ft"]
    assert stats["fl"]["mean_ppl"] == fl_summary["mean_ppl"]
    assert stats["fl + ft"]["ratio_to_worldlm"] == fl_summary["mean_ppl_ft"] / stats["worldlm"]["mean_ppl"]
    assert "worldlm + ft" not in stats and "centralized + ft" not in stats
    assert "| fl + ft | **" in md


@pytest.mark.e2e
def test_compute_axis_reads_every_method_at_worldlms_compute(proto: tuple[Path, dict[str, Any], str]) -> None:
    out, report, md = proto
    assert (out / "plots" / "default" / "val_ppl_compute.png").is_file()
    v = report["variants"]["default"]
    stats = v["methods"]
    tokens = {m: stats[m]["train_tokens"] for m in ("worldlm", "fl", "centralized")}
    # 4 rounds x 3 levels x 1 step = 12 sequential steps of 4 x 32 tokens: centralized trains one model
    assert tokens["centralized"] == 12 * 4 * 32
    assert tokens["worldlm"] == 7 * 4 * 1 * 4 * 32 and tokens["fl"] == 7 * 12 * 4 * 32
    assert v["equal_compute_tokens"] == tokens["worldlm"]
    # WorldLM is read at its own end; FL mid-run, at 4 of its 12 rounds' tokens; centralized ended with less
    assert stats["worldlm"]["val_ppl_at_equal_compute"] == pytest.approx(stats["worldlm"]["val_ppl"])
    fl = [json.loads(line) for line in (out / "runs" / "default" / "fl" / "seed0" / "metrics.jsonl").open()]
    after_4 = [r["ppl"] for r in fl if r.get("split") == "val" and r["round"] == 3]  # FL round 4: 4 x 7 x 128 tokens
    assert len(after_4) == 7 and stats["fl"]["val_ppl_at_equal_compute"] == pytest.approx(sum(after_4) / 7)
    assert stats["centralized"]["val_ppl_at_equal_compute"] is None
    assert (
        Path(report["experiment"]).parent / "results" / "proto" / "plots" / "default" / "val_ppl_compute.png"
    ).is_file()
    assert "val ppl at equal compute" in md


@pytest.mark.e2e
def test_trace_is_tabulated_and_plotted(proto: tuple[Path, dict[str, Any], str]) -> None:
    out, report, md = proto
    trace = report["variants"]["default"]["trace"]
    assert set(trace) == {"worldlm", "fl", "centralized"}
    assert [(p["node"], p["what"]) for p in trace["worldlm"]][-1] == ("root", "aggregated")
    assert all(math.isfinite(p["val_loss_all"]) for p in trace["fl"])
    assert (out / "plots" / "default" / "trace.png").is_file()
    assert "One round traced" in md


def test_value_at_interpolates_log_linearly() -> None:
    curve = [(0, 100.0), (10, 10.0), (20, 5.0)]
    assert value_at(curve, 5) == pytest.approx(math.sqrt(1000.0))
    assert value_at(curve, 20) == 5.0 and value_at(curve, 25) is None and value_at([], 1) is None


def test_method_set_names_a_method_of_the_experiment(tmp_path: Path) -> None:
    tiny_config(tmp_path, tmp_path / "data")
    path = tmp_path / "bad.toml"
    path.write_text(EXPERIMENT.replace("fl = [", "fedper = ["))
    with pytest.raises(ConfigError, match="method_set: method 'fedper' is not one of the experiment's methods"):
        load_experiment(path)


def test_trace_points_average_the_points_every_seed_has() -> None:
    from types import SimpleNamespace

    from worldlm.experiments.report import trace_points

    def point(what: str, step: int, loss: float) -> dict[str, Any]:
        return {"round": 3, "node": "root", "what": what, "step": step, "val_loss_all": loss, "val_loss": loss}

    old = SimpleNamespace(trace=[point("trained", 5, 2.0), point("aggregated", 9, 1.0)])  # traced before "start"
    new = SimpleNamespace(trace=[point("start", 3, 9.0), point("trained", 5, 4.0), point("aggregated", 9, 3.0)])
    points = trace_points([old, new])  # type: ignore[list-item]
    assert [(p["what"], p["val_loss_all"], p["seeds"]) for p in points] == [("trained", 3.0, 2), ("aggregated", 2.0, 2)]


def test_privatised_nodes_and_the_others_are_compared_with_the_same_variant_without_dp(tmp_path: Path) -> None:
    (tmp_path / "e.toml").write_text(
        'name = "e"\nbase = "b.toml"\nmethods = ["worldlm"]\nseeds = [0]\n'
        "[variants.no-dp]\n[variants.dp-a]\nset = [\"dp.nodes=['a']\"]\n"
        '[variants.slow]\nset = ["train.lr_max=1e-4"]\n'
        '[variants.dp-b-slow]\nset = ["train.lr_max=1e-4", "dp.nodes=[\'b\']", "dp.sigma=1.0"]\n'
        '[variants.dp-other]\nset = ["train.lr_max=1.0", "dp.nodes=[\'b\']"]\n'
    )
    (tmp_path / "b.toml").write_text("")
    exp = load_experiment(tmp_path / "e.toml")
    targeted = {"no-dp": frozenset(), "dp-a": frozenset("a"), "slow": frozenset(), "dp-b-slow": frozenset("b")}
    targeted["dp-other"] = frozenset("b")
    references = reference_variants(exp, targeted)
    assert references == {"dp-a": "no-dp", "dp-b-slow": "slow", "dp-other": None}

    def variant(nodes: dict[str, float]) -> dict[str, Any]:
        return {"methods": {"worldlm": {"nodes": nodes}}}

    variants = {
        "no-dp": variant({"root": 10.0, "a": 20.0, "b": 40.0}),
        "dp-a": variant({"root": 11.0, "a": 30.0, "b": 44.0}),
        "slow": variant({"root": 10.0, "a": 20.0, "b": 40.0}),
        "dp-b-slow": variant({"root": 10.0, "a": 20.0, "b": math.exp(50)}),  # b diverged
        "dp-other": variant({"root": 10.0, "a": 20.0, "b": 40.0}),
    }
    rows = targeted_rows(variants, targeted, references)
    assert rows[0] == {
        "variant": "dp-a",
        "method": "worldlm",
        "nodes": ["a"],
        "reference": "no-dp",
        "targeted": 30.0,
        "targeted_reference": 20.0,
        "others": 27.5,  # root and b
        "others_reference": 25.0,
    }
    report = {
        "name": "t", "description": "", "command": "c", "date": "d", "experiment": "e", "seeds": [0], "set": [],
        "runs_complete": 3, "runs_total": 3, "eval_models": "`deliverable`", "variants": {}, "runs": [],
        "missing": [], "overview_plot": None, "targeted": rows,
    }  # fmt: skip
    md = markdown(report)
    assert "| `dp-a` | worldlm | a | 30.00 (1.50×) | 27.50 (1.10×) | `no-dp` |" in md
    assert "| `dp-b-slow` | worldlm | b | diverged | 15.00 (1.00×) | `slow` |" in md
    assert "| `dp-other` | worldlm | b | 40.00 | 15.00 | – |" in md
