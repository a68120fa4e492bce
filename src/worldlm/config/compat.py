"""Compatibility with runs written before a key existed: resume and the experiment harness's skip check."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from worldlm.config.load import dumps
from worldlm.config.schema import Config

# Keys added after runs were committed, with the value that reproduces what those runs did: a saved
# config.toml without one of them meant that value, so complete earlier runs still count as complete.
ADDED_KEYS: dict[tuple[str, str], Any] = {
    ("data", "max_train_tokens"): 0,
    ("federation", "schedule"): "sequential",
    ("federation", "fl_round"): "global",  # FL clients trained depth x local_steps per round before 2026-12-03
    ("eval", "trace_round"): -1,
    # the paper's similarity; outlier detection only reports (runs are the same without it)
    ("federation", "similarity"): "weights",
    ("federation", "temperature"): 1.0,
    ("federation", "similarity_on"): "all",
    ("federation", "outlier_weight"): 0.5,
    ("federation", "outlier_rounds"): 2,
    ("federation", "skip_outlier_residuals"): False,
    ("attack", "nodes"): [],
    ("attack", "kind"): "random_tokens",
    ("attack", "scale"): -10.0,
    ("log", "tensorboard"): False,
    # runs before these keys were fp32 on the CPU, which "auto" resolves to there
    ("train", "device"): "auto",
    ("train", "precision"): "auto",
    ("train", "grad_accum"): 1,
    ("train", "compile"): False,
    # DP runs before record-level DP were node-level ([dp] is written only when set)
    ("dp", "unit"): "node",
    ("dp", "noise"): "local",
    ("dp", "max_grad_norm"): 1.0,
    ("dp", "target_epsilon"): 8.0,
    # DP runs before secret noise drew it from the run's seed
    ("dp", "reproducible_noise"): True,
}


def same_config(path: Path, cfg: Config) -> bool:
    """A run directory's config.toml is `cfg` resolved (resume and experiment skip checks); see ADDED_KEYS.

    Left out of the comparison: the [log] table (how a run is watched) and train.device (a run checkpointed
    on one device resumes on another)."""
    if not path.is_file():
        return False
    try:
        saved = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return False
    wanted = tomllib.loads(dumps(cfg))
    for (table, key), value in ADDED_KEYS.items():
        if table in wanted and isinstance(saved.setdefault(table, {}), dict):  # a table added later is absent
            saved[table].setdefault(key, value)
    for doc in (saved, wanted):
        doc.pop("log", None)
        if isinstance(doc.get("train"), dict):
            doc["train"].pop("device", None)
    return saved == wanted
