"""The experiment report: report.json, report.md (rendered by `experiments.markdown`) and the plots.

The metric is personalised test perplexity (docs/design.md, "The metric"): what each method delivers to a node, on that
node's own test windows. Per (variant, method): the mean over nodes of each seed's run, averaged over
seeds; the (population) std over nodes, averaged over seeds; the std over seeds of the per-seed means;
and the ratio of the mean to WorldLM's in the same variant (the paper's "×" comparisons, Tables 1–3).
FL and HierFAVG runs judged by their global model also give "<method> + ft" rows (each client after
its last local steps, from the same runs). Beside the test numbers: validation perplexity (what
settings are chosen on), and each method against compute (training tokens of all nodes together),
with the validation perplexity every method reaches at WorldLM's compute (`equal_compute_budget`).
"""

from __future__ import annotations

import datetime
import functools
import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worldlm import config as C
from worldlm.data.mixture import Span, mixture_weights
from worldlm.data.prepared import Prepared, load_prepared
from worldlm.experiments import plots
from worldlm.experiments.markdown import FT, markdown
from worldlm.experiments.spec import Experiment, RunSpec, is_complete
from worldlm.files import atomic_write_json, atomic_write_text
from worldlm.runners.planning import held_tokens, node_spans, tree_from_config

REFERENCE = "worldlm"


@dataclass(frozen=True)
class RunData:
    """A complete run: its summary and the metrics records the report draws."""

    spec: RunSpec
    summary: dict[str, Any]
    val: dict[str, plots.Curve]  # node -> validation perplexity against sequential steps
    val_compute: dict[str, plots.Curve]  # node -> validation perplexity against training tokens of all nodes
    attention: list[dict[str, Any]]
    routes: list[dict[str, Any]]
    trace: list[dict[str, Any]]  # eval.trace_round records
    tokens: int  # training tokens of all nodes in the whole run (its compute)
    outliers: list[dict[str, Any]]  # `outlier` events
    node_tokens: dict[str, int]  # training tokens per trainer (its train records)


def read_run(spec: RunSpec) -> RunData:
    val: dict[str, plots.Curve] = defaultdict(list)
    val_compute: dict[str, plots.Curve] = defaultdict(list)
    attention, routes, trace, outliers = [], [], [], []
    tokens = 0  # training tokens of all nodes so far: a round's evaluation follows its training
    node_tokens: dict[str, int] = defaultdict(int)
    with (spec.dir / "metrics.jsonl").open(encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("split") == "train":
                tokens += int(rec["tokens"])
                node_tokens[rec["node"]] += int(rec["tokens"])
            elif rec.get("split") == "val":
                val[rec["node"]].append((int(rec["step"]), float(rec["ppl"])))
                val_compute[rec["node"]].append((tokens, float(rec["ppl"])))
            elif rec.get("event") == "attention":
                attention.append(rec)
            elif rec.get("event") == "residual_route":
                routes.append(rec)
            elif rec.get("event") == "trace":
                trace.append(rec)
            elif rec.get("event") == "outlier":
                outliers.append(rec)
    summary = json.loads((spec.dir / "summary.json").read_text(encoding="utf-8"))
    return RunData(
        spec, summary, dict(val), dict(val_compute), attention, routes, trace, tokens, outliers, dict(node_tokens)
    )


def mean_curve(curves: list[plots.Curve]) -> plots.Curve:
    """Average curves step by step (over nodes, or over seeds)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for curve in curves:
        for step, ppl in curve:
            by_step[step].append(ppl)
    return [(s, float(np.mean(by_step[s]))) for s in sorted(by_step)]


# ---------------------------------------------------------------------------- numbers


def _val_mean(summary: dict[str, Any], key: str) -> float:
    values = [v[key] for v in summary["nodes"].values() if v.get(key) is not None]
    return float(np.mean(values)) if values else math.nan


def method_stats(
    runs: list[RunData], fine_tuned: bool = False, attacked: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """A method's numbers over its seeds; `fine_tuned`: its "+ ft" row (summary.json's *_ft values);
    `attacked`: the nodes any variant poisons, left out of `mean_ppl_clean` (None when there are none)."""
    ft = "_ft" if fine_tuned else ""
    means = np.array([r.summary[f"mean_ppl{ft}"] for r in runs])
    nodes = list(runs[0].summary["nodes"])
    clean = [n for n in nodes if n not in attacked]
    clean_means = [np.mean([r.summary["nodes"][n][f"ppl{ft}"] for n in clean]) for r in runs]
    return {
        "mean_ppl": float(means.mean()),
        "mean_ppl_clean": float(np.mean(clean_means)) if attacked and clean else None,
        "std_over_nodes": float(np.mean([r.summary[f"std_ppl{ft}"] for r in runs])),
        "std_over_seeds": float(means.std()),
        "val_ppl": float(np.mean([_val_mean(r.summary, f"val_ppl{ft}") for r in runs])),
        "ratio_to_worldlm": None,
        "seeds": [r.spec.seed for r in runs],
        "sequential_steps": max(int(r.summary["sequential_steps"]) for r in runs),  # a diverged run stops early
        "rounds": max(int(r.summary["rounds"]) for r in runs),
        "train_tokens": max(r.tokens for r in runs),
        "val_ppl_at_equal_compute": None,
        "wall_seconds_mean": float(np.mean([r.summary["wall_seconds"] for r in runs])),
        "nodes": {n: float(np.mean([r.summary["nodes"][n][f"ppl{ft}"] for r in runs])) for n in nodes},
        "privacy": None if fine_tuned else privacy_stats(runs),
        "data_passes": None if fine_tuned else data_passes(runs),
    }


def data_passes(runs: list[RunData]) -> dict[str, float]:
    """Per trainer, how many times the run went over the training tokens it holds (mean over seeds): its
    training tokens divided by its shard's (> 1: it saw its data more than once and can overfit it)."""

    held = held_tokens(runs[0].spec.cfg, node_spans_of(runs[0].spec))
    return {n: float(np.mean([r.node_tokens.get(n, 0) / size for r in runs])) for n, size in held.items() if size}


