"""Typed run configuration: TOML in, validated dataclasses out, `--set a.b=c` overrides.

Every problem is reported as one `ConfigError` line naming the key and the fix (the CLI maps it to
exit code 2). The resolved configuration is written back as TOML into the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from worldlm.data.prepared import DEFAULT_VOCAB
from worldlm.errors import ConfigError, quoted
from worldlm.federation.aggregation import SIMILARITIES

METHODS = ("worldlm", "fl", "hierfavg", "fedper", "centralized", "local")
HIERARCHY_METHODS = ("worldlm", "hierfavg", "fedper")  # train on the tree itself (the others re-plan it)
SHARED_MODEL_METHODS = ("fl", "hierfavg", "centralized")  # deliver one model to every node (DESIGN §2 metric)
FINE_TUNED_METHODS = ("fl", "hierfavg")  # also scored after each client's last local steps ("+ local fine-tuning")
EVAL_MODELS = ("deliverable", "local", "deployed")
SCHEDULES = ("sequential", "parallel")
FL_ROUNDS = ("stage", "global")
SERVER_OPTS = ("fedavg", "fedavgm", "nesterov", "fedadam")
SIMILARITY_ON = ("all", "matrices")
ATTACKS = ("random_tokens", "scaled_update")
SOURCE_FORMATS = ("text", "lines", "jsonl", "parquet", "hf")
PRECISIONS = ("auto", "fp32", "bf16")
DP_UNITS = ("node", "record")


@dataclass
class SourceConfig:
    """A user's own text source, prepared by `worldlm prepare CONFIG`."""

    path: str = ""
    format: str = "text"  # text | lines | jsonl | parquet | hf (see data/sources.py)
    field: str = "text"  # JSONL field / Parquet column holding the text


@dataclass
class DataConfig:
    path: str = "data/languages"  # a prepared directory (manifest.json, tokenizer.json, tokens/)
    recipe: str = ""  # languages | domains: `worldlm prepare CONFIG` builds it at `path`
    vocab_size: int = DEFAULT_VOCAB  # BPE vocabulary trained by `worldlm prepare`
    leaf_shards: int = 3  # paper A.2: a leaf gets 3 equal shards of each of its sources
    inner_shards: int = 2  # ... every other level 2
    # > 0: each node keeps at most this many of its training tokens (the first ones of each shard, in its
    # mixture's proportions): the data-scarce regime of an organisation with little text. 0: no cap.
    max_train_tokens: int = 0
    sources: dict[str, SourceConfig] = field(default_factory=dict)


@dataclass
class ModelConfig:
    preset: str = "nano"
    seq_len: int = 128
    key_blocks: int = -1  # -1: round(0.3 * n_layer) (paper: ~30% of blocks)


@dataclass
class TrainConfig:
    rounds: int = 4
    local_steps: int = 10  # steps per node per visit (every level); FL clients train this per FL round (A.1.2)
    batch_size: int = 8
    lr_max: float = 3e-3  # eta_max of the shared schedule
    lr_alpha: float = 0.01  # schedule starts and ends at alpha * eta_max (paper Table 5: 1e-2)
    warmup_steps: int = -1  # -1: 10% of the sequential steps
    total_steps: int = -1  # T of the cosine; -1: the run's sequential steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    threads: int = 0  # torch intra-op threads; 0: all cores
    # Where and how to compute (issue 18). device: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N.
    # precision: auto (bf16 autocast on CUDA devices that support it, fp32 elsewhere) | fp32 | bf16 (autocast:
    # weights, gradients and optimizer state stay fp32). grad_accum: micro-batches of batch_size / grad_accum
    # sequences per step. compile: torch.compile the model (bitwise equality across runners and resumes is
    # then not promised).
    device: str = "auto"
    precision: str = "auto"
    grad_accum: int = 1
    compile: bool = False


@dataclass
class ServerOptSettings:
    # Chosen on validation at the paper's budget (results/paper-regime-sweep): plain FedAvg beat the paper's
    # FedAvgM (mu_s = 0.9, Table 5) for WorldLM, whose momentum compounds over the levels of the tree.
    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3


