"""Key-layer aggregation: attention, pooling, residual selection, routing (paper §3.2, A.3.3–A.3.7).

A *key layer* is one transformer block's parameters flattened into a 1-D float vector. These are
pure functions over tensors: no I/O, no engine.

Similarity (`Similarity`). Two key layers a, b of members being compared score
    s(a, b) = cos(P(a − r_a), P(b − r_b)),   attention weights λ = softmax(s / τ),
where P keeps the compared elements (all, or the weight matrices only: `Similarity.mask`) and r is
the reference each kind subtracts:
    weights   r = 0: the paper's cosine of the flattened blocks (A.3.3 step 2c);
    centered  r = the mean of the members compared at that key position (what they share, such as the
              common initialisation and the LayerNorm gains, cancels);
    updates   r = the model the member last received (`reference`, given by the engine): each member's
              change. A member without a change (P(a − r) = 0) has similarity 0 with every other member.
The member itself keeps the paper's score 1 (e_qq = 1), also divided by τ. Residual picking (E) and
routing (A.3.7) rank by the same s; τ does not change a ranking.

Shape letters used throughout:
    L  number of key positions (the last |K| blocks; position l is 0-based among the key blocks)
    D  flattened size of one block (all key blocks of one model have the same D)
    M  members of a sub-federation (member 0 is the node itself, then its children)
    C  candidate children, R residuals

Numerics, chosen so the engine gets the same answer on every device:
- similarities (dot products, norms) accumulate in float64 (float32 on devices without float64,
  e.g. MPS), chunked along D so the up-cast never copies a whole key-layer stack at once; they are
  float64 matmuls, so a global TF32 setting (nanoGPT turns it on) cannot perturb them;
- the weighted sums that produce new key layers are elementwise multiply-adds in float32 (float64
  for float64 inputs), never matmuls, for the same reason; results come back in the input dtype;
- cosine with a zero-norm vector is 0, never NaN; ties break towards the lowest index.
Similarities and attention weights are returned in the similarity dtype (float64 on CPU/CUDA).

The single-vector functions (the public API: 1-D key layers in, tensors or indices out) are thin
wrappers over the batched ones, so there is one implementation of the math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "SIMILARITIES",
    "Similarity",
    "aggregate_children",
    "aggregate_children_batched",
    "aggregate_with_parent",
    "aggregate_with_parent_batched",
    "attention_spread",
    "cosine",
    "cosine_matrix",
    "most_dissimilar",
    "most_dissimilar_batched",
    "route",
    "route_batched",
]

# Elements per chunk when up-casting to the similarity dtype: bounds the temporary float64 copy to
# 2 MiB per operand however large the key layers are, small enough to stay in cache (`worldlm bench`:
# the Gram matrix of 17 micro-sized key layers took 2.7x longer with 128 MiB chunks).
_CHUNK_ELEMENTS = 1 << 18

SIMILARITIES = ("weights", "centered", "updates")


@dataclass(frozen=True)
class Similarity:
    """How key layers are compared (module docstring): the kind of reference, τ, the compared elements."""

    kind: str = "weights"  # weights | centered | updates
    temperature: float = 1.0  # τ > 0: softmax(s / τ)
    mask: Tensor | None = field(default=None, compare=False)  # [D] bool: the elements compared; None: all

    def __post_init__(self) -> None:
        if self.kind not in SIMILARITIES:
            raise ValueError(f"similarity kind must be one of {', '.join(SIMILARITIES)}, got {self.kind!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")
        m = self.mask
        if m is not None and (m.dim() != 1 or m.dtype != torch.bool or not bool(m.any())):
            raise ValueError("similarity mask must be a 1-D bool tensor selecting at least one element")


WEIGHTS = Similarity()  # the paper's similarity


# --------------------------------------------------------------------------------------------------
# dtype / validation helpers


def _check_float(name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _sim_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everywhere else similarities are float64 (cheap: L·M²·D flops at most).
    return torch.float32 if device.type == "mps" else torch.float64


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    # Weighted sums: float64 if any input is float64, else float32 (bf16/fp16 inputs are up-cast).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _chunk(rows: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, rows))


def _check_sim(sim: Similarity, d: int, reference: Tensor | None, ref_shapes: Sequence[tuple[int, ...]]) -> None:
    if sim.mask is not None and sim.mask.shape != (d,):
        raise ValueError(f"similarity mask must have D={d} elements, got {tuple(sim.mask.shape)}")
    if sim.kind == "updates":
        if reference is None:
            raise ValueError("similarity 'updates' needs the reference model (what the members last received)")
        _check_float("reference", reference)
        if tuple(reference.shape) not in ref_shapes:
            raise ValueError(f"reference must have a shape in {list(ref_shapes)}, got {tuple(reference.shape)}")


def _compared(x: Tensor, basis: Tensor | None, sim: Similarity) -> Tensor:
    """P(x − r): what the similarity reads of x (x itself, no copy, for the paper's `weights` on all elements)."""
    if basis is not None:
        acc = _acc_dtype(x, basis)
        x = x.to(acc) - basis.to(device=x.device, dtype=acc)
    if sim.mask is not None:
        x = x[..., sim.mask.to(x.device)]
    return x


def _mean(x: Tensor, dim: int) -> Tensor:
    """Mean in the accumulation dtype (the `centered` reference)."""
    return x.to(_acc_dtype(x)).mean(dim=dim)


def _scaled(scores: Tensor, sim: Similarity) -> Tensor:
    """s / τ (−inf, a member that does not take part, stays −inf)."""
    return scores if sim.temperature == 1.0 else scores / sim.temperature


# --------------------------------------------------------------------------------------------------
# similarity kernels


def _dots_elementwise(a: Tensor, b: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Broadcast a[..., D], b[..., D] -> (⟨a,b⟩, |a|², |b|²), each [...broadcast], in `dtype`."""
    # The broadcast shape, from meta tensors (no data; torch.broadcast_shapes is untyped).
    shape = (torch.empty(a.shape, device="meta") + torch.empty(b.shape, device="meta")).shape
    a, b = a.expand(shape), b.expand(shape)  # views, no copy
    d = a.shape[-1]
    dot = torch.zeros(shape[:-1], dtype=dtype, device=a.device)
    aa = torch.zeros(shape[:-1], dtype=dtype, device=a.device)
    bb = torch.zeros(shape[:-1], dtype=dtype, device=a.device)
    step = _chunk(max(1, a.numel() // max(1, d)))
    for s in range(0, d, step):
        ac = a[..., s : s + step].to(dtype)
        bc = b[..., s : s + step].to(dtype)
        dot += torch.linalg.vecdot(ac, bc)
        aa += torch.linalg.vector_norm(ac, dim=-1).square()
        bb += torch.linalg.vector_norm(bc, dim=-1).square()
    return dot, aa, bb


def _dots_matmul(x: Tensor, y: Tensor | None, dtype: torch.dtype) -> Tensor:
    """x[..., M, D], y[..., N, D] -> ⟨x_m, y_n⟩ [..., M, N] in `dtype` (float64 matmul: no TF32).

    y=None means y is x (a Gram matrix): each chunk is up-cast once and |x_m|² is its diagonal.
    """
    d = x.shape[-1]
    rows = max(x.numel(), 0 if y is None else y.numel()) // max(1, d)
    step = _chunk(rows)
    n = x.shape[-2] if y is None else y.shape[-2]
    out = torch.zeros((*x.shape[:-1], n), dtype=dtype, device=x.device)
    for s in range(0, d, step):
        xc = x[..., s : s + step].to(dtype)
        yc = xc if y is None else y[..., s : s + step].to(dtype)
        out += xc @ yc.transpose(-1, -2)
    return out


def _sq_norms(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x[..., D] -> |x|² [...] in `dtype`."""
    d = x.shape[-1]
    out = torch.zeros(x.shape[:-1], dtype=dtype, device=x.device)
    step = _chunk(x.numel() // max(1, d))
    for s in range(0, d, step):
        out += torch.linalg.vector_norm(x[..., s : s + step].to(dtype), dim=-1).square()
    return out


def _cos_from(dot: Tensor, sq_a: Tensor, sq_b: Tensor) -> Tensor:
    """cos = dot / (|a||b|); 0 where either norm is 0; clamped to [-1, 1] against rounding."""
    na, nb = sq_a.sqrt(), sq_b.sqrt()
    ok = (na > 0) & (nb > 0)
    one = torch.ones((), dtype=dot.dtype, device=dot.device)
    # Divide one norm at a time: |a|·|b| can underflow to 0 when both are tiny; dot/|a| <= |b|.
    cos = dot / torch.where(na > 0, na, one) / torch.where(nb > 0, nb, one)
    return torch.where(ok, cos, torch.zeros_like(cos)).clamp(-1.0, 1.0)


def _gram_cos(x: Tensor) -> Tensor:
    """x[..., M, D] -> all-pairs cosine [..., M, M] from one Gram matrix (norms on its diagonal)."""
    gram = _dots_matmul(x, None, _sim_dtype(x.device))
    sq = gram.diagonal(dim1=-2, dim2=-1).clamp_min(0)
    return _cos_from(gram, sq.unsqueeze(-1), sq.unsqueeze(-2))


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Cosine similarity over the last dim, broadcasting the rest: a[..., D], b[..., D] -> [...].

    Zero-norm vectors have similarity 0 with everything (never NaN). Result in the similarity dtype.
    """
    _check_float("a", a)
    _check_float("b", b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"last dims differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    dot, aa, bb = _dots_elementwise(a, b, _sim_dtype(a.device))
    return _cos_from(dot, aa, bb)


def cosine_matrix(x: Tensor, y: Tensor) -> Tensor:
    """All-pairs cosine per position: x[L, M, D], y[L, N, D] -> [L, M, N] (any leading dims work)."""
    _check_float("x", x)
    _check_float("y", y)
    if x.dim() < 2 or y.dim() < 2 or x.shape[:-2] != y.shape[:-2] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"expected x[..., M, D] and y[..., N, D], got {tuple(x.shape)}, {tuple(y.shape)}")
    if x is y:
        return _gram_cos(x)
    dtype = _sim_dtype(x.device)
    dots = _dots_matmul(x, y, dtype)  # [L, M, N]
    return _cos_from(dots, _sq_norms(x, dtype).unsqueeze(-1), _sq_norms(y, dtype).unsqueeze(-2))


# --------------------------------------------------------------------------------------------------
# batched forms (what the engine calls)


def aggregate_with_parent_batched(
    own: Tensor,
    parent: Tensor,
    residuals: Sequence[tuple[Tensor, int]] = (),
    attention: bool = True,
    sim: Similarity = WEIGHTS,
    reference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A.3.3 step 2 / A.3.5: attention of a node's key layers over its parent's and its residuals'.

    own, parent: [L, D] — the node's and the parent's key layers, one row per key position.
    residuals: (v[D], l) pairs from D_a; v takes part only at key position l (step 2b: "masking
      unfilled layers"), i.e. its weight is exactly 0 at every other position.
    attention: False gives the "attention off" ablation: uniform weights over the entries that
      take part at each position (self, parent, and the residuals at that position).
    sim: the similarity (module docstring); `centered` subtracts, per position, the mean of the entries
      taking part there (with no residual: own and parent alone, whose centred cosine is −1).
    reference: [L, D], for `updates`: the keys the node started its last training from.

    Returns (new keys [L, D] in own's dtype, λ [L, 2+R]: columns self, parent, residual 1..R;
    masked entries 0; each row sums to 1).
    """
    _check_float("own", own)
    _check_float("parent", parent)
    if own.dim() != 2 or own.shape != parent.shape:
        raise ValueError(f"own and parent must both be [L, D], got {tuple(own.shape)}, {tuple(parent.shape)}")
    n_pos, d = own.shape
    vecs: list[Tensor] = []
    pos: list[int] = []
    for i, (v, at) in enumerate(residuals):
        _check_float(f"residual {i}", v)
        if v.shape != (d,):
            raise ValueError(f"residual {i} must be [D={d}], got {tuple(v.shape)}")
        if not 0 <= int(at) < n_pos:
            raise ValueError(f"residual {i} has key position {at}, outside [0, {n_pos})")
        vecs.append(v)
        pos.append(int(at))
    _check_sim(sim, d, reference, [(n_pos, d)])
    n_res = len(vecs)
    dev = own.device
    sdt = _sim_dtype(dev)
    res = torch.stack([v.to(device=dev) for v in vecs]) if n_res else own[:0]  # [R, D]
    pos_t = torch.tensor(pos, dtype=torch.long, device=dev)  # [R]
    basis = reference
    if sim.kind == "centered":  # per position: the mean of own, parent and the residuals at that position
        acc = _acc_dtype(own, parent, res)
        total = own.to(acc) + parent.to(acc)
        count = torch.full((n_pos, 1), 2.0, dtype=acc, device=dev)
        for r in range(n_res):
            total[pos[r]] += res[r].to(acc)
            count[pos[r]] += 1.0
        basis = total / count
    elif sim.kind == "weights":
        basis = None

    # Scores e [L, 2+R] (step 2c): self is the constant 1, parent and residuals are similarities.
    scores = torch.full((n_pos, 2 + n_res), float("-inf"), dtype=sdt, device=dev)
    scores[:, 0] = 1.0
    seen = _compared(own, basis, sim)
    scores[:, 1] = cosine(seen, _compared(parent, basis, sim))
    if n_res:
        cols = torch.arange(2, 2 + n_res, device=dev)
        res_basis = None if basis is None else basis.index_select(0, pos_t)
        # Residual r scores only against own[l_r]; every other (l, r) cell stays -inf -> weight 0.
        scores[pos_t, cols] = cosine(seen.index_select(0, pos_t), _compared(res, res_basis, sim))
    if not attention:
        scores = torch.where(torch.isinf(scores), scores, torch.zeros_like(scores))
    lam = torch.softmax(_scaled(scores, sim), dim=-1)  # [L, 2+R] (step 2d)

    acc = _acc_dtype(own, parent, *vecs)
    w = lam.to(acc)
    out = w[:, :1] * own.to(acc) + w[:, 1:2] * parent.to(acc)  # [L, D]
    for r in range(n_res):  # a Python loop: deterministic order, unlike index_add_ on CUDA
        lr = pos[r]
        out[lr] += w[lr, 2 + r] * vecs[r].to(device=dev, dtype=acc)
    return out.to(own.dtype), lam


def aggregate_children_batched(
    members: Tensor, attention: bool = True, sim: Similarity = WEIGHTS, reference: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """A.3.3 step 4.iv C–D: attention among a node and its children, then average pooling.

    members: [M, L, D]; member 0 is the node q itself, members 1.. are its children.
    For each position l and member c: λ_{c,·} = softmax_j s(K_c, K_j) / τ over all members j (c itself
    included with score exactly 1), K'_c = Σ_j λ_{c,j} K_j; pooled K'_q = mean_c K'_c.
    attention: False gives the plain mean and uniform λ.
    reference: for `updates`, [L, D] (common to all members) or [M, L, D] (each member's own).

    Returns (pooled [L, D] in members' dtype, λ [L, M, M] with λ[l, c, j] = weight of j in K'_c).
    """
    _check_float("members", members)
    if members.dim() != 3 or members.shape[0] == 0:
        raise ValueError(f"members must be [M>=1, L, D], got {tuple(members.shape)}")
    m, n_pos, d = members.shape
    _check_sim(sim, d, reference, [(n_pos, d), (m, n_pos, d)])
    dev = members.device
    acc = _acc_dtype(members)
    if attention:
        basis = {"weights": None, "centered": _mean(members, 0), "updates": reference}[sim.kind]
        scores = _gram_cos(_compared(members, basis, sim).transpose(0, 1))  # [L, M, M]
        # The paper sets self-similarity to 1 (as e_{q,q} = 1 in step 2c), also for a zero vector.
        scores.diagonal(dim1=-2, dim2=-1).fill_(1.0)
        lam = torch.softmax(_scaled(scores, sim), dim=-1)
        # mean_c Σ_j λ_cj K_j = Σ_j (mean_c λ_cj) K_j: one weighted sum instead of M.
        w = lam.mean(dim=1).to(acc)  # [L, M]
        out = torch.zeros((n_pos, d), dtype=acc, device=dev)
        for j in range(m):
            out += w[:, j : j + 1] * members[j].to(acc)
    else:
        lam = torch.full((n_pos, m, m), 1.0 / m, dtype=_sim_dtype(dev), device=dev)
        out = torch.zeros((n_pos, d), dtype=acc, device=dev)
        for j in range(m):
            out += members[j].to(acc)
        out /= m
    return out.to(members.dtype), lam


def most_dissimilar_batched(
    pooled: Tensor,
    candidates: Tensor,
    nu: int,
    sim: Similarity = WEIGHTS,
    reference: Tensor | None = None,
    eligible: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A.3.3 step 4.iv E: per position, the ν candidates least similar to the pooled layer.

    pooled: [L, D]; candidates: [C, L, D] (the engine passes the children's key layers).
    sim: `centered` subtracts the candidates' mean at each position; reference: [L, D] for `updates`.
    eligible: optional [L, C] bool, False: the candidate may not be picked at that position.
    Returns (indices [L, min(ν, C)] int64: each row the picked candidates ascending, then −1 where fewer
    than ν are eligible; sims [L, C]). Ties in similarity prefer the lower index.
    """
    _check_float("pooled", pooled)
    _check_float("candidates", candidates)
    if nu < 0:
        raise ValueError(f"nu must be >= 0, got {nu}")
    if pooled.dim() != 2 or candidates.dim() != 3 or candidates.shape[1:] != pooled.shape:
        raise ValueError(
            f"expected pooled [L, D] and candidates [C, L, D], got {tuple(pooled.shape)}, {tuple(candidates.shape)}"
        )
    n_cand = candidates.shape[0]
    _check_sim(sim, pooled.shape[1], reference, [tuple(pooled.shape)])
    if eligible is not None and (eligible.shape != (pooled.shape[0], n_cand) or eligible.dtype != torch.bool):
        raise ValueError(f"eligible must be a bool tensor of shape [{pooled.shape[0]}, {n_cand}]")
    basis = {"weights": None, "centered": _mean(candidates, 0), "updates": reference}[sim.kind]
    seen = _compared(pooled, basis, sim)
    # Dots as float64 matmuls per position and norms apart: broadcasting `pooled` against every
    # candidate (as `cosine` would) up-casts C copies of it.
    dtype = _sim_dtype(pooled.device)
    cands = _compared(candidates, basis, sim).transpose(0, 1)  # [L, C, D]
    dots = _dots_matmul(cands, seen.unsqueeze(1), dtype).squeeze(-1)  # [L, C]
    sims = _cos_from(dots, _sq_norms(cands, dtype), _sq_norms(seen, dtype).unsqueeze(-1))  # [L, C]
    k = min(nu, n_cand)
    ranked = sims if eligible is None else sims.masked_fill(~eligible.to(sims.device), float("inf"))
    # Stable ascending sort: least similar first, equal similarities keep index order.
    order = torch.sort(ranked, dim=-1, stable=True).indices[:, :k]
    if eligible is not None:  # ineligible picks sort last (as index C), then read -1
        order = torch.where(ranked.gather(1, order).isinf(), torch.full_like(order, n_cand), order)
    order = torch.sort(order, dim=-1).values
    return torch.where(order == n_cand, torch.full_like(order, -1), order), sims


def route_batched(
    residuals: Tensor,
    positions: Tensor,
    children: Tensor,
    allowed: Tensor | None = None,
    sim: Similarity = WEIGHTS,
    reference: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A.3.3 step 4.ii–iii / A.3.7: send each residual (v, l) to the child with the most similar K_{c,l}.

    residuals: [R, D]; positions: [R] int64 key positions; children: [C, L, D];
    allowed: optional [R, C] bool, False excludes a child for that residual (e.g. never route a
      residual back into the subtree it came from).
    sim: `centered` subtracts the children's mean at the residual's position (from both sides);
      reference: [L, D] for `updates` (the model the children are about to receive).
    Returns (child index [R] int64, -1 where no child is allowed; its cosine [R], 0 where -1).
    Ties prefer the lower child index.
    """
    _check_float("residuals", residuals)
    _check_float("children", children)
    if residuals.dim() != 2 or children.dim() != 3 or residuals.shape[1] != children.shape[2]:
        raise ValueError(
            f"expected residuals [R, D] and children [C, L, D], got {tuple(residuals.shape)}, {tuple(children.shape)}"
        )
    n_res = residuals.shape[0]
    n_child, n_pos, d = children.shape
    dev = residuals.device
    if positions.shape != (n_res,) or positions.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"positions must be an integer tensor of shape [{n_res}], got {positions.shape}")
    positions = positions.to(device=dev, dtype=torch.long)
    if n_res and (int(positions.min()) < 0 or int(positions.max()) >= n_pos):
        raise ValueError(f"residual positions must lie in [0, {n_pos})")
    if allowed is not None and (allowed.shape != (n_res, n_child) or allowed.dtype != torch.bool):
        raise ValueError(f"allowed must be a bool tensor of shape [{n_res}, {n_child}]")
    _check_sim(sim, d, reference, [(n_pos, d)])
    sdt = _sim_dtype(dev)
    if n_res == 0 or n_child == 0:
        return (
            torch.full((n_res,), -1, dtype=torch.long, device=dev),
            torch.zeros((n_res,), dtype=sdt, device=dev),
        )
    basis = {"weights": None, "centered": _mean(children, 0), "updates": reference}[sim.kind]
    residuals = _compared(residuals, None if basis is None else basis.index_select(0, positions), sim)
    children = _compared(children, basis, sim)
    d = children.shape[-1]

    # Dots against every (child, position), then keep each residual's own position: L× the flops
    # of a gather but no [C, R, D] copy, and L is small.
    flat = children.reshape(n_child * n_pos, d)
    dots = _dots_matmul(residuals, flat, sdt).view(n_res, n_child, n_pos)  # [R, C, L]
    idx = positions.view(n_res, 1, 1).expand(n_res, n_child, 1)
    dots = dots.gather(2, idx).squeeze(2)  # [R, C]
    child_sq = _sq_norms(children, sdt)  # [C, L]
    sims = _cos_from(dots, _sq_norms(residuals, sdt).unsqueeze(1), child_sq[:, positions].T)  # [R, C]

    masked = sims if allowed is None else sims.masked_fill(~allowed.to(dev), float("-inf"))
    best = torch.argmax(masked, dim=-1)  # first maximum -> lowest index on ties
    best_sim = masked.gather(1, best.unsqueeze(1)).squeeze(1)
    none = torch.isinf(best_sim)  # every child masked out
    best = torch.where(none, torch.full_like(best, -1), best)
    best_sim = torch.where(none, torch.zeros_like(best_sim), best_sim)
    return best, best_sim


def attention_spread(weights: Tensor, takes_part: Tensor | None = None) -> dict[str, float]:
    """How far attention rows are from uniform: the mean over rows of their max, min and entropy (nats).

    weights: [..., K] rows that sum to 1; takes_part: the same shape, bool, False for an entry masked
    out of its row (a residual at another key position): it counts neither in min nor in the entropy.
    A uniform row over k entries has max = min = 1/k and entropy ln k.
    """
    w = weights.double().reshape(-1, weights.shape[-1])
    part = torch.ones_like(w, dtype=torch.bool) if takes_part is None else takes_part.reshape(w.shape).to(w.device)
    big = w.masked_fill(~part, float("-inf")).amax(dim=-1)
    small = w.masked_fill(~part, float("inf")).amin(dim=-1)
    logs = torch.where(part & (w > 0), w.clamp_min(1e-300).log(), torch.zeros_like(w))
    entropy = -(w * logs).sum(dim=-1)
    return {"max": float(big.mean()), "min": float(small.mean()), "entropy": float(entropy.mean())}


# --------------------------------------------------------------------------------------------------
# single-vector public API: 1-D key layers, thin wrappers over the batched forms


def _check_vec(name: str, t: Tensor, d: int | None = None) -> int:
    _check_float(name, t)
    if t.dim() != 1 or (d is not None and t.shape[0] != d):
        want = "1-D" if d is None else f"1-D of size {d}"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    return int(t.shape[0])


def aggregate_with_parent(own: Tensor, parent: Tensor, residuals: Sequence[Tensor] = ()) -> Tensor:
    """A.3.3 step 2c–d for one key layer: λ = softmax([1, cos(own,parent), cos(own,r)...]);
    returns λ_self·own + λ_p·parent + Σ λ_r·r, in own's dtype."""
    d = _check_vec("own", own)
    _check_vec("parent", parent, d)
    for i, r in enumerate(residuals):
        _check_vec(f"residual {i}", r, d)
    new, _ = aggregate_with_parent_batched(own.unsqueeze(0), parent.unsqueeze(0), [(r, 0) for r in residuals])
    return new[0]


def aggregate_children(node: Tensor, children: Sequence[Tensor]) -> Tensor:
    """A.3.3 step 4.iv C–D for one key layer: attention over [node, *children], then the mean
    of the attended layers (the pooled K'_q), in node's dtype."""
    d = _check_vec("node", node)
    for i, c in enumerate(children):
        _check_vec(f"child {i}", c, d)
    members = torch.stack([node, *(c.to(device=node.device, dtype=node.dtype) for c in children)])
    pooled, _ = aggregate_children_batched(members.unsqueeze(1))  # [M, 1, D]
    return pooled[0]


def most_dissimilar(pooled: Tensor, members: Sequence[Tensor], nu: int) -> list[int]:
    """A.3.3 step 4.iv E for one key layer: indices (ascending) of the ν members least
    cosine-similar to `pooled`; all of them if ν exceeds their number."""
    d = _check_vec("pooled", pooled)
    if nu < 0:
        raise ValueError(f"nu must be >= 0, got {nu}")
    for i, c in enumerate(members):
        _check_vec(f"member {i}", c, d)
    if not members or nu == 0:
        return []
    stacked = torch.stack([c.to(device=pooled.device) for c in members]).unsqueeze(1)  # [C, 1, D]
    idx, _ = most_dissimilar_batched(pooled.unsqueeze(0), stacked, nu)
    return [int(i) for i in idx[0].tolist()]


def route(residual: Tensor, children: Sequence[Tensor]) -> int:
    """A.3.7 for one key layer: index of the child most cosine-similar to the residual."""
    d = _check_vec("residual", residual)
    if not children:
        raise ValueError("route needs at least one child")
    for i, c in enumerate(children):
        _check_vec(f"child {i}", c, d)
    stacked = torch.stack([c.to(device=residual.device) for c in children]).unsqueeze(1)  # [C, 1, D]
    pos = torch.zeros(1, dtype=torch.long, device=residual.device)
    best, _ = route_batched(residual.unsqueeze(0), pos, stacked)
    return int(best[0])


def child_shares(weights: Tensor) -> Tensor:
    """Each child's share of its parent's attention over the children: the parent's own row of step 4.iv's
    weights [L, M, M] (member 0 the parent) without its self-weight, renormalised: [L, C], rows sum to 1.

    Leaving the self-weight out keeps the share comparable across temperatures (at a low τ the fixed
    self-score 1 takes most of the row whatever the children are); uniform attention gives 1/C each.
    """
    row = weights[:, 0, 1:]
    return row / row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