def method_curve(runs: list[RunData], compute: bool = False) -> plots.Curve:
    """Validation perplexity, mean over nodes then seeds, against sequential steps or compute (training tokens)."""
    return mean_curve([mean_curve(list((r.val_compute if compute else r.val).values())) for r in runs])


def equal_compute_budget(compute: dict[str, float]) -> float | None:
    """The compute (training tokens of all nodes) every method is compared at: WorldLM's where it ran (the
    methods are compared with it), else the least any method used. Not the least always: centralized trains
    one model, a seventh of a 7-node federation's compute, so every federated method would be read very early."""
    if REFERENCE in compute:
        return compute[REFERENCE]
    return min(compute.values(), default=None)


def value_at(curve: plots.Curve, x: float) -> float | None:
    """The curve at x, log-linear between its two neighbouring points; None outside the curve."""
    exact = [y for x_k, y in curve if x_k == x]
    if exact:
        return exact[-1]
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x0 < x < x1:
            t = (x - x0) / (x1 - x0)
            return float(math.exp((1 - t) * math.log(y0) + t * math.log(y1)))
    return None


def privacy_stats(runs: list[RunData]) -> dict[str, Any] | None:
    """DP runs: ε per DP node at δ (mean over seeds) and the nodes that hit dp.epsilon_budget; else None."""
    private = [r.summary["privacy"] for r in runs if "privacy" in r.summary]
    if not private:
        return None
    nodes = list(private[0]["epsilon"])
    record = private[0].get("unit") == "record"  # DP-SGD: a calibrated noise multiplier per node
    return {
        "unit": private[0].get("unit", "node"),
        "delta": private[0]["delta"],
        "sigma": (
            {n: float(np.mean([p["noise_multiplier"][n] for p in private])) for n in nodes}
            if record
            else private[0]["sigma"]
        ),
        "epsilon": {n: float(np.mean([p["epsilon"][n] for p in private])) for n in nodes},
        "stopped": sorted({n for p in private for n in p["stopped"]}),
    }


