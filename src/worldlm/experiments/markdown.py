"""The experiment report's markdown (report.md): report.json rendered as tables.

Pure: takes the report dict that `experiment_report.write_report` builds and returns text; every number
it prints is already in report.json.
"""

from __future__ import annotations

import math
from typing import Any

FT = " + ft"  # the "+ local fine-tuning" rows: each client's model after its last local steps (ppl_ft)

DIVERGED = 1e9  # perplexities this large (evaluate caps the loss at 50: e^50 ≈ 5e21) or NaN mean a diverged model


def _ppl(x: float) -> str:
    return f"{x:.2f}" if math.isfinite(x) and x < DIVERGED else "diverged"


def _mean_std(mean: float, std: float | None) -> str:
    """`mean ± std`; the mean alone where there is no spread to show (std None)."""
    if _ppl(mean) == "diverged" or std is None:
        return _ppl(mean)
    return f"{_ppl(mean)} ± {_ppl(std)}"


def _seed_std(s: dict[str, Any]) -> float | None:
    """The std over seeds of a method's per-seed means, or None with one seed: no spread to show."""
    return s["std_over_seeds"] if len(s["seeds"]) > 1 else None


def _ratio(x: float) -> str:
    return f"{x:.2f}×" if math.isfinite(x) and x < DIVERGED else "–"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _overview_md(report: dict[str, Any]) -> list[str]:
    variants = list(report["variants"])
    methods = list(dict.fromkeys(m for v in report["variants"].values() for m in v["methods"]))
    first = report["variants"][variants[0]]["methods"]
    lines = [
        "## Variants side by side",
        "",
        "Mean ± std over seeds (no spread where a cell has one seed); in brackets the ratio to the same method "
        f"in `{variants[0]}`.",
        "",
        "| method | " + " | ".join(f"`{v}`" for v in variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for m in methods:
        cells = []
        for v in variants:
            s = report["variants"][v]["methods"].get(m)
            same = s and m in first and v != variants[0] and _ppl(s["mean_ppl"]) != "diverged"
            ratio = f" ({_ratio(s['mean_ppl'] / first[m]['mean_ppl'])})" if same else ""
            cells.append(f"{_mean_std(s['mean_ppl'], _seed_std(s))}{ratio}" if s else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Validation perplexity (mean over nodes and seeds), the one every setting is chosen on; **bold**: each "
        "method's lowest.",
        "",
        "| method | " + " | ".join(f"`{v}`" for v in variants) + " |",
        "|---|" + "---:|" * len(variants),
    ]
    for m in methods:
        val = {v: s["val_ppl"] for v in variants if (s := report["variants"][v]["methods"].get(m))}
        best = min((x for x in val.values() if _ppl(x) != "diverged"), default=None)
        cells = [("–" if v not in val else f"**{_ppl(val[v])}**" if val[v] == best else _ppl(val[v])) for v in variants]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    if report["overview_plot"]:
        lines += ["", f"![validation perplexity by variant]({report['overview_plot']})"]
    return [*lines, ""]


def _variant_md(name: str, v: dict[str, Any], n_seeds: int) -> list[str]:
    lines = [f"## Variant `{name}`", ""]
    if v["description"]:
        lines += [v["description"], ""]
    overrides = ", ".join(f"`{_cell(s)}`" for s in v["set"]) or "none"
    lines += [f"Run config `{v['base']}`; variant overrides: {overrides}.", ""]
    stats = v["methods"]
    if not stats:
        return [*lines, "No complete run yet.", ""]
    lines += [
        "| method | mean ppl | ± over nodes | ± over seeds | / worldlm | val ppl | val ppl at equal compute "
        "| seeds | rounds | sequential steps | training tokens | wall s / run |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m, s in stats.items():
        ratio = _ratio(s["ratio_to_worldlm"]) if s["ratio_to_worldlm"] is not None else "–"
        seed_std = _seed_std(s)
        over_seeds = _ppl(seed_std) if seed_std is not None else "–"
        at_compute = s.get("val_ppl_at_equal_compute")
        lines.append(
            f"| {m} | **{_ppl(s['mean_ppl'])}** | {_ppl(s['std_over_nodes'])} | {over_seeds} | {ratio} | "
            f"{_ppl(s.get('val_ppl', math.nan))} | {_ppl(at_compute) if at_compute is not None else '–'} | "
            f"{len(s['seeds'])}/{n_seeds} | {s.get('rounds', '–')} | {s['sequential_steps']} | "
            f"{s.get('train_tokens', 0):,} | {s['wall_seconds_mean']:.0f} |"
        )
    if v.get("equal_compute_tokens"):
        lines += [
            "",
            f"*val ppl*: validation perplexity at the end (mean over nodes and seeds; settings are chosen on it). "
            f"*val ppl at equal compute*: on each method's validation curve against training tokens of all nodes, "
            f"read at {v['equal_compute_tokens']:,} tokens (WorldLM's compute where it ran, else the least any "
            "method used; '–': the run ended with less). A run read before its end still has its learning rate "
            "near the peak, not decayed, which puts it behind a run whose whole schedule ends at that compute; "
            "the parallel schedule compares at equal compute by construction. "
            f'*{FT.strip()}*: the same runs, each client judged after its last local steps ("+ local fine-tuning").',
        ]
    lines += _privacy_md(stats)
    nodes = list(dict.fromkeys(n for s in stats.values() for n in s["nodes"]))
    lines += [
        "",
        "Per node (mean over seeds):",
        "",
        "| node | " + " | ".join(stats) + " |",
        "|---|" + "---:|" * len(stats),
    ]
    for n in nodes:
        lines.append(
            f"| {n} | " + " | ".join(_ppl(s["nodes"][n]) if n in s["nodes"] else "–" for s in stats.values()) + " |"
        )
    captions = {
        "val_ppl": "validation perplexity per method",
        "val_nodes": "validation perplexity per node",
        "attention": "WorldLM attention coefficients",
        "residual_flows": "WorldLM residual routing",
        "mixture": "data mixture of each node",
        "val_ppl_compute": "validation perplexity against compute",
        "trace": "one round traced",
    }
    lines += _passes_md(stats) + _clean_md(stats) + _attention_md(v.get("attention", []))
    for kind, path in v["plots"].items():
        lines += ["", f"![{captions[kind]}]({path})"]
    return [*lines, *_trace_md(v.get("trace", {})), ""]


def _passes_md(stats: dict[str, dict[str, Any]]) -> list[str]:
    """Per trainer and method: passes over the training tokens it holds (> 1: it has seen them before)."""
    passes = {m: s["data_passes"] for m, s in stats.items() if s.get("data_passes")}
    if not passes:
        return []
    trainers = list(dict.fromkeys(n for p in passes.values() for n in p))
    lines = [
        "",
        "Passes over each trainer's training data (its training tokens ÷ the tokens it holds, mean over seeds; "
        "above 1 it has seen its data before and can overfit it):",
        "",
        "| trainer | " + " | ".join(passes) + " |",
        "|---|" + "---:|" * len(passes),
    ]
    for n in trainers:
        lines.append(f"| {n} | " + " | ".join(f"{p[n]:.2f}" if n in p else "–" for p in passes.values()) + " |")
    return lines


def _clean_md(stats: dict[str, dict[str, Any]]) -> list[str]:
    """With poisoned or DP nodes in the experiment: the mean over the nodes no variant attacks or privatises."""
    clean = {m: s["mean_ppl_clean"] for m, s in stats.items() if s.get("mean_ppl_clean") is not None}
    if not clean:
        return []
    cells = ", ".join(f"{m} **{_ppl(x)}**" for m, x in clean.items())
    what = "Mean test perplexity over the nodes that no variant attacks or privatises (mean over seeds)"
    return ["", f"{what}: {cells}."]


def _targeted_md(rows: list[dict[str, Any]]) -> list[str]:
    """The privatised (or poisoned) nodes and the others, each against the same variant without doing so."""
    if not rows:
        return []
    lines = [
        "## Privatised or attacked nodes and the others",
        "",
        "Test perplexity, mean over the nodes (per-node means over seeds); in brackets the ratio to the same "
        "nodes and method in the reference variant (the same settings, no node privatised or attacked).",
        "",
        "| variant | method | nodes | on those nodes | on the other nodes | reference |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        cells = []
        for part in ("targeted", "others"):
            ref = r[f"{part}_reference"]
            ratio = f" ({_ratio(r[part] / ref)})" if ref and _ppl(r[part]) != "diverged" else ""
            cells.append(f"{_ppl(r[part])}{ratio}")
        reference = f"`{r['reference']}`" if r["reference"] else "–"
        lines.append(
            f"| `{r['variant']}` | {r['method']} | {', '.join(r['nodes'])} | {cells[0]} | {cells[1]} | {reference} |"
        )
    return [*lines, ""]


def _attention_md(rows: list[dict[str, Any]]) -> list[str]:
    """WorldLM's attention at each parent: how far each child's share is from uniform."""
    if not rows:
        return []
    lines = [
        "",
        "WorldLM attention at each parent (mean over seeds): each child's share of its parent's own attention "
        "over the children (self-weight left out, renormalised), in the last round and at its lowest after "
        "round 1, against the uniform 1/C; *outlier rounds*: aggregations reported as an `outlier`.",
        "",
        "| parent → child | share, last round | lowest share | uniform | outlier rounds |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['edge']} | {r['share_last']:.3f} | {r['share_min']:.3f} | {r['uniform']:.3f} | "
            f"{r['outlier_rounds']:.1f} |"
        )
    return lines


def _trace_md(traces: dict[str, list[dict[str, Any]]]) -> list[str]:
    """eval.trace_round: the travelling model's validation loss after each step of the round (what, in order)."""
    if not traces:
        return []
    lines = [
        "",
        "One round traced (`eval.trace_round`; mean over seeds): validation loss of the model that travels, as the "
        "round starts (`start`), once a node has taken its parent's model (`received`, steps 2-3: the parent's "
        "backbone, key layers mixed with the parent's and the residuals queued for it), after each local training "
        "(`trained`) and each aggregation (`aggregated`), on every node's validation windows and on the node's own.",
        "",
        "| method | step | node | at | val loss, all nodes | val loss, own | seeds |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for m, points in traces.items():
        for p in points:
            own = f"{p['val_loss']:.3f}" if p["val_loss"] is not None else "–"
            lines.append(
                f"| {m} | {p['step']} | {p['node']} | {p['what']} | {p['val_loss_all']:.3f} | {own} | {p['seeds']} |"
            )
    return lines


def _privacy_md(stats: dict[str, dict[str, Any]]) -> list[str]:
    """Privacy spent by each method's DP nodes (dp-accounting RDP; summary.json "privacy")."""
    lines = []
    for m, s in stats.items():
        p = s.get("privacy")
        if p is None:
            continue
        stopped = f"; stopped at the budget: {', '.join(p['stopped'])}" if p["stopped"] else ""
        if isinstance(p["sigma"], dict):  # record-level: each node's own calibrated σ
            spent = ", ".join(f"{n} ε = {eps:.1f} (σ = {p['sigma'][n]:.3g})" for n, eps in p["epsilon"].items())
            lines.append(f"- {m}: record-level DP-SGD, {spent} (δ = {p['delta']:g}{stopped})")
            continue
        spent = ", ".join(f"{n} ε = {eps:.1f}" for n, eps in p["epsilon"].items())
        lines.append(f"- {m}: {spent} (δ = {p['delta']:g}, σ = {p['sigma']:g}{stopped})")
    if not lines:
        return []
    return ["", "Privacy spent per DP node (mean over seeds; RDP accountant of dp-accounting):", "", *lines]


def _runs_md(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Runs",
        "",
        "| variant | method | seed | mean ± std over nodes | sequential steps | wall s | directory |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        result = _mean_std(r["mean_ppl"], r["std_ppl"])
        if r.get("diverged_round") is not None:
            result = f"diverged in round {r['diverged_round']}, stopped"
        lines.append(
            f"| {r['variant']} | {r['method']} | {r['seed']} | {result} | "
            f"{r['sequential_steps']} | {r['wall_seconds']:.0f} | [{r['dir']}]({r['dir']}) |"
        )
    if report["missing"]:
        lines += ["", "Not complete: " + ", ".join(f"`{m}`" for m in report["missing"]) + "."]
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    seeds = report["seeds"]
    common = ", ".join(f"`{_cell(s)}`" for s in report["set"]) or "none"
    lines = [f"# Experiment `{report['name']}`", ""]
    if report["description"]:
        lines += [report["description"], ""]
    lines += [
        f"- command: `{report['command']}`",
        f"- date: {report['date']}",
        f"- experiment file: `{report['experiment']}`; seeds: {', '.join(map(str, seeds))}; "
        f"overrides for every run: {common}",
        f"- runs complete: {report['runs_complete']} of {report['runs_total']}",
        "",
        "Metric: personalised test perplexity of the model each method delivers to a node, on that node's own "
        f"held-out test windows (lower is better; `eval.model` of the runs: {report['eval_models']}). "
        "*mean ppl*: mean over nodes, averaged over seeds; *± over nodes*: population std "
        "over the tree's nodes, averaged over seeds; *± over seeds*: std of the per-seed means; "
        "*/ worldlm*: the method's mean over WorldLM's in the same variant.",
        "",
    ]
    if len(report["variants"]) > 1:
        lines += _overview_md(report)
    lines += _targeted_md(report.get("targeted", []))
    for name, v in report["variants"].items():
        lines += _variant_md(name, v, len(v["seeds"]))
    return "\n".join(lines + _runs_md(report))
