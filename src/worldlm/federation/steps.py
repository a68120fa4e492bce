"""Per-node steps of Algorithm 1 (Appendix A.3): what one node does when one message arrives.

`round.run_round` (every node in one process) and the Flower node (one process per node) both call these,
in the same order, so the two runners agree bit for bit. Pure: no model, no data, no I/O.
"""

from __future__ import annotations

import torch
from torch import Tensor

from worldlm.federation.aggregation import (
    aggregate_children_batched,
    aggregate_with_parent_batched,
    child_shares,
    most_dissimilar_batched,
    route_batched,
)
from worldlm.federation.server_opt import ServerOpt
from worldlm.federation.tree import Tree
from worldlm.federation.types import FedOptions, NodeState, Residual, Split, Update


def uses_keys(split: Split, opts: FedOptions) -> bool:
    return split.key_blocks > 0 and opts.share_keys


def receive_from_parent(
    own: Tensor,
    parent: Tensor,
    residuals: list[Residual],
    split: Split,
    opts: FedOptions,
    reference: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Steps 2–3: aggregate own keys with the parent's (and D_a) by attention; take the parent's backbone.

    `reference`: the keys the node's last visit started from (similarity "updates"; None: no visit yet,
    so its own keys: no change). Returns the new flat state and the attention weights [L, 2 + |D_a|]
    (None when keys are not shared).
    """
    backbone = split.backbone(parent).clone()  # step 3: replace backbone
    if split.key_blocks == 0:
        return backbone, None
    if not opts.share_keys:  # FedPer: personal layers never mix
        return split.join(backbone, split.keys(own)), None
    updates = opts.similarity.kind == "updates"
    keys, weights = aggregate_with_parent_batched(
        split.keys(own),
        split.keys(parent),
        [(r.vector, r.position) for r in residuals],
        attention=opts.attention,
        sim=opts.similarity,
        reference=(split.keys(own) if reference is None else reference) if updates else None,
    )  # step 2c–d
    return split.join(backbone, keys), weights


def aggregate_subtree(
    node_params: Tensor,
    updates: list[Update],
    children: list[str],
    server_opt: ServerOpt,
    split: Split,
    opts: FedOptions,
    own: Tensor | None = None,
    reference: Tensor | None = None,
) -> tuple[Tensor, list[Residual], Tensor | None]:
    """Step 4.iv: ServerOpt on the mean pseudo-gradient, attention pooling of keys, residual selection.

    `own`: in the parallel schedule (§3.1) the node trained as a client from `node_params` beside its
    children; its trained state is then one more pseudo-gradient in the mean and its keys are member 0.
    `reference`: the keys the node's visit started from (similarity "updates": the node's own change is
    measured from them, its children's from `node_params`, the model it sent them).
    With `opts.skip_outlier_residuals`, residuals are picked among the children whose share of the node's
    attention (`child_shares`) is at least `opts.outlier_weight` / C at that key position.
    Returns the node's new state, the residuals it selected, and the attention weights [L, M, M].
    """
    backbone = split.backbone(node_params)
    trained = ([own] if own is not None else []) + [u.params for u in updates]
    deltas = torch.stack([split.backbone(p) - backbone for p in trained])  # A: Δ_c = B_c − B
    new_backbone = server_opt.step(backbone, deltas.mean(dim=0))  # B: ServerOpt(mean Δ)
    node_keys = split.keys(own if own is not None else node_params) if split.key_blocks else backbone[:0]
    if not uses_keys(split, opts):
        return split.join(new_backbone, node_keys), [], None
    child_keys = torch.stack([split.keys(u.params) for u in updates])  # [C, L, D]
    members = torch.cat([node_keys.unsqueeze(0), child_keys])  # [M, L, D], member 0 = q
    sent = split.keys(node_params)  # the model q's children received from it
    refs: Tensor | None = None
    if opts.similarity.kind == "updates":
        # each member's change: q's since its visit began, the children's since `sent`
        mine = node_keys if reference is None else reference
        refs = torch.cat([mine.unsqueeze(0), sent.unsqueeze(0).expand_as(child_keys)])
    pooled, weights = aggregate_children_batched(members, opts.attention, opts.similarity, refs)  # C–D
    picked: list[Residual] = []
    if opts.nu > 0:
        eligible = None
        if opts.skip_outlier_residuals and opts.outlier_weight > 0:  # a child q's attention all but ignores
            eligible = child_shares(weights) >= opts.outlier_weight / len(updates)  # [L, C]
        ref = sent if opts.similarity.kind == "updates" else None
        idx, _ = most_dissimilar_batched(pooled, child_keys, opts.nu, opts.similarity, ref, eligible)  # E
        for pos in range(split.key_blocks):
            for c in idx[pos].tolist():
                if c >= 0:
                    picked.append(Residual(child_keys[c, pos].clone(), pos, children[c]))
    return split.join(new_backbone, pooled), picked, weights


def route_residuals(
    residuals: list[Residual],
    children: list[str],
    child_params: list[Tensor],
    tree: Tree,
    split: Split,
    opts: FedOptions,
    reference: Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """Steps 4.ii–iii / A.3.7: send each residual to the child whose key layer at l is most similar.

    Returns per residual the chosen child index (-1: no allowed child) and the similarity.
    """
    if not residuals:
        return [], []
    keys = torch.stack([split.keys(p) for p in child_params])
    return route_by_keys(residuals, children, keys, tree, opts, reference)


def origin_node(origin: str) -> str:
    """The tree node a residual's origin names. A region of a nested deployment hides the members below it
    behind aliases `<region>#<k>` when residuals leave it; such an alias stands for a node of that region's
    subtree, which is all A.3.7's `route_to_origin` test asks."""
    return origin.split("#", 1)[0]


