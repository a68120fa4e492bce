"""One global round of WorldLM (paper Algorithm 1, Appendix A.3) over a tree of any depth.

Pure federation logic on flat parameter vectors: no model, no data, no I/O. Local training is
delegated to a `NodeTrainer` (the runner owns models, AdamW states and data samplers); every
observable decision (attention weights, residual moves, bytes on each edge) goes to an `emit`
callback. Baselines are configurations of this same round (DESIGN §2):

- HierFAVG: `key_blocks = 0` (everything is backbone);
- FedPer: key layers never leave a node (`share_keys = False`);
- FL: a flat tree (`tree.flat_tree`) without key layers;
- centralized / local: single-node trees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from worldlm.federation.aggregation import (
    WEIGHTS,
    Similarity,
    aggregate_children_batched,
    aggregate_with_parent_batched,
    attention_spread,
    most_dissimilar_batched,
    route_batched,
)
from worldlm.federation.server_opt import ServerOpt
from worldlm.federation.tree import Tree
from worldlm.timing import PhaseFn, no_phase

Event = dict[str, object]
Emit = Callable[[Event], None]
BYTES_PER_VALUE = 4  # float32 on the wire


@dataclass(frozen=True)
class Split:
    """Where the backbone and the key layers sit in a flat state vector (see model.ParamLayout)."""

    backbone_size: int
    key_blocks: int  # L
    key_size: int  # D

    def backbone(self, flat: Tensor) -> Tensor:
        return flat[: self.backbone_size]

    def keys(self, flat: Tensor) -> Tensor:
        return flat[self.backbone_size :].view(self.key_blocks, self.key_size)  # [L, D]

    def join(self, backbone: Tensor, keys: Tensor) -> Tensor:
        return torch.cat([backbone.reshape(-1), keys.reshape(-1)])


@dataclass(frozen=True)
class Residual:
    """A child's key layer at one position, picked as dissimilar (A.3.3 step 4.iv E)."""

    vector: Tensor  # [D]
    position: int  # l
    origin: str  # the node whose key layer it was


@dataclass
class NodeState:
    """What a node keeps between rounds on the federation side (training state lives in the runner)."""

    params: Tensor  # flat: backbone then key layers
    server_opt: ServerOpt | None = None  # inner nodes only (per-level momentum)
    to_aggregate: list[Residual] = field(default_factory=list)  # D_a (leaves)
    to_route: list[Residual] = field(default_factory=list)  # D_r (inner nodes; the root's for next round)
    # similarity "updates": the key layers [L, D] the node's latest visit started from (what it received)
    reference: Tensor | None = None
    # inner nodes: consecutive aggregations in which each child's weight here was under the outlier threshold
    low_rounds: dict[str, int] = field(default_factory=dict)
    # inner nodes: each child's key layers [L, D] as last received (its DP release for a DP child): what
    # routing reads (A.3.7); a parent never looks at a child's own state
    child_keys: dict[str, Tensor] = field(default_factory=dict)
    # inner nodes with FedOptions.keep_trained: the model after the node's latest local training, which its
    # aggregation then replaces in `params` ("+ local fine-tuning" scores each node's model after its last steps)
    trained: Tensor | None = None


@dataclass(frozen=True)
class FedOptions:
    local_steps: Mapping[str, int]  # steps each node trains per visit (0: an aggregation-only server)
    share_keys: bool = True  # False: FedPer (key layers stay local)
    attention: bool = True  # False: uniform averaging of key layers (ablation)
    nu: int = 1  # residuals per key position per inner node
    route_to_origin: bool = True  # A.3.7; False: never route a residual back into the subtree it came from
    sub_rounds: int = 1  # T_q
    parallel: bool = False  # §3.1 parallel mode: an inner node trains as a client beside its children
    similarity: Similarity = WEIGHTS  # how key layers are compared (attention, residual picking, routing)
    # A child whose share of its parent's attention over the children (`child_shares`) falls under
    # outlier_weight / C (C children; 0: off) for outlier_rounds aggregations in a row is an `outlier`; with
    # skip_outlier_residuals a child under it is not picked as a residual there (its keys are not carried
    # to other federations).
    outlier_weight: float = 0.5
    outlier_rounds: int = 2
    skip_outlier_residuals: bool = False
    keep_trained: bool = False  # inner nodes keep their trained model (NodeState.trained) beside the aggregate