def variant_stats(
    runs: dict[str, list[RunData]], attacked: frozenset[str] = frozenset()
) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Per method (and "+ ft" row) its stats, and the equal-compute budget (`equal_compute_budget`).

    Every method's validation perplexity is read off its compute curve at that budget; a
    method whose run ended with less compute has none there.
    """
    stats: dict[str, dict[str, Any]] = {}
    for m, rs in runs.items():
        if not rs:
            continue
        stats[m] = method_stats(rs, attacked=attacked)
        if all("mean_ppl_ft" in r.summary for r in rs):
            stats[m + FT] = method_stats(rs, fine_tuned=True, attacked=attacked)
    if REFERENCE in stats:
        for s in stats.values():
            s["ratio_to_worldlm"] = s["mean_ppl"] / stats[REFERENCE]["mean_ppl"]
    curves = {m: method_curve(rs, compute=True) for m, rs in runs.items() if rs and any(r.val_compute for r in rs)}
    budget = equal_compute_budget({m: c[-1][0] for m, c in curves.items() if c})
    if budget is not None:
        for m, curve in curves.items():
            stats[m]["val_ppl_at_equal_compute"] = value_at(curve, budget)
    return stats, budget


TARGETING = ("dp.", "attack.")  # the overrides that privatise or poison nodes


def targeted_nodes(cfg: C.Config) -> frozenset[str]:
    """The nodes a run's config poisons (attack.nodes) or privatises (DP nodes)."""
    return frozenset([*cfg.attack.nodes, *C.dp_nodes(cfg)])


def reference_variants(exp: Experiment, targeted: dict[str, frozenset[str]]) -> dict[str, str | None]:
    """Each variant that privatises or poisons nodes -> the variant that is the same without doing so: same
    base config, same other overrides, no targeted node (None where the experiment has no such variant)."""

    def rest(v: str) -> tuple[Path, tuple[str, ...]]:
        var = exp.variants[v]
        return var.base, tuple(sorted(x for x in var.set if not x.strip().startswith(TARGETING)))

    clean = [v for v, nodes in targeted.items() if not nodes]
    return {v: next((c for c in clean if rest(c) == rest(v)), None) for v, nodes in targeted.items() if nodes}


def targeted_rows(
    variants: dict[str, dict[str, Any]], targeted: dict[str, frozenset[str]], references: dict[str, str | None]
) -> list[dict[str, Any]]:
    """Per variant that privatises or poisons nodes, per method: its test perplexity on those nodes and on the
    others (means over nodes of the per-node means over seeds), each against the same nodes and method in its
    reference variant (`reference_variants`: do the others stay stable?)."""
    rows = []
    for name, reference in references.items():
        nodes = targeted[name]
        for m, s in variants[name]["methods"].items():
            ref = variants[reference]["methods"].get(m) if reference is not None else None
            row: dict[str, Any] = {"variant": name, "method": m, "nodes": sorted(nodes), "reference": reference}
            for part, members in (
                ("targeted", [n for n in s["nodes"] if n in nodes]),
                ("others", [n for n in s["nodes"] if n not in nodes]),
            ):
                row[part] = float(np.mean([s["nodes"][n] for n in members]))
                row[f"{part}_reference"] = float(np.mean([ref["nodes"][n] for n in members])) if ref else None
            rows.append(row)
    return rows


def run_row(run: RunData, out_dir: Path) -> dict[str, Any]:
    s = run.summary
    return {
        "variant": run.spec.variant,
        "method": run.spec.method,
        "seed": run.spec.seed,
        "dir": str(run.spec.dir.relative_to(out_dir)),
        "mean_ppl": s["mean_ppl"],
        "std_ppl": s["std_ppl"],
        "sequential_steps": s["sequential_steps"],
        "wall_seconds": s["wall_seconds"],
        "diverged_round": s.get("diverged_round"),  # stopped early: every node's loss NaN/inf in that round
    }


# ---------------------------------------------------------------------------- plots


