"""The coordinator: the ServerApp's side of the Flower runner.

It drives one global round of Algorithm 1 over the tree by messages, root first:

    train.visit      -> node q: [parent's model + routed residuals] -> steps 2–3, 4.i training,
                        4.ii–iii routing; a leaf replies with its update, an inner node with its
                        model and the residuals routed to each child
    (the same for every child of q, in parallel, with q's model)
    train.aggregate  -> node q: its children's updates -> step 4.iv; the last sub-round replies
                        with q's update and the residuals it sends up
    evaluate         -> every node: its personalised model on its own held-out split

The coordinator only relays: it never trains, aggregates, routes or decodes a model, and it
never sees data. It counts the parameter bytes of every model message on the tree edge it
stands for, writes metrics.jsonl / summary.json, and leaves out of an aggregation any node that
does not answer within `timeout` seconds (logged; the run goes on). Nodes are looked up by the
node-name they report, every round, so a restarted SuperNode rejoins at the next round.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import Tensor

from worldlm import config as C
from worldlm.errors import WorldLMError
from worldlm.federation.events import edge_event
from worldlm.federation.round import sequential_span
from worldlm.federation.tree import Tree
from worldlm.federation.types import Split
from worldlm.files import JsonlWriter, atomic_write_json, atomic_write_text
from worldlm.model import ParamLayout
from worldlm.runners.flower import wire
from worldlm.runners.flower.aliases import ALIASES, Aliases, rename_origins
from worldlm.runners.flower.dispatch import Call, Directory, Dispatcher, Gather, Job, LogFn, stderr_log
from worldlm.runners.flower.node import check_nested, check_supported, host_of
from worldlm.runners.metrics_log import metrics_writer
from worldlm.runners.planning import (
    FINE_TUNED,
    EngineRun,
    engine_rounds,
    plan,
    steps_per_round,
    train_tokens,
    tree_from_config,
)
from worldlm.runners.records import (
    all_diverged,
    budget_message,
    diverged_message,
    eval_record,
    privacy_summary,
    run_summary,
)

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class _Sizes:
    """The parameter layout as the nodes report it (the coordinator never builds the model)."""

    backbone_size: int
    key_blocks: int
    key_size: int
    total: int

    @property
    def split(self) -> Split:
        return Split(self.backbone_size, self.key_blocks, self.key_size)

    def key_matrix_mask(self) -> Tensor:
        """All elements: the coordinator never compares key layers (the nodes do, with the model's own mask)."""
        return torch.ones(self.key_size, dtype=torch.bool)


def engine_plan(cfg: C.Config, tree: Tree, sizes: _Sizes | None = None) -> list[EngineRun]:
    """The method's engine federations without data or model (trees, steps, options; Split from `sizes`)."""
    layout = cast(ParamLayout, sizes or _Sizes(1, 0, 0, 1))
    return plan(cfg, tree, {n: [] for n in tree.order}, layout)


def step_events(record: dict[str, Any], local_steps: dict[str, int], cfg: C.Config) -> list[dict[str, Any]]:
    """Progress events for a metrics record: one per local step of a `train` record (it carries the last step)."""
    if record.get("split") != "train":
        return []
    n, tokens = local_steps.get(str(record["node"]), 0), cfg.train.batch_size * cfg.model.seq_len
    node, loss, last = record["node"], record["loss"], int(record["step"])
    return [{"kind": "step", "node": node, "step": last - n + i, "loss": loss, "tokens": tokens} for i in range(n)]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the run: the held-out split, the round, whether it is the last (final models are
    saved), the model scored (eval.model, or FINE_TUNED for the "+ ft" scores) and the records' split label."""

    split: str
    round: int
    last: bool
    mode: str
    label: str

    def message(self, node: str) -> dict[str, Any]:
        return {
            "node": node,
            "split": self.split,
            "round": self.round,
            "final": self.last,
            "mode": self.mode,
            "label": self.label,
        }

    @staticmethod
    def from_message(c: ConfigRecord) -> Evaluation:
        return Evaluation(
            str(c["split"]), int(cast(int, c["round"])), bool(c["final"]), str(c["mode"]), str(c["label"])
        )


def _metrics(reply: Message) -> dict[str, dict[str, float]]:
    """An evaluate reply's metrics ({node}/{loss,ppl,tokens}) as {node: {what: value}}."""
    results: dict[str, dict[str, float]] = {}
    metrics = reply.content.metric_records["metrics"]
    for key in metrics:
        user, what = str(key).rsplit("/", 1)
        results.setdefault(user, {})[what] = float(cast(float, metrics[key]))
    return results


# ---------------------------------------------------------------------- the coordinator


class Coordinator:
    """One run of `cfg.method` through a Flower Grid; writes the run directory (same contract as LocalRun)."""

    def __init__(
        self,
        grid: Grid,
        cfg: C.Config,
        out: Path,
        timeout: float = 600.0,
        connect_timeout: float = 300.0,
        progress: ProgressFn | None = None,
        log: LogFn = stderr_log,
        scope: str | None = None,
        rejoin: bool = False,
    ) -> None:
        check_supported(cfg)
        self.grid, self.cfg, self.out = grid, cfg, out
        self.timeout, self.connect_timeout = timeout, connect_timeout
        self.progress = progress or (lambda _e: None)
        self.log = log
        self.tree = tree_from_config(cfg)
        # scope: the tree node whose federation this coordinator runs in a nested deployment (its SuperLink
        # connects that node and its children; an inner child is the bridge to the child's own coordinator);
        # None: one coordinator for the whole tree
        self.scope = scope
        if scope is None:
            self.members, self.writes_eval = list(self.tree.order), set(self.tree.order)
        else:
            check_nested(cfg)
            children = list(self.tree[scope].children)
            self.members = [scope, *children]
            own = [scope] if scope == self.tree.root else []  # a region's own record is its parent's to write
            self.writes_eval = {*own, *children}
        self.aliases = Aliases(scope or self.tree.root, out / ALIASES, fresh=not rejoin)
        self.directory = Directory(grid, connect_timeout, log)
        self.dispatcher = Dispatcher(grid, self._resolve, timeout, self._missing)
        self.edge_bytes: dict[str, int] = {}
        self.metrics: JsonlWriter | None = None
        self.record_dp: dict[str, dict[str, Any]] = {}  # DP nodes' latest privacy records
        self.round_privacy: dict[str, dict[str, Any]] = {}  # node-level DP records of this round, written after it
        self.trained = 0  # train.visit replies this round
        self.round_losses: list[float] = []  # training losses the nodes reported this round

    def _resolve(self, engine_node: str) -> int | None:
        return self.directory.ids.get(host_of(engine_node, self.tree))

    def _missing(self, call: Call, reason: str) -> None:
        self.log(f"round {call.round}: node '{call.node}' left out ({call.kind}: {reason})")
        self._write(
            {"event": "left_out", "round": call.round, "node": call.node, "message": call.kind, "reason": reason}
        )

    def _write(self, record: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(record)

    def _edge(self, rnd: int, src: str, dst: str, nbytes: int) -> None:
        key = f"{src}->{dst}"
        self.edge_bytes[key] = self.edge_bytes.get(key, 0) + nbytes
        self._write(edge_event(rnd, src, dst, nbytes))

    def _node_log(self, reply: Message) -> None:
        for record in wire.json_from(reply.content, "log") or []:
            if record.get("event") == "privacy":
                self.record_dp[str(record["node"])] = record  # the latest: summary.json's privacy
                if record.get("unit") != "record":  # node-level: one record per round, after it (as in-process)
                    self.round_privacy[str(record["node"])] = record
                    continue
            if record.get("event") == "dp_budget_exhausted":
                self.log(budget_message(record, int(record["round"])))
            self._write(record)
            if record.get("split") == "train":
                self.round_losses.append(float(record["loss"]))
            for event in step_events(record, self.feds_steps, self.cfg):
                self.progress(event)

    # ------------------------------------------------------------------ one round, by messages

    def _visit(self, fed: EngineRun, q: str, rnd: int, step: int, parent: str | None, down: RecordDict | None) -> Job:
        """One visit of q (Algorithm 1 from q down): returns q's update message, or None if q's subtree is out."""
        tree, opts = fed.tree, fed.opts
        if self._delegated(fed, q):  # nested: q's own coordinator runs its subtree's visit
            return (yield from self._visit_region(q, rnd, step, parent, down))
        children = list(tree[q].children)
        final: Message | None = None
        subs = opts.sub_rounds if children else 1
        for sub in range(subs):  # T_q sub-rounds per parent visit
            content = self._from_parent(q, rnd, step, parent, down if sub == 0 else None)
            reply = yield Call(q, "train.visit", content, rnd)
            if reply is None:
                return None
            self.trained += 1
            self._node_log(reply)
            step += opts.local_steps[q]
            if not children:
                return reply
            downs = []
            for c in children:
                d = RecordDict({"model": reply.content.array_records["model"]})
                if "dp" in reply.content.config_records:  # q's clip bound for its DP children (§4.2)
                    d["dp"] = reply.content.config_records["dp"]
                wire.copy_residuals(reply.content, f"routed/{c}", d, "routed")
                downs.append(d)
            updates = yield Gather([self._visit(fed, c, rnd, step, q, d) for c, d in zip(children, downs, strict=True)])
            step += max(sequential_span(tree, c, opts) for c in children)
            # None: left out; no update: a DP child whose ε budget is spent withheld it (it logged dp_withheld)
            sent = [u is not None and "update" in u.content.array_records for u in updates]
            senders = [c for c, ok in zip(children, sent, strict=True) if ok]
            agg = RecordDict()
            for c, u, ok in zip(children, updates, sent, strict=True):
                if not ok:
                    continue
                agg[f"update/{c}"] = u.content.array_records["update"]
                if "dp" in u.content.config_records:  # a DP child's release statistics, for q's next bound
                    agg[f"dp/{c}"] = u.content.config_records["dp"]
                wire.copy_residuals(u.content, "residuals", agg, f"residuals/{c}")
                nbytes = wire.value_bytes(u.content.array_records["update"])
                nbytes += wire.value_bytes(u.content.array_records.get("residuals"))
                self._edge(rnd, c, q, nbytes)
            agg_cfg: dict[str, Any] = {"node": q, "round": rnd, "final": sub == subs - 1}
            if senders:
                agg_cfg["senders"] = senders
            agg["cfg"] = ConfigRecord(agg_cfg)
            final = yield Call(q, "train.aggregate", agg, rnd)
            if final is None:
                return None
            self._node_log(final)
        return final

    def _from_parent(self, q: str, rnd: int, step: int, parent: str | None, down: RecordDict | None) -> RecordDict:
        """The message that starts q's (sub-)visit: with its parent's model and routed residuals on the first.

        The parent -> q edge is counted here, by the coordinator that relays it (a region's coordinator
        does not count the edge from its parent: the parent's coordinator did)."""
        content = RecordDict()
        cfg: dict[str, Any] = {"node": q, "round": rnd, "step": step}
        if down is not None and parent is not None:
            content["model"] = down.array_records["model"]
            wire.copy_residuals(down, "routed", content, "routed")
            if "dp" in down.config_records:
                content["dp"] = down.config_records["dp"]
            cfg["parent"] = parent
            if q != self.scope:
                nbytes = wire.value_bytes(content.array_records["model"])
                nbytes += wire.value_bytes(content.array_records.get("routed"))
                self._edge(rnd, parent, q, nbytes)
        content["cfg"] = ConfigRecord(cfg)
        return content

    def _delegated(self, fed: EngineRun, q: str) -> bool:
        """Nested deployment: an inner node other than this coordinator's own is run by its own coordinator."""
        return self.scope is not None and q != self.scope and bool(fed.tree[q].children)

    def _visit_region(self, q: str, rnd: int, step: int, parent: str | None, down: RecordDict | None) -> Job:
        """A region's whole visit (its T_q sub-rounds over its subtree) in one message to its bridge SuperNode.

        The reply is the region's update and the residuals it sends up (origins below it aliased), plus
        how many of its subtree's nodes trained and whether any loss was finite (the divergence rule)."""
        content = self._from_parent(q, rnd, step, parent, down)
        subtree = self.tree.subtree(q)
        rename_origins(content, "routed", self.aliases.hide_outside(subtree))
        reply = yield Call(q, "train.subtree", content, rnd)
        if reply is None:
            return None
        rename_origins(reply.content, "residuals", self.aliases.reveal)
        sub = reply.content.config_records["subtree"]
        trained = int(cast(int, sub["trained"]))
        self.trained += trained
        if trained:  # stands for the subtree's losses: all_diverged only asks whether any was finite
            self.round_losses.append(0.0 if bool(sub["finite"]) else math.nan)
        return reply

    def _evaluate_node(self, fed: EngineRun, q: str, ev: Evaluation, deployed: Any | None) -> Job:
        content = RecordDict({"cfg": ConfigRecord(ev.message(q))})
        if deployed is not None:
            content["deployed"] = deployed
        if self._delegated(fed, q):  # its own coordinator evaluates its subtree and keeps those records
            reply = yield Call(q, "evaluate.subtree", content, ev.round)
            return {} if reply is None else _metrics(reply)
        reply = yield Call(q, "evaluate", content, ev.round)
        if reply is None:
            return {}
        results = _metrics(reply)
        children = fed.tree[q].children
        if ev.mode == "deployed" and children and "deployed" in reply.content.array_records:
            model = reply.content.array_records["deployed"]
            below = yield Gather([self._evaluate_node(fed, c, ev, model) for c in children])
            for part in below:
                results.update(part)
        return results

    def evaluate_scope(self, ev: Evaluation, deployed: Any | None = None) -> dict[str, dict[str, float]]:
        """Evaluate the nodes this coordinator reaches (a region's coordinator: its subtree) and write their
        records, except its own node's, which its parent's coordinator writes; returns every result."""
        jobs: list[Job] = []
        for fed in self.feds:
            if ev.mode == "deployed":
                jobs.append(self._evaluate_node(fed, self.scope or fed.tree.root, ev, deployed))
            else:
                for eng in dict.fromkeys(fed.evaluates.values()):
                    if self.scope is None or eng in self.members:
                        jobs.append(self._evaluate_node(fed, eng, ev, None))
        results: dict[str, dict[str, float]] = {}
        for part in self.dispatcher.run(jobs):
            results.update(part)
        for fed in self.feds:  # the in-process runner's record order
            for user in fed.evaluates:
                if user not in results or user not in self.writes_eval:
                    continue
                r = results[user]
                step = (ev.round + 1) * self.per_round
                self._write(eval_record(ev.round, user, ev.label, r["loss"], r["ppl"], int(r["tokens"]), step))
        return results

    def evaluate_all(
        self, split: str, rnd: int, last: bool = False, fine_tuned: bool = False
    ) -> dict[str, dict[str, float]]:
        """As LocalRun.evaluate_all: the delivered models, or with `fine_tuned` each client's own (split "*_ft")."""
        mode = FINE_TUNED if fine_tuned else C.eval_model(self.cfg)
        label = f"{split}_ft" if fine_tuned else split
        results = self.evaluate_scope(Evaluation(split, rnd, last, mode, label))
        shown = {u: {"loss": r["loss"], "ppl": r["ppl"]} for u, r in results.items()}
        if not fine_tuned:
            self.progress({"kind": "eval", "split": split, "round": rnd, "results": shown})
        return shown

    # ------------------------------------------------------------------ the run

    def open(self) -> None:
        """Start this coordinator's part of the run directory (config.toml, a fresh metrics.jsonl)."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.toml", C.dumps(self.cfg))
        (self.out / "metrics.jsonl").unlink(missing_ok=True)
        self.metrics = metrics_writer(self.out / "metrics.jsonl", self.cfg.log.tensorboard and self.scope is None)

    def connect(self) -> dict[str, Any]:
        """Wait for this federation's members, plan the engine from the layout they report; the root's hello."""
        names = self.members
        self.log(f"waiting for {len(names)} tree nodes to connect: {', '.join(names)}")
        self.directory.wait_for(names, self.connect_timeout)
        sizes = {
            (int(i["backbone-size"]), int(i["key-blocks"]), int(i["key-size"])) for i in self.directory.info.values()
        }
        if len(sizes) != 1:
            raise WorldLMError(f"nodes disagree on the model layout {sorted(sizes)}: same config and data everywhere?")
        bb, kb, ks = sizes.pop()
        self.feds = engine_plan(self.cfg, self.tree, _Sizes(bb, kb, ks, bb + kb * ks))
        first = self.feds[0]
        self.per_round = sequential_span(first.tree, first.tree.root, first.opts)
        self.feds_steps = {n: f.opts.local_steps[n] for f in self.feds for n in f.tree.order}
        return dict(self.directory.info[self.scope or self.tree.root])

    def run(self) -> dict[str, Any]:
        """The whole run from the root: summary.json; in a nested deployment the root's part (`RUN_FACTS`),
        which `nested.merge_federations` joins with the regions' records into summary.json."""
        t_start = time.perf_counter()
        cfg = self.cfg
        self.open()
        assert self.metrics is not None
        try:
            info = self.connect()
            planned = engine_rounds(cfg, self.tree)
            total = steps_per_round(self.feds) * planned
            self.progress({"kind": "start", "method": cfg.method, "total_steps": total, "rounds": planned})
            evals: dict[str, dict[str, dict[str, float]]] = {}
            rounds, diverged = planned, None
            for rnd in range(planned):
                if rnd > 0:
                    self.rejoin(rnd)
                self.trained, self.round_losses = 0, []
                jobs = [
                    self._visit(f, f.tree.root, rnd, rnd * sequential_span(f.tree, f.tree.root, f.opts), None, None)
                    for f in self.feds
                ]
                self.dispatcher.run(jobs)
                self.flush_privacy()
                if self.trained == 0:
                    raise WorldLMError(f"round {rnd}: no node answered; see the log above")
                stop = all_diverged(self.round_losses)
                if cfg.eval.every_round or stop or rnd == planned - 1:
                    evals["val"] = self.evaluate_all("val", rnd)
                self.log(f"round {rnd + 1}/{planned} done")
                if stop:
                    rounds, diverged = rnd + 1, rnd
                    self._write({"event": "diverged", "round": rnd})
                    self.log(diverged_message(rnd, planned))
                    break
            evals["test"] = self.evaluate_all("test", rounds - 1, last=True)
            if C.scores_fine_tuned(cfg):  # FL / HierFAVG + local fine-tuning, from the same run
                evals["test_ft"] = self.evaluate_all("test", rounds - 1, fine_tuned=True)
                evals["val_ft"] = self.evaluate_all("val", rounds - 1, fine_tuned=True)
            if self.scope is not None:
                self.finish_regions(rounds - 1)
        finally:
            self.metrics.close()
        facts = {
            "planned_rounds": planned,
            "rounds": rounds,
            "sequential_steps": self.per_round * rounds,
            "train_tokens": train_tokens(cfg, self.feds, rounds),
            "parameters": int(info["parameters"]),
            "key_blocks": int(info["key-blocks"]),
            "wall_seconds": time.perf_counter() - t_start,
            "diverged_round": diverged,
        }
        if self.scope is not None:  # nested: the regions keep their members' records
            atomic_write_json(self.out / RUN_FACTS, facts)
            return facts
        summary = federated_summary(cfg, self.tree.order, evals, self.edge_bytes, self.record_dp, facts)
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def flush_privacy(self) -> None:
        """Node-level DP: each DP node's privacy record of the round that ended (the in-process runner's)."""
        for record in self.round_privacy.values():
            self._write(record)
        self.round_privacy = {}

    def rejoin(self, rnd: int) -> None:
        """Greet SuperNodes that (re)started since the last round; a `rejoined` record for each."""
        for name in self.directory.refresh(wait=min(self.timeout, 30.0)):
            self._write({"event": "rejoined", "round": rnd, "node": name})

    def finish_regions(self, rnd: int) -> None:
        """Nested: tell each region's coordinator (through its bridge) that the run is over, depth first."""
        fed = self.feds[0]
        regions = [c for c in fed.tree[self.scope or fed.tree.root].children if self._delegated(fed, c)]

        def finish(c: str) -> Job:
            return (yield Call(c, "query.finish", RecordDict({"cfg": ConfigRecord({"node": c})}), rnd))

        self.dispatcher.run([finish(c) for c in regions])


RUN_FACTS = "run.json"  # a nested root's part of summary.json: what only the root knows about the run


def federated_summary(
    cfg: C.Config,
    order: Sequence[str],
    evals: dict[str, dict[str, dict[str, float]]],
    edges: dict[str, int],
    record_dp: dict[str, dict[str, Any]],
    facts: dict[str, Any],
) -> dict[str, Any]:
    """summary.json as LocalRun writes it, from the evaluations by label ("test", "val", "test_ft", "val_ft"),
    the bytes per edge, record-level DP nodes' latest privacy records and the run's facts (`Coordinator.run`).
    Nodes that never answered the test are listed as missing."""
    if not evals.get("test"):
        raise WorldLMError("no node answered the final evaluation; no summary")
    fine_tuned = (evals["test_ft"], evals["val_ft"]) if "test_ft" in evals else None
    progress = (int(facts["planned_rounds"]), int(facts["sequential_steps"]), int(facts["train_tokens"]))
    model = (int(facts["parameters"]), int(facts["key_blocks"]))
    summary = run_summary(
        cfg,
        order,
        evals["test"],
        evals.get("val", {}),
        edges,
        progress,
        model,
        float(facts["wall_seconds"]),
        facts["diverged_round"],
        fine_tuned,
    )
    return summary | privacy_summary(cfg, record_dp)
