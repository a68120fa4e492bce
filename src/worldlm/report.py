"""Human-facing output: progress display, result tables, comparison files and plots."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
    table = node_table(f"{summary['method']}: test perplexity", comparison_columns({summary["method"]: summary}))
    if "diverged_round" in summary:
        table.caption = f"[red]diverged in round {summary['diverged_round']}: stopped early"
    console.print(table)


def node_table(title: str, cols: list[Column]) -> Table:
    """A node × column table of test perplexities with a bold mean ± std row (the terminal's comparison)."""
    table = Table(title=title)
    table.add_column("node")
    for c in cols:
        table.add_column(c.label, justify="right")
    for node in cols[0].nodes:
        table.add_row(node, *[f"{c.nodes[node]:.2f}" for c in cols])
    table.add_row("[bold]mean ± std", *[f"[bold]{c.mean:.2f} ± {c.std:.2f}" for c in cols])
    return table


@dataclass(frozen=True)
class Column:
    """One column of a comparison: a method, or its "+ ft" reading (each client after its last local steps)."""

    label: str
    nodes: dict[str, float]
    mean: float
    std: float
    summary: dict[str, Any]


def comparison_columns(summaries: dict[str, dict[str, Any]]) -> list[Column]:
    """Each method's delivered model, then, for FL and HierFAVG judged by their global model, its "+ ft" column."""
    columns = []
    for m, s in summaries.items():
        columns.append(Column(m, {n: v["ppl"] for n, v in s["nodes"].items()}, s["mean_ppl"], s["std_ppl"], s))
        if "mean_ppl_ft" in s:
            ft = {n: v["ppl_ft"] for n, v in s["nodes"].items()}
            columns.append(Column(f"{m} + ft", ft, s["mean_ppl_ft"], s["std_ppl_ft"], s))
    return columns


def comparison_markdown(summaries: dict[str, dict[str, Any]], reference: str) -> str:
    """Per-node table (one column per method and "+ ft" reading), mean ± std, and each one's ratio to the reference."""
    cols = comparison_columns(summaries)
    ref = summaries[reference]["mean_ppl"]
    lines = ["| node | " + " | ".join(c.label for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for node in cols[0].nodes:
        lines.append(f"| {node} | " + " | ".join(f"{c.nodes[node]:.2f}" for c in cols) + " |")
    lines.append("| **mean ± std** | " + " | ".join(f"**{c.mean:.2f} ± {c.std:.2f}**" for c in cols) + " |")
    lines.append(f"| mean / {reference} | " + " | ".join(f"{c.mean / ref:.2f}×" for c in cols) + " |")
    for label, key in (
        ("rounds", "rounds"),
        ("sequential steps", "sequential_steps"),
        ("training tokens", "train_tokens"),
    ):
        lines.append(f"| {label} | " + " | ".join(f"{c.summary.get(key, 0):,}" for c in cols) + " |")
    lines.append("| wall time (s) | " + " | ".join(f"{c.summary['wall_seconds']:.0f}" for c in cols) + " |")
    notes = [
        "",
        "Each method judged by what it delivers to a node (`eval.model = deliverable`): FL and HierFAVG by their "
        "global model, WorldLM, FedPer and local by each node's own model; `+ ft` is the same FL/HierFAVG run with "
        "each client judged after its last local steps (FL + local fine-tuning). Training tokens: all nodes "
        "together (compute); every method runs the same sequential steps.",
    ]
    return "\n".join(lines + notes) + "\n"


def val_curves(run_dir: Path) -> dict[str, list[tuple[int, int, float]]]:
    """Validation perplexity per node: (sequential step, training tokens of all nodes so far, ppl); metrics.jsonl."""
    curves: dict[str, list[tuple[int, int, float]]] = {}
    tokens = 0  # a round's evaluation follows its training
    with (run_dir / "metrics.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("split") == "train":
                tokens += int(rec["tokens"])
            elif rec.get("split") == "val":
                curves.setdefault(rec["node"], []).append((rec["step"], tokens, rec["ppl"]))
    return curves


def plot_val_curves(runs: dict[str, Path], path: Path) -> None:
    """Mean validation perplexity over nodes, one line per method, against sequential steps (paper Fig. 3)
    and against compute (training tokens of all nodes together)."""
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, run_dir in runs.items():
        curves = val_curves(run_dir)
        first = next(iter(curves.values()))
        mean = np.mean([[p for _, _, p in c] for c in curves.values()], axis=0)
        axes[0].plot([s for s, _, _ in first], mean, marker="o", label=method)
        axes[1].plot([t for _, t, _ in first], mean, marker="o", label=method)
    for ax, xlabel in zip(axes, ("sequential steps", "training tokens of all nodes (compute)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean validation perplexity over nodes")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


SUMMARY_KEYS = ("mean_ppl", "std_ppl", "mean_ppl_ft", "std_ppl_ft", "nodes", "train_tokens")


def compare_runs(summaries: dict[str, dict[str, Any]], root: Path, quiet: bool) -> str:
    """Write comparison.md/.json and val_ppl.png under `root`; print the table. Returns the markdown."""
    reference = "worldlm" if "worldlm" in summaries else next(iter(summaries))
    md = comparison_markdown(summaries, reference)
    atomic_write_text(root / "comparison.md", md)
    atomic_write_json(
        root / "comparison.json",
        {
            m: {
                k: s[k] for k in ("mean_ppl", "std_ppl", "mean_ppl_ft", "std_ppl_ft", "nodes", "train_tokens") if k in s
            }
            for m, s in summaries.items()
        },
    )
    plot_val_curves({m: root / m for m in summaries}, root / "val_ppl.png")
    if not quiet:
        cols = comparison_columns(summaries)
        table = node_table("test perplexity per node (lower is better)", cols)
        ref = summaries[reference]["mean_ppl"]
        table.add_row(f"mean / {reference}", *[f"{c.mean / ref:.2f}×" for c in cols])
        table.caption = "+ ft: the same run, each client judged after its last local steps (FL + local fine-tuning)"
        console.print(table)
        console.print(f"comparison: {root / 'comparison.md'}, plot: {root / 'val_ppl.png'}")
    return md
