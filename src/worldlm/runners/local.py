"""The in-process runner: every node of the tree lives in this process, deterministically.

It turns a method into one or more federations for the engine (DESIGN §2 baselines table),
owns the one working model, each node's AdamW state and data sampler, evaluates each node's
personalised model, and writes the run directory (DESIGN §4).
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from worldlm import config as C
from worldlm.data.mixture import BatchSampler, Span, assign_shards, eval_windows
from worldlm.data.prepared import load_prepared
from worldlm.evaluate import evaluate
from worldlm.federation.server_opt import ServerOptConfig, make_server_opt
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
from worldlm.train import ClientOptConfig, Schedule, make_client_opt, train_steps

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class Federation:
    """One engine run: a tree, its node data, options; `evaluates` maps user nodes to engine nodes."""

    tree: Tree
    spans: dict[str, list[Span]]
    opts: FedOptions
    split: Split
    evaluates: dict[str, str]
    states: dict[str, NodeState]


def tree_from_config(cfg: C.Config) -> Tree:
    return build_tree([NodeSpec(n.name, n.parent, tuple(n.sources), n.dp) for n in cfg.tree.nodes])


def _server_opt_cfg(s: C.ServerOptSettings) -> ServerOptConfig:
    return ServerOptConfig(kind=s.kind, lr=s.lr, momentum=s.momentum, beta1=s.beta1, beta2=s.beta2, tau=s.tau)


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
    keys = Split(layout.backbone_size, layout.key_blocks, layout.key_size)
    no_keys = Split(layout.total, 0, 0)

    def opts(t: Tree, steps: dict[str, int], **kw: Any) -> FedOptions:
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
        o = opts(tree, {n: s for n in names}, share_keys=cfg.method == "worldlm")
        return [Federation(tree, spans, o, split, {n: n for n in names}, {})]
    if cfg.method == "fl":
        flat = flat_tree(tree)
        steps = {n: (0 if n == flat.root else per_round) for n in flat.order}
        return [Federation(flat, spans, opts(flat, steps), no_keys, {n: n for n in names}, {})]
    if cfg.method == "centralized":
        pooled = [sp for n in names for sp in spans[n]]
        single = _single("centralized", pooled)
        o = opts(single, {"centralized": per_round})
        return [Federation(single, {"centralized": pooled}, o, no_keys, {n: "centralized" for n in names}, {})]
    # local: every node alone on its own data for the same sequential steps
    return [
        Federation(_single(n, spans[n]), {n: spans[n]}, opts(tree, {n: per_round}), no_keys, {n: n}, {}) for n in names
    ]


def personal_models(fed: Federation, which: str) -> dict[str, Tensor]:
    """Each engine node's personalised model (see eval.model in config.py)."""
    if which == "deployed":
        return deployed_models(fed.tree, fed.states, fed.split, fed.opts)
    return {name: st.params for name, st in fed.states.items()}


class LocalTrainer:
    """Owns the working model and, per node, an AdamW state and a data sampler (engine's NodeTrainer)."""

    def __init__(
        self,
        model: GPT,
        layout: ParamLayout,
        client: ClientOptConfig,
        schedule: Schedule,
        on_train: Callable[[str, int, int, Any], None],
        on_step: Callable[[str, int, float], None],
    ) -> None:
        self.model = model
        self.layout = layout
        self.client = client
        self.schedule = schedule
        self.samplers: dict[str, BatchSampler] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.on_train = on_train
        self.on_step = on_step

    def add_node(self, name: str, sampler: BatchSampler) -> None:
        self.samplers[name] = sampler
        # Each node's AdamW holds its own moments for the shared working parameters (ClientOpt state).
        self.opts[name] = make_client_opt(self.model, self.client)

    def train(self, node: str, params: Tensor, start_step: int, n_steps: int) -> Tensor:
        self.layout.load(self.model, params)
        stats = train_steps(
            self.model,
            self.opts[node],
            self.samplers[node].next,
            self.schedule,
            start_step,
            n_steps,
            self.client.grad_clip,
            on_step=lambda step, loss: self.on_step(node, step, loss),
        )
        self.on_train(node, start_step, n_steps, stats)
        return self.layout.flatten(self.model)


