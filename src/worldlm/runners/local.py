"""The in-process runner: every node of the tree lives in this process, deterministically.

It turns a method into one or more federations for the engine (DESIGN §2 baselines table),
owns the one working model, each node's AdamW state and data sampler, evaluates each node's
personalised model, and writes the run directory (DESIGN §4).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from worldlm import config as C
from worldlm.data.mixture import BatchSampler, Span, assign_shards, eval_windows
from worldlm.data.prepared import Prepared, load_prepared
from worldlm.errors import WorldLMError
from worldlm.evaluate import evaluate
from worldlm.federation.privacy import DPSettings, Privacy
from worldlm.federation.server_opt import ServerOpt, ServerOptConfig, make_server_opt
from worldlm.federation.tree import NodeSpec, Tree, TreeNode, build_tree, flat_tree
from worldlm.federation.worldlm import (
    BYTES_PER_VALUE,
    FedOptions,
    NodeState,
    Split,
    deployed_models,
    run_round,
    sequential_span,
    trainings_per_round,
)
from worldlm.io import JsonlWriter, atomic_write_bytes, atomic_write_json, atomic_write_text
from worldlm.model import GPT, ParamLayout, gpt_config
from worldlm.runners.checkpoint import (
    CannotResume,
    Part,
    Snapshot,
    load_latest,
    read_part,
    save_checkpoint,
    write_part,
)
from worldlm.runners.node_state import (
    DiskStates,
    MemoryStates,
    NodeStates,
    adam_part,
    encode_state,
    load_adam,
    load_state,
)
from worldlm.timing import PhaseFn, PhaseTimer, no_phase, round_record
from worldlm.train import ClientOptConfig, Schedule, TrainStats, make_client_opt, train_steps

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class Federation:
    """One engine run: a tree, its node data, options; `evaluates` maps user nodes to engine nodes."""

    tree: Tree
    spans: dict[str, list[Span]]
    opts: FedOptions
    split: Split
    evaluates: dict[str, str]
    states: NodeStates


def tree_from_config(cfg: C.Config) -> Tree:
    dp = C.dp_nodes(cfg)  # `dp = true` on a node or its name in dp.nodes (DESIGN §2 "Differential privacy")
    return build_tree([NodeSpec(n.name, n.parent, tuple(n.sources), n.name in dp) for n in cfg.tree.nodes])


def make_privacy(cfg: C.Config, fed: Federation) -> Privacy | None:
    """The DP state of one federation: its nodes flagged dp that have a parent to privatise against (§4.2)."""
    parents = {n: p for n in fed.tree.order if fed.tree[n].dp and (p := fed.tree[n].parent) is not None}
    if not parents:
        return None
    d = cfg.dp
    settings = DPSettings(
        sigma=d.sigma,
        delta=d.delta,
        clip=d.clip,
        initial_clip=d.initial_clip,
        epsilon_budget=d.epsilon_budget,
        target_quantile=d.target_quantile,
        clip_lr=d.clip_lr,
        bit_sigma=d.bit_sigma,
    )
    return Privacy(settings, parents, {n: node_seed(cfg.seed, f"dp-noise/{n}") for n in parents})


def _server_opt_cfg(s: C.ServerOptSettings) -> ServerOptConfig:
    return ServerOptConfig(kind=s.kind, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2, tau=s.tau)


def server_opt_for(cfg: C.Config, fed: Federation, name: str) -> ServerOpt | None:
    """A fresh server optimizer for an inner node (its own settings, else federation.server_opt); None for a leaf."""
    if not fed.tree[name].children:
        return None
    own = next((n.server_opt for n in cfg.tree.nodes if n.name == name and n.server_opt), None)
    return make_server_opt(_server_opt_cfg(own or cfg.federation.server_opt))


def _single(name: str, spans: list[Span]) -> Tree:
    return Tree(
        nodes={name: TreeNode(name, None, (), tuple(dict.fromkeys(s.source for s in spans)), False, 0)},
        root=name,
        order=(name,),
    )


def plan(cfg: C.Config, tree: Tree, spans: dict[str, list[Span]], layout: ParamLayout) -> list[Federation]:
    """The method as engine configurations, all at equal sequential steps per round (paper §4.2)."""
    s = cfg.train.local_steps
    per_round = tree.depth * s  # the hierarchy's sequential steps per round (T_q = 1)
    fed = cfg.federation
    keys = layout.split
    no_keys = Split(layout.total, 0, 0)

    def opts(steps: dict[str, int], **kw: Any) -> FedOptions:
        return FedOptions(
            local_steps=steps,
            nu=fed.nu,
            attention=fed.attention,
            route_to_origin=fed.route_to_origin,
            sub_rounds=fed.sub_rounds,
            **kw,
        )

    names = list(tree.order)
    if cfg.method in ("worldlm", "hierfavg", "fedper"):
        split = no_keys if cfg.method == "hierfavg" else keys
        o = opts({n: s for n in names}, share_keys=cfg.method == "worldlm")
        return [Federation(tree, spans, o, split, {n: n for n in names}, MemoryStates())]
    if cfg.method == "fl":
        flat = flat_tree(tree)
        steps = {n: (0 if n == flat.root else per_round) for n in flat.order}
        return [Federation(flat, spans, opts(steps), no_keys, {n: n for n in names}, MemoryStates())]
    if cfg.method == "centralized":
        pooled = [sp for n in names for sp in spans[n]]
        single = _single("centralized", pooled)
        o = opts({"centralized": per_round})
        evaluates = {n: "centralized" for n in names}
        return [Federation(single, {"centralized": pooled}, o, no_keys, evaluates, MemoryStates())]
    # local: every node alone on its own data for the same sequential steps
    return [
        Federation(_single(n, spans[n]), {n: spans[n]}, opts({n: per_round}), no_keys, {n: n}, MemoryStates())
        for n in names
    ]


def personal_models(fed: Federation, which: str) -> Iterator[tuple[str, Tensor]]:
    """Each engine node's personalised model (see eval.model in config.py), one node at a time."""
    if which == "deployed":
        yield from deployed_models(fed.tree, fed.states, fed.split, fed.opts, fed.states.release)
        return
    for name in fed.tree.order:
        with fed.states.use(name) as st:
            yield name, st.params


