"""The run configuration: schema, loading, validation, what a config implies, compatibility with earlier runs.

Callers use the package (`from worldlm import config as C`; `C.load_config`, `C.Config`, `C.dp_nodes`, ...);
each name lives in one module of it.
"""

from worldlm.config.compat import ADDED_KEYS, same_config
from worldlm.config.load import apply_overrides, dumps, load_config, to_dict
from worldlm.config.resolve import (
    FINE_TUNED_METHODS,
    HIERARCHY_METHODS,
    SHARED_MODEL_METHODS,
    attacked,
    dp_nodes,
    dp_settings,
    eval_model,
    is_hierarchy,
    key_blocks,
    scores_fine_tuned,
)
from worldlm.config.schema import (
    ATTACKS,
    DP_UNITS,
    EVAL_MODELS,
    FL_ROUNDS,
    METHODS,
    PRECISIONS,
    SCHEDULES,
    SIMILARITY_ON,
    AttackConfig,
    CheckpointConfig,
    Config,
    DataConfig,
    DPConfig,
    EvalConfig,
    FederationConfig,
    LogConfig,
    ModelConfig,
    NodeConfig,
    SourceConfig,
    TrainConfig,
    TreeConfig,
)
from worldlm.config.validate import validate
from worldlm.errors import ConfigError
from worldlm.federation.server_opt import ServerOptConfig

__all__ = [
    "ADDED_KEYS",
    "ATTACKS",
    "DP_UNITS",
    "EVAL_MODELS",
    "FINE_TUNED_METHODS",
    "FL_ROUNDS",
    "HIERARCHY_METHODS",
    "METHODS",
    "PRECISIONS",
    "SCHEDULES",
    "SHARED_MODEL_METHODS",
    "SIMILARITY_ON",
    "AttackConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DPConfig",
    "DataConfig",
    "EvalConfig",
    "FederationConfig",
    "LogConfig",
    "ModelConfig",
    "NodeConfig",
    "ServerOptConfig",
    "SourceConfig",
    "TrainConfig",
    "TreeConfig",
    "apply_overrides",
    "attacked",
    "dp_nodes",
    "dp_settings",
    "dumps",
    "eval_model",
    "is_hierarchy",
    "key_blocks",
    "load_config",
    "same_config",
    "scores_fine_tuned",
    "to_dict",
    "validate",
]
