"""The organisation's side of the Flower runner: what one SuperNode's ClientApp does.

A SuperNode is one node of the user's tree (`--node-config 'node-name="fr"'`). It hosts the
engine node(s) of that name — for standard FL the data-less server is hosted by the root
organisation — and keeps everything private on its side: its data and sampler position, its
AdamW moments, its server-optimizer state, its key layers, residual queues (D_a, D_r, the
residuals gathered for its parent) and what it last received of its children's key layers
(residual routing, A.3.7). That state lives in the SuperNode's `Context.state` (never sent to
the SuperLink) or, with `state-dir` in the node config, in files on the node, which also survive
a SuperNode restart. Only models and residuals leave, as the algorithm prescribes.

Each handler is one per-node step of `worldlm.federation.round` (the functions `run_round`
uses), so a node does exactly what the in-process runner does for it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from worldlm import config as C
from worldlm.data.prepared import load_prepared
from worldlm.data.samplers import eval_windows
from worldlm.errors import WorldLMError, quoted
from worldlm.federation.events import (
    children_attention_event,
    outlier_event,
    parent_attention_event,
    pick_event,
    route_event,
)
from worldlm.federation.steps import (
    accept_from_parent,
    aggregate_step,
    fine_tuned_model,
    keep_trained,
    receive_from_parent,
    route_pending,
    start_visit,
    uses_keys,
)
from worldlm.federation.tree import Tree
from worldlm.federation.types import NodeState, Residual, Update
from worldlm.files import atomic_write_bytes
from worldlm.runners.checkpoint import Part
from worldlm.runners.flower import wire
from worldlm.runners.planning import (
    FINE_TUNED,
    EngineRun,
    initial_state,
    make_privacy,
    server_opt_for,
    set_up,
    training_node,
    tree_from_config,
)
from worldlm.runners.records import record_dp_record, train_record
from worldlm.runners.state_store import adam_part, encode_state, load_adam, load_state
from worldlm.runners.trainer import LocalTrainer
from worldlm.training.evaluate import evaluate
from worldlm.training.loop import TrainStats

STATE_KEY = "worldlm"  # the ArrayRecord in Context.state holding this node's private state


def check_supported(cfg: C.Config) -> None:
    """Methods and options the Flower runner runs; the rest say so in one line."""
    if cfg.method == "centralized":
        raise WorldLMError(
            "method 'centralized' pools every node's raw text in one place, which a federation never does; "
            "run it with the in-process runner (worldlm train CONFIG) as the reference it is"
        )
    if C.is_hierarchy(cfg) and cfg.federation.schedule == "parallel":
        raise WorldLMError(
            "federation.schedule = 'parallel' is not available on the Flower runner yet; "
            "run it with the in-process runner (worldlm train CONFIG) or use schedule = 'sequential'"
        )
    if cfg.eval.trace_round >= 0:
        raise WorldLMError(
            "eval.trace_round evaluates every travelling model on every node's data, which only the in-process "
            "runner can do; run the trace with worldlm train CONFIG"
        )


NESTED_METHODS = ("worldlm", "hierfavg", "fedper")  # the methods whose federations are the tree's inner nodes


def check_nested(cfg: C.Config) -> None:
    """A nested deployment runs one federation per inner node of the tree; one-federation methods cannot."""
    if cfg.method not in NESTED_METHODS:
        raise WorldLMError(
            f"a nested deployment gives every inner node of the tree its own federation, but method "
            f"'{cfg.method}' is a single federation; deploy it without --nested (methods with a tree of "
            f"federations: {', '.join(NESTED_METHODS)})"
        )


def host_of(engine_node: str, user_tree: Tree) -> str:
    """The tree node (SuperNode) that hosts an engine node: FL's data-less server runs at the root organisation."""
    return engine_node if engine_node in user_tree.nodes else user_tree.root