class LocalTrainer:
    """Owns the working model and, per node, an AdamW state and a data sampler (engine's NodeTrainer).

    With `offload`, a node's AdamW moments live in a file there between its visits (see
    federation.offload_states). `phase` times "serialisation" (a node's flat state into and out of
    the working model), "training" and "offload".
    """

    def __init__(
        self,
        model: GPT,
        layout: ParamLayout,
        client: ClientOptConfig,
        schedule: Schedule,
        offload: Path | None = None,
        phase: PhaseFn = no_phase,
    ) -> None:
        self.model = model
        self.layout = layout
        self.client = client
        self.schedule = schedule
        self.offload = offload
        self.phase = phase
        self.samplers: dict[str, BatchSampler] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.on_train: Callable[[str, int, int, TrainStats], None] = lambda *_: None
        self.on_step: Callable[[str, int, float], None] = lambda *_: None

    def add_node(self, name: str, sampler: BatchSampler) -> None:
        self.samplers[name] = sampler
        # Each node's AdamW holds its own moments for the shared working parameters (ClientOpt state).
        self.opts[name] = make_client_opt(self.model, self.client)

    def _adam_file(self, node: str) -> Path:
        assert self.offload is not None
        return self.offload / f"adam-{list(self.opts).index(node)}.safetensors"

    def adam_state(self, node: str) -> Part:
        """The node's AdamW state (read from its file when offloaded; empty before it first trained)."""
        if self.offload is None:
            return adam_part(self.opts[node])
        file = self._adam_file(node)
        return read_part(file) if file.is_file() else Part({}, {})

    def set_adam_state(self, node: str, part: Part) -> None:
        if self.offload is None:
            load_adam(self.opts[node], part)
        else:
            write_part(self._adam_file(node), part, durable=False)

    def train(self, node: str, params: Tensor, start_step: int, n_steps: int) -> Tensor:
        opt = self.opts[node]
        with self.phase("serialisation"):
            self.layout.load(self.model, params)
        if self.offload is not None:
            with self.phase("offload"):
                load_adam(opt, self.adam_state(node))
        with self.phase("training"):
            stats = train_steps(
                self.model,
                opt,
                self.samplers[node].next,
                self.schedule,
                start_step,
                n_steps,
                self.client.grad_clip,
                on_step=lambda step, loss: self.on_step(node, step, loss),
            )
        if self.offload is not None:
            with self.phase("offload"):
                self.set_adam_state(node, adam_part(opt))
                opt.state.clear()
        self.on_train(node, start_step, n_steps, stats)
        with self.phase("serialisation"):
            return self.layout.flatten(self.model)