@dataclass(frozen=True)
class Update:
    """What a child sends its parent after its subtree finished (A.3.3 step 4.iv inputs)."""

    params: Tensor
    residuals: list[Residual]


class NodeTrainer(Protocol):
    def train(self, node: str, params: Tensor, start_step: int, n_steps: int) -> Tensor:
        """Train `node` from `params` for `n_steps` with the LR of global steps start_step..; return params."""


class Privatizer(Protocol):
    """DP of flagged nodes (DESIGN §2 "Differential privacy"; implemented by federation.privacy.Privacy)."""

    def applies(self, node: str) -> bool:
        """Whether `node` privatises what it sends to its parent."""

    def release(self, node: str, update: Update, received: Tensor, split: Split, share_keys: bool) -> Update | None:
        """The message `node` sends instead of `update` (`received`: its parent's state this visit); None: none."""

    def combine(
        self,
        parent: str,
        senders: Sequence[str],
        updates: Sequence[Update],
        sent: Tensor,
        split: Split,
        share_keys: bool,
    ) -> list[Update]:
        """What `parent` aggregates of its children's messages (central DP noise; else `updates` as they are)."""


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


def child_shares(weights: Tensor) -> Tensor:
    """Each child's share of its parent's attention over the children: the parent's own row of step 4.iv's
    weights [L, M, M] (member 0 the parent) without its self-weight, renormalised: [L, C], rows sum to 1.

    Leaving the self-weight out keeps the share comparable across temperatures (at a low τ the fixed
    self-score 1 takes most of the row whatever the children are); uniform attention gives 1/C each.
    """
    row = weights[:, 0, 1:]
    return row / row.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)


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


# Per-node steps: what one node does when one message arrives. `run_round` (all nodes in one
# process) and the Flower runner (one process per node) both call these, so they agree exactly.


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


def message_numel(split: Split, opts: FedOptions, residuals: list[Residual]) -> int:
    """Values on the wire for one model message: the backbone, shared key layers, residuals (+ position)."""
    keys = split.key_blocks * split.key_size if opts.share_keys else 0
    return split.backbone_size + keys + sum(r.vector.numel() + 1 for r in residuals)


def sequential_span(tree: Tree, node: str, opts: FedOptions) -> int:
    """Sequential steps one visit of `node` takes: its own training, then its slowest child, T_q times.

    In the parallel schedule (§3.1) the node trains in the same window as its children: the longer of the two.
    """
    children = tree[node].children
    if not children:
        return opts.local_steps[node]
    below = max(sequential_span(tree, c, opts) for c in children)
    own = opts.local_steps[node]
    return opts.sub_rounds * (max(own, below) if opts.parallel else own + below)


def trainings_per_round(tree: Tree, node: str, opts: FedOptions) -> int:
    """How often `node` trains in one global round: once per sub-round of each inner ancestor and its own."""
    inner = [n for n in tree.path_to_root(node) if tree[n].children]
    return int(opts.sub_rounds ** len(inner))


def _keep(_node: str) -> None:
    """The `release` hook of states held in memory: nothing to do."""


Observe = Callable[[str, str, int, Tensor], None]


def _unobserved(_what: str, _node: str, _step: int, _params: Tensor) -> None:
    """The `observe` hook of a round nobody traces."""