def route_by_keys(
    residuals: list[Residual],
    children: list[str],
    keys: Tensor,
    tree: Tree,
    opts: FedOptions,
    reference: Tensor | None = None,
) -> tuple[list[int], list[float]]:
    """`route_residuals` given the children's key layers [C, L, D] (what a parent knows of its children);
    `reference` [L, D]: for similarity "updates", the keys the children are about to receive."""
    if not residuals:
        return [], []
    vectors = torch.stack([r.vector for r in residuals])  # [R, D]
    positions = torch.tensor([r.position for r in residuals], dtype=torch.int64)
    allowed = None
    if not opts.route_to_origin:
        subtrees = [set(tree.subtree(c)) for c in children]
        allowed = torch.tensor(
            [[origin_node(r.origin) not in s for s in subtrees] for r in residuals], dtype=torch.bool
        )
    dest, sims = route_batched(vectors, positions, keys, allowed, opts.similarity, reference)
    return dest.tolist(), sims.tolist()


def accept_from_parent(
    st: NodeState, parent: Tensor, routed: list[Residual], leaf: bool, split: Split, opts: FedOptions
) -> tuple[Tensor | None, list[Residual]]:
    """Steps 2–3 (with 4.iii) at a node when its parent's model arrives, updating `st` in place.

    The residuals the parent routed here join D_a on a leaf (aggregated right now) or D_r on an
    inner node (routed further down after it trains). Returns the attention weights and the D_a used.
    """
    (st.to_aggregate if leaf else st.to_route).extend(routed)
    used, st.to_aggregate = st.to_aggregate, []  # D_a is consumed by this aggregation
    st.params, weights = receive_from_parent(st.params, parent, used, split, opts, st.reference)
    return weights, used


def start_visit(st: NodeState, split: Split, opts: FedOptions) -> None:
    """A node's (sub-)visit begins, before its training: remember the keys it starts from (similarity "updates")."""
    if opts.similarity.kind == "updates" and uses_keys(split, opts):
        st.reference = split.keys(st.params).clone()


def initial_child_keys(st: NodeState, children: list[str], split: Split, opts: FedOptions) -> None:
    """Before round 0 every child holds the initial model: what its parent knows of its key layers."""
    if uses_keys(split, opts):
        st.child_keys = {c: split.keys(st.params).clone() for c in children}