def attention_data(runs: list[RunData]) -> tuple[np.ndarray, list[str], list[int], np.ndarray | None, list[str]]:
    """Mean over seeds of λ_self per (node, round) and of the root's last-round children λ matrix."""

    tree = tree_from_config(runs[0].spec.cfg)
    parent = [a for r in runs for a in r.attention if a["kind"] == "parent"]
    nodes = [n for n in tree.order if any(a["node"] == n for a in parent)]
    rounds = sorted({int(a["round"]) for a in parent})
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for a in parent:  # weights [L][members]; member 0 is the node itself
        cells[(a["node"], int(a["round"]))].append(float(np.mean([w[0] for w in a["weights"]])))
    self_weight = np.array([[np.mean(cells[(n, r)]) if cells[(n, r)] else np.nan for r in rounds] for n in nodes])
    root = [a for r in runs for a in r.attention if a["kind"] == "children" and a["node"] == tree.root]
    if not root:
        return self_weight, nodes, rounds, None, []
    last = max(int(a["round"]) for a in root)
    matrices = [np.mean(np.array(a["weights"]), axis=0) for a in root if int(a["round"]) == last]  # [L,M,M] -> [M,M]
    return self_weight, nodes, rounds, np.mean(matrices, axis=0), list(root[0]["members"])


def _shares(event: dict[str, Any]) -> list[float]:
    """Each child's share of its parent's attention (worldlm.child_shares), from the event's weights, so that
    runs recorded before events carried `shares` read the same."""
    w = np.array(event["weights"])[:, 0, 1:]  # [L, C]: the parent's own row without its self-weight
    return list((w / np.maximum(w.sum(axis=1, keepdims=True), 1e-300)).mean(axis=0))


def share_data(runs: list[RunData]) -> tuple[np.ndarray, list[str], list[int]]:
    """Each child's share of its parent's attention per round (mean over key positions, sub-rounds and seeds):
    rows "parent → child", columns rounds; uniform attention is 1/C."""
    cells: dict[tuple[str, int], list[float]] = defaultdict(list)
    for a in (a for r in runs for a in r.attention if a["kind"] == "children" and len(a["members"]) > 2):
        for member, share in zip(a["members"][1:], _shares(a), strict=True):
            cells[(f"{a['node']} → {member}", int(a["round"]))].append(share)
    rows = list(dict.fromkeys(edge for edge, _ in cells))
    rounds = sorted({rnd for _, rnd in cells})
    values = np.array([[np.mean(cells[(e, r)]) if cells[(e, r)] else np.nan for r in rounds] for e in rows])
    return values, rows, rounds


def attention_rows(runs: list[RunData]) -> list[dict[str, Any]]:
    """Per parent → child edge: the child's share in the last round, its lowest share after the first round,
    the uniform share 1/C, and the rounds it was reported an `outlier` (mean over seeds)."""
    values, rows, _ = share_data(runs)
    if not rows:
        return []
    later = values[:, 1:] if values.shape[1] > 1 else values
    out = []
    for i, edge in enumerate(rows):
        parent, child = edge.split(" → ")
        n_children = sum(1 for e in rows if e.split(" → ")[0] == parent)
        flagged = [sum(1 for o in r.outliers if o["node"] == parent and o["member"] == child) for r in runs]
        out.append(
            {
                "edge": edge,
                "share_last": float(values[i, -1]),
                "share_min": float(np.nanmin(later[i])),
                "uniform": 1.0 / n_children,
                "outlier_rounds": float(np.mean(flagged)),
            }
        )
    return out


def flow_data(runs: list[RunData]) -> tuple[np.ndarray, list[str], list[str]]:
    """Residuals per run (mean over seeds) from origin to the leaf that received them ('none': no allowed child)."""

    tree = tree_from_config(runs[0].spec.cfg)
    landed = [(r["origin"], r["destination"] or "none") for run in runs for r in run.routes]
    landed = [(o, d) for o, d in landed if d == "none" or tree.is_leaf(d)]  # hops via inner nodes are not landings
    origins = [n for n in tree.order if any(o == n for o, _ in landed)]
    dests = [n for n in tree.order if tree.is_leaf(n)] + (["none"] if any(d == "none" for _, d in landed) else [])
    counts = np.zeros((len(origins), len(dests)))
    for o, d in landed:
        counts[origins.index(o), dests.index(d)] += 1
    return counts / len(runs), origins, dests