def run_round(
    tree: Tree,
    states: Mapping[str, NodeState],
    split: Split,
    opts: FedOptions,
    round_idx: int,
    trainer: NodeTrainer,
    emit: Emit,
    privacy: Privatizer | None = None,
    release: Callable[[str], None] = _keep,
    phase: PhaseFn = no_phase,
    observe: Observe = _unobserved,
) -> None:
    """Algorithm 1 for one global round, root first; states are updated in place.

    With `privacy`, the update of every node it `applies` to is replaced by its DP release before
    the parent sees it (paper §4.2, DPFedAvg); a node without a release (budget spent) is left out
    of its parent's aggregation. Nodes it does not apply to, and runs without it, are unchanged.

    `release(q)` is called when q's visit is over: its state is not needed until it is next looked
    up (a runner keeping states on disk writes it out then). `phase(name)` times the federation's
    own work: "aggregation" (steps 2–3 and 4.iv), "routing" (4.ii–iii), "serialisation" (the
    update a node sends up) and "privacy" (DP releases); training is timed by the trainer.

    `observe(what, q, step, params)` sees the model that travels: "start" the root's model as the
    round begins, "received" a child's model once it has taken its parent's (steps 2–3; left out
    without key layers, where it is the parent's model unchanged: FL, HierFAVG), "trained"
    after q's local training (4.i), "aggregated" after q aggregated its subtree (4.iv); `step` is the
    sequential step reached.

    With `opts.parallel` (§3.1) an inner node trains from the model it received, as a client beside
    its children (who receive that same model) in the same sequential window, and its trained state
    joins their updates in its aggregation.
    """
    start = round_idx * sequential_span(tree, tree.root, opts)
    received: dict[str, Tensor] = {}  # DP nodes: the parent state they got this visit (the DP reference)

    def visit(q: str, step: int) -> Update | None:
        st = states[q]
        children = list(tree[q].children)
        outbox: list[Residual] = []  # residuals this subtree sends up
        for _ in range(opts.sub_rounds if children else 1):  # T_q sub-rounds per parent visit
            own: Tensor | None = None  # parallel schedule: q's trained state, a member of its own aggregation
            start_visit(st, split, opts)
            if opts.local_steps[q] > 0:  # 4.i: local training with ClientOpt on the global clock
                trained = trainer.train(q, st.params, step, opts.local_steps[q])
                observe("trained", q, step + opts.local_steps[q], trained)
                keep_trained(st, trained, bool(children), opts)
                if opts.parallel and children:
                    own = trained
                else:
                    st.params = trained
            if not children:
                break
            window = step  # where the children start: after q's training, or beside it in the parallel schedule
            if not opts.parallel:
                window += opts.local_steps[q]
            with phase("routing"):
                routed = _route_down(q, st, children, round_idx)  # 4.ii–iii
            updates: list[Update] = []
            senders: list[str] = []  # children whose update arrived (all of them without DP budgets)
            for c in children:  # notionally in parallel: every child sees the same parent state
                _send_down(q, c, routed.get(c, []), round_idx)
                if split.key_blocks:  # without key layers (FL, HierFAVG) c holds q's model unchanged: q's point
                    observe("received", c, window, states[c].params)
                update = visit(c, window)
                if update is None:  # a DP child whose ε budget is spent sends nothing (§4.2 accounting)
                    emit({"event": "dp_withheld", "round": round_idx, "node": c, "parent": q})
                    continue
                updates.append(update)
                senders.append(c)
                up = message_numel(split, opts, update.residuals)
                emit({"event": "edge", "round": round_idx, "src": c, "dst": q, "bytes": up * BYTES_PER_VALUE})
            below = max(sequential_span(tree, c, opts) for c in children)
            step = max(step + opts.local_steps[q], window + below)
            if not updates:  # every child withheld: nothing to aggregate this sub-round (q keeps its own training)
                st.params = own if own is not None else st.params
                continue
            assert st.server_opt is not None, f"inner node {q} has no server optimizer"
            if privacy is not None:  # dp.noise = "central": q noises its DP children's sum (§4.2 variant)
                with phase("privacy"):
                    updates = privacy.combine(q, senders, updates, st.params, split, uses_keys(split, opts))
            with phase("aggregation"):
                picked, weights, to_parent, outliers = aggregate_step(
                    st, updates, senders, q == tree.root, split, opts, own
                )  # 4.iv
            observe("aggregated", q, step, st.params)
            if weights is not None:
                emit(children_attention_event(round_idx, q, senders, weights))
            for child, w, n in outliers:
                emit(outlier_event(round_idx, q, child, w, n, opts, len(senders)))
            for r in picked:
                emit(pick_event(round_idx, q, r))
            outbox.extend(to_parent)
        with phase("serialisation"):
            message = Update(st.params.clone(), outbox)
        sent: Update | None = message
        if privacy is not None and q in received:  # DPFedAvg: what leaves a DP node is privatised (§4.2)
            with phase("privacy"):
                sent = privacy.release(q, message, received.pop(q), split, uses_keys(split, opts))
        release(q)
        return sent

    def _send_down(q: str, c: str, routed: list[Residual], rnd: int) -> None:
        parent_params = states[q].params
        if privacy is not None and privacy.applies(c):
            received[c] = parent_params.clone()  # the DP reference: release = this + privatised difference
        with phase("aggregation"):
            weights, used = accept_from_parent(states[c], parent_params, routed, tree.is_leaf(c), split, opts)  # 2–3
        down = message_numel(split, opts, routed)
        emit(edge_event(rnd, q, c, down * BYTES_PER_VALUE))
        if weights is not None:
            emit(parent_attention_event(rnd, c, q, used, weights))

    def _route_down(q: str, st: NodeState, children: list[str], rnd: int) -> dict[str, list[Residual]]:
        routed: dict[str, list[Residual]] = {}  # the children queue them when the parent's model arrives
        for r, target, sim in route_pending(st, children, tree, split, opts):
            emit(route_event(rnd, q, r, target, sim))
            if target is not None:
                routed.setdefault(target, []).append(r)
        return routed

    observe("start", tree.root, start, states[tree.root].params)
    visit(tree.root, start)


