"""The terminal: the live progress display of a run, the prepared-data table, per-node result tables."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from worldlm.data.prepared import Prepared

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