def route_pending(
    st: NodeState, children: list[str], tree: Tree, split: Split, opts: FedOptions
) -> list[tuple[Residual, str | None, float]]:
    """Steps 4.ii–iii at an inner node: route its D_r by the children's key layers as it last received them
    (`NodeState.child_keys`; for DP children their releases), never by the children's own states.

    Empties D_r; returns (residual, destination child or None, similarity) per residual.
    """
    pending, st.to_route = st.to_route, []
    if not pending or not uses_keys(split, opts):
        return []
    sent = split.keys(st.params) if opts.similarity.kind == "updates" else None  # the model the children get next
    own = split.keys(st.params)  # a child never heard from (no update yet) is taken to hold what q holds
    keys = torch.stack([st.child_keys.get(c, own) for c in children])
    dest, sims = route_by_keys(pending, children, keys, tree, opts, sent)
    return [(r, children[d] if d >= 0 else None, s) for r, d, s in zip(pending, dest, sims, strict=True)]


def aggregate_step(
    st: NodeState,
    updates: list[Update],
    senders: list[str],
    is_root: bool,
    split: Split,
    opts: FedOptions,
    own: Tensor | None = None,
) -> tuple[list[Residual], Tensor | None, list[Residual], list[tuple[str, float, int]]]:
    """Step 4.iv at an inner node once its children's updates arrived, updating `st` in place.

    Returns the residuals it picked, the attention weights, the residuals to send up (all it
    picked plus those its children sent; the root keeps them as next round's D_r instead), and the
    outliers: (child, its mean share of the node's attention, aggregations in a row under the threshold)
    for every child under `opts.outlier_weight` / C for at least `opts.outlier_rounds` aggregations.
    `own`: the node's own trained state in the parallel schedule (see `aggregate_subtree`).
    """
    assert st.server_opt is not None, "an inner node needs a server optimizer"
    st.params, picked, weights = aggregate_subtree(
        st.params, updates, senders, st.server_opt, split, opts, own, st.reference
    )
    if uses_keys(split, opts):  # what q now knows of its children's key layers (routing's next input)
        for child, u in zip(senders, updates, strict=True):
            st.child_keys[child] = split.keys(u.params).clone()
    outliers: list[tuple[str, float, int]] = []
    if weights is not None and opts.outlier_weight > 0:
        shares = child_shares(weights).mean(dim=0).tolist()  # each child's share of q's attention
        for child, w in zip(senders, shares, strict=True):
            low = w < opts.outlier_weight / len(senders)
            st.low_rounds[child] = st.low_rounds.get(child, 0) + 1 if low else 0
            if st.low_rounds[child] >= opts.outlier_rounds:
                outliers.append((child, w, st.low_rounds[child]))
    forwarded = picked + [r for u in updates for r in u.residuals]
    if is_root:  # the root routes everything down at its next visit of its children
        st.to_route = forwarded
        return picked, weights, [], outliers
    return picked, weights, forwarded, outliers


def message_numel(split: Split, opts: FedOptions, residuals: list[Residual]) -> int:
    """Values on the wire for one model message: the backbone, shared key layers, residuals (+ position)."""
    keys = split.key_blocks * split.key_size if opts.share_keys else 0
    return split.backbone_size + keys + sum(r.vector.numel() + 1 for r in residuals)


def keep_trained(st: NodeState, trained: Tensor, inner: bool, opts: FedOptions) -> None:
    """After 4.i: an inner node with opts.keep_trained keeps a copy of its trained model, which its aggregation
    replaces in `params` (a leaf's `params` stays its trained model): what `fine_tuned_model` returns."""
    if opts.keep_trained and inner:
        st.trained = trained.clone()


def fine_tuned_model(st: NodeState) -> Tensor:
    """A node's model after its last local training: kept apart by an inner node that aggregates after it
    (FedOptions.keep_trained); otherwise its state (a leaf's state is its last training's result)."""
    return st.trained if st.trained is not None else st.params
