"""Planning a run: a method as engine runs (docs/design.md, "One round through the code"), its rounds and its set-up.

Every runner (in-process, each Flower node) builds a run alike from a config and its data: the same
tree, shards, initial model, federations, LR schedule and per-node samplers, so the same seed gives
the same numbers everywhere.
"""

from __future__ import annotations

import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from worldlm import config as C
from worldlm.data.mixture import Span, assign_shards, cap_spans
from worldlm.data.prepared import Prepared
from worldlm.data.samplers import BatchSampler, PoissonWindows
from worldlm.federation.aggregation import Similarity
from worldlm.federation.round import deployed_models, sequential_span, trainings_per_round
from worldlm.federation.server_opt import ServerOpt, make_server_opt
from worldlm.federation.steps import fine_tuned_model, initial_child_keys
from worldlm.federation.tree import NodeSpec, Tree, TreeNode, build_tree, flat_tree
from worldlm.federation.types import FedOptions, NodeState, Split
from worldlm.model import GPT, ParamLayout, gpt_config
from worldlm.privacy.node import Privacy
from worldlm.privacy.record import RecordDP, calibrate
from worldlm.runners.state_store import MemoryStates, NodeStates
from worldlm.training.device import Compute, resolve_compute
from worldlm.training.loop import ClientOptConfig, Schedule


@dataclass
class EngineRun:
    """One engine run: a tree, its node data, options; `evaluates` maps user nodes to engine nodes."""

    tree: Tree
    spans: dict[str, list[Span]]
    opts: FedOptions
    split: Split
    evaluates: dict[str, str]
    states: NodeStates


def tree_from_config(cfg: C.Config) -> Tree:
    dp = C.dp_nodes(cfg)  # `dp = true` on a node or its name in dp.nodes
    return build_tree([NodeSpec(n.name, n.parent, tuple(n.sources), n.name in dp) for n in cfg.tree.nodes])


def make_privacy(cfg: C.Config, fed: EngineRun) -> Privacy | None:
    """The node-level DP state of one federation: its nodes flagged dp that have a parent to privatise
    against (§4.2); None under dp.unit = "record" (DP-SGD at the nodes instead, `make_record_dp`)."""
    if cfg.dp.unit == "record":
        return None
    parents = {n: p for n in fed.tree.order if fed.tree[n].dp and (p := fed.tree[n].parent) is not None}
    if not parents:
        return None
    settings = C.dp_settings(cfg)
    seeds = {n: dp_seed(cfg, f"dp-noise/{n}") for n in parents}
    return Privacy(settings, parents, seeds, {p: dp_seed(cfg, f"dp-central/{p}") for p in set(parents.values())})


def make_record_dp(cfg: C.Config, fed: EngineRun, name: str, sampler: PoissonWindows, rounds: int) -> RecordDP:
    """A record-level DP node's DP-SGD state, its noise calibrated over its planned steps of the whole run."""
    steps = fed.opts.local_steps[name] * trainings_per_round(fed.tree, name, fed.opts) * rounds
    sigma = calibrate(cfg.dp.target_epsilon, cfg.dp.delta, sampler.sample_rate, steps)
    seed = dp_seed(cfg, f"dp-sgd/{name}")
    n = len(sampler.windows)
    return RecordDP(sigma, sampler.sample_rate, n, cfg.dp.max_grad_norm, seed, cfg.dp.delta, cfg.dp.epsilon_budget)


def server_opt_for(cfg: C.Config, fed: EngineRun, name: str) -> ServerOpt | None:
    """A fresh server optimizer for an inner node (its own settings, else federation.server_opt); None for a leaf."""
    if not fed.tree[name].children:
        return None
    own = next((n.server_opt for n in cfg.tree.nodes if n.name == name and n.server_opt), None)
    return make_server_opt(own or cfg.federation.server_opt)


def _single(name: str, spans: list[Span]) -> Tree:
    return Tree(
        nodes={name: TreeNode(name, None, (), tuple(dict.fromkeys(s.source for s in spans)), False, 0)},
        root=name,
        order=(name,),
    )