def node_seed(seed: int, name: str) -> int:
    """A per-node seed that does not depend on the order nodes are created in."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def node_sampler(cfg: C.Config, data: Prepared, fed: Federation, name: str) -> BatchSampler:
    """A training node's batches: its shards, seeded by the run seed and its name (the same in every runner)."""
    return BatchSampler(data, fed.spans[name], cfg.model.seq_len, cfg.train.batch_size, node_seed(cfg.seed, name))


def train_record(rnd: int, level: int, node: str, end_step: int, stats: TrainStats) -> dict[str, Any]:
    """The metrics.jsonl record of one node's local training (4.i); stage = tree level + 1."""
    return {
        "round": rnd,
        "stage": level + 1,
        "node": node,
        "split": "train",
        "loss": stats.loss,
        "ppl": math.exp(min(stats.loss, 50.0)),
        "tokens": stats.tokens,
        "seconds": round(stats.seconds, 4),
        "tokens_per_s": round(stats.tokens / stats.seconds, 1),
        "step": end_step,
    }


def eval_record(rnd: int, node: str, split: str, loss: float, ppl: float, tokens: int, step: int) -> dict[str, Any]:
    """The metrics.jsonl record of one node's personalised evaluation (stage None: not a training stage)."""
    return {
        "round": rnd,
        "stage": None,
        "node": node,
        "split": split,
        "loss": loss,
        "ppl": ppl,
        "tokens": tokens,
        "step": step,
    }


def all_diverged(losses: Sequence[float]) -> bool:
    """Every node that trained this round ended with a NaN/inf loss: the run cannot recover, stop it.

    A non-finite loss means non-finite weights (the step's clipped gradient is NaN), and a NaN
    spreads through every aggregation it enters, so the remaining rounds would only burn compute.
    """
    return bool(losses) and not any(math.isfinite(x) for x in losses)


def diverged_message(rnd: int, rounds: int) -> str:
    return (
        f"round {rnd}: every node's training loss is NaN/inf, the run diverged; stopping after round {rnd + 1} of "
        f"{rounds} (summary.json reports NaN perplexities and diverged_round; lower train.lr_max or dp.sigma)"
    )


def run_summary(
    cfg: C.Config,
    order: Sequence[str],
    test: dict[str, dict[str, float]],
    val: dict[str, dict[str, float]],
    edges: dict[str, int],
    sequential_steps: int,
    model: tuple[int, int],
    wall_seconds: float,
    diverged_round: int | None = None,
) -> dict[str, Any]:
    """summary.json (DESIGN §4 run directory contract) for every runner; `model` = (parameters, key blocks).

    A node without a test result (a Flower node that never answered) gets None values, is left out
    of the mean and is listed under "missing_nodes". A run stopped because it diverged (see
    `all_diverged`) has "diverged_round" and the sequential steps it actually trained.
    """
    ppls = np.array([test[n]["ppl"] for n in order if n in test])

    def sent(n: str) -> int:
        return sum(v for k, v in edges.items() if k.split("->")[0] == n)

    def received(n: str) -> int:
        return sum(v for k, v in edges.items() if k.split("->")[1] == n)

    summary: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "nodes": {
            n: {
                "ppl": test[n]["ppl"] if n in test else None,
                "loss": test[n]["loss"] if n in test else None,
                "val_ppl": val[n]["ppl"] if n in val else None,
                "bytes_sent": sent(n),
                "bytes_received": received(n),
            }
            for n in order
        },
        "mean_ppl": float(ppls.mean()),
        "std_ppl": float(ppls.std()),
        "rounds": cfg.train.rounds,
        "sequential_steps": sequential_steps,
        "parameters": model[0],
        "key_blocks": model[1],
        "bytes_per_edge": dict(sorted(edges.items())),
        "bytes_total": sum(edges.values()),
        "bytes_per_value": BYTES_PER_VALUE,
        "wall_seconds": round(wall_seconds, 2),
    }
    if missing := [n for n in order if n not in test]:
        summary["missing_nodes"] = missing
    if diverged_round is not None:
        summary["diverged_round"] = diverged_round
    return summary


