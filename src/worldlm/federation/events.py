"""The round's observable decisions as metrics records: bytes on an edge, attention weights, outliers,
residual picks and moves, withheld DP releases. Both runners write these same records."""

from __future__ import annotations

import torch
from torch import Tensor

from worldlm.federation.aggregation import attention_spread, child_shares
from worldlm.federation.types import Event, FedOptions, Residual


def edge_event(rnd: int, src: str, dst: str, nbytes: int) -> Event:
    return {"event": "edge", "round": rnd, "src": src, "dst": dst, "bytes": nbytes}


def parent_attention_event(rnd: int, node: str, parent: str, used: list[Residual], weights: Tensor) -> Event:
    """Step 2's weights [L, 2+R] and their spread (over the entries taking part at each key position)."""
    members = [node, parent, *[f"residual:{r.origin}@{r.position}" for r in used]]
    takes_part = torch.zeros(weights.shape, dtype=torch.bool)
    takes_part[:, :2] = True
    for j, r in enumerate(used):
        takes_part[r.position, 2 + j] = True
    return {
        "event": "attention",
        "round": rnd,
        "node": node,
        "kind": "parent",
        "members": members,
        "weights": weights.tolist(),
        "spread": attention_spread(weights, takes_part),
    }


def children_attention_event(rnd: int, node: str, senders: list[str], weights: Tensor) -> Event:
    """Step 4.iv's weights [L, M, M]; `spread` of the node's own row (its weight on each member), `shares`:
    each child's share of that row (`child_shares`, mean over key positions), and `pooled`: each member's
    weight in the pooled keys (mean over the members' rows and the key positions)."""
    return {
        "event": "attention",
        "round": rnd,
        "node": node,
        "kind": "children",
        "members": [node, *senders],
        "weights": weights.tolist(),
        "spread": attention_spread(weights[:, 0]),
        "shares": child_shares(weights).mean(dim=0).tolist(),
        "pooled": weights.mean(dim=(0, 1)).tolist(),
    }


def outlier_event(
    rnd: int, node: str, child: str, share: float, rounds: int, opts: FedOptions, n_children: int
) -> Event:
    """A child its parent's attention has all but ignored for `rounds` aggregations in a row (`child_shares`)."""
    where = {"round": rnd, "node": node, "member": child}
    return {
        "event": "outlier",
        **where,
        "share": share,
        "threshold": opts.outlier_weight / n_children,
        "rounds": rounds,
    }


def pick_event(rnd: int, node: str, r: Residual) -> Event:
    return {"event": "residual_pick", "round": rnd, "node": node, "origin": r.origin, "position": r.position}


def route_event(rnd: int, node: str, r: Residual, target: str | None, similarity: float) -> Event:
    where = {"node": node, "origin": r.origin, "position": r.position}
    return {"event": "residual_route", "round": rnd, **where, "destination": target, "similarity": similarity}


def withheld_event(rnd: int, node: str, parent: str) -> Event:
    """A DP child whose ε budget is spent sends nothing this visit (§4.2 accounting)."""
    return {"event": "dp_withheld", "round": rnd, "node": node, "parent": parent}
