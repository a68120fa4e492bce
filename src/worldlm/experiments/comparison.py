"""`worldlm compare`: several methods' runs of one config side by side (comparison.md/.json, val_ppl.png)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from worldlm.experiments import plots
from worldlm.experiments.console import comparison_columns, console, node_table
from worldlm.files import atomic_write_json, atomic_write_text


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


SUMMARY_KEYS = ("mean_ppl", "std_ppl", "mean_ppl_ft", "std_ppl_ft", "nodes", "train_tokens")


def compare_runs(summaries: dict[str, dict[str, Any]], root: Path, quiet: bool) -> str:
    """Write comparison.md/.json and val_ppl.png under `root`; print the table. Returns the markdown."""
    reference = "worldlm" if "worldlm" in summaries else next(iter(summaries))
    md = comparison_markdown(summaries, reference)
    atomic_write_text(root / "comparison.md", md)
    kept = {m: {k: s[k] for k in SUMMARY_KEYS if k in s} for m, s in summaries.items()}
    atomic_write_json(root / "comparison.json", kept)
    plots.method_curves({m: val_curves(root / m) for m in summaries}, root / "val_ppl.png")
    if not quiet:
        cols = comparison_columns(summaries)
        table = node_table("test perplexity per node (lower is better)", cols)
        ref = summaries[reference]["mean_ppl"]
        table.add_row(f"mean / {reference}", *[f"{c.mean / ref:.2f}×" for c in cols])
        table.caption = "+ ft: the same run, each client judged after its last local steps (FL + local fine-tuning)"
        console.print(table)
        console.print(f"comparison: {root / 'comparison.md'}, plot: {root / 'val_ppl.png'}")
    return md