def config_from_text(text: str) -> C.Config:
    """The resolved config the coordinator's run carries (C.dumps output), validated as a file would be."""
    with tempfile.TemporaryDirectory(prefix="worldlm-cfg-") as tmp:
        path = Path(tmp) / "config.toml"
        path.write_text(text, encoding="utf-8")
        return C.load_config(path)


@dataclass
class Hosted:
    """One engine node on this SuperNode and its federation-side private state."""

    fed: EngineRun
    name: str
    state: NodeState
    outbox: list[Residual] = field(default_factory=list)  # residuals for the parent, over this visit's sub-rounds
    received: Tensor | None = None  # node-level DP: the parent's model this visit started from (the reference)


class NodeSide:
    """Set-up of one organisation (mirrors LocalRun.__init__ for the nodes it hosts) and its message handlers."""

    def __init__(
        self,
        cfg: C.Config,
        name: str,
        data_path: str | None = None,
        out_dir: str | None = None,
        threads: int = 0,
    ) -> None:
        check_supported(cfg)
        self.cfg, self.name = cfg, name
        self.out_dir = Path(out_dir) if out_dir else None
        # train.threads, else the launcher's count: CPU matmuls sum in a thread-count-dependent order,
        # and the simulation engine's actors default to one thread (set per message, see `handle`)
        self.threads = cfg.train.threads or threads
        self.tree = tree_from_config(cfg)
        if name not in self.tree.nodes:
            raise WorldLMError(
                f"node-name {quoted(name)} is not a node of the config's tree ({', '.join(self.tree.order)})"
            )
        self.data = load_prepared(data_path or cfg.data.path)
        setup = set_up(cfg, self.data)  # every node builds the same initial model as the in-process runner
        self.spans, self.model, self.layout, self.feds = setup.spans, setup.model, setup.layout, setup.feds
        self.schedule, self.client, self.rounds = setup.schedule, setup.client, setup.rounds
        self.compute, self.forward = setup.compute, setup.forward
        self.init = self.layout.flatten(self.model)
        self.engine: dict[str, EngineRun] = {
            n: fed for fed in self.feds for n in fed.tree.order if host_of(n, self.tree) == name
        }
        self.users: dict[str, list[str]] = {}  # engine node -> the tree nodes it is evaluated for
        for fed in self.feds:
            for user, eng in fed.evaluates.items():
                if eng in self.engine:
                    self.users.setdefault(eng, []).append(user)
        self.windows: dict[tuple[str, str], Tensor] = {}  # (tree node, split) -> held-out windows, on first use
        self.last_stats: TrainStats | None = None
        self.reset()

    # ------------------------------------------------------------------ private state

    def reset(self) -> None:
        """The state before round 0 (what every node holds in the in-process runner at start)."""
        self.trainer = LocalTrainer(
            self.model, self.layout, self.client, self.schedule, compute=self.compute, forward=self.forward
        )
        self.trainer.on_train = self._on_train
        # node-level DP (§4.2): each federation's Privacy, of which this node uses its own noise generator,
        # accountant and its parent's clip bound (a DP node) or its bound and central generator (a DP node's parent)
        self.privacy = {id(fed): p for fed in self.feds if (p := make_privacy(self.cfg, fed)) is not None}
        self.hosted: dict[str, Hosted] = {}
        for name, fed in self.engine.items():
            node = fed.tree[name]
            self.hosted[name] = Hosted(fed, name, initial_state(self.cfg, fed, name, self.init))
            if node.trains:
                self.trainer.add_node(name, *training_node(self.cfg, self.data, fed, name, self.rounds))

    def dump(self) -> bytes:
        """All private state as one safetensors blob: each hosted node's state and AdamW moments as the
        in-process runner checkpoints them (`encode_state`, `adam_part`), plus what only a Flower node
        keeps (its outbox of residuals for the parent, sampler positions)."""
        tensors: dict[str, Tensor] = {}
        meta: dict[str, Any] = {"states": {}, "outbox": {}, "record_dp": {}}
        for name, h in self.hosted.items():
            part = encode_state(h.state)
            tensors.update({f"{name}/state/{k}": v for k, v in part.tensors.items()})
            meta["states"][name] = part.meta
            tensors.update({f"{name}/outbox/{j}": r.vector for j, r in enumerate(h.outbox)})
            meta["outbox"][name] = [[r.position, r.origin] for r in h.outbox]
            if h.received is not None:
                tensors[f"{name}/received"] = h.received
        for name, opt in self.trainer.opts.items():
            tensors.update({f"adam/{name}/{k}": v for k, v in adam_part(opt).tensors.items()})
        meta["samplers"] = {name: s.state() for name, s in self.trainer.samplers.items()}
        for name, dp_sgd in self.trainer.private.items():  # DP-SGD noise generator and accountant history
            dp_tensors, meta["record_dp"][name] = dp_sgd.state_dict()
            tensors.update({f"record-dp/{name}/{k}": v for k, v in dp_tensors.items()})
        meta["privacy"] = {}
        for key, priv in enumerate(self.privacy.values()):
            priv_tensors, meta["privacy"][str(key)] = priv.state_dict()
            tensors.update({f"privacy/{key}/{k}": v for k, v in priv_tensors.items()})
        header = {"meta": json.dumps(meta)}
        try:
            return save_safetensors({k: v.detach().contiguous() for k, v in tensors.items()}, metadata=header)
        except RuntimeError:  # some tensors share memory (views): store copies
            return save_safetensors({k: v.detach().clone() for k, v in tensors.items()}, metadata=header)

    def load(self, blob: bytes | None) -> None:
        """Restore the private state (or start fresh when the node has none yet)."""
        if blob is None:
            self.reset()
            return
        t = load_safetensors(blob)
        header_len = int.from_bytes(blob[:8], "little")  # safetensors: u64 length, then a JSON header
        meta = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["meta"])

        def prefixed(prefix: str) -> dict[str, Tensor]:
            return {k.removeprefix(prefix): v for k, v in t.items() if k.startswith(prefix)}

        for name, h in self.hosted.items():
            if h.state.server_opt is not None:
                h.state.server_opt = server_opt_for(self.cfg, h.fed, name)
            load_state(h.state, Part(prefixed(f"{name}/state/"), meta["states"][name]), self.compute.device)
            outbox = meta["outbox"][name]
            h.outbox = [Residual(t[f"{name}/outbox/{j}"], int(pos), str(o)) for j, (pos, o) in enumerate(outbox)]
            h.received = t.get(f"{name}/received")
        for name, opt in self.trainer.opts.items():
            load_adam(opt, Part(prefixed(f"adam/{name}/"), {}))
        for name, sampler in self.trainer.samplers.items():
            sampler.set_state(meta["samplers"][name])
        for name, dp_sgd in self.trainer.private.items():
            dp_sgd.load_state_dict(prefixed(f"record-dp/{name}/"), meta["record_dp"][name])
        for key, priv in enumerate(self.privacy.values()):
            priv.load_state_dict(prefixed(f"privacy/{key}/"), meta["privacy"][str(key)])

    # ------------------------------------------------------------------ handlers

    def _on_train(self, node: str, start_step: int, n_steps: int, stats: TrainStats) -> None:
        self.last_stats = stats

    def hello(self) -> RecordDict:
        lay = self.layout
        info: dict[str, Any] = {
            "node-name": self.name,
            "hosts": sorted(self.engine),
            "parameters": self.model.num_params(),
            "backbone-size": lay.backbone_size,
            "key-blocks": lay.key_blocks,
            "key-size": lay.key_size,
        }
        return RecordDict({"hello": ConfigRecord(info)})

    def _hosted(self, c: ConfigRecord) -> Hosted:
        node = str(c["node"])
        if node not in self.hosted:
            raise WorldLMError(f"SuperNode '{self.name}' does not host engine node '{node}'")
        return self.hosted[node]

    def visit(self, content: RecordDict) -> RecordDict:
        """train.visit: steps 2–3 with the parent's model (first sub-round), 4.i training, 4.ii–iii routing."""
        c = content.config_records["cfg"]
        h = self._hosted(c)
        fed, tree, node = h.fed, h.fed.tree, h.name
        split, opts = fed.split, fed.opts
        rnd, step = int(str(c["round"])), int(str(c["step"]))
        log: list[dict[str, Any]] = []
        privacy = self.privacy.get(id(fed))
        if "model" in content.array_records:
            parent = wire.model_from_record(content.array_records["model"], h.state.params, split)
            if privacy is not None and privacy.applies(node):
                h.received = parent.clone()  # the DP reference: release = this + privatised difference
                privacy.set_bound(node, float(cast(float, content.config_records["dp"]["clip"])))
            routed = wire.residuals_from(content, "routed")
            weights, used = accept_from_parent(h.state, parent, routed, tree.is_leaf(node), split, opts)
            if weights is not None:
                log.append(parent_attention_event(rnd, node, str(c["parent"]), used, weights))
        if privacy is not None and node in privacy.clip:  # a DP node's parent: last round's releases set its bound
            privacy.begin(node, rnd)
        start_visit(h.state, split, opts)
        n_steps = opts.local_steps[node]
        if n_steps > 0:  # 4.i: local training with ClientOpt on the global clock
            h.state.params = self.trainer.train(node, h.state.params, step, n_steps)
            keep_trained(h.state, h.state.params, bool(tree[node].children), opts)
            stats = self.last_stats
            assert stats is not None
            log.append(train_record(rnd, tree[node].level, node, step + n_steps, stats))
            if node in self.trainer.private:  # record-level DP: epsilon so far
                log.append(record_dp_record(rnd, node, self.trainer.private[node], self.cfg.dp.delta))
        reply = RecordDict()
        children = list(tree[node].children)
        if not children:  # a leaf's visit ends here: its update goes up
            self._send_up(h, Update(h.state.params.clone(), []), reply, rnd, log)
        else:
            routes = route_pending(h.state, children, tree, split, opts)
            routed_to: dict[str, list[Residual]] = {}
            for r, target, sim in routes:
                log.append(route_event(rnd, node, r, target, sim))
                if target is not None:
                    routed_to.setdefault(target, []).append(r)
            reply["model"] = wire.model_record(h.state.params, split, opts)
            if privacy is not None and node in privacy.clip:  # its DP children clip to its bound (§4.2)
                reply["dp"] = ConfigRecord({"clip": privacy.clip[node]})
            for ch, rs in routed_to.items():
                wire.residuals_into(reply, f"routed/{ch}", rs)
        reply["log"] = wire.json_record(log)
        return reply

    def aggregate(self, content: RecordDict) -> RecordDict:
        """train.aggregate: step 4.iv over the children whose updates arrived; the final one replies with the update."""
        c = content.config_records["cfg"]
        h = self._hosted(c)
        fed, node = h.fed, h.name
        split, opts = fed.split, fed.opts
        rnd = int(str(c["round"]))
        senders = [str(s) for s in cast(list[str], c["senders"])] if "senders" in c else []
        updates = [
            Update(
                wire.model_from_record(content.array_records[f"update/{s}"], h.state.params, split),
                wire.residuals_from(content, f"residuals/{s}"),
            )
            for s in senders
        ]
        log: list[dict[str, Any]] = []
        is_root = node == fed.tree.root
        privacy = self.privacy.get(id(fed))
        if updates and privacy is not None:  # node-level DP at a DP node's parent (§4.2)
            for s in senders:  # the statistics its DP children's releases carried, for its next bound
                if (stats := content.config_records.get(f"dp/{s}")) is not None:
                    privacy.note(node, rnd, cast(list[float], stats["norms"]), cast(list[float], stats.get("bits", [])))
            # dp.noise = "central": its DP children's updates become one noised mean
            updates = privacy.combine(node, senders, updates, h.state.params, split, uses_keys(split, opts))
        if updates:
            picked, weights, up, outliers = aggregate_step(h.state, updates, senders, is_root, split, opts)
            if weights is not None:
                log.append(children_attention_event(rnd, node, senders, weights))
            log.extend(outlier_event(rnd, node, ch, w, n, opts, len(senders)) for ch, w, n in outliers)
            log.extend(pick_event(rnd, node, r) for r in picked)
            h.outbox.extend(up)
        reply = RecordDict()
        if bool(c["final"]) and not is_root:  # the end of this visit: the update and the gathered residuals go up
            self._send_up(h, Update(h.state.params.clone(), h.outbox), reply, rnd, log)
            h.outbox = []
        reply["log"] = wire.json_record(log)
        return reply

    def _send_up(self, h: Hosted, message: Update, reply: RecordDict, rnd: int, log: list[dict[str, Any]]) -> None:
        """What leaves a node for its parent: its update, or for a DP node its DP release (§4.2), or nothing
        once its ε budget is spent (the parent aggregates without it), as the in-process runner sends."""
        fed, node = h.fed, h.name
        privacy = self.privacy.get(id(fed))
        sent: Update | None = message
        if privacy is not None and privacy.applies(node) and h.received is not None:
            sent = privacy.release(node, message, h.received, fed.split, uses_keys(fed.split, fed.opts))
            h.received = None
            for event in privacy.events:  # its budget is spent: logged once, as the in-process runner does
                log.append({**event, "round": rnd})
            privacy.events.clear()
            if sent is not None:  # what its parent's next bound needs (median / adaptive clipping) goes up with it
                norms, bits = privacy.drain(node)
                reply["dp"] = ConfigRecord({"norms": norms, "bits": bits} if bits else {"norms": norms})
            log.extend({"event": "privacy", "round": rnd, **r} for r in privacy.records() if r["node"] == node)
        if sent is None:
            log.append({"event": "dp_withheld", "round": rnd, "node": node, "parent": fed.tree[node].parent})
            return
        reply["update"] = wire.model_record(sent.params, fed.split, fed.opts)
        wire.residuals_into(reply, "residuals", sent.residuals)

    def evaluate(self, content: RecordDict) -> RecordDict:
        """evaluate: each tree node's personalised model on its own held-out split (the metric)."""
        c = content.config_records["cfg"]
        h = self._hosted(c)
        split_name, final = str(c["split"]), bool(c["final"])
        params = fine_tuned_model(h.state) if str(c["mode"]) == FINE_TUNED else h.state.params
        if "deployed" in content.array_records:  # eval.model = deployed: steps 2–3 on a copy (state unchanged)
            parent = wire.model_from_record(content.array_records["deployed"], params, h.fed.split)
            st, fed = h.state, h.fed
            params, _ = receive_from_parent(params, parent, st.to_aggregate, fed.split, fed.opts, st.reference)
        reply = RecordDict()
        metrics: dict[str, Any] = {}
        for user in self.users.get(h.name, []):
            self.layout.load(self.model, params)
            if (user, split_name) not in self.windows:
                n = self.cfg.eval.batches * self.cfg.eval.batch_size
                seq = self.cfg.model.seq_len
                self.windows[(user, split_name)] = eval_windows(self.data, self.spans[user], split_name, seq, n)
            windows = self.windows[(user, split_name)]
            loss, ppl = evaluate(self.forward, windows, self.cfg.eval.batch_size, self.compute)
            metrics.update({f"{user}/loss": loss, f"{user}/ppl": ppl, f"{user}/tokens": float(windows[:, 1:].numel())})
            if final and self.out_dir is not None:  # the personal model stays with its organisation
                tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
                atomic_write_bytes(self.out_dir / "final" / f"{user}.safetensors", save_safetensors(tensors))
        reply["metrics"] = MetricRecord(metrics)
        if str(c["mode"]) == "deployed" and h.fed.tree[h.name].children:
            reply["deployed"] = wire.model_record(params, h.fed.split, h.fed.opts)
        return reply


