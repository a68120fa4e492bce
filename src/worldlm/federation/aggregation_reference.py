"""Naive references for `federation.aggregation` (picotron style): the paper's formulas written literally.

One key position and one member at a time, cosine and softmax on Python floats, weighted sums one
vector at a time, everything in float64. Slow on purpose: the tests check the batched forms against
these on random inputs, and `worldlm bench` measures how much faster the batched forms are.

Shapes as in `aggregation`: own/parent/pooled [L, D], members [M, L, D] (member 0 the node
itself), candidates/children [C, L, D], residuals [R, D].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from worldlm.federation.aggregation import WEIGHTS, Similarity


def cos(u: Tensor, v: Tensor) -> float:
    """dot(u, v) / (|u| |v|) in float64; 0 when either vector is zero."""
    u, v = u.double(), v.double()
    nu = math.sqrt(float(torch.dot(u, u)))
    nv = math.sqrt(float(torch.dot(v, v)))
    if nu == 0.0 or nv == 0.0:
        return 0.0
    return float(torch.dot(u, v)) / (nu * nv)


def seen(x: Tensor, basis: Tensor | None, sim: Similarity) -> Tensor:
    """P(x − r) in float64: x minus its reference (none for `weights`), then the compared elements."""
    x = x.double() if basis is None else x.double() - basis.double()
    return x if sim.mask is None else x[sim.mask]


def mean(vectors: Sequence[Tensor]) -> Tensor:
    """The `centered` reference: the plain mean of the vectors being compared, in float64."""
    return weighted_sum([1.0 / len(vectors)] * len(vectors), vectors)


def basis(sim: Similarity, compared: Sequence[Tensor], reference: Tensor | None) -> Tensor | None:
    """The reference r of one comparison: none (weights), the mean of `compared` (centered), `reference` (updates)."""
    if sim.kind == "weights":
        return None
    return mean(compared) if sim.kind == "centered" else reference


def softmax(scores: Sequence[float | None]) -> list[float]:
    """Softmax over the entries that are not None; None entries get weight 0."""
    top = max(s for s in scores if s is not None)
    exps = [0.0 if s is None else math.exp(s - top) for s in scores]
    total = sum(exps)
    return [x / total for x in exps]


def weighted_sum(weights: Sequence[float], vectors: Sequence[Tensor]) -> Tensor:
    """Σ w_i v_i, one vector at a time, in float64."""
    out = torch.zeros(vectors[0].shape, dtype=torch.float64)
    for w, v in zip(weights, vectors, strict=True):
        out += w * v.double()
    return out


def with_parent(
    own: Tensor,
    parent: Tensor,
    residuals: Sequence[tuple[Tensor, int]] = (),
    attention: bool = True,
    sim: Similarity = WEIGHTS,
    reference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A.3.3 step 2c–d, position by position: (new keys [L, D], λ [L, 2+R])."""
    new: list[Tensor] = []
    lams: list[list[float]] = []
    for pos in range(own.shape[0]):
        q = own[pos]
        values = [q, parent[pos], *(v for v, _ in residuals)]
        here = [q, parent[pos], *(v for v, at in residuals if at == pos)]  # the entries compared at pos
        r = basis(sim, here, None if reference is None else reference[pos])
        mine = seen(q, r, sim)
        scores: list[float | None] = [1.0, cos(mine, seen(parent[pos], r, sim))]
        scores += [cos(mine, seen(v, r, sim)) if at == pos else None for v, at in residuals]
        if not attention:
            scores = [None if s is None else 0.0 for s in scores]
        else:
            scores = [None if s is None else s / sim.temperature for s in scores]
        lam = softmax(scores)
        new.append(weighted_sum(lam, values))
        lams.append(lam)
    return torch.stack(new), torch.tensor(lams, dtype=torch.float64)


def children(
    members: Tensor, attention: bool = True, sim: Similarity = WEIGHTS, reference: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A.3.3 step 4.iv C–D: every member's attended layer K'_c built explicitly, then their mean.

    reference ([L, D] or [M, L, D]) for `updates`. Returns (pooled [L, D], λ [L, M, M]).
    """
    n_mem, n_pos = members.shape[0], members.shape[1]
    pooled: list[Tensor] = []
    lams: list[list[list[float]]] = []
    for pos in range(n_pos):
        layer = [members[j, pos].double() for j in range(n_mem)]  # up-cast once per position, not per pair
        refs = [
            None if reference is None else reference[pos] if reference.dim() == 2 else reference[j, pos]
            for j in range(n_mem)
        ]
        compared = [seen(layer[j], basis(sim, layer, refs[j]), sim) for j in range(n_mem)]
        lam_l: list[list[float]] = []
        attended: list[Tensor] = []
        for c in range(n_mem):
            if not attention:
                scores = [0.0] * n_mem
            else:  # the member itself: similarity 1 by definition
                scores = [(1.0 if j == c else cos(compared[c], compared[j])) / sim.temperature for j in range(n_mem)]
            lam = softmax(scores)
            attended.append(weighted_sum(lam, layer))
            lam_l.append(lam)
        pooled.append(weighted_sum([1.0 / n_mem] * n_mem, attended))
        lams.append(lam_l)
    return torch.stack(pooled), torch.tensor(lams, dtype=torch.float64)


def most_dissimilar(
    pooled: Tensor,
    candidates: Tensor,
    nu: int,
    sim: Similarity = WEIGHTS,
    reference: Tensor | None = None,
    eligible: Tensor | None = None,
) -> list[list[int]]:
    """A.3.3 step 4.iv E: per position, the ν eligible candidates least similar to the pooled layer
    (ascending), padded with -1 to min(ν, C) when fewer are eligible."""
    out = []
    n_cand = candidates.shape[0]
    for pos in range(pooled.shape[0]):
        layer = [candidates[c, pos] for c in range(n_cand)]
        r = basis(sim, layer, None if reference is None else reference[pos])
        mine = seen(pooled[pos], r, sim)
        ok = [c for c in range(n_cand) if eligible is None or bool(eligible[pos, c])]
        sims = sorted((cos(mine, seen(layer[c], r, sim)), c) for c in ok)
        picked = sorted(c for _, c in sims[:nu])
        out.append(picked + [-1] * (min(nu, n_cand) - len(picked)))
    return out


def route(
    residuals: Tensor,
    positions: Sequence[int],
    children: Tensor,
    allowed: Tensor | None = None,
    sim: Similarity = WEIGHTS,
    reference: Tensor | None = None,
) -> list[int]:
    """A.3.7: per residual, the allowed child most similar at its position (-1: none; ties: lowest)."""
    out = []
    for r in range(residuals.shape[0]):
        at = positions[r]
        layer = [children[c, at] for c in range(children.shape[0])]
        ref = basis(sim, layer, None if reference is None else reference[at])
        mine = seen(residuals[r], ref, sim)
        best, best_sim = -1, -math.inf
        for c in range(children.shape[0]):
            if allowed is not None and not bool(allowed[r, c]):
                continue
            s = cos(mine, seen(layer[c], ref, sim))
            if s > best_sim:  # strict: ties keep the lower index
                best, best_sim = c, s
        out.append(best)
    return out