def node_seed(seed: int, name: str) -> int:
    """A per-node seed that does not depend on the order nodes are created in."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def run(cfg: C.Config, out: Path, progress: ProgressFn | None = None) -> dict[str, Any]:
    """Train `cfg.method` on the configured tree and write the run directory; returns summary.json."""
    t_start = time.perf_counter()
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    tree = tree_from_config(cfg)
    data = load_prepared(cfg.data.path)
    train_sizes = {src: data.splits[src]["train"].tokens for src in data.sources}
    spans = assign_shards(tree, train_sizes, cfg.data.leaf_shards, cfg.data.inner_shards)
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg.model.preset, data.vocab_size, cfg.model.seq_len))
    kb = C.key_blocks(cfg)
    layout = ParamLayout(model, kb if cfg.method in ("worldlm", "fedper") else 0)
    init = layout.flatten(model)
    feds = plan(cfg, tree, spans, layout)
    per_round = sequential_span(feds[0].tree, feds[0].tree.root, feds[0].opts)
    total_seq = per_round * cfg.train.rounds
    t = cfg.train
    schedule = Schedule(
        t.lr_max,
        t.lr_alpha,
        t.warmup_steps if t.warmup_steps >= 0 else max(1, total_seq // 10),
        t.total_steps if t.total_steps >= 0 else total_seq,
    )
    client = ClientOptConfig(t.weight_decay, t.beta1, t.beta2, t.grad_clip)

    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    atomic_write_text(out / "config.toml", C.dumps(cfg))
    metrics = JsonlWriter(out / "metrics.jsonl")
    state = {"round": 0}
    emit_progress = progress or (lambda _e: None)

    def on_train(node: str, start_step: int, n_steps: int, stats: Any) -> None:
        metrics.write(
            {
                "round": state["round"],
                "stage": current_level[node] + 1,
                "node": node,
                "split": "train",
                "loss": stats.loss,
                "ppl": math.exp(min(stats.loss, 50.0)),
                "tokens": stats.tokens,
                "seconds": round(stats.seconds, 4),
                "tokens_per_s": round(stats.tokens / stats.seconds, 1),
                "step": start_step + n_steps,
            }
        )

    def on_step(node: str, step: int, loss: float) -> None:
        emit_progress(
            {
                "kind": "step",
                "node": node,
                "step": step,
                "loss": loss,
                "tokens": t.batch_size * cfg.model.seq_len,
            }
        )

    trainer = LocalTrainer(model, layout, client, schedule, on_train, on_step)
    current_level: dict[str, int] = {}
    for fed in feds:
        for name in fed.tree.order:
            node = fed.tree[name]
            current_level[name] = node.level
            fed.states[name] = NodeState(params=init.clone())
            if node.children:
                so = next((n.server_opt for n in cfg.tree.nodes if n.name == name and n.server_opt), None)
                fed.states[name].server_opt = make_server_opt(_server_opt_cfg(so or cfg.federation.server_opt))
            if node.trains:
                trainer.add_node(
                    name,
                    BatchSampler(data, fed.spans[name], cfg.model.seq_len, t.batch_size, node_seed(cfg.seed, name)),
                )

    windows: dict[tuple[str, str], Tensor] = {}
    n_windows = cfg.eval.batches * cfg.eval.batch_size
    for name in tree.order:
        for split in ("val", "test"):
            windows[(name, split)] = eval_windows(data, spans[name], split, cfg.model.seq_len, n_windows)

    def evaluate_all(split: str, rnd: int) -> dict[str, dict[str, float]]:
        results: dict[str, dict[str, float]] = {}
        for fed in feds:
            deployed = personal_models(fed, cfg.eval.model)
            for user_node, engine_node in fed.evaluates.items():
                layout.load(model, deployed[engine_node])
                loss, ppl = evaluate(model, windows[(user_node, split)], cfg.eval.batch_size)
                results[user_node] = {"loss": loss, "ppl": ppl}
                metrics.write(
                    {
                        "round": rnd,
                        "stage": None,
                        "node": user_node,
                        "split": split,
                        "loss": loss,
                        "ppl": ppl,
                        "tokens": int(windows[(user_node, split)][:, 1:].numel()),
                        "step": (rnd + 1) * per_round,
                    }
                )
        emit_progress({"kind": "eval", "split": split, "round": rnd, "results": results})
        return results

    edge_bytes: dict[tuple[str, str], int] = {}

    def emit(event: dict[str, object]) -> None:
        if event["event"] == "edge":
            key = (str(event["src"]), str(event["dst"]))
            edge_bytes[key] = edge_bytes.get(key, 0) + int(str(event["bytes"]))
        metrics.write(event)

    steps_per_round = sum(
        f.opts.local_steps[n] * trainings_per_round(f.tree, n, f.opts) for f in feds for n in f.tree.order
    )
    emit_progress(
        {
            "kind": "start",
            "method": cfg.method,
            "total_steps": steps_per_round * cfg.train.rounds,
            "rounds": cfg.train.rounds,
        }
    )
    val: dict[str, dict[str, float]] = {}
    for rnd in range(cfg.train.rounds):
        state["round"] = rnd
        for fed in feds:
            run_round(fed.tree, fed.states, fed.split, fed.opts, rnd, trainer, emit)
        if cfg.eval.every_round or rnd == cfg.train.rounds - 1:
            val = evaluate_all("val", rnd)
    test = evaluate_all("test", cfg.train.rounds - 1)
    metrics.close()

    for fed in feds:
        deployed = personal_models(fed, cfg.eval.model)
        for user_node, engine_node in fed.evaluates.items():
            layout.load(model, deployed[engine_node])
            tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
            atomic_write_bytes(out / "checkpoints" / f"{user_node}.safetensors", save_safetensors(tensors))

    ppls = np.array([test[n]["ppl"] for n in tree.order])
    summary: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "nodes": {
            n: {
                "ppl": test[n]["ppl"],
                "loss": test[n]["loss"],
                "val_ppl": val[n]["ppl"],
                "bytes_sent": sum(v for (src, _), v in edge_bytes.items() if src == n),
                "bytes_received": sum(v for (_, dst), v in edge_bytes.items() if dst == n),
            }
            for n in tree.order
        },
        "mean_ppl": float(ppls.mean()),
        "std_ppl": float(ppls.std()),
        "rounds": cfg.train.rounds,
        "sequential_steps": total_seq,
        "parameters": model.num_params(),
        "key_blocks": layout.key_blocks,
        "bytes_per_edge": {f"{a}->{b}": v for (a, b), v in sorted(edge_bytes.items())},
        "bytes_total": sum(edge_bytes.values()),
        "bytes_per_value": BYTES_PER_VALUE,
        "wall_seconds": round(time.perf_counter() - t_start, 2),
    }
    atomic_write_json(out / "summary.json", summary)
    return summary
