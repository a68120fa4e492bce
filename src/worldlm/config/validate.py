"""Range and consistency checks of a loaded configuration that types alone cannot express.

The tree's own shape (cycles, unknown parents, ...) is checked where it is built (`federation.tree`); the DP
settings the privacy code owns by `privacy.node.DPSettings` itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection

from worldlm.config.resolve import HIERARCHY_METHODS, dp_nodes, dp_settings
from worldlm.config.schema import (
    ATTACKS,
    DP_UNITS,
    EVAL_MODELS,
    FL_ROUNDS,
    METHODS,
    PRECISIONS,
    SCHEDULES,
    SIMILARITY_ON,
    Config,
)
from worldlm.data.sources import FORMATS as SOURCE_FORMATS
from worldlm.errors import ConfigError, quoted, suggest
from worldlm.federation.aggregation import SIMILARITIES
from worldlm.model import PRESETS


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _choice(value: str, valid: Collection[str], key: str) -> None:
    """`key` must name one of `valid` (the closest one suggested)."""
    _check(value in valid, f"{key} {quoted(value)} is unknown{suggest(value, valid)}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express (the tree is checked in tree.py)."""
    _choice(cfg.method, METHODS, "method")
    _check(
        bool(cfg.name) and "/" not in cfg.name,
        f"name must be a non-empty string without '/', got {quoted(cfg.name)}",
    )
    _validate_model(cfg)
    _validate_train(cfg)
    _validate_federation(cfg)
    _validate_eval(cfg)
    _check(cfg.checkpoint.every >= 1 and cfg.checkpoint.keep >= 1, "checkpoint.every and checkpoint.keep must be >= 1")
    _validate_data(cfg)
    _check(
        len(cfg.tree.nodes) >= 1,
        "tree.nodes is empty; describe at least one node ([[tree.nodes]] name = ...)",
    )
    _validate_dp(cfg)
    _validate_attack(cfg)


def _validate_model(cfg: Config) -> None:
    _choice(cfg.model.preset, PRESETS, "model.preset")
    _check(cfg.model.seq_len >= 8, f"model.seq_len must be >= 8, got {cfg.model.seq_len}")
    n_layer = PRESETS[cfg.model.preset].n_layer
    _check(
        -1 <= cfg.model.key_blocks < n_layer,
        f"model.key_blocks must be -1 (auto) or in [0, {n_layer - 1}] for preset {cfg.model.preset}, "
        f"got {cfg.model.key_blocks}",
    )


def _validate_train(cfg: Config) -> None:
    t = cfg.train
    for name in ("rounds", "local_steps", "batch_size"):
        _check(getattr(t, name) >= 1, f"train.{name} must be >= 1, got {getattr(t, name)}")
    _check(t.lr_max > 0, f"train.lr_max must be > 0, got {t.lr_max}")
    _check(0 < t.lr_alpha <= 1, f"train.lr_alpha must be in (0, 1], got {t.lr_alpha}")
    _check(
        t.warmup_steps >= -1 and t.total_steps >= -1,
        "train.warmup_steps/total_steps must be >= 0 or -1 (auto)",
    )
    _check(t.grad_clip >= 0 and t.weight_decay >= 0, "train.grad_clip and train.weight_decay must be >= 0")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2 must be in [0, 1)")
    _check(t.threads >= 0, f"train.threads must be >= 0, got {t.threads}")
    _check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device) is not None,
        f"train.device {quoted(t.device)} is unknown; use auto, cpu, cuda or cuda:N",
    )
    _choice(t.precision, PRECISIONS, "train.precision")
    _check(
        t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
        f"train.grad_accum = {t.grad_accum} must be >= 1 and divide train.batch_size = {t.batch_size}",
    )


