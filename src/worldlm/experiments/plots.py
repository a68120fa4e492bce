"""PNG figures of experiment reports and comparisons, drawn from plain arrays and written atomically.

Figures are built with matplotlib's object API (`Figure`, rendered by Agg), never pyplot, so no
global state or display backend is involved.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from worldlm.files import atomic_write_bytes

Curve = list[tuple[int, float]]  # (sequential step or training tokens, perplexity) points


def _save(fig: Figure, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(path, buf.getvalue())


def _grid(n: int, width: float, height: float) -> tuple[Figure, list[Axes]]:
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def curve_panels(panels: dict[str, dict[str, Curve]], path: Path, title: str, xlabel: str = "sequential steps") -> None:
    """Validation perplexity against sequential steps (paper Fig. 3/5) or compute: a panel per key, a line per curve."""
    fig, axes = _grid(len(panels), 5.0, 3.6)
    for ax, (panel, curves) in zip(axes, panels.items(), strict=True):
        for label, points in curves.items():
            ax.plot([s for s, _ in points], [p for _, p in points], marker="o", markersize=3, label=label)
        ax.set_title(panel)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation perplexity")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    _save(fig, path)


def _heatmap(ax: Axes, values: np.ndarray, rows: list[str], cols: list[str], fmt: str) -> None:
    image = ax.imshow(values, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xticks(range(len(cols)), cols, rotation=45 if max(map(len, cols), default=0) > 3 else 0)
    lo, hi = image.get_clim()
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):  # white on the dark half of viridis
            dark = (v - lo) < (hi - lo) / 2
            ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=7, color="w" if dark else "k")
    ax.figure.colorbar(image, ax=ax)


def attention_heatmaps(
    self_weight: np.ndarray,
    nodes: list[str],
    rounds: list[int],
    children: np.ndarray | None,
    members: list[str],
    shares: np.ndarray,
    edges: list[str],
    share_rounds: list[int],
    path: Path,
    title: str,
) -> None:
    """λ_self of each node's parent step (A.3.3 step 2) per round; the root's children λ (step 4.iv C); and
    each child's share of its parent's attention per round (how far from uniform 1/C)."""
    n_panels = 1 + (children is not None) + (len(edges) > 0)
    fig, axes = _grid(n_panels, 5.5, 0.5 * max(len(nodes), len(members), len(edges)) + 2.0)
    _heatmap(axes[0], self_weight, nodes, [str(r + 1) for r in rounds], ".3f")
    axes[0].set_xlabel("round")
    axes[0].set_title("self weight λ_self with the parent (mean over key positions)", fontsize="medium")
    if children is not None:
        _heatmap(axes[1], children, members, members, ".3f")
        axes[1].set_xlabel("aggregated member j")
        axes[1].set_ylabel("member c")
        axes[1].set_title("root over its children: λ_{c,j}, last round", fontsize="medium")
    if edges:
        ax = axes[-1]
        _heatmap(ax, shares, edges, [str(r + 1) for r in share_rounds], ".2f")
        ax.set_xlabel("round")
        ax.set_title("each child's share of its parent's attention", fontsize="medium")
    fig.suptitle(title)
    _save(fig, path)


def flow_heatmap(counts: np.ndarray, origins: list[str], destinations: list[str], path: Path, title: str) -> None:
    """Residual routing (A.3.7): residuals picked at each origin that landed at each destination."""
    fig, axes = _grid(1, 5.5, 0.45 * len(origins) + 2.0)
    _heatmap(axes[0], counts, origins, destinations, ".1f")
    axes[0].set_xlabel("destination (leaf that aggregated it)")
    axes[0].set_ylabel("origin")
    fig.suptitle(title)
    _save(fig, path)


def mixture_bars(mixtures: dict[str, dict[str, float]], path: Path, title: str) -> None:
    """Each node's data mixture (paper A.1.1/A.2): the share of its training tokens from each source."""
    nodes = list(mixtures)
    sources = sorted({s for mix in mixtures.values() for s in mix})  # same colours in every variant
    fig, axes = _grid(1, 6.0, 0.4 * len(nodes) + 1.5)
    ax = axes[0]
    left = np.zeros(len(nodes))
    for src in sources:
        share = np.array([mixtures[n].get(src, 0.0) for n in nodes])
        ax.barh(nodes, share, left=left, label=src)
        left += share
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of the node's training tokens")
    ax.legend(ncols=len(sources), loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize="small")
    fig.suptitle(title)
    _save(fig, path)


TracePoint = tuple[int, float, str, str]  # (sequential step, validation loss, node, what)
TRACE_MARKS = {"start": "S", "received": "R", "trained": "T", "aggregated": "A"}


def trace_plot(traces: dict[str, list[TracePoint]], path: Path, title: str) -> None:
    """One round traced: validation loss of the travelling model at the start, after each node took
    its parent's model (steps 2-3), after each training and aggregation. A line follows the shared model (the
    root, or FL's server: the node that aggregates last); every other node's model is a labelled point."""
    fig, axes = _grid(1, 9.0, 5.0)
    ax = axes[0]
    for method, points in traces.items():
        root = points[-1][2]
        shared = [(step, loss) for step, loss, node, _ in points if node == root]
        (line,) = ax.plot([p[0] for p in shared], [p[1] for p in shared], marker="o", label=f"{method}: {root}")
        others = [p for p in points if p[2] != root]
        ax.scatter([p[0] for p in others], [p[1] for p in others], s=12, color=line.get_color(), alpha=0.6)
        for step, loss, node, what in points:
            label = f"{node} {TRACE_MARKS.get(what, what)}"
            ax.annotate(label, (step, loss), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("sequential step reached")
    ax.set_ylabel("validation loss over every node's windows")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", title="shared model (line)", title_fontsize="small")
    fig.suptitle(title)
    _save(fig, path)


def method_curves(curves: dict[str, dict[str, list[tuple[int, int, float]]]], path: Path) -> None:
    """Mean validation perplexity over nodes, one line per method, against sequential steps (paper Fig. 3)
    and against compute (training tokens of all nodes together). `curves`: per method, per node, the
    (sequential step, training tokens so far, perplexity) points of its validations."""
    fig = Figure(figsize=(11, 4), layout="tight")
    axes = fig.subplots(1, 2)
    for method, nodes in curves.items():
        first = next(iter(nodes.values()))
        mean = np.mean([[p for _, _, p in c] for c in nodes.values()], axis=0)
        axes[0].plot([s for s, _, _ in first], mean, marker="o", label=method)
        axes[1].plot([t for _, t, _ in first], mean, marker="o", label=method)
    for ax, xlabel in zip(axes, ("sequential steps", "training tokens of all nodes (compute)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean validation perplexity over nodes")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)