@functools.cache
def _prepared(path: str) -> Prepared:
    """A report reads one manifest per data directory, however many variants and methods share it."""
    return load_prepared(path)


def node_spans_of(spec: RunSpec) -> dict[str, list[Span]]:
    """Each tree node's training spans, recomputed from the tree and the manifest as the run had them (A.2)."""

    cfg = spec.cfg
    return node_spans(cfg, tree_from_config(cfg), _prepared(cfg.data.path))


def node_mixtures(spec: RunSpec) -> dict[str, dict[str, float]]:
    """Each node's source proportions (paper A.2, A.1.1)."""
    spans = node_spans_of(spec)
    return {
        n: {sp.source: float(w) for sp, w in zip(sp_n, mixture_weights(sp_n), strict=True)} for n, sp_n in spans.items()
    }


def variant_plots(variant: str, runs: dict[str, list[RunData]], out_dir: Path, mixture_file: Path) -> dict[str, str]:
    """The variant's figures; returns {kind: path relative to out_dir}."""
    folder = out_dir / "plots" / variant
    done = {m: rs for m, rs in runs.items() if rs}
    files: dict[str, Path] = {}
    if len(done) > 1:
        files["val_ppl"] = folder / "val_ppl.png"
        curves = {m: method_curve(rs) for m, rs in done.items()}
        plots.curve_panels({"mean over nodes and seeds": curves}, files["val_ppl"], f"{variant}: validation perplexity")
        files["val_ppl_compute"] = folder / "val_ppl_compute.png"
        plots.curve_panels(
            {"mean over nodes and seeds": {m: method_curve(rs, compute=True) for m, rs in done.items()}},
            files["val_ppl_compute"],
            f"{variant}: validation perplexity against compute",
            xlabel="training tokens of all nodes together",
        )
    if done:
        files["val_nodes"] = folder / "val_nodes.png"
        panels = {m: {n: mean_curve([r.val[n] for r in rs]) for n in rs[0].val} for m, rs in done.items()}
        plots.curve_panels(panels, files["val_nodes"], f"{variant}: validation perplexity per node (mean over seeds)")
    wl = done.get(REFERENCE, [])
    if any(r.attention for r in wl):
        files["attention"] = folder / "attention.png"
        title = f"{variant}: WorldLM attention coefficients"
        plots.attention_heatmaps(*attention_data(wl), *share_data(wl), files["attention"], title)
    if any(r.routes for r in wl):
        counts, origins, dests = flow_data(wl)
        files["residual_flows"] = folder / "residual_flows.png"
        title = f"{variant}: WorldLM residual routing (per run, mean over seeds)"
        plots.flow_heatmap(counts, origins, dests, files["residual_flows"], title)
    traced = {m: rs for m, rs in done.items() if any(r.trace for r in rs)}
    if traced:
        files["trace"] = folder / "trace.png"
        points = {
            m: [(p["step"], p["val_loss_all"], p["node"], p["what"]) for p in trace_points(rs)]
            for m, rs in traced.items()
        }
        plots.trace_plot(points, files["trace"], f"{variant}: one round traced (mean over seeds)")
    files["mixture"] = mixture_file
    return {kind: str(p.relative_to(out_dir)) for kind, p in files.items()}


def trace_points(runs: list[RunData]) -> list[dict[str, Any]]:
    """A method's traced round: the points every seed has, matched by (round, node, what), losses averaged.

    (Runs traced before the "start" points existed lack them; those points are then left out.)
    """
    seeds = [r.trace for r in runs if r.trace]
    by_key: dict[tuple[int, str, str], list[dict[str, Any]]] = defaultdict(list)
    for trace in seeds:
        for p in trace:
            by_key[(int(p["round"]), p["node"], p["what"])].append(p)
    out = []
    for point in seeds[0]:
        same = by_key[(int(point["round"]), point["node"], point["what"])]
        if len(same) < len(seeds):
            continue
        own = [p["val_loss"] for p in same if p["val_loss"] is not None]
        out.append(
            {
                "round": point["round"],
                "node": point["node"],
                "what": point["what"],
                "step": point["step"],
                "val_loss_all": float(np.mean([p["val_loss_all"] for p in same])),
                "val_loss": float(np.mean(own)) if own else None,
                "seeds": len(same),
            }
        )
    return out


