"""The experiment harness: grid runs, resume by skipping complete runs, report and plots."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tiny import make_prepared, tiny_config
from worldlm.cli import main
from worldlm.config import Config, load_config
from worldlm.config.load import parse_override
from worldlm.data.prepared import load_prepared
from worldlm.errors import ConfigError, DataError
from worldlm.experiments.spec import load_experiment, plan_runs
from worldlm.runners import local
from worldlm.runners.planning import node_spans, tree_from_config
from worldlm.runners.resume import Interrupted

MICRO = """
name = "micro"
base = "worldlm.toml"
methods = ["worldlm", "centralized"]
seeds = [0]
set = ["train.rounds=2", "train.local_steps=2", "train.threads=1"]

[variants.default]
set = []

[variants.no-residuals]
description = "nu = 0"
set = ["federation.nu=0"]
"""


@dataclass(frozen=True)
class Micro:
    experiment: Path
    out_root: Path
    report_md: str
    report: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.out_root / "micro"


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> Micro:
    """Run the micro experiment once (2 variants × 2 methods × 1 seed) and keep its first report."""
    tmp = tmp_path_factory.mktemp("exp")
    tiny_config(tmp, make_prepared(tmp / "data"))
    experiment = tmp / "micro.toml"
    experiment.write_text(MICRO)
    out_root = tmp / "results"
    assert main(["experiment", str(experiment), "--out-root", str(out_root), "--quiet"]) == 0
    report = json.loads((out_root / "micro" / "report.json").read_text())
    return Micro(experiment, out_root, (out_root / "micro" / "report.md").read_text(), report)


@pytest.fixture
def runner_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Count calls of the in-process runner (by run name) while still running it."""
    calls: list[str] = []
    real = local.run

    def counting(cfg: Config, out: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(cfg.name)
        return real(cfg, out, *args, **kwargs)

    monkeypatch.setattr(local, "run", counting)
    yield calls


def rerun(m: Micro, *extra: str) -> int:
    return main(["experiment", str(m.experiment), "--out-root", str(m.out_root), "--quiet", *extra])


@pytest.mark.e2e
def test_report_has_every_variant_method_and_node(micro: Micro) -> None:
    report = micro.report
    assert report["runs_complete"] == report["runs_total"] == 4 and report["missing"] == []
    assert report["command"] == f"worldlm experiment {micro.experiment} --out-root {micro.out_root}"
    for variant in ("default", "no-residuals"):
        stats = report["variants"][variant]["methods"]
        assert list(stats) == ["worldlm", "centralized"]
        wl, central = stats["worldlm"], stats["centralized"]
        assert wl["ratio_to_worldlm"] == 1.0
        assert central["ratio_to_worldlm"] == pytest.approx(central["mean_ppl"] / wl["mean_ppl"])
        assert set(wl["nodes"]) == {"root", "fr-it", "uk-ru", "fr", "it", "uk", "ru"}
        assert wl["seeds"] == [0] and wl["std_over_seeds"] == 0.0 and wl["sequential_steps"] == 2 * 3 * 2
    runs = {(r["variant"], r["method"]): r for r in report["runs"]}
    assert len(runs) == 4 and all(r["wall_seconds"] > 0 for r in runs.values())
    md = micro.report_md
    assert "## Variant `default`" in md and "## Variant `no-residuals`" in md and "## Variants side by side" in md
    # method | mean | ± nodes | ± seeds | / worldlm | val ppl | val at equal compute | seeds | rounds | steps
    # (centralized trains one model: it ends with less compute than WorldLM, so it has no value at WorldLM's)
    assert re.search(
        r"\| centralized \| \*\*[\d.]+\*\* \| [\d.]+ \| – \| [\d.]+× \| [\d.]+ \| – \| 1/1 \| 2 \| 12 \|", md
    )
    assert "| ru | " in md and report["command"] in md
    # side by side: one seed per cell, so a mean without a spread over seeds (not "± 0.00")
    overview = md.split("## Variants side by side")[1].split("Validation perplexity")[0]
    means = {v: report["variants"][v]["methods"]["worldlm"]["mean_ppl"] for v in ("default", "no-residuals")}
    assert f"| worldlm | {means['default']:.2f} | {means['no-residuals']:.2f} (" in overview
    assert not any("±" in line for line in overview.splitlines() if line.startswith("| "))
    # the validation overview: each method's lowest validation perplexity over the variants in bold
    val = {v: report["variants"][v]["methods"]["worldlm"]["val_ppl"] for v in ("default", "no-residuals")}
    cells = [f"**{x:.2f}**" if x == min(val.values()) else f"{x:.2f}" for x in val.values()]
    assert f"| worldlm | {cells[0]} | {cells[1]} |" in md.split("the one every setting is chosen on")[1]


@pytest.mark.e2e
def test_passes_over_each_trainers_data_follow_its_tokens_and_shard(micro: Micro) -> None:
    """WorldLM: every node trains 2 rounds x 2 steps x batch 4 x 32 tokens over its own shard; centralized
    trains 12 sequential steps over everyone's pooled data, so it has one trainer."""
    cfg = plan_runs(load_experiment(micro.experiment), micro.dir)[0].cfg
    held = {
        n: sum(s.size for s in sp)
        for n, sp in node_spans(cfg, tree_from_config(cfg), load_prepared(cfg.data.path)).items()
    }
    stats = micro.report["variants"]["default"]["methods"]
    assert stats["worldlm"]["data_passes"] == pytest.approx({n: 2 * 2 * 4 * 32 / size for n, size in held.items()})
    assert stats["centralized"]["data_passes"] == pytest.approx({"centralized": 12 * 4 * 32 / sum(held.values())})
    assert "| trainer | worldlm | centralized |" in micro.report_md and "| centralized | – | " in micro.report_md


@pytest.mark.e2e
def test_plots_exist_and_are_linked(micro: Micro) -> None:
    links = re.findall(r"!\[[^]]*\]\(([^)]+)\)", micro.report_md)
    for link in links:
        assert (micro.dir / link).read_bytes()[:4] == b"\x89PNG"
    default = micro.report["variants"]["default"]["plots"]
    assert set(default) == {"val_ppl", "val_ppl_compute", "val_nodes", "attention", "residual_flows", "mixture"}
    no_residuals = micro.report["variants"]["no-residuals"]["plots"]
    assert "residual_flows" not in no_residuals  # nu = 0 routes nothing
    assert no_residuals["mixture"] == default["mixture"]  # same tree and data: one figure
    assert micro.report["overview_plot"] in links and set(default.values()) <= set(links)


@pytest.mark.e2e
def test_rerun_skips_complete_runs_and_redoes_a_stale_one(micro: Micro, runner_calls: list[str]) -> None:
    assert rerun(micro) == 0  # whatever other tests left incomplete is completed here
    runner_calls.clear()
    summaries = sorted(micro.dir.glob("runs/*/*/seed0/summary.json"))
    mtimes = [p.stat().st_mtime_ns for p in summaries]
    assert rerun(micro) == 0
    assert runner_calls == [] and [p.stat().st_mtime_ns for p in summaries] == mtimes
    stale = micro.dir / "runs" / "default" / "worldlm" / "seed0"
    lines = len((stale / "metrics.jsonl").read_text().splitlines())
    (stale / "summary.json").unlink()
    config = stale / "config.toml"
    config.write_text(config.read_text().replace("rounds = 2", "rounds = 3"))  # written by another config
    assert rerun(micro) == 0
    assert runner_calls == ["micro-default-worldlm-seed0"]
    assert len((stale / "metrics.jsonl").read_text().splitlines()) == lines  # redone from scratch, not appended


@pytest.mark.e2e
def test_changed_override_reruns_only_the_affected_runs(micro: Micro, runner_calls: list[str]) -> None:
    micro.experiment.write_text(MICRO.replace('set = ["federation.nu=0"]', 'set = ["federation.nu=0", "seq=1"]'))
    with pytest.raises(ConfigError, match=r"variant 'no-residuals'.*unknown config key 'seq'"):
        plan_runs(load_experiment(micro.experiment), micro.dir)
    micro.experiment.write_text(
        MICRO.replace('set = ["federation.nu=0"]', 'set = ["federation.nu=0", "train.lr_max=1e-3"]')
    )
    try:
        assert rerun(micro) == 0
    finally:
        micro.experiment.write_text(MICRO)
    assert sorted(runner_calls) == ["micro-no-residuals-centralized-seed0", "micro-no-residuals-worldlm-seed0"]
    assert "train.lr_max=1e-3" in (micro.dir / "report.md").read_text()


def failing_for(method: str, real: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    def run(cfg: Config, out: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if cfg.method == method:
            raise DataError(f"no data for {method}")
        return real(cfg, out, *args, **kwargs)

    return run


@pytest.mark.e2e
def test_a_failed_run_is_reported_and_the_others_complete(
    micro: Micro, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    other = micro.out_root.parent / "other"
    monkeypatch.setattr(local, "run", failing_for("centralized", local.run))
    experiment = micro.experiment.parent / "one.toml"
    experiment.write_text(MICRO.replace('name = "micro"', 'name = "one"').split("[variants")[0])
    assert main(["experiment", str(experiment), "--out-root", str(other), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 runs failed" in err and "default/centralized/seed0: no data for centralized" in err
    report = json.loads((other / "one" / "report.json").read_text())
    assert report["runs_complete"] == 1 and report["missing"] == ["default/centralized/seed0"]
    assert list(report["variants"]["default"]["methods"]) == ["worldlm"]


@pytest.mark.e2e
def test_an_interrupt_stops_the_experiment_and_keeps_a_report(
    micro: Micro, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(cfg: Config, out: Path, *args: Any, **kwargs: Any) -> dict[str, Any]:
        raise Interrupted("stopped after round 1")

    monkeypatch.setattr(local, "run", interrupted)
    out_root = micro.out_root.parent / "interrupted"
    assert main(["experiment", str(micro.experiment), "--out-root", str(out_root), "--quiet"]) == 130
    assert "run `worldlm experiment" in capsys.readouterr().err
    report = json.loads((out_root / "micro" / "report.json").read_text())
    assert report["runs_complete"] == 0 and len(report["missing"]) == 4
    assert "No complete run yet." in (out_root / "micro" / "report.md").read_text()


def write(tmp: Path, text: str) -> Path:
    (tmp / "base.toml").write_text('[[tree.nodes]]\nname = "root"\nsources = ["fr"]\n')
    path = tmp / "exp.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('base = "base.toml"\nmethod = ["fl"]', r"unknown key 'method' \(did you mean 'methods'\?\)"),
        ('base = "base.toml"', r"'methods' is missing"),
        ('base = "base.toml"\nmethods = ["worldln"]', r"'worldln' is not a known method \(did you mean 'worldlm'"),
        ('base = "base.toml"\nmethods = ["fl"]\nseeds = [0, 0]', r"'seeds' must be a non-empty list of distinct"),
        ('base = "base.toml"\nmethods = ["fl"]\nset = ["seed=3"]', r"'seed' is set per run by the experiment grid"),
        ('base = "missing.toml"\nmethods = ["fl"]', r"base config 'missing.toml' not found"),
        ('methods = ["fl"]', r"variants.default: no run config; give 'base'"),
        (
            'base = "base.toml"\nmethods = ["fl"]\n[variants.a]\nsett = []',
            r"variants.a: unknown key 'sett' \(did you mean 'set'\?\)",
        ),
        (
            'base = "base.toml"\nmethods = ["fl"]\n[variants.a]\nmethods = ["worldlm"]',
            r"method 'worldlm' is not one of the experiment's methods",
        ),
        ('base = "base.toml"\nmethods = ["fl"]\n[variants."a/b"]', r"variant name 'a/b' must be letters"),
        ('base = "base.toml"\nmethods = ["fl"\n', r"is not valid TOML"),
    ],
)
def test_malformed_experiment_files_are_one_clear_config_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_experiment(write(tmp_path, text))


def test_cli_reports_a_bad_experiment_in_one_line_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, 'base = "base.toml"\nmethods = ["fl"]\nset = ["train.rouns=3"]')
    assert main(["experiment", str(path), "--out-root", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown config key 'train.rouns' (did you mean 'rounds'?)" in err
    assert main(["experiment", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    assert not (tmp_path / "r").exists()


@pytest.mark.e2e
def test_dp_grid_runs_seed_by_seed_and_reports_epsilon(
    micro: Micro, runner_calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: DP on leaf fr, two methods × two seeds; the report is then rewritten with --report-only
    experiment = micro.experiment.parent / "dp.toml"
    text = MICRO.replace('name = "micro"', 'name = "dp"').replace('"centralized"', '"fl"').replace("[0]", "[0, 1]")
    variant = '[variants.dp]\nset = ["dp.nodes=[\'fr\']", "train.rounds=1"]\n'
    experiment.write_text(text.split("[variants")[0] + variant)
    # execute
    assert main(["experiment", str(experiment), "--out-root", str(micro.out_root), "--quiet"]) == 0
    report_md = micro.out_root / "dp" / "report.md"
    report_md.unlink()
    monkeypatch.setattr(local, "run", failing_for("worldlm", local.run))  # --report-only must train nothing
    assert main(["experiment", str(experiment), "--out-root", str(micro.out_root), "--quiet", "--report-only"]) == 0
    # assert: every method of seed 0 before seed 1; ε of fr per method, as the runs' summaries say
    assert runner_calls == [f"dp-dp-{m}-seed{s}" for s in (0, 1) for m in ("worldlm", "fl")]
    report = json.loads((micro.out_root / "dp" / "report.json").read_text())
    for method in ("worldlm", "fl"):
        privacy = report["variants"]["dp"]["methods"][method]["privacy"]
        runs = [micro.out_root / "dp" / "runs" / "dp" / method / f"seed{s}" / "summary.json" for s in (0, 1)]
        epsilons = [json.loads(p.read_text())["privacy"]["epsilon"]["fr"] for p in runs]
        assert privacy["epsilon"] == {"fr": pytest.approx(sum(epsilons) / 2)} and epsilons[0] > 0
        assert f"- {method}: fr ε = {privacy['epsilon']['fr']:.1f} (δ = {privacy['delta']:g}" in report_md.read_text()


@pytest.mark.e2e
def test_variants_seeds_and_methods_select_what_trains(micro: Micro, runner_calls: list[str]) -> None:
    assert rerun(micro) == 0  # complete whatever other tests left incomplete
    runner_calls.clear()
    for run_dir in micro.dir.glob("runs/*/worldlm/seed0"):
        (run_dir / "summary.json").unlink()
    assert rerun(micro, "--variants", "no-residuals", "--seeds", "0") == 0
    assert runner_calls == ["micro-no-residuals-worldlm-seed0"]
    report = json.loads((micro.dir / "report.json").read_text())
    assert report["missing"] == ["default/worldlm/seed0"]  # the report still covers the whole grid
    assert rerun(micro, "--variants", "nope") == 2 and rerun(micro, "--seeds", "7") == 2
    assert rerun(micro, "--seeds", "x") == 2
    assert rerun(micro) == 0 and runner_calls[-1] == "micro-default-worldlm-seed0"
    for run_dir in micro.dir.glob("runs/*/*/seed0"):
        (run_dir / "summary.json").unlink()
    runner_calls.clear()
    assert rerun(micro, "--methods", "centralized", "--variants", "default") == 0
    assert runner_calls == ["micro-default-centralized-seed0"] and rerun(micro, "--methods", "fl") == 2
    assert rerun(micro) == 0 and len(runner_calls) == 4


def test_a_diverged_run_reads_diverged_not_a_huge_number() -> None:
    from worldlm.experiments.markdown import _mean_std, _ratio

    assert _mean_std(math.exp(50.0), 0.0) == _mean_std(math.nan, math.nan) == "diverged"
    assert _mean_std(562.0, 74.9) == "562.00 ± 74.90" and _ratio(1.25) == "1.25×" and _ratio(math.nan) == "–"
    assert _mean_std(562.0, None) == "562.00" and _mean_std(math.nan, None) == "diverged"  # no spread to show


@pytest.mark.e2e
@pytest.mark.parametrize("damage", ["none", "corrupt-checkpoint", "no-checkpoint", "torn-metrics"])
def test_an_interrupted_run_continues_from_its_checkpoint(
    micro: Micro, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], damage: str
) -> None:
    """SIGTERM in round 0 of the first run; rerunning the command continues it from its checkpoint or, when
    that cannot be used, starts it again with a warning. Either way the result equals an uninterrupted run."""
    real_round = local.run_round
    fired: list[int] = []

    def round_then_sigterm(*args: Any, **kwargs: Any) -> None:
        real_round(*args, **kwargs)
        if not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the runner finishes this round, checkpoints, stops

    monkeypatch.setattr(local, "run_round", round_then_sigterm)
    out_root = micro.out_root.parent / f"resumed-{damage}"
    args = ["experiment", str(micro.experiment), "--out-root", str(out_root), "--quiet", "--variants", "default"]
    assert main(args) == 130
    run_dir = out_root / "micro" / "runs" / "default" / "worldlm" / "seed0"
    checkpoint = run_dir / "checkpoints" / "round-0001"
    assert not (run_dir / "summary.json").exists() and checkpoint.is_dir()
    if damage == "corrupt-checkpoint":
        (checkpoint / "state.safetensors").write_bytes(b"not a checkpoint")
    elif damage == "no-checkpoint":
        shutil.rmtree(run_dir / "checkpoints")
    elif damage == "torn-metrics":  # fewer records than the checkpoint counts (a crash before they reached disk)
        metrics = run_dir / "metrics.jsonl"
        metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:3]))
    resumed: list[bool] = []
    real_run = local.LocalRun.execute

    def recording(self: local.LocalRun, resume: bool = False, **kwargs: Any) -> dict[str, Any]:
        resumed.append(resume)
        return real_run(self, resume=resume, **kwargs)

    monkeypatch.setattr(local.LocalRun, "execute", recording)
    capsys.readouterr()
    assert main(args) == 0
    # the cut-off worldlm run is resumed when it has a checkpoint (then started again if unusable); centralized fresh
    expected = {"none": [True, False], "no-checkpoint": [False, False]}.get(damage, [True, False, False])
    assert resumed == expected
    assert ("starting the run again" in capsys.readouterr().out) == (len(expected) == 3)
    reference = micro.dir / "runs" / "default" / "worldlm" / "seed0"
    got, want = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    got.pop("wall_seconds"), want.pop("wall_seconds")
    assert got == want

    def records(d: Path) -> list[dict[str, Any]]:
        drop = ("seconds", "tokens_per_s")
        lines = (d / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in lines]

    assert records(run_dir) == records(reference)  # same records in the same order, none twice
    timing = [json.loads(line)["round"] for line in (run_dir / "timing.jsonl").read_text().splitlines()]
    assert timing == [0, 1]


@pytest.mark.e2e
def test_a_diverging_variant_stops_early_and_reads_diverged(micro: Micro) -> None:
    experiment = micro.experiment.parent / "div.toml"
    text = MICRO.replace('name = "micro"', 'name = "div"').replace('["worldlm", "centralized"]', '["worldlm"]')
    experiment.write_text(text.replace('set = ["federation.nu=0"]', 'set = ["train.lr_max=1e30"]'))
    out_root = micro.out_root.parent / "div"
    assert main(["experiment", str(experiment), "--out-root", str(out_root), "--quiet"]) == 0
    report = json.loads((out_root / "div" / "report.json").read_text())
    rows = {r["variant"]: r for r in report["runs"]}
    assert rows["default"]["diverged_round"] is None and rows["no-residuals"]["diverged_round"] == 0
    assert rows["no-residuals"]["sequential_steps"] * 2 == rows["default"]["sequential_steps"]
    report_md = (out_root / "div" / "report.md").read_text()
    assert "| no-residuals | worldlm | 0 | diverged in round 0, stopped |" in report_md


def test_a_variant_can_run_its_own_seeds(tmp_path: Path) -> None:
    text = 'base = "base.toml"\nmethods = ["fl"]\n[variants.a]\n[variants.b]\nseeds = [0, 3]\n'
    exp = load_experiment(write(tmp_path, text))
    assert exp.seeds == (0, 3) and exp.variants["a"].seeds == (0,)
    labels = [s.label for s in plan_runs(exp, tmp_path / "out")]
    assert labels == ["a/fl/seed0", "b/fl/seed0", "b/fl/seed3"]
    with pytest.raises(ConfigError, match=r"variants.b: 'seeds' must be a non-empty list"):
        load_experiment(write(tmp_path, text.replace("[0, 3]", "[]")))


REPO = Path(__file__).resolve().parents[2]


def _setting(cfg: Config, keys: list[str]) -> Any:
    node: Any = cfg
    for part in keys:
        node = getattr(node, part)
    return node


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_run_config_loads_with_a_valid_tree(path: Path) -> None:
    assert tree_from_config(load_config(path)).order


@pytest.mark.parametrize("path", sorted((REPO / "configs/experiments").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_experiment_resolves_every_run(path: Path, tmp_path: Path) -> None:
    # A typo in a shipped grid (a key, a method_set entry, a variant's base) fails here, not hours into it.
    exp = load_experiment(path)
    specs = plan_runs(exp, tmp_path)
    assert len(specs) == sum(len(v.methods) * len(v.seeds) for v in exp.variants.values())
    for spec in specs:
        assert (spec.cfg.method, spec.cfg.seed) == (spec.method, spec.seed)
        assert tree_from_config(spec.cfg).order
        variant_keys = {tuple(parse_override(item)[0]) for item in exp.variants[spec.variant].set}
        for item in exp.method_set.get(spec.method, ()):  # each per-method setting reaches its runs
            keys, value = parse_override(item)  # as the config loader reads it
            if tuple(keys) not in variant_keys:  # a variant's own setting comes after method_set
                assert _setting(spec.cfg, keys) == value, (spec.label, item)
