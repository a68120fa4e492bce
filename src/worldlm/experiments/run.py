"""Running an experiment: every incomplete run of its grid through the in-process runner, then its report.

A run whose summary.json exists and whose config.toml equals the resolved config is skipped; one with the
same config.toml but no summary.json (interrupted) continues from its newest valid checkpoint, exactly as
if it had not stopped; any other run directory there is stale and redone. At the end (also after failures
or an interrupt) `report.md`, `report.json` and the plots are regenerated from the complete runs.
"""

from __future__ import annotations

import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from worldlm import config as C
from worldlm.data.prepared import load_prepared
from worldlm.errors import WorldLMError
from worldlm.experiments.console import console, progress_display
from worldlm.experiments.report import write_report
from worldlm.experiments.spec import RunSpec, is_complete, load_experiment, plan_runs, select_runs
from worldlm.runners import local
from worldlm.runners.checkpoint import CannotResume, checkpoint_dirs
from worldlm.runners.resume import Interrupted


class ExperimentFailed(WorldLMError):
    """Some runs failed; the others completed and the report was written from them."""

    exit_code = 1


@dataclass(frozen=True)
class ExperimentResult:
    report: Path
    ran: int
    skipped: int


def check_data(specs: Sequence[RunSpec]) -> None:
    """Fail fast (DataError) when a prepared directory is missing, instead of failing every run."""

    for path in dict.fromkeys(s.cfg.data.path for s in specs):
        load_prepared(path)


def command_line(path: Path, out_root: Path, overrides: Sequence[str]) -> str:
    """The command that reproduces the experiment, as recorded in the report."""
    args = ["worldlm", "experiment", str(path)]
    for item in overrides:
        args += ["--set", item]
    if out_root != Path("results"):
        args += ["--out-root", str(out_root)]
    return shlex.join(args)


def _resumable(spec: RunSpec) -> bool:
    """An interrupted run of this very config: config.toml matches and a checkpoint directory exists."""

    return C.same_config(spec.dir / "config.toml", spec.cfg) and bool(checkpoint_dirs(spec.dir / "checkpoints"))


def _run_one(spec: RunSpec, quiet: bool) -> None:
    """Train one cell: continue an interrupted run from its checkpoint, else start it clean."""

    def warn(message: str) -> None:
        console.print(f"[yellow]{spec.label}: {message}[/]")

    with progress_display(quiet=quiet) as progress:
        if _resumable(spec):
            try:
                local.run(spec.cfg, spec.dir, progress, resume=True, warn=warn)
                return
            except CannotResume as exc:
                warn(f"starting the run again: {exc}")
        if spec.dir.exists():  # stale or unusable: the runner appends to metrics, so start clean
            shutil.rmtree(spec.dir)
        local.run(spec.cfg, spec.dir, progress)


def _run_grid(specs: Sequence[RunSpec], quiet: bool) -> tuple[int, int, list[str]]:
    """Run every incomplete cell; a WorldLMError fails that run only. Returns (ran, skipped, failures).

    Seed by seed (every variant and method of the first seed, then the next), so an experiment cut
    short still has complete columns to compare.
    """

    seeds = list(dict.fromkeys(s.seed for s in specs))
    ran, skipped, failures = 0, 0, []
    for k, spec in enumerate(sorted(specs, key=lambda s: seeds.index(s.seed)), 1):
        if is_complete(spec):
            skipped += 1
            continue
        if not quiet:
            console.rule(f"[bold][{k}/{len(specs)}] {spec.label}")
        try:
            _run_one(spec, quiet)
            ran += 1
        except Interrupted:
            raise
        except WorldLMError as exc:
            failures.append(f"{spec.label}: {exc}")
            console.print(f"[red]run {spec.label} failed:[/] {exc}")
    return ran, skipped, failures


def run_experiment(
    path: str | Path,
    out_root: Path = Path("results"),
    overrides: Sequence[str] = (),
    quiet: bool = False,
    report_only: bool = False,
    variants: Sequence[str] = (),
    seeds: Sequence[int] = (),
    methods: Sequence[str] = (),
) -> ExperimentResult:
    """Run the grid (skipping complete runs), then write report.md/report.json and the plots.

    `report_only`: train nothing, only (re)write the report from the runs complete so far.
    `variants` / `seeds` / `methods`: train only those cells (a long experiment in parts); the
    report still covers every complete run of the whole grid and lists the missing ones.
    """

    exp = load_experiment(path)
    out_dir = out_root / exp.name
    specs = plan_runs(exp, out_dir, overrides)
    check_data(specs)
    command = command_line(Path(path), out_root, overrides)
    if report_only:
        report = write_report(exp, specs, out_dir, command)
        complete = sum(map(is_complete, specs))
        if not quiet:
            console.print(f"report of {complete} complete runs of {len(specs)}: {report}")
        return ExperimentResult(report, 0, complete)
    try:
        ran, skipped, failures = _run_grid(select_runs(exp, specs, variants, seeds, methods), quiet)
    except Interrupted as exc:  # the runner stopped at a round boundary: keep what is complete
        write_report(exp, specs, out_dir, command)
        raise Interrupted(f"experiment stopped; run `{command}` again to continue (complete runs are kept)") from exc
    report = write_report(exp, specs, out_dir, command)
    if not quiet:
        console.print(f"{ran} runs trained, {skipped} already complete; report: {report}")
    if failures:
        raise ExperimentFailed(
            f"{len(failures)} of {len(specs)} runs failed (report {report} covers the complete ones):\n  "
            + "\n  ".join(failures)
        )
    return ExperimentResult(report, ran, skipped)