def mixture_files(exp: Experiment, first_spec: dict[str, RunSpec], out_dir: Path) -> dict[str, Path]:
    """One mixture figure per distinct mixture; variants with the same data share it."""
    drawn: list[tuple[dict[str, dict[str, float]], Path]] = []
    files = {}
    for v, spec in first_spec.items():
        mix = node_mixtures(spec)
        match = next((p for m, p in drawn if m == mix), None)
        if match is None:
            match = out_dir / "plots" / v / "mixture.png"
            plots.mixture_bars(mix, match, f"{exp.name}/{v}: data mixture of each node")
            drawn.append((mix, match))
        files[v] = match
    return files


def overview_plot(report: dict[str, Any], runs: dict[tuple[str, str], list[RunData]], out_dir: Path) -> str | None:
    """With several variants: per method, one line per variant (mean over nodes and seeds)."""
    if len(report["variants"]) < 2:
        return None
    panels: dict[str, dict[str, plots.Curve]] = defaultdict(dict)
    for (variant, method), rs in runs.items():
        if rs:
            panels[method][variant] = mean_curve([mean_curve(list(r.val.values())) for r in rs])
    if not panels:
        return None
    path = out_dir / "plots" / "variants_val_ppl.png"
    plots.curve_panels(dict(panels), path, f"{report['name']}: validation perplexity by variant")
    return str(path.relative_to(out_dir))


# ---------------------------------------------------------------------------- entry point


def write_report(exp: Experiment, specs: list[RunSpec], out_dir: Path, command: str) -> Path:
    """Regenerate report.json, report.md and the plots from the complete runs; returns report.md."""
    done = {s.label: is_complete(s) for s in specs}
    complete = [read_run(s) for s in specs if done[s.label]]
    runs: dict[tuple[str, str], list[RunData]] = {(v.name, m): [] for v in exp.variants.values() for m in v.methods}
    for r in complete:
        runs[(r.spec.variant, r.spec.method)].append(r)
    first_spec = {v: next(s for s in specs if s.variant == v) for v in exp.variants}
    # nodes some variant poisons or privatises: the others' mean is the like-for-like comparison across variants
    attacked = frozenset().union(*(targeted_nodes(s.cfg) for s in specs))
    mixtures = mixture_files(exp, first_spec, out_dir)
    variants = {}
    for v in exp.variants.values():
        by_method = {m: runs[(v.name, m)] for m in v.methods}
        stats, budget = variant_stats(by_method, attacked)
        traced = {m: trace_points(rs) for m, rs in by_method.items() if any(r.trace for r in rs)}
        variants[v.name] = {
            "description": v.description,
            "seeds": list(v.seeds),
            "base": str(v.base),
            "set": list(v.set),
            "methods": stats,
            "equal_compute_tokens": budget,
            "trace": traced,
            "attention": attention_rows(by_method.get(REFERENCE, [])),
            "plots": variant_plots(v.name, by_method, out_dir, mixtures[v.name]),
        }
    report: dict[str, Any] = {
        "name": exp.name,
        "description": exp.description,
        "experiment": str(exp.path),
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "seeds": list(exp.seeds),
        "set": list(exp.set),
        "runs_complete": len(complete),
        "eval_models": ", ".join(sorted({f"`{s.cfg.eval.model}`" for s in specs})),
        "runs_total": len(specs),
        "missing": [s.label for s in specs if not done[s.label]],
        "variants": variants,
        "runs": [run_row(r, out_dir) for r in complete],
    }
    report["overview_plot"] = overview_plot(report, runs, out_dir)
    targeted = {v: targeted_nodes(first_spec[v].cfg) for v in exp.variants}
    report["targeted"] = targeted_rows(variants, targeted, reference_variants(exp, targeted))
    atomic_write_json(out_dir / "report.json", report)
    atomic_write_text(out_dir / "report.md", markdown(report))
    return out_dir / "report.md"
