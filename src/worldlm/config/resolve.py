"""What a configuration implies, resolved once for every runner: the method's family, DP nodes and settings,
attacked nodes, the model each node is judged on, |K|."""

from __future__ import annotations

from worldlm.config.schema import Config
from worldlm.model import PRESETS
from worldlm.privacy.node import DPSettings

HIERARCHY_METHODS = ("worldlm", "hierfavg", "fedper")  # train on the tree itself (the others re-plan it)
SHARED_MODEL_METHODS = ("fl", "hierfavg", "centralized")  # deliver one model to every node (the protocol's metric)
FINE_TUNED_METHODS = ("fl", "hierfavg")  # also scored after each client's last local steps ("+ local fine-tuning")


def attacked(cfg: Config, node: str, kind: str) -> bool:
    """Whether engine node `node` runs the attack `kind` (see AttackConfig)."""
    return cfg.attack.kind == kind and node in cfg.attack.nodes


def dp_nodes(cfg: Config) -> set[str]:
    """Nodes with differential privacy: `dp = true` on the node or its name in dp.nodes."""
    return {n.name for n in cfg.tree.nodes if n.dp} | set(cfg.dp.nodes)


def dp_settings(cfg: Config) -> DPSettings:
    """The node-level DP mechanism's settings (privacy.node; ValueError naming the dp key when out of range)."""
    d = cfg.dp
    return DPSettings(
        sigma=d.sigma,
        delta=d.delta,
        clip=d.clip,
        initial_clip=d.initial_clip,
        epsilon_budget=d.epsilon_budget,
        target_quantile=d.target_quantile,
        clip_lr=d.clip_lr,
        bit_sigma=d.bit_sigma,
        noise=d.noise,
    )


def is_hierarchy(cfg: Config) -> bool:
    """The method trains on the configured tree itself (the others re-plan it: flat, pooled, alone)."""
    return cfg.method in HIERARCHY_METHODS


def eval_model(cfg: Config) -> str:
    """The resolved eval.model, "local" or "deployed": what `deliverable` means for this method.

    A method that builds one shared model delivers it (FL's and HierFAVG's global model, the one
    centralized model: "deployed" is exactly that model on every node); personalised methods
    deliver each node's own model at the end of its training ("local").
    """
    if cfg.eval.model != "deliverable":
        return cfg.eval.model
    return "deployed" if cfg.method in SHARED_MODEL_METHODS else "local"


def scores_fine_tuned(cfg: Config) -> bool:
    """Whether a run also reports "+ local fine-tuning" (each client after its last local steps: ppl_ft)."""
    return cfg.eval.model == "deliverable" and cfg.method in FINE_TUNED_METHODS


def key_blocks(cfg: Config) -> int:
    """Resolved |K|: explicit, or round(0.3 * n_layer) (paper §3.2: ~30% of blocks)."""
    if cfg.model.key_blocks >= 0:
        return cfg.model.key_blocks
    return round(0.3 * PRESETS[cfg.model.preset].n_layer)