def keep_trained(st: NodeState, trained: Tensor, inner: bool, opts: FedOptions) -> None:
    """After 4.i: an inner node with opts.keep_trained keeps a copy of its trained model, which its aggregation
    replaces in `params` (a leaf's `params` stays its trained model): what `fine_tuned_model` returns."""
    if opts.keep_trained and inner:
        st.trained = trained.clone()


def fine_tuned_model(st: NodeState) -> Tensor:
    """A node's model after its last local training: kept apart by an inner node that aggregates after it
    (FedOptions.keep_trained); otherwise its state (a leaf's state is its last training's result)."""
    return st.trained if st.trained is not None else st.params


def deployed_models(
    tree: Tree,
    states: Mapping[str, NodeState],
    split: Split,
    opts: FedOptions,
    release: Callable[[str], None] = _keep,
) -> Iterator[tuple[str, Tensor]]:
    """Each node's personalised model: what it would hold after the next downward pass (steps 2–3).

    The root keeps its own state; every other node takes its parent's deployed backbone and
    aggregates its keys with the parent's (and its pending D_a). For FL this is the usual
    "global model broadcast to every client". Node states are not modified. Yields (node, model)
    depth-first, so only the models on one root-to-node path are held at a time; `release` as
    in `run_round`.
    """

    def walk(name: str, parent: Tensor | None) -> Iterator[tuple[str, Tensor]]:
        st = states[name]
        model = (
            st.params
            if parent is None
            else receive_from_parent(st.params, parent, st.to_aggregate, split, opts, st.reference)[0]
        )
        release(name)
        yield name, model
        for child in tree[name].children:
            yield from walk(child, model)

    yield from walk(tree.root, None)