@dataclass
class FederationConfig:
    nu: int = 1  # residuals per key position per inner node (paper: nu_K)
    attention: bool = True  # False: uniform averaging of key layers (ablation)
    # A.3.7 routes a residual to the most similar child, wherever it came from; false forbids the child
    # subtree it came from (an option; with two regions it sends every residual to the other one)
    route_to_origin: bool = True
    sub_rounds: int = 1  # T_q: sub-rounds of a node per parent visit
    # Paper §3.1: "sequential" = an inner node trains, then its children (a round is depth x local_steps
    # sequential steps); "parallel" = an inner node trains as a client beside its children, from the same
    # model in the same window, its update averaged with theirs (a round is local_steps sequential steps).
    schedule: str = "sequential"
    # FL's round (A.1.2): "stage" = every client trains local_steps per round and FL runs depth x rounds
    # (equal sequential steps); "global" = one FL round per hierarchy round, depth x local_steps per client.
    fl_round: str = "stage"
    # How key layers are compared, in the attention (A.3.3 steps 2c, 4.iv C), residual picking (E) and
    # routing (A.3.7): s = cos(P(a - r_a), P(b - r_b)), weights softmax(s / temperature). "weights": r = 0,
    # the paper's cosine of the flattened blocks; "centered": r = the mean of the members compared;
    # "updates": r = the model the member last received (its change). similarity_on: "all" elements of a
    # block, or its weight "matrices" only (LayerNorm gains and biases left out).
    similarity: str = "weights"
    temperature: float = 1.0
    similarity_on: str = "all"
    # Outliers (the detection signal of the paper's limitations): a child whose share of its parent's attention
    # over the children (the parent's own weights, its self-weight left out, renormalised) is under
    # outlier_weight x 1/C (C children) for outlier_rounds aggregations in a row gets an `outlier` event;
    # skip_outlier_residuals: a child under that share is not picked as a residual there, so its keys are not
    # carried to other federations.
    outlier_weight: float = 0.5
    outlier_rounds: int = 2
    skip_outlier_residuals: bool = False
    server_opt: ServerOptSettings = field(default_factory=ServerOptSettings)
    # Keep node states (parameters, AdamW and server-optimizer state) in files under the run directory
    # between their uses, so memory does not grow with the number of nodes; results are bitwise the same.
    # "host" (issue 18): in host memory between uses when the model is on an accelerator (the same as false on
    # the CPU); results are bitwise the same in every case.
    offload_states: bool | str = False


@dataclass
class EvalConfig:
    batches: int = 8  # evaluation batches per node and split
    batch_size: int = 16
    every_round: bool = True  # validation perplexity after every round (test only at the end)
    # Which model a node is judged on (DESIGN §2 metric): "deliverable" = what the method delivers
    # (fl, hierfavg, centralized: their one shared model; worldlm, fedper, local: each node's own model
    # at the end of its training), with fl and hierfavg also scored after each client's last local steps
    # ("+ local fine-tuning", ppl_ft); "deployed" = what a node holds after the next downward pass
    # (parent backbone, keys aggregated with the parent's; FL: the global model); "local" = its own
    # state at the end of the round (leaves: after local training; inner nodes: after aggregation).
    model: str = "deliverable"
    # >= 0: in this global round (the hierarchy's round index; for engines with depth rounds per global
    # round, the rounds covering the same sequential steps), evaluate the model that travels: at the start,
    # after every local training and every aggregation (issue 14 item 5: where a round loses progress).
    trace_round: int = -1


@dataclass
class CheckpointConfig:
    every: int = 1  # rounds between checkpoints of the whole federation
    keep: int = 2  # newest checkpoints kept


@dataclass
class DPConfig:
    """Differential privacy of the nodes flagged `dp = true` (DESIGN §2, paper §4.2; federation/privacy.py)."""

    nodes: list[str] = field(default_factory=list)  # DP nodes by name, besides `dp = true` (a --set-able form)
    sigma: float = 0.5  # noise multiplier: N(0, sigma² C²) per coordinate (paper: 0.5)
    delta: float = 1e-5  # epsilon is reported at this delta
    clip: str = "median"  # median (paper: previous round's median norm) | adaptive (Andrew et al. 2021) | fixed
    initial_clip: float = 1.0  # C in the first round (paper: 1.0), and throughout with clip = "fixed"
    epsilon_budget: float = 0.0  # > 0: a node stops releasing before its epsilon would exceed this; 0: none
    target_quantile: float = 0.5  # adaptive: fraction of updates meant to fall under C (gamma)
    clip_lr: float = 0.2  # adaptive: eta_C of the geometric update C <- C exp(-eta_C (b - gamma))
    bit_sigma: float = 0.5  # adaptive: noise std on each node's clipped-or-not bit (accounted too)
    # What is protected (issue 16): "node" = everything a node sends (DPFedAvg above: sigma, clip, ...);
    # "record" = each training window of a DP node (DP-SGD there: per-example clipping to max_grad_norm,
    # Poisson sampling, the noise multiplier calibrated so epsilon reaches target_epsilon at delta after the
    # node's planned steps; record_dp.py).
    unit: str = "node"
    # unit "node": "local" = each DP node adds the noise itself (trusts nobody); "central" = it sends its clipped
    # update and its parent adds the noise once to the sum of its DP children's (trusts its parent).
    noise: str = "local"
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0