@dataclass
class RunSetup:
    """What every runner (in-process, each Flower node) builds alike from a config and its data."""

    tree: Tree
    spans: dict[str, list[Span]]
    model: GPT  # the same initial weights everywhere: seeded from cfg.seed just before it is built
    layout: ParamLayout
    feds: list[Federation]
    per_round: int  # sequential steps of one global round
    schedule: Schedule  # one LR clock over all sequential steps (DESIGN §2)
    client: ClientOptConfig


def set_up(cfg: C.Config, data: Prepared) -> RunSetup:
    tree = tree_from_config(cfg)
    train_sizes = {src: data.splits[src]["train"].tokens for src in data.sources}
    spans = assign_shards(tree, train_sizes, cfg.data.leaf_shards, cfg.data.inner_shards)
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg.model.preset, data.vocab_size, cfg.model.seq_len))
    layout = ParamLayout(model, C.key_blocks(cfg) if cfg.method in ("worldlm", "fedper") else 0)
    feds = plan(cfg, tree, spans, layout)
    per_round = sequential_span(feds[0].tree, feds[0].tree.root, feds[0].opts)
    t = cfg.train
    total_seq = per_round * t.rounds
    schedule = Schedule(
        t.lr_max,
        t.lr_alpha,
        t.warmup_steps if t.warmup_steps >= 0 else max(1, total_seq // 10),
        t.total_steps if t.total_steps >= 0 else total_seq,
    )
    client = ClientOptConfig(t.weight_decay, t.beta1, t.beta2, t.grad_clip)
    return RunSetup(tree, spans, model, layout, feds, per_round, schedule, client)


class Interrupted(WorldLMError):
    """SIGINT/SIGTERM: the run stopped at a round boundary after writing a checkpoint."""

    exit_code = 130


class LocalRun:
    """One method on one tree, in this process: set-up, rounds, evaluation, checkpoints, summary."""

    def __init__(self, cfg: C.Config, out: Path, progress: ProgressFn | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.progress = progress or (lambda _e: None)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.data = load_prepared(cfg.data.path)
        setup = set_up(cfg, self.data)
        self.tree, self.spans, self.feds = setup.tree, setup.spans, setup.feds
        self.model, self.layout = setup.model, setup.layout
        self.timer = PhaseTimer()
        self.offload = out / "offload" if cfg.federation.offload_states else None
        if self.offload is not None:  # federation.offload_states: node states in files between uses
            for i, fed in enumerate(self.feds):
                fed.states = DiskStates(self.offload / str(i), partial(server_opt_for, self.cfg, fed), self.timer.phase)
        # DP per federation index (only federations holding dp-flagged nodes with a parent)
        self.privacy = {i: p for i, fed in enumerate(self.feds) if (p := make_privacy(cfg, fed)) is not None}
        self.per_round = setup.per_round
        self.trainer = LocalTrainer(
            self.model, self.layout, setup.client, setup.schedule, self.offload, self.timer.phase
        )
        self.trainer.on_train, self.trainer.on_step = self._on_train, self._on_step
        self._init_nodes()
        n_windows = cfg.eval.batches * cfg.eval.batch_size
        self.windows = {
            (name, split): eval_windows(self.data, self.spans[name], split, cfg.model.seq_len, n_windows)
            for name in self.tree.order
            for split in ("val", "test")
        }
        self.round = 0  # rounds completed
        self.round_losses: list[float] = []  # this round's training losses, one per node visit
        self.diverged_round: int | None = None
        self.edge_bytes: dict[str, int] = {}
        self.val: dict[str, dict[str, float]] = {}
        self.metrics: JsonlWriter | None = None
        self.round_seconds: list[dict[str, float | int]] = []  # this session's timing.jsonl records
        self.t_start = time.perf_counter()
        self.elapsed_before = 0.0  # wall seconds of earlier sessions of a resumed run

    def _init_nodes(self) -> None:
        init = self.layout.flatten(self.model)
        self.level: dict[str, int] = {}
        for fed in self.feds:
            for name in fed.tree.order:
                node = fed.tree[name]
                self.level[name] = node.level
                fed.states[name] = NodeState(params=init.clone(), server_opt=server_opt_for(self.cfg, fed, name))
                fed.states.release(name)
                if node.trains:
                    self.trainer.add_node(name, node_sampler(self.cfg, self.data, fed, name))

    # ------------------------------------------------------------------ observability

    def _write(self, record: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(record)

    def _on_train(self, node: str, start_step: int, n_steps: int, stats: TrainStats) -> None:
        self.round_losses.append(stats.loss)
        self._write(train_record(self.round, self.level[node], node, start_step + n_steps, stats))

    def _on_step(self, node: str, step: int, loss: float) -> None:
        tokens = self.cfg.train.batch_size * self.cfg.model.seq_len
        self.progress({"kind": "step", "node": node, "step": step, "loss": loss, "tokens": tokens})

    def _emit(self, event: dict[str, object]) -> None:
        if event["event"] == "edge":
            key = f"{event['src']}->{event['dst']}"
            self.edge_bytes[key] = self.edge_bytes.get(key, 0) + int(str(event["bytes"]))
        self._write(event)

    def _end_privacy_round(self, privacy: Privacy, rnd: int) -> None:
        """Paper §4.2: next round's clip bounds; epsilon per DP node into metrics.jsonl; budget stops, loudly."""
        privacy.end_round()
        for event in privacy.events:  # a node reached dp.epsilon_budget: logged once, here and on stderr
            self._write({**event, "round": rnd})
            print(
                f"worldlm: DP node '{event['node']}' stops releasing updates in round {rnd}: its next release would "
                f"reach epsilon {float(str(event['next_epsilon'])):.3g} > dp.epsilon_budget {event['budget']} "
                f"(spent {float(str(event['epsilon'])):.3g}); its parent aggregates without it",
                file=sys.stderr,
            )
        privacy.events.clear()
        for record in privacy.records():
            self._write({"event": "privacy", "round": rnd, **record})

    # ------------------------------------------------------------------ evaluation

    def user_models(self) -> Iterator[tuple[str, Tensor]]:
        """(user node, its personalised model) for every tree node, one engine node's model at a time."""
        for fed in self.feds:
            users: dict[str, list[str]] = {}
            for user_node, engine_node in fed.evaluates.items():
                users.setdefault(engine_node, []).append(user_node)
            for engine_node, params in personal_models(fed, self.cfg.eval.model):
                for user_node in users.get(engine_node, []):
                    yield user_node, params

    def evaluate_all(self, split: str, rnd: int) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        for user_node, params in self.user_models():
            self.layout.load(self.model, params)
            windows = self.windows[(user_node, split)]
            loss, ppl = evaluate(self.model, windows, self.cfg.eval.batch_size)
            results[user_node] = {"loss": loss, "ppl": ppl}
            tokens = int(windows[:, 1:].numel())
            self._write(eval_record(rnd, user_node, split, loss, ppl, tokens, (rnd + 1) * self.per_round))
        self.progress({"kind": "eval", "split": split, "round": rnd, "results": results})
        return results

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> Snapshot:
        """Everything needed to continue exactly, as checkpoint parts made one at a time when written.

        Parts: `state` (counters, sampler RNG, DP state), `node-<fed>-<k>` per node state (k: its
        index in the tree order), `adam-<k>` per training node's AdamW state.
        """
        parts: dict[str, Callable[[], Part]] = {"state": self._run_part}
        for i, fed in enumerate(self.feds):
            for k, name in enumerate(fed.tree.order):
                parts[f"node-{i}-{k}"] = partial(_node_part, fed.states, name)
        for k, name in enumerate(self.trainer.opts):
            parts[f"adam-{k}"] = partial(self.trainer.adam_state, name)
        return Snapshot(self.round, parts)

    def _run_part(self) -> Part:
        tensors: dict[str, Tensor] = {}
        privacy: dict[str, Any] = {}
        for i, priv in self.privacy.items():  # accountant ledgers, clip bounds, noise RNG (resume = uninterrupted)
            priv_tensors, privacy[str(i)] = priv.state_dict()
            tensors.update({f"dp/{i}/{k}": v for k, v in priv_tensors.items()})
        assert self.metrics is not None
        state = {
            "round": self.round,
            "metrics_lines": self.metrics.lines,
            "edge_bytes": self.edge_bytes,
            "val": self.val,
            "samplers": {name: sampler.state() for name, sampler in self.trainer.samplers.items()},
            "privacy": privacy,
            "wall_seconds": self.elapsed_before + time.perf_counter() - self.t_start,
        }
        return Part(tensors, state)

    def restore(self, snap: Snapshot) -> int:
        """Continue from `snap`, one part at a time; returns the metrics.jsonl records it covers."""
        run = snap.parts["state"]()
        t, s = run.tensors, run.meta
        for i, fed in enumerate(self.feds):
            for k, name in enumerate(fed.tree.order):
                with fed.states.use(name) as st:
                    load_state(st, snap.parts[f"node-{i}-{k}"]())
        for k, name in enumerate(self.trainer.opts):
            self.trainer.set_adam_state(name, snap.parts[f"adam-{k}"]())
        for name, sampler in self.trainer.samplers.items():
            sampler.set_state(s["samplers"][name])
        for i, priv in self.privacy.items():
            prefix = f"dp/{i}/"
            priv.load_state_dict(
                {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, s["privacy"][str(i)]
            )
        self.round = snap.round
        self.edge_bytes = dict(s["edge_bytes"])
        self.val = s["val"]
        self.elapsed_before = float(s["wall_seconds"])
        return int(s["metrics_lines"])

    # ------------------------------------------------------------------ driver

    @property
    def steps_per_round(self) -> int:
        """Training steps of all nodes in one round (each node's local steps times its visits)."""
        return sum(
            f.opts.local_steps[n] * trainings_per_round(f.tree, n, f.opts) for f in self.feds for n in f.tree.order
        )

    def execute(self, resume: bool = False, warn: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
        """Run (or continue) all rounds, checkpointing each; then test, save models and summary.json.

        Each round's wall seconds, split into phases (see `run_round` and `LocalTrainer`; plus
        "evaluation" and "checkpoint"), go to `timing.jsonl` and `round_seconds`; `other` is the
        time in no phase (metrics, progress).
        """
        ckpt_root = self.out / "checkpoints"
        if resume:
            saved = self.out / "config.toml"
            if not C.same_config(saved, self.cfg):
                raise WorldLMError(
                    f"{saved} differs from this config (or is missing); resume with the same config and --set "
                    "options, or start a new run directory"
                )
            try:
                lines = self.restore(load_latest(ckpt_root, warn))
                truncate_lines(self.out / "metrics.jsonl", lines)
            except CannotResume:
                raise
            except (WorldLMError, OSError, KeyError, ValueError, TypeError) as exc:  # checkpoint and files disagree
                raise CannotResume(f"cannot resume {self.out} ({exc}); start the run again without --resume") from exc
            drop_rounds_from(self.out / "timing.jsonl", self.round)
        else:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.toml", C.dumps(self.cfg))
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
            (self.out / "timing.jsonl").unlink(missing_ok=True)
        self.metrics = JsonlWriter(self.out / "metrics.jsonl")
        timing = JsonlWriter(self.out / "timing.jsonl")
        self.progress(
            {
                "kind": "start",
                "method": self.cfg.method,
                "total_steps": self.steps_per_round * self.cfg.train.rounds,
                "done_steps": self.steps_per_round * self.round,
                "rounds": self.cfg.train.rounds,
            }
        )
        phase = self.timer.phase
        try:
            with _graceful_stop() as stop:
                while self.round < self.cfg.train.rounds:
                    rnd = self.round
                    t0 = time.perf_counter()
                    self.timer.take()  # a round's phases only
                    self.round_losses = []
                    for i, fed in enumerate(self.feds):
                        privacy = self.privacy.get(i)
                        run_round(
                            fed.tree,
                            fed.states,
                            fed.split,
                            fed.opts,
                            rnd,
                            self.trainer,
                            self._emit,
                            privacy,
                            fed.states.release,
                            phase,
                        )
                        if privacy is not None:
                            with phase("privacy"):
                                self._end_privacy_round(privacy, rnd)
                    diverged = all_diverged(self.round_losses)
                    if self.cfg.eval.every_round or diverged or rnd == self.cfg.train.rounds - 1:
                        with phase("evaluation"):
                            self.val = self.evaluate_all("val", rnd)
                    self.round += 1
                    if not diverged and (self.round % self.cfg.checkpoint.every == 0 or stop.requested):
                        with phase("checkpoint"):
                            self.metrics.sync()  # the records a checkpoint counts are on disk before it is
                            save_checkpoint(ckpt_root, self.snapshot(), self.cfg.checkpoint.keep)
                    self.round_seconds.append(round_record(rnd, time.perf_counter() - t0, self.timer.take()))
                    timing.write(self.round_seconds[-1])
                    if diverged:
                        self.diverged_round = rnd
                        self._write({"event": "diverged", "round": rnd})
                        print(f"worldlm: {diverged_message(rnd, self.cfg.train.rounds)}", file=sys.stderr)
                        break
                    if stop.requested and self.round < self.cfg.train.rounds:
                        raise Interrupted(
                            f"stopped after round {self.round} of {self.cfg.train.rounds} (checkpoint saved); "
                            f"continue with: worldlm train CONFIG --resume --out {self.out}"
                        )
            test = self.evaluate_all("test", self.round - 1)
        finally:
            self.metrics.close()
            timing.close()
        self._save_models()
        if self.offload is not None:  # scratch: the checkpoints hold what a resume needs
            shutil.rmtree(self.offload)
        summary = self._summary(test)
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def _save_models(self) -> None:
        for user_node, params in self.user_models():
            self.layout.load(self.model, params)
            tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            path = self.out / "checkpoints" / "final" / f"{user_node}.safetensors"
            atomic_write_bytes(path, save_safetensors(tensors))

    def _summary(self, test: dict[str, dict[str, float]]) -> dict[str, Any]:
        wall = self.elapsed_before + time.perf_counter() - self.t_start
        parts = (self.model.num_params(), self.layout.key_blocks)
        steps = self.per_round * self.round  # all rounds, unless the run diverged and stopped early
        summary = run_summary(
            self.cfg, self.tree.order, test, self.val, self.edge_bytes, steps, parts, wall, self.diverged_round
        )
        return {**summary, **self._privacy_summary()}

    def _privacy_summary(self) -> dict[str, Any]:
        """DP runs only (DESIGN §4 run directory contract): epsilon per DP node at the configured delta."""
        if not self.privacy:
            return {}
        privs = list(self.privacy.values())
        return {
            "privacy": {
                "delta": self.cfg.dp.delta,
                "epsilon": {r["node"]: r["epsilon"] for p in privs for r in p.records()},
                "sigma": self.cfg.dp.sigma,
                "clip_rule": self.cfg.dp.clip,
                "releases": {r["node"]: r["releases"] for p in privs for r in p.records()},
                "stopped": sorted(n for p in privs for n in p.stopped),
                "accountant": "dp-accounting RDP, Gaussian mechanism per release, add-or-remove adjacency",
            }
        }


class _StopFlag:
    requested = False


@contextlib.contextmanager
def _graceful_stop() -> Iterator[_StopFlag]:
    """First SIGINT/SIGTERM: finish the round and checkpoint. A second one stops at once."""
    flag = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("worldlm: stopping after this round (checkpoint follows); press Ctrl-C again to abort", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def truncate_lines(path: Path, lines: int) -> None:
    """Drop metrics written after the checkpoint (a partial round that will be redone)."""
    if not path.is_file():
        if lines:
            raise WorldLMError(f"{path} is missing but the checkpoint expects {lines} records; start a new run")
        return
    kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
    if len(kept) < lines:
        raise WorldLMError(f"{path} has fewer records than the checkpoint expects; start a new run")
    atomic_write_text(path, "".join(kept))


def drop_rounds_from(path: Path, first_round: int) -> None:
    """Drop timing records of rounds that a resumed run does again (and a line torn by a crash)."""

    def kept(line: str) -> bool:
        try:
            return int(json.loads(line)["round"]) < first_round
        except (ValueError, KeyError, TypeError):
            return False

    if path.is_file():
        atomic_write_text(
            path, "".join(x for x in path.read_text(encoding="utf-8").splitlines(keepends=True) if kept(x))
        )


def _node_part(states: NodeStates, name: str) -> Part:
    with states.use(name) as st:
        return encode_state(st)


def run(
    cfg: C.Config,
    out: Path,
    progress: ProgressFn | None = None,
    resume: bool = False,
    warn: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Train `cfg.method` on the configured tree and write the run directory; returns summary.json."""
    threads = torch.get_num_threads()
    try:
        return LocalRun(cfg, out, progress).execute(resume=resume, warn=warn)
    finally:
        torch.set_num_threads(threads)  # train.threads applies to this run only, not to the caller