def _validate_federation(cfg: Config) -> None:
    f = cfg.federation
    _check(f.nu >= 0, f"federation.nu must be >= 0, got {f.nu}")
    _check(f.sub_rounds >= 1, f"federation.sub_rounds must be >= 1, got {f.sub_rounds}")
    _choice(f.schedule, SCHEDULES, "federation.schedule")
    _choice(f.fl_round, FL_ROUNDS, "federation.fl_round")
    _check(
        f.schedule == "sequential" or f.sub_rounds == 1,
        "federation.schedule = 'parallel' runs every level in one window, so it needs federation.sub_rounds = 1",
    )
    _choice(f.similarity, SIMILARITIES, "federation.similarity")
    _check(
        math.isfinite(f.temperature) and f.temperature > 0,
        f"federation.temperature must be a number > 0, got {f.temperature}",
    )
    _choice(f.similarity_on, SIMILARITY_ON, "federation.similarity_on")
    _check(0 <= f.outlier_weight <= 1, f"federation.outlier_weight must be in [0, 1], got {f.outlier_weight}")
    _check(f.outlier_rounds >= 1, f"federation.outlier_rounds must be >= 1, got {f.outlier_rounds}")
    _check(
        f.offload_states in (False, True, "host"),
        f'federation.offload_states must be false, true (disk) or "host", got {f.offload_states!r}',
    )


def _validate_eval(cfg: Config) -> None:
    e = cfg.eval
    _choice(e.model, EVAL_MODELS, "eval.model")
    _check(
        -1 <= e.trace_round < cfg.train.rounds,
        f"eval.trace_round must be -1 (off) or a round index in [0, {cfg.train.rounds - 1}], got {e.trace_round}",
    )
    _check(e.batches >= 1 and e.batch_size >= 1, "eval.batches and eval.batch_size must be >= 1")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _check(d.leaf_shards >= 1 and d.inner_shards >= 1, "data.leaf_shards and data.inner_shards must be >= 1")
    _check(d.max_train_tokens >= 0, f"data.max_train_tokens must be >= 0 (0: no cap), got {d.max_train_tokens}")
    _check(256 < d.vocab_size <= 65535 * 4, f"data.vocab_size must be in (256, 262140], got {d.vocab_size}")
    _check(
        d.recipe in ("", "languages", "domains"),
        f"data.recipe {quoted(d.recipe)} is unknown (valid: languages, domains)",
    )
    for src_name, src in d.sources.items():
        _check(
            src.format in SOURCE_FORMATS,
            f"data.sources.{src_name}.format must be one of {', '.join(SOURCE_FORMATS)}",
        )
        _check(bool(src.path), f"data.sources.{src_name}.path is empty; give the file or folder holding its text")


def _validate_dp(cfg: Config) -> None:
    """[dp] ranges and the DP node names (node-level DP: paper §4.2; record-level: DP-SGD)."""
    dp = cfg.dp
    try:  # the node-level mechanism's settings, checked by the privacy code that owns them
        dp_settings(cfg)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    names = [n.name for n in cfg.tree.nodes]
    for name in dp.nodes:
        _check(name in names, f"dp.nodes names {quoted(name)}, which is not a tree node{suggest(name, names)}")
    _choice(dp.unit, DP_UNITS, "dp.unit")
    if dp.noise == "central" and cfg.method in HIERARCHY_METHODS:
        inner = sorted(
            n.name for n in cfg.tree.nodes if n.name in dp_nodes(cfg) and n.name in {m.parent for m in cfg.tree.nodes}
        )
        _check(
            not inner,
            f"dp.noise = 'central' needs DP nodes that are leaves, but {', '.join(inner)} send residuals up; "
            "use dp.noise = 'local' for inner DP nodes",
        )
    _check(dp.max_grad_norm > 0, f"dp.max_grad_norm must be > 0, got {dp.max_grad_norm}")
    _check(dp.target_epsilon > 0, f"dp.target_epsilon must be > 0, got {dp.target_epsilon}")
    root = next((n.name for n in cfg.tree.nodes if not n.parent), None)
    if cfg.method in HIERARCHY_METHODS and root is not None and dp.unit == "node":
        _check(
            root not in dp_nodes(cfg),
            f"tree node {quoted(root)} is the root: it sends nothing to a parent, so DP has nothing to privatise "
            "there; flag leaves or regions instead (dp = true / dp.nodes)",
        )


def _validate_attack(cfg: Config) -> None:
    a = cfg.attack
    _choice(a.kind, ATTACKS, "attack.kind")
    _check(math.isfinite(a.scale), f"attack.scale must be a finite number, got {a.scale}")
    names = [n.name for n in cfg.tree.nodes]
    for name in a.nodes:
        _check(name in names, f"attack.nodes names {quoted(name)}, which is not a tree node{suggest(name, names)}")
    _check(
        not a.nodes or cfg.method != "centralized",
        "attack.nodes has no meaning for method 'centralized' (one node on pooled text); attack another method",
    )