@dataclass
class AttackConfig:
    """Poisoned nodes, to test what the federation does with a member it should not trust (issue 15).

    "random_tokens": the nodes train on uniformly random tokens instead of their text; "scaled_update": each
    local training's change is multiplied by `scale` before the node uses and sends it (-10: a sign-flipped,
    amplified update). Their own perplexity is still measured on their true held-out text.
    """

    nodes: list[str] = field(default_factory=list)
    kind: str = "random_tokens"
    scale: float = -10.0


@dataclass
class LogConfig:
    # Also write metrics.jsonl as TensorBoard event files under runs/<name>/tensorboard/ (needs the
    # tensorboard package: pip install 'worldlm[tensorboard]'); --tensorboard on train/compare/experiment.
    tensorboard: bool = False


@dataclass
class NodeConfig:
    name: str = ""
    parent: str = ""  # empty: the root
    sources: list[str] = field(default_factory=list)  # empty on an inner node: its subtree's sources
    dp: bool = False  # differential privacy: privatise what this node sends its parent (see [dp])
    server_opt: ServerOptSettings | None = None  # overrides federation.server_opt at this node


@dataclass
class TreeConfig:
    nodes: list[NodeConfig] = field(default_factory=list)


@dataclass
class Config:
    name: str = "run"
    method: str = "worldlm"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dp: DPConfig = field(default_factory=DPConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    log: LogConfig = field(default_factory=LogConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)


# ---------------------------------------------------------------------------- loading


def _suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean {quoted(close[0])}?)" if close else f" (valid: {', '.join(sorted(valid))})"