def stages_per_round(cfg: C.Config, tree: Tree) -> int:
    """Engine rounds per global round: depth when a round is one stage of local_steps, else 1.

    Paper A.1.2: at equal sequential steps FL runs 3 rounds of `local_steps` per client where a
    3-level hierarchy runs one round of 3 × `local_steps`; so does the hierarchy in the parallel
    schedule (§3.1), where every level trains in the same window.
    """
    fed = cfg.federation
    per_stage = (cfg.method == "fl" and fed.fl_round == "stage") or (C.is_hierarchy(cfg) and fed.schedule == "parallel")
    return tree.depth if per_stage else 1


def engine_rounds(cfg: C.Config, tree: Tree) -> int:
    """Rounds the engine runs for `train.rounds` global rounds, all methods at equal sequential steps."""
    return cfg.train.rounds * stages_per_round(cfg, tree)


def steps_per_round(feds: list[EngineRun]) -> int:
    """Training steps of all nodes in one engine round (each node's local steps times its visits)."""
    return sum(f.opts.local_steps[n] * trainings_per_round(f.tree, n, f.opts) for f in feds for n in f.tree.order)


def train_tokens(cfg: C.Config, feds: list[EngineRun], rounds: int) -> int:
    """Training tokens of all nodes together over `rounds` engine rounds: a run's compute (summary.json)."""
    return steps_per_round(feds) * rounds * cfg.train.batch_size * cfg.model.seq_len


def plan(cfg: C.Config, tree: Tree, spans: dict[str, list[Span]], layout: ParamLayout) -> list[EngineRun]:
    """The method as engine configurations, all at equal sequential steps per global round (paper §4.2, A.1.2).

    A global round is depth × local_steps sequential steps (the hierarchy's sequential schedule, T_q = 1);
    engines whose round is one stage (FL as in A.1.2, the parallel schedule) run `stages_per_round` rounds
    for each global round (see `engine_rounds`).
    """
    s = cfg.train.local_steps
    per_round = tree.depth * s  # sequential steps of one global round
    fed = cfg.federation
    keys = layout.split
    no_keys = Split(layout.total, 0, 0)

    matrices = fed.similarity_on == "matrices" and keys.key_blocks > 0
    similarity = Similarity(fed.similarity, fed.temperature, layout.key_matrix_mask() if matrices else None)

    def opts(steps: dict[str, int], **kw: Any) -> FedOptions:
        return FedOptions(
            local_steps=steps,
            nu=fed.nu,
            attention=fed.attention,
            route_to_origin=fed.route_to_origin,
            sub_rounds=fed.sub_rounds,
            similarity=similarity,
            outlier_weight=fed.outlier_weight,
            outlier_rounds=fed.outlier_rounds,
            skip_outlier_residuals=fed.skip_outlier_residuals,
            **kw,
        )

    names = list(tree.order)
    if C.is_hierarchy(cfg):
        split = no_keys if cfg.method == "hierfavg" else keys
        o = opts(
            {n: s for n in names},
            share_keys=cfg.method == "worldlm",
            parallel=fed.schedule == "parallel",
            keep_trained=C.scores_fine_tuned(cfg),  # HierFAVG + ft: inner nodes too, after their last steps
        )
        return [EngineRun(tree, spans, o, split, {n: n for n in names}, MemoryStates())]
    if cfg.method == "fl":
        flat = flat_tree(tree)
        client_steps = per_round // stages_per_round(cfg, tree)  # A.1.2: local_steps per FL round by default
        steps = {n: (0 if n == flat.root else client_steps) for n in flat.order}
        return [EngineRun(flat, spans, opts(steps), no_keys, {n: n for n in names}, MemoryStates())]
    if cfg.method == "centralized":
        pooled = [sp for n in names for sp in spans[n]]
        single = _single("centralized", pooled)
        o = opts({"centralized": per_round})
        evaluates = {n: "centralized" for n in names}
        return [EngineRun(single, {"centralized": pooled}, o, no_keys, evaluates, MemoryStates())]
    # local: every node alone on its own data for the same sequential steps
    return [
        EngineRun(_single(n, spans[n]), {n: spans[n]}, opts({n: per_round}), no_keys, {n: n}, MemoryStates())
        for n in names
    ]