# ---------------------------------------------------------------------- state stores and the process cache

_SIDES: OrderedDict[tuple[str, str, str, str, int], NodeSide] = OrderedDict()


def node_side(cfg_text: str, name: str, data_path: str | None, out_dir: str | None, threads: int = 0) -> NodeSide:
    """The set-up of a node, cached per process (simulation actors and tests reuse it; state is reloaded)."""
    key = (cfg_text, name, data_path or "", out_dir or "", threads)
    if key not in _SIDES:
        _SIDES[key] = NodeSide(config_from_text(cfg_text), name, data_path, out_dir, threads)
        while len(_SIDES) > 32:
            _SIDES.popitem(last=False)
    _SIDES.move_to_end(key)
    return _SIDES[key]


class StateStore:
    """Where a node keeps its private state between messages: Context.state, or files in `state-dir`."""

    def __init__(self, context: Context, state_dir: str | None, run_key: str) -> None:
        self.context = context
        self.path = Path(state_dir) / f"{run_key}.safetensors" if state_dir else None

    def read(self) -> bytes | None:
        if self.path is not None:
            return self.path.read_bytes() if self.path.is_file() else None
        if STATE_KEY not in self.context.state.array_records:
            return None
        return bytes(self.context.state.array_records[STATE_KEY]["blob"].numpy().tobytes())

    def write(self, blob: bytes) -> None:
        if self.path is not None:
            atomic_write_bytes(self.path, blob)
            return
        self.context.state[STATE_KEY] = ArrayRecord({"blob": Array(np.frombuffer(blob, dtype=np.uint8))})