def _convert(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one TOML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for arg in args[:-1]:  # the first type the value fits; the last one's error otherwise
            try:
                return _convert(value, arg, where)
            except ConfigError:
                continue
        return _convert(value, args[-1], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): _convert(v, item, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")  # a bug in this file, not user input


def _build(cls: Any, raw: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{where}.{key}" if where else key
        if key not in names:
            raise ConfigError(f"unknown config key {quoted(path)}{_suggest(key, names)}")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. train.rounds=8), got {quoted(item)}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {quoted(item)}")
    try:  # a TOML literal (number, bool, list, quoted string) ...
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:  # ... or a bare string
        value = text
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = _parse_override(item)
        node = raw
        for k in keys[:-1]:
            nxt = node.setdefault(k, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {item}: {quoted(k)} is not a table")
            node = nxt
        node[keys[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read TOML (or start from defaults when path is None), apply overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass a TOML file such as configs/demo.toml")
        try:
            raw = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{p} is not valid TOML: {exc}") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config {p}: {exc}") from exc
    cfg: Config = _build(Config, apply_overrides(raw, overrides), "")
    validate(cfg)
    return cfg


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _validate_server_opt(s: ServerOptSettings, where: str) -> None:
    _check(s.kind in SERVER_OPTS, f"{where}.kind {quoted(s.kind)} is unknown{_suggest(s.kind, SERVER_OPTS)}")
    _check(s.lr > 0, f"{where}.lr must be > 0, got {s.lr}")
    _check(0 <= s.momentum < 1, f"{where}.momentum must be in [0, 1), got {s.momentum}")
    _check(0 <= s.beta1 < 1 and 0 <= s.beta2 < 1, f"{where}.beta1/beta2 must be in [0, 1)")
    _check(s.tau > 0, f"{where}.tau must be > 0, got {s.tau}")


def validate(cfg: Config) -> None:
    """Range and consistency checks that types alone cannot express (the tree is checked in tree.py)."""
    from worldlm.model import PRESETS  # model imports nothing from config at module level

    _check(cfg.method in METHODS, f"method {quoted(cfg.method)} is unknown{_suggest(cfg.method, METHODS)}")
    _check(
        bool(cfg.name) and "/" not in cfg.name,
        f"name must be a non-empty string without '/', got {quoted(cfg.name)}",
    )
    _check(
        cfg.model.preset in PRESETS,
        f"model.preset {quoted(cfg.model.preset)} is unknown{_suggest(cfg.model.preset, PRESETS)}",
    )
    _check(cfg.model.seq_len >= 8, f"model.seq_len must be >= 8, got {cfg.model.seq_len}")
    n_layer = PRESETS[cfg.model.preset].n_layer
    _check(
        -1 <= cfg.model.key_blocks < n_layer,
        f"model.key_blocks must be -1 (auto) or in [0, {n_layer - 1}] for preset {cfg.model.preset}, "
        f"got {cfg.model.key_blocks}",
    )
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
    _check(
        t.precision in PRECISIONS,
        f"train.precision {quoted(t.precision)} is unknown{_suggest(t.precision, PRECISIONS)}",
    )
    _check(
        t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0,
        f"train.grad_accum = {t.grad_accum} must be >= 1 and divide train.batch_size = {t.batch_size}",
    )
    f = cfg.federation
    _check(f.nu >= 0, f"federation.nu must be >= 0, got {f.nu}")
    _check(f.sub_rounds >= 1, f"federation.sub_rounds must be >= 1, got {f.sub_rounds}")
    _check(
        f.schedule in SCHEDULES, f"federation.schedule {quoted(f.schedule)} is unknown{_suggest(f.schedule, SCHEDULES)}"
    )
    _check(
        f.fl_round in FL_ROUNDS, f"federation.fl_round {quoted(f.fl_round)} is unknown{_suggest(f.fl_round, FL_ROUNDS)}"
    )
    _check(
        f.schedule == "sequential" or f.sub_rounds == 1,
        "federation.schedule = 'parallel' runs every level in one window, so it needs federation.sub_rounds = 1",
    )
    _check(
        f.similarity in SIMILARITIES,
        f"federation.similarity {quoted(f.similarity)} is unknown{_suggest(f.similarity, SIMILARITIES)}",
    )
    _check(
        math.isfinite(f.temperature) and f.temperature > 0,
        f"federation.temperature must be a number > 0, got {f.temperature}",
    )
    _check(
        f.similarity_on in SIMILARITY_ON,
        f"federation.similarity_on {quoted(f.similarity_on)} is unknown{_suggest(f.similarity_on, SIMILARITY_ON)}",
    )
    _check(0 <= f.outlier_weight <= 1, f"federation.outlier_weight must be in [0, 1], got {f.outlier_weight}")
    _check(f.outlier_rounds >= 1, f"federation.outlier_rounds must be >= 1, got {f.outlier_rounds}")
    _check(
        f.offload_states in (False, True, "host"),
        f'federation.offload_states must be false, true (disk) or "host", got {f.offload_states!r}',
    )
    _validate_server_opt(f.server_opt, "federation.server_opt")
    for node in cfg.tree.nodes:
        if node.server_opt is not None:
            _validate_server_opt(node.server_opt, f"tree.nodes {quoted(node.name)}.server_opt")
    _check(
        cfg.eval.model in EVAL_MODELS,
        f"eval.model {quoted(cfg.eval.model)} is unknown{_suggest(cfg.eval.model, EVAL_MODELS)}",
    )
    _check(
        -1 <= cfg.eval.trace_round < t.rounds,
        f"eval.trace_round must be -1 (off) or a round index in [0, {t.rounds - 1}], got {cfg.eval.trace_round}",
    )
    _check(cfg.eval.batches >= 1 and cfg.eval.batch_size >= 1, "eval.batches and eval.batch_size must be >= 1")
    _check(cfg.checkpoint.every >= 1 and cfg.checkpoint.keep >= 1, "checkpoint.every and checkpoint.keep must be >= 1")
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
    _check(
        len(cfg.tree.nodes) >= 1,
        "tree.nodes is empty; describe at least one node ([[tree.nodes]] name = ...)",
    )
    _validate_dp(cfg)
    _validate_attack(cfg)


CLIP_RULES = ("median", "adaptive", "fixed")  # = federation.privacy.CLIP_RULES


def _validate_dp(cfg: Config) -> None:
    """[dp] ranges and the DP node names (DESIGN §2 "Differential privacy")."""
    dp = cfg.dp
    _check(dp.sigma > 0, f"dp.sigma must be > 0 (the noise multiplier), got {dp.sigma}")
    _check(0 < dp.delta < 1, f"dp.delta must be in (0, 1), got {dp.delta}")
    _check(dp.clip in CLIP_RULES, f"dp.clip {quoted(dp.clip)} is unknown{_suggest(dp.clip, CLIP_RULES)}")
    _check(dp.initial_clip > 0, f"dp.initial_clip must be > 0, got {dp.initial_clip}")
    _check(dp.epsilon_budget >= 0, f"dp.epsilon_budget must be >= 0 (0: no budget), got {dp.epsilon_budget}")
    _check(0 < dp.target_quantile < 1, f"dp.target_quantile must be in (0, 1), got {dp.target_quantile}")
    _check(dp.clip_lr > 0 and dp.bit_sigma > 0, "dp.clip_lr and dp.bit_sigma must be > 0")
    names = [n.name for n in cfg.tree.nodes]
    for name in dp.nodes:
        _check(name in names, f"dp.nodes names {quoted(name)}, which is not a tree node{_suggest(name, names)}")
    _check(dp.unit in DP_UNITS, f"dp.unit {quoted(dp.unit)} is unknown{_suggest(dp.unit, DP_UNITS)}")
    _check(dp.noise in ("local", "central"), f"dp.noise must be local or central, got {quoted(dp.noise)}")
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
    _check(a.kind in ATTACKS, f"attack.kind {quoted(a.kind)} is unknown{_suggest(a.kind, ATTACKS)}")
    _check(math.isfinite(a.scale), f"attack.scale must be a finite number, got {a.scale}")
    names = [n.name for n in cfg.tree.nodes]
    for name in a.nodes:
        _check(name in names, f"attack.nodes names {quoted(name)}, which is not a tree node{_suggest(name, names)}")
    _check(
        not a.nodes or cfg.method != "centralized",
        "attack.nodes has no meaning for method 'centralized' (one node on pooled text); attack another method",
    )


def attacked(cfg: Config, node: str, kind: str) -> bool:
    """Whether engine node `node` runs the attack `kind` (see AttackConfig)."""
    return cfg.attack.kind == kind and node in cfg.attack.nodes


def dp_nodes(cfg: Config) -> set[str]:
    """Nodes with differential privacy: `dp = true` on the node or its name in dp.nodes."""
    return {n.name for n in cfg.tree.nodes if n.dp} | set(cfg.dp.nodes)


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
    from worldlm.model import PRESETS

    if cfg.model.key_blocks >= 0:
        return cfg.model.key_blocks
    return round(0.3 * PRESETS[cfg.model.preset].n_layer)


def to_dict(cfg: Config) -> dict[str, Any]:
    def strip_none(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip_none(v) for k, v in obj.items() if v is not None}
        if isinstance(obj, list):
            return [strip_none(v) for v in obj]
        return obj

    out = typing.cast(dict[str, Any], strip_none(dataclasses.asdict(cfg)))
    if cfg.dp == DPConfig():  # [dp] is written only when set, so configs of runs without DP stay as before
        del out["dp"]
    if not cfg.federation.offload_states:  # likewise, so complete earlier runs still match (experiments)
        del out["federation"]["offload_states"]
    return out


def dumps(cfg: Config) -> str:
    return tomli_w.dumps(to_dict(cfg))


# Keys added after runs were committed, with the value that reproduces what those runs did: a saved
# config.toml without one of them meant that value, so complete earlier runs still count as complete.
ADDED_KEYS: dict[tuple[str, str], Any] = {
    ("data", "max_train_tokens"): 0,
    ("federation", "schedule"): "sequential",
    ("federation", "fl_round"): "global",  # FL clients trained depth x local_steps per round before issue 14
    ("eval", "trace_round"): -1,
    # issue 15: the paper's similarity; outlier detection only reports (runs are the same without it)
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
    # issue 18: runs before it were fp32 on the CPU, which "auto" resolves to there
    ("train", "device"): "auto",
    ("train", "precision"): "auto",
    ("train", "grad_accum"): 1,
    ("train", "compile"): False,
    # issue 16: DP runs before it were node-level ([dp] is written only when set)
    ("dp", "unit"): "node",
    ("dp", "noise"): "local",
    ("dp", "max_grad_norm"): 1.0,
    ("dp", "target_epsilon"): 8.0,
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
    for table in (saved, wanted):
        table.pop("log", None)
        if isinstance(table.get("train"), dict):
            table["train"].pop("device", None)
    return saved == wanted
