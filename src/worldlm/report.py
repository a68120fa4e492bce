"""Human-facing output: progress display, result tables, comparison files and plots."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from worldlm.data.prepared import Prepared
from worldlm.io import atomic_write_bytes, atomic_write_json, atomic_write_text

console = Console()


@contextlib.contextmanager
def progress_display(quiet: bool) -> Iterator[Any]:
    """Yield the runner's progress callback: a live bar with node, loss and tokens/s (or nothing)."""
    if quiet:
        yield None
        return
    bar = Progress(
        TextColumn("[bold]{task.fields[method]}[/]"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps"),
        TextColumn("node [cyan]{task.fields[node]}[/] loss {task.fields[loss]:.3f} {task.fields[tps]:,.0f} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
    task: dict[str, Any] = {"id": None, "t": time.perf_counter(), "method": ""}

    def update(event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "start":
            task["method"] = event["method"]
            task["id"] = bar.add_task(
                "train",
                completed=event.get("done_steps", 0),
                total=event["total_steps"],
                method=event["method"],
                node="-",
                loss=float("nan"),
                tps=0.0,
            )
            task["t"], task["tps"] = time.perf_counter(), 0.0
        elif kind == "step":
            now = time.perf_counter()
            tps = event.get("tokens", 0) / max(now - task["t"], 1e-9)
            task["t"] = now
            task["tps"] = tps if not task.get("tps") else 0.9 * task["tps"] + 0.1 * tps  # smoothed
            bar.update(task["id"], advance=1, node=event["node"], loss=event["loss"], tps=task["tps"])
        elif kind == "eval":
            ppl = [r["ppl"] for r in event["results"].values()]
            bar.console.print(
                f"  round {event['round'] + 1}: mean {event['split']} perplexity "
                f"{np.mean(ppl):.2f} over {len(ppl)} nodes"
            )

    with bar:
        yield update


def print_prepared(prepared: Prepared) -> None:
    table = Table(title=f"prepared data: {prepared.root} (vocab {prepared.vocab_size})")
    table.add_column("source")
    for split in ("train", "val", "test"):
        table.add_column(f"{split} chars", justify="right")
        table.add_column(f"{split} tokens", justify="right")
    for src in prepared.sources:
        row = [src]
        for split in ("train", "val", "test"):
            info = prepared.splits[src][split]
            row += [f"{info.chars:,}", f"{info.tokens:,}"]
        table.add_row(*row)
    console.print(table)


def print_summary(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['method']}: personalised test perplexity")
    table.add_column("node")
    table.add_column("test ppl", justify="right")
    for node, res in summary["nodes"].items():
        table.add_row(node, f"{res['ppl']:.2f}")
    table.add_row("[bold]mean ± std", f"[bold]{summary['mean_ppl']:.2f} ± {summary['std_ppl']:.2f}")
    if "diverged_round" in summary:
        table.caption = f"[red]diverged in round {summary['diverged_round']}: stopped early"
    console.print(table)


def comparison_markdown(summaries: dict[str, dict[str, Any]], reference: str) -> str:
    """Per-node table (one column per method), mean ± std, and each method's ratio to the reference."""
    methods = list(summaries)
    nodes = list(next(iter(summaries.values()))["nodes"])
    ref = summaries[reference]["mean_ppl"]
    lines = ["| node | " + " | ".join(methods) + " |", "|---|" + "---:|" * len(methods)]
    for node in nodes:
        lines.append(f"| {node} | " + " | ".join(f"{summaries[m]['nodes'][node]['ppl']:.2f}" for m in methods) + " |")
    lines.append(
        "| **mean ± std** | "
        + " | ".join(f"**{summaries[m]['mean_ppl']:.2f} ± {summaries[m]['std_ppl']:.2f}**" for m in methods)
        + " |"
    )
    lines.append(
        f"| mean / {reference} | " + " | ".join(f"{summaries[m]['mean_ppl'] / ref:.2f}×" for m in methods) + " |"
    )
    lines.append("| sequential steps | " + " | ".join(str(summaries[m]["sequential_steps"]) for m in methods) + " |")
    lines.append("| wall time (s) | " + " | ".join(f"{summaries[m]['wall_seconds']:.0f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


def val_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation perplexity per node against sequential steps, read from metrics.jsonl."""
    curves: dict[str, list[tuple[int, float]]] = {}
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("split") == "val":
                curves.setdefault(rec["node"], []).append((rec["step"], rec["ppl"]))
    return curves


def plot_val_curves(runs: dict[str, Path], path: Path) -> None:
    """Mean validation perplexity over nodes against sequential steps, one line per method (paper Fig. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, run_dir in runs.items():
        curves = val_curves(run_dir)
        steps = [s for s, _ in next(iter(curves.values()))]
        mean = np.mean([[p for _, p in c] for c in curves.values()], axis=0)
        ax.plot(steps, mean, marker="o", label=method)
    ax.set_xlabel("sequential steps")
    ax.set_ylabel("mean validation perplexity over nodes")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def compare_runs(summaries: dict[str, dict[str, Any]], root: Path, quiet: bool) -> str:
    """Write comparison.md/.json and val_ppl.png under `root`; print the table. Returns the markdown."""
    reference = "worldlm" if "worldlm" in summaries else next(iter(summaries))
    md = comparison_markdown(summaries, reference)
    atomic_write_text(root / "comparison.md", md)
    atomic_write_json(
        root / "comparison.json",
        {m: {"mean_ppl": s["mean_ppl"], "std_ppl": s["std_ppl"], "nodes": s["nodes"]} for m, s in summaries.items()},
    )
    plot_val_curves({m: root / m for m in summaries}, root / "val_ppl.png")
    if not quiet:
        table = Table(title="personalised test perplexity per node (lower is better)")
        table.add_column("node")
        for m in summaries:
            table.add_column(m, justify="right")
        for node in next(iter(summaries.values()))["nodes"]:
            table.add_row(node, *[f"{s['nodes'][node]['ppl']:.2f}" for s in summaries.values()])
        table.add_row(
            "[bold]mean ± std",
            *[f"[bold]{s['mean_ppl']:.2f} ± {s['std_ppl']:.2f}" for s in summaries.values()],
        )
        ref = summaries[reference]["mean_ppl"]
        table.add_row(f"mean / {reference}", *[f"{s['mean_ppl'] / ref:.2f}×" for s in summaries.values()])
        console.print(table)
        console.print(f"comparison: {root / 'comparison.md'}, plot: {root / 'val_ppl.png'}")
    return md