def handle(kind: str, content: RecordDict, context: Context, defaults: dict[str, Any]) -> RecordDict:
    """Run one message on this SuperNode: load private state, do the step, store the state, reply."""
    node_cfg = dict(context.node_config)
    name = node_cfg.get("node-name")
    if name is None and "partition-id" in node_cfg and "node-names" in defaults:  # simulation: one node per id
        name = defaults["node-names"][int(node_cfg["partition-id"])]
    if name is None:
        raise WorldLMError("this SuperNode has no node-name; start it with --node-config 'node-name=\"<tree node>\"'")
    cfg_text = str(context.run_config.get("worldlm-config") or defaults.get("worldlm-config", ""))
    if not cfg_text:
        raise WorldLMError("the run carries no worldlm-config; start runs with worldlm deploy-local or --run-config")
    local = {
        k: str(v) if (v := node_cfg.get(k, defaults.get(k))) else None for k in ("data-path", "out-dir", "state-dir")
    }
    threads = int(node_cfg.get("threads", defaults.get("threads", 0)))
    side = node_side(cfg_text, str(name), local["data-path"], local["out-dir"], threads)
    if kind == "hello":
        return side.hello()
    if side.threads > 0 and torch.get_num_threads() != side.threads:
        torch.set_num_threads(side.threads)
    t0 = time.perf_counter()
    run_key = f"{context.run_config.get('run-key') or context.run_id}-{name}"  # nested: the same across resubmits
    store = StateStore(context, local["state-dir"], run_key)
    side.load(store.read())
    steps = {"visit": side.visit, "aggregate": side.aggregate, "evaluate": side.evaluate}
    if kind not in steps:
        raise WorldLMError(f"SuperNode '{name}' is a tree node, not a bridge to a region: it takes no '{kind}'")
    reply = steps[kind](content)
    store.write(side.dump())
    reply["timing"] = MetricRecord({"seconds": time.perf_counter() - t0})
    return reply