FINE_TUNED = "fine_tuned"  # the evaluation of "+ local fine-tuning" (beside eval.model's modes)


def personal_models(fed: EngineRun, which: str) -> Iterator[tuple[str, Tensor]]:
    """Each engine node's personalised model (see eval.model in config.py), one node at a time; `which` =
    "fine_tuned": its model after its last local training ("+ local fine-tuning")."""
    if which == "deployed":
        yield from deployed_models(fed.tree, fed.states, fed.split, fed.opts, fed.states.release)
        return
    for name in fed.tree.order:
        with fed.states.use(name) as st:
            yield name, fine_tuned_model(st) if which == FINE_TUNED else st.params


def initial_state(cfg: C.Config, fed: EngineRun, name: str, init: Tensor) -> NodeState:
    """A node's federation state before round 0 (every runner): the initial model, its server optimizer,
    and, on an inner node, its children's key layers as it knows them (the initial model's)."""
    st = NodeState(params=init.clone(), server_opt=server_opt_for(cfg, fed, name))
    initial_child_keys(st, list(fed.tree[name].children), fed.split, fed.opts)
    return st


def node_seed(seed: int, name: str) -> int:
    """A per-node seed that does not depend on the order nodes are created in."""
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


def dp_seed(cfg: C.Config, name: str) -> int:
    """The seed of a generator that protects privacy (DP noise, a DP node's record sampler): from the operating
    system's secure randomness, drawn where the generator lives and kept only in that node's state and
    checkpoints; from the run's public seed only with dp.reproducible_noise (experiments, tests)."""
    if cfg.dp.reproducible_noise:
        return node_seed(cfg.seed, name)
    return secrets.randbits(63)


def public_noise_warning(cfg: C.Config) -> str | None:
    """What a deployment should tell its operator when its DP noise can be regenerated from the run config."""
    if not (cfg.dp.reproducible_noise and C.dp_nodes(cfg)):
        return None
    return (
        "dp.reproducible_noise = true: the DP nodes' noise is seeded from the run's public seed, so whoever "
        "holds the run config can regenerate it and subtract it from what they release; for experiments only"
    )


def record_dp_nodes(cfg: C.Config) -> set[str]:
    """The nodes that train with DP-SGD (dp.unit = "record"); none for centralized (pooled by definition)."""
    return C.dp_nodes(cfg) if cfg.dp.unit == "record" and cfg.method != "centralized" else set()


def node_sampler(cfg: C.Config, data: Prepared, fed: EngineRun, name: str) -> BatchSampler | PoissonWindows:
    """A training node's batches: its shards, seeded by the run seed and its name (the same in every runner);
    random tokens for a node under attack.kind = "random_tokens"; Poisson samples of its windows for a
    record-level DP node, seeded secretly (`dp_seed`: which records a step used is part of its privacy)."""
    if name in record_dp_nodes(cfg):
        seed = dp_seed(cfg, name)  # the name alone: the label reproducible runs have always used
        return PoissonWindows(data, fed.spans[name], cfg.model.seq_len, cfg.train.batch_size, seed)
    noise = data.vocab_size if C.attacked(cfg, name, "random_tokens") else 0
    seed = node_seed(cfg.seed, name)
    return BatchSampler(data, fed.spans[name], cfg.model.seq_len, cfg.train.batch_size, seed, noise)


