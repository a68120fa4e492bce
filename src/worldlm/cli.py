"""Command line: parse, load the config, call one function. Usage errors exit with code 2."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worldlm.errors import WorldLMError, quoted

if TYPE_CHECKING:
    from worldlm.config import Config


def _prepare(args: argparse.Namespace) -> int:
    from worldlm import config as C
    from worldlm.data.prepare import prepare_recipe, prepare_sources
    from worldlm.data.sources import SourceSpec
    from worldlm.experiments.console import console

    out = Path(args.out) if args.out else None
    log = (lambda msg: None) if args.quiet else (lambda msg: console.print(f"[dim]prepare[/] {msg}"))
    if args.recipe:
        vocab = args.vocab_size or C.DataConfig().vocab_size
        prepared = prepare_recipe(args.recipe, out or Path("data") / args.recipe, vocab_size=vocab, progress=log)
    else:
        if not args.config:
            raise C.ConfigError("prepare needs --recipe languages|domains or a CONFIG with data.recipe/data.sources")
        cfg = C.load_config(args.config, args.set)
        target = out or Path(cfg.data.path)
        if cfg.data.recipe:
            prepared = prepare_recipe(
                cfg.data.recipe, target, vocab_size=cfg.data.vocab_size, seed=cfg.seed, progress=log
            )
        elif cfg.data.sources:
            specs = {n: SourceSpec(s.path, s.format, s.field) for n, s in cfg.data.sources.items()}  # type: ignore[arg-type]
            prepared = prepare_sources(specs, target, vocab_size=cfg.data.vocab_size, seed=cfg.seed, progress=log)
        else:
            raise C.ConfigError(f"{args.config} has neither data.recipe nor [data.sources.*]; nothing to prepare")
    if not args.quiet:
        from worldlm.experiments.console import print_prepared

        print_prepared(prepared)
    return 0


def _out_dir(path: str | None, name: str, force: bool) -> Path:
    out = Path(path) if path else Path("runs") / name
    if out.exists() and any(out.iterdir()):
        if not force:
            raise WorldLMError(f"run directory {out} already exists; pass --force to overwrite or --out elsewhere")
        shutil.rmtree(out)
    return out


def _train(args: argparse.Namespace) -> int:
    from worldlm import config as C
    from worldlm.experiments.console import console
    from worldlm.runners.local import run

    cfg = C.load_config(args.config, args.set)
    if args.runner != "local":
        return _train_flower(args, cfg)
    if args.resume:
        out = Path(args.out) if args.out else Path("runs") / cfg.name
        if (out / "summary.json").is_file():
            console.print(f"{out} is already complete (summary.json exists); nothing to resume")
            return 0
        if not out.is_dir():
            raise WorldLMError(f"cannot resume: run directory {out} does not exist; drop --resume to start it")
    else:
        out = _out_dir(args.out, cfg.name, args.force)
    return _show_run(args, out, "", lambda progress: run(cfg, out, progress, resume=args.resume, warn=_warn))


def _warn(message: str) -> None:
    print(f"worldlm: {message}", file=sys.stderr)


def _warn_public_noise(cfg: Config) -> None:
    from worldlm.runners.planning import public_noise_warning

    warning = public_noise_warning(cfg)
    if warning is not None:
        _warn(warning)


def _show_run(args: argparse.Namespace, out: Path, engine: str, fn: Callable[[Any], dict[str, Any]]) -> int:
    """Run `fn(progress)` under the progress display, then print its summary (every runner)."""
    from worldlm.experiments.console import console, print_summary, progress_display

    with progress_display(quiet=args.quiet) as progress:
        summary = fn(progress)
    if not args.quiet:
        print_summary(summary)
        console.print(f"run directory: {out}" + (f" ({engine})" if engine else ""))
    return 0


def _train_flower(args: argparse.Namespace, cfg: Config) -> int:
    """`train --runner flower-sim|flower-inproc`: the same run through the Flower apps (runners/flower)."""
    from worldlm.runners.flower import require_flower

    if args.resume:
        raise WorldLMError(f"--resume is not available with --runner {args.runner}; rerun it or use --runner local")
    require_flower()
    from worldlm.runners.flower.engines import run_inprocess, run_simulation_engine

    out = _out_dir(args.out, cfg.name, args.force)
    engine = run_simulation_engine if args.runner == "flower-sim" else run_inprocess
    return _show_run(args, out, args.runner, lambda progress: engine(cfg, out, progress, timeout=args.node_timeout))


def _deploy_local(args: argparse.Namespace) -> int:
    from worldlm import config as C
    from worldlm.runners.flower import require_flower

    cfg = C.load_config(args.config, args.set)
    require_flower()
    _warn_public_noise(cfg)
    from worldlm.runners.flower.deploy import DeployOptions, deploy_local

    out = _out_dir(args.out, cfg.name, args.force)
    opts = DeployOptions(
        timeout=args.node_timeout,
        connect_timeout=args.connect_timeout,
        restart_dead=args.restart_dead,
        keep_state=args.keep_state,
        gpus=tuple(_gpu_list(args.gpus)),
        nested=args.nested,
        isolation=args.isolation,
    )
    return _show_run(args, out, "Flower deployment engine", lambda progress: deploy_local(cfg, out, progress, opts))


def _gpu_list(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(g) for g in text.split(",")]
    except ValueError:
        raise WorldLMError(f"--gpus takes GPU indices separated by commas, e.g. 0,1; got {quoted(text)}") from None


def _flower_app(args: argparse.Namespace) -> int:
    """Write the Flower app and run config(s) for a multi-host deployment (README "Running on Flower")."""
    from worldlm import config as C
    from worldlm.runners.flower.deploy import write_app, write_run_config

    cfg = C.load_config(args.config, args.set)
    _warn_public_noise(cfg)
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    app = write_app(dest)
    run_out = Path(args.run_out)
    if not args.nested:
        run_config = write_run_config(dest / "run-config.toml", cfg, run_out, args.node_timeout, args.connect_timeout)
        if not args.quiet:
            print(f"Flower app: {app}\nrun config: {run_config} (run directory on the SuperLink host: {run_out})")
            print(f"submit with: flwr run {app} <connection> --run-config {run_config} --stream")
        return 0
    import uuid

    from worldlm.runners.flower.nested import federation_dirs
    from worldlm.runners.flower.node import check_nested

    check_nested(cfg)
    root = next(iter(federation_dirs(cfg, run_out)))
    run_key = uuid.uuid4().hex[:12]  # the nodes' state key, the same if a region's run is resubmitted
    for q, part in federation_dirs(cfg, run_out).items():
        extra = {"federation": q, "run-key": run_key, "rejoin": 0}
        extra["bridge-socket"] = "" if q == root else str(Path(args.bridge_dir) / f"{q}.sock")
        path = write_run_config(
            dest / f"run-config-{q}.toml", cfg, part, args.node_timeout, args.connect_timeout, extra
        )
        if not args.quiet:
            print(f"federation {q}: run config {path} (its records: {part} on its coordinator's host)")
    if not args.quiet:
        print(f"Flower app: {app}; submit each region's run first, the root's ({root}) last:")
        print(
            f"  flwr run {app} <connection to that federation's SuperLink> --run-config {dest}/run-config-<node>.toml"
        )
        print(f"then join the parts: worldlm merge-federations {args.config} --out RUN_DIR PART_DIR...")
    return 0


def _merge_federations(args: argparse.Namespace) -> int:
    from worldlm import config as C
    from worldlm.runners.flower.nested import merge_federations

    cfg = C.load_config(args.config, args.set)
    parts = [Path(p) for p in args.parts]
    for p in parts:
        if not (p / "metrics.jsonl").is_file():
            raise WorldLMError(f"{p} is not a federation's part of a nested run (no metrics.jsonl); check the path")
    out = Path(args.out)
    summary = merge_federations(cfg, out, parts)
    if not args.quiet:
        print(f"wrote {out}/summary.json and metrics.jsonl; mean personalised perplexity {summary['mean_ppl']:.2f}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from worldlm import config as C
    from worldlm.experiments.comparison import compare_runs
    from worldlm.experiments.console import console, progress_display
    from worldlm.runners.local import run

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in C.METHODS]
    if not methods or unknown:
        raise C.ConfigError(f"--methods: unknown {', '.join(unknown) or '(empty)'}; valid: {', '.join(C.METHODS)}")
    base = C.load_config(args.config, args.set)
    root = _out_dir(args.out, base.name, args.force)
    summaries = {}
    for method in methods:
        cfg = C.load_config(args.config, [*args.set, f"method={method}", f"name={base.name}-{method}"])
        if not args.quiet:
            console.rule(f"[bold]{method}")
        with progress_display(quiet=args.quiet) as progress:
            summaries[method] = run(cfg, root / method, progress)
    compare_runs(summaries, root, quiet=args.quiet)
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from worldlm.config import ConfigError
    from worldlm.experiments.run import run_experiment

    variants = [v for v in (args.variants or "").split(",") if v]
    try:
        seeds = [int(k) for k in (args.seeds or "").split(",") if k]
    except ValueError as exc:
        raise ConfigError(
            f"--seeds takes comma-separated integers, e.g. --seeds 0,1 (got {quoted(args.seeds)})"
        ) from exc
    run_experiment(
        args.config,
        Path(args.out_root),
        args.set,
        quiet=args.quiet,
        report_only=args.report_only,
        variants=variants,
        seeds=seeds,
        methods=[m for m in (args.methods or "").split(",") if m],
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from worldlm.tools.hub import export_hf, run_nodes

    run = Path(args.run)
    if args.all == bool(args.node):
        raise WorldLMError("export needs --node NAME or --all (every node), not both")
    nodes = run_nodes(run) if args.all else [args.node]
    out = Path(args.out)
    for node in nodes:  # with --all: one model directory per node under --out
        written = export_hf(run, node, out / node if args.all else out, force=args.force)
        if not args.quiet:
            print(f"{node}: {written}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from worldlm.tools.hub import generate, load_node_model

    nodes = [n for n in args.node.split(",") if n]
    for node in nodes:  # several nodes: the same prompt and settings, one line each (⏎ marks a newline)
        text = generate(
            load_node_model(Path(args.run), node),
            args.prompt,
            args.max_new_tokens,
            args.temperature,
            args.top_k,
            args.seed,
        )
        print(f"--- {node}: {args.prompt}{text}".replace("\n", " ⏎ ") if len(nodes) > 1 else text)
    return 0


def _gpu_check(args: argparse.Namespace) -> int:
    from worldlm.tools.gpu_check import cli

    return cli(Path(args.out), args.dry_run, args.quiet)


def _bench(args: argparse.Namespace) -> int:
    from worldlm.experiments.console import console
    from worldlm.tools.bench import run_bench

    def say(msg: str) -> None:
        if not args.quiet:
            console.print(f"[dim]bench[/] {msg}")

    out = Path(args.out)
    run_bench(out, quick=args.quick, preset=args.preset, steps=args.steps, note=args.note, say=say)
    if not args.quiet:
        print((out / "results.md").read_text(encoding="utf-8"))
        console.print(f"results: {out / 'results.json'}, {out / 'results.md'}")
    return 0


Subparsers = argparse._SubParsersAction  # what add_subparsers() returns


def _common(p: argparse.ArgumentParser, config_required: bool = True) -> None:
    """The config file, --set overrides and --quiet, which most commands take."""
    p.add_argument("config", nargs=None if config_required else "?", help="TOML config file")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.rounds=8 (repeatable)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress display (CI)")


def _add_prepare(sub: Subparsers) -> None:
    p = sub.add_parser("prepare", help="build a prepared dataset (offline recipe or your own sources)")
    _common(p, config_required=False)
    p.add_argument("--recipe", choices=["languages", "domains"], help="offline corpus recipe")
    p.add_argument("--out", help="output directory (default: data/<recipe> or the config's data.path)")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size with --recipe (default 4096)")
    p.set_defaults(func=_prepare)


def _add_train(sub: Subparsers) -> None:
    p = sub.add_parser("train", help="train one method on the configured tree; writes runs/<name>/")
    _common(p)
    p.add_argument("--out", help="run directory (default: runs/<name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument("--resume", action="store_true", help="continue from the run directory's newest valid checkpoint")
    p.add_argument(
        "--runner",
        choices=["local", "flower-sim", "flower-inproc"],
        default="local",
        help="local: in-process (default); flower-sim: Flower's simulation engine; "
        "flower-inproc: the Flower apps over in-process messages (debugging)",
    )
    p.add_argument(
        "--node-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="Flower runners: a node that does not answer a message within this is left out of that round",
    )
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events (log.tensorboard)")
    p.set_defaults(func=_train)


def _add_deploy_local(sub: Subparsers) -> None:
    p = sub.add_parser(
        "deploy-local",
        help="run on Flower's deployment engine: a SuperLink and one SuperNode per tree node on 127.0.0.1",
    )
    _common(p)
    p.add_argument("--out", help="run directory (default: runs/<name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    p.add_argument(
        "--node-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="a node that does not answer a message within this is left out of that round (default 600)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for every SuperNode to connect (default 300)",
    )
    p.add_argument(
        "--restart-dead",
        action="store_true",
        help="restart a SuperNode that exits during the run (it rejoins at the next round)",
    )
    p.add_argument("--keep-state", action="store_true", help="keep the nodes' private state files (<out>/flower/state)")
    p.add_argument("--gpus", metavar="0,1", help="pin the SuperNodes to these GPUs round-robin (one per SuperNode)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events (log.tensorboard)")
    p.add_argument(
        "--nested",
        action="store_true",
        help="a SuperLink and coordinator per inner node: leaves connect only to their region, the root only "
        "sees its children",
    )
    p.add_argument(
        "--isolation",
        choices=["warm", "subprocess"],
        default="warm",
        help="warm: one long-lived ClientApp process per SuperNode (default); subprocess: Flower's own, a "
        "fresh process per message (same results, slower)",
    )
    p.set_defaults(func=_deploy_local)


def _add_flower_app(sub: Subparsers) -> None:
    p = sub.add_parser("flower-app", help="write the Flower app and run config for a multi-host deployment")
    _common(p)
    p.add_argument("--out", required=True, help="directory for worldlm-app/ and run-config.toml")
    p.add_argument("--run-out", required=True, help="run directory on the SuperLink host (an absolute path there)")
    p.add_argument("--node-timeout", type=float, default=600.0, metavar="SECONDS", help="per-message timeout")
    p.add_argument("--connect-timeout", type=float, default=300.0, metavar="SECONDS", help="wait for SuperNodes")
    p.add_argument("--nested", action="store_true", help="one run config per inner node (federations of federations)")
    p.add_argument(
        "--bridge-dir",
        default="/run/worldlm",
        help="--nested: where each region's coordinator opens its bridge socket on its host (default /run/worldlm)",
    )
    p.set_defaults(func=_flower_app)


def _add_merge_federations(sub: Subparsers) -> None:
    p = sub.add_parser("merge-federations", help="join the parts of a nested run into one run directory")
    _common(p)
    p.add_argument("parts", nargs="+", help="each federation's part (its coordinator's --run-out/federations/<node>)")
    p.add_argument("--out", required=True, help="the run directory to write (summary.json, metrics.jsonl)")
    p.set_defaults(func=_merge_federations)


def _add_compare(sub: Subparsers) -> None:
    p = sub.add_parser("compare", help="train several methods on the same tree and compare them")
    _common(p)
    p.add_argument("--methods", default="worldlm,fl", help="comma-separated methods (default: worldlm,fl)")
    p.add_argument("--out", help="directory for the runs and the comparison (default: runs/<name>)")
    p.add_argument("--force", action="store_true", help="overwrite an existing directory")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events (log.tensorboard)")
    p.set_defaults(func=_compare)


def _add_experiment(sub: Subparsers) -> None:
    p = sub.add_parser("experiment", help="run a grid of methods × seeds × variants; writes results/<name>/report.md")
    _common(p)
    p.add_argument("--out-root", default="results", help="parent of the experiment directory (default: results)")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing; rewrite the report from the runs complete so far"
    )
    p.add_argument("--variants", metavar="A,B", help="train only these variants (the report covers every run)")
    p.add_argument("--seeds", metavar="0,1", help="train only these seeds (the report covers every run)")
    p.add_argument("--methods", metavar="A,B", help="train only these methods (the report covers every run)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard events (log.tensorboard)")
    p.set_defaults(func=_experiment)


def _add_export(sub: Subparsers) -> None:
    p = sub.add_parser("export", help="write a run's node model as a Hugging Face Transformers (GPT-2) directory")
    p.add_argument("run", help="run directory (runs/<name>, or a compare/experiment run's directory)")
    p.add_argument("--node", help="the tree node whose model to export")
    p.add_argument("--all", action="store_true", help="export every node's model, each to OUT/<node>")
    p.add_argument("--out", required=True, help="model directory (with --all: their parent)")
    p.add_argument("--force", action="store_true", help="replace an existing directory")
    p.add_argument("--quiet", action="store_true", help="no output")
    p.set_defaults(func=_export)


def _add_generate(sub: Subparsers) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a node's final model")
    p.add_argument("run", help="run directory")
    p.add_argument("--node", required=True, help="the tree node whose model writes (several: fr,it,uk)")
    p.add_argument("--prompt", default="", help="text to continue (default: start a new document)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.set_defaults(func=_generate)


def _add_gpu_check(sub: Subparsers) -> None:
    p = sub.add_parser("gpu-check", help="measure a CUDA GPU (throughput, MFU, WorldLM vs FL); CPU dry run without one")
    p.add_argument("--out", default="bench/gpu", help="output directory (default: bench/gpu)")
    p.add_argument("--dry-run", action="store_true", help="the CPU dry run (tiny preset, a few steps) into --out")
    p.add_argument("--quiet", action="store_true", help="no output")
    p.set_defaults(func=_gpu_check)


def _add_bench(sub: Subparsers) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training efficiency, federation overhead, aggregation cost and memory; writes bench/results.*",
    )
    p.add_argument("--out", default="bench", help="output directory (default: bench)")
    p.add_argument("--quick", action="store_true", help="a seconds-long run at toy sizes (checks, not numbers)")
    p.add_argument("--preset", help="model preset of the training-efficiency rows (default: nano)")
    p.add_argument("--steps", type=int, help="timed steps per training setting (default: 20; --quick: 2)")
    p.add_argument("--note", default="", help="a remark recorded with the results, e.g. 'machine busy'")
    p.add_argument("--quiet", action="store_true", help="no output")
    p.set_defaults(func=_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="worldlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_train(sub)
    _add_deploy_local(sub)
    _add_flower_app(sub)
    _add_merge_federations(sub)
    _add_compare(sub)
    _add_experiment(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_gpu_check(sub)
    _add_bench(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    args = build_parser().parse_args(argv)
    if getattr(args, "tensorboard", False):
        args.set.append("log.tensorboard=true")
    try:
        return int(args.func(args))
    except WorldLMError as exc:
        print(f"worldlm: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # e.g. a full disk: files are written atomically, earlier results stay intact
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"worldlm: error: {exc.strerror or exc}{where}; free space or fix permissions and retry", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("worldlm: interrupted", file=sys.stderr)
        return 130
