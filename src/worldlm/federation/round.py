"""One global round of WorldLM (paper Algorithm 1, Appendix A.3) over a tree of any depth.

Pure federation logic on flat parameter vectors: no model, no data, no I/O. Local training is
delegated to a `NodeTrainer` (the runner owns models, AdamW states and data samplers); every
observable decision (attention weights, residual moves, bytes on each edge) goes to an `emit`
callback. The per-node steps it calls are in `steps` (shared with the Flower node).
Baselines are configurations of this same round:

- HierFAVG: `key_blocks = 0` (everything is backbone);
- FedPer: key layers never leave a node (`share_keys = False`);
- FL: a flat tree (`tree.flat_tree`) without key layers;
- centralized / local: single-node trees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from torch import Tensor

from worldlm.federation.events import (
    children_attention_event,
    edge_event,
    outlier_event,
    parent_attention_event,
    pick_event,
    route_event,
    withheld_event,
)
from worldlm.federation.steps import (
    accept_from_parent,
    aggregate_step,
    keep_trained,
    message_numel,
    receive_from_parent,
    route_pending,
    start_visit,
    uses_keys,
)
from worldlm.federation.tree import Tree
from worldlm.federation.types import (
    BYTES_PER_VALUE,
    Emit,
    FedOptions,
    NodeState,
    NodeTrainer,
    Observe,
    Privatizer,
    Residual,
    Split,
    Update,
)
from worldlm.timing import PhaseFn, no_phase


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
    walk = _RoundWalk(tree, states, split, opts, round_idx, trainer, emit, privacy, release, phase, observe)
    start = round_idx * sequential_span(tree, tree.root, opts)
    observe("start", tree.root, start, states[tree.root].params)
    walk.visit(tree.root, start)


@dataclass
class _RoundWalk:
    """One global round's depth-first walk of the tree (`run_round`'s arguments, and the DP references)."""

    tree: Tree
    states: Mapping[str, NodeState]
    split: Split
    opts: FedOptions
    rnd: int
    trainer: NodeTrainer
    emit: Emit
    privacy: Privatizer | None
    release: Callable[[str], None]
    phase: PhaseFn
    observe: Observe
    received: dict[str, Tensor] = field(default_factory=dict)  # DP nodes: the parent state they got this visit

    def visit(self, q: str, step: int) -> Update | None:
        """q's visit from global sequential step `step`: its T_q sub-rounds; returns what q sends its parent."""
        st, opts = self.states[q], self.opts
        children = list(self.tree[q].children)
        outbox: list[Residual] = []  # residuals this subtree sends up
        for _ in range(opts.sub_rounds if children else 1):  # T_q sub-rounds per parent visit
            own: Tensor | None = None  # parallel schedule: q's trained state, a member of its own aggregation
            start_visit(st, self.split, opts)
            if opts.local_steps[q] > 0:  # 4.i: local training with ClientOpt on the global clock
                trained = self.trainer.train(q, st.params, step, opts.local_steps[q])
                self.observe("trained", q, step + opts.local_steps[q], trained)
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
            updates, senders = self._children(q, children, window)
            below = max(sequential_span(self.tree, c, opts) for c in children)
            step = max(step + opts.local_steps[q], window + below)
            if not updates:  # every child withheld: nothing to aggregate this sub-round (q keeps its own training)
                st.params = own if own is not None else st.params
                continue
            outbox.extend(self._aggregate(q, st, updates, senders, own, step))
        return self._send_up(q, st, outbox)

    def _children(self, q: str, children: list[str], window: int) -> tuple[list[Update], list[str]]:
        """4.ii–iii routing, then each child's visit from q's model: the updates that arrived and their senders
        (all children without DP budgets)."""
        with self.phase("routing"):
            routed = self._route_down(q, children)  # 4.ii–iii
        updates: list[Update] = []
        senders: list[str] = []
        for c in children:  # notionally in parallel: every child sees the same parent state
            self._send_down(q, c, routed.get(c, []))
            if self.split.key_blocks:  # without key layers (FL, HierFAVG) c holds q's model unchanged: q's point
                self.observe("received", c, window, self.states[c].params)
            update = self.visit(c, window)
            if update is None:  # a DP child whose ε budget is spent sends nothing (§4.2 accounting)
                self.emit(withheld_event(self.rnd, c, q))
                continue
            updates.append(update)
            senders.append(c)
            up = message_numel(self.split, self.opts, update.residuals)
            self.emit(edge_event(self.rnd, c, q, up * BYTES_PER_VALUE))
        return updates, senders

    def _aggregate(
        self, q: str, st: NodeState, updates: list[Update], senders: list[str], own: Tensor | None, step: int
    ) -> list[Residual]:
        """4.iv at q over its children's updates (central DP noise first); returns the residuals q sends up."""
        assert st.server_opt is not None, f"inner node {q} has no server optimizer"
        if self.privacy is not None:  # dp.noise = "central": q noises its DP children's sum (§4.2 variant)
            with self.phase("privacy"):
                share = uses_keys(self.split, self.opts)
                updates = self.privacy.combine(q, senders, updates, st.params, self.split, share)
        with self.phase("aggregation"):
            picked, weights, to_parent, outliers = aggregate_step(
                st, updates, senders, q == self.tree.root, self.split, self.opts, own
            )  # 4.iv
        self.observe("aggregated", q, step, st.params)
        if weights is not None:
            self.emit(children_attention_event(self.rnd, q, senders, weights))
        for child, w, n in outliers:
            self.emit(outlier_event(self.rnd, q, child, w, n, self.opts, len(senders)))
        for r in picked:
            self.emit(pick_event(self.rnd, q, r))
        return to_parent

    def _send_up(self, q: str, st: NodeState, outbox: list[Residual]) -> Update | None:
        """What q sends its parent: its state and residuals, privatised when q is a DP node (DPFedAvg, §4.2)."""
        with self.phase("serialisation"):
            message = Update(st.params.clone(), outbox)
        sent: Update | None = message
        if self.privacy is not None and q in self.received:
            with self.phase("privacy"):
                share = uses_keys(self.split, self.opts)
                sent = self.privacy.release(q, message, self.received.pop(q), self.split, share)
        self.release(q)
        return sent

    def _send_down(self, q: str, c: str, routed: list[Residual]) -> None:
        parent_params = self.states[q].params
        if self.privacy is not None and self.privacy.applies(c):
            self.received[c] = parent_params.clone()  # the DP reference: release = this + privatised difference
        with self.phase("aggregation"):
            weights, used = accept_from_parent(
                self.states[c], parent_params, routed, self.tree.is_leaf(c), self.split, self.opts
            )  # 2–3
        down = message_numel(self.split, self.opts, routed)
        self.emit(edge_event(self.rnd, q, c, down * BYTES_PER_VALUE))
        if weights is not None:
            self.emit(parent_attention_event(self.rnd, c, q, used, weights))

    def _route_down(self, q: str, children: list[str]) -> dict[str, list[Residual]]:
        routed: dict[str, list[Residual]] = {}  # the children queue them when the parent's model arrives
        for r, target, sim in route_pending(self.states[q], children, self.tree, self.split, self.opts):
            self.emit(route_event(self.rnd, q, r, target, sim))
            if target is not None:
                routed.setdefault(target, []).append(r)
        return routed


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