def training_node(
    cfg: C.Config, data: Prepared, fed: EngineRun, name: str, rounds: int
) -> tuple[BatchSampler | PoissonWindows, float, RecordDP | None]:
    """What a runner's trainer needs for a training node (LocalTrainer.add_node's arguments, every runner):
    its sampler, its update scale (attack.scale) and, for a record-level DP node, its DP-SGD state."""
    sampler = node_sampler(cfg, data, fed, name)
    private = make_record_dp(cfg, fed, name, sampler, rounds) if isinstance(sampler, PoissonWindows) else None
    return sampler, update_scale(cfg, name), private


def update_scale(cfg: C.Config, name: str) -> float:
    """What a node's local training change is multiplied by: attack.scale under "scaled_update", else 1."""
    return cfg.attack.scale if C.attacked(cfg, name, "scaled_update") else 1.0


@dataclass
class RunSetup:
    """What every runner (in-process, each Flower node) builds alike from a config and its data."""

    tree: Tree
    spans: dict[str, list[Span]]
    model: GPT  # the same initial weights everywhere: seeded from cfg.seed just before it is built
    layout: ParamLayout
    feds: list[EngineRun]
    rounds: int  # engine rounds (see engine_rounds)
    per_round: int  # sequential steps of one engine round
    schedule: Schedule  # one LR clock over all sequential steps (paper A.3.3)
    client: ClientOptConfig
    compute: Compute  # device, autocast, micro-batches (train.device / precision / grad_accum)
    forward: nn.Module  # what trains and evaluates: the model, or torch.compile of it (train.compile)


def node_spans(cfg: C.Config, tree: Tree, data: Prepared) -> dict[str, list[Span]]:
    """Each tree node's training data: its paper A.2 shards, capped at data.max_train_tokens when set."""
    train_sizes = {src: data.splits[src]["train"].tokens for src in data.sources}
    spans = assign_shards(tree, train_sizes, cfg.data.leaf_shards, cfg.data.inner_shards)
    if cfg.data.max_train_tokens > 0:  # the data-scarce regime: each node keeps only its first tokens
        spans = {n: cap_spans(sp, cfg.data.max_train_tokens) for n, sp in spans.items()}
    return spans


def held_tokens(cfg: C.Config, spans: dict[str, list[Span]]) -> dict[str, int]:
    """Training tokens each trainer of `cfg.method` holds: every tree node its own, or, for centralized, its
    one trainer everyone's pooled (as `plan` builds it). How often a run went over its data is a trainer's
    training tokens divided by these."""
    held = {n: sum(s.size for s in sp) for n, sp in spans.items()}
    return {"centralized": sum(held.values())} if cfg.method == "centralized" else held


def set_up(cfg: C.Config, data: Prepared) -> RunSetup:
    tree = tree_from_config(cfg)
    spans = node_spans(cfg, tree, data)
    t = cfg.train
    compute = resolve_compute(t.device, t.precision, t.grad_accum, bool(C.dp_nodes(cfg)))
    torch.manual_seed(cfg.seed)
    model = GPT(gpt_config(cfg.model.preset, data.vocab_size, cfg.model.seq_len))
    model.to(compute.device)  # initialised on the CPU: the same weights whatever the device
    forward: nn.Module = cast(nn.Module, torch.compile(model)) if cfg.train.compile else model
    layout = ParamLayout(model, C.key_blocks(cfg) if cfg.method in ("worldlm", "fedper") else 0)
    feds = plan(cfg, tree, spans, layout)
    per_round = sequential_span(feds[0].tree, feds[0].tree.root, feds[0].opts)
    rounds = engine_rounds(cfg, tree)
    t = cfg.train
    total_seq = per_round * rounds
    schedule = Schedule(
        t.lr_max,
        t.lr_alpha,
        t.warmup_steps if t.warmup_steps >= 0 else max(1, total_seq // 10),
        t.total_steps if t.total_steps >= 0 else total_seq,
    )
    client = ClientOptConfig(t.weight_decay, t.beta1, t.beta2, t.grad_clip)
    return RunSetup(tree, spans, model, layout, feds, rounds, per_round, schedule, client, compute, forward)
