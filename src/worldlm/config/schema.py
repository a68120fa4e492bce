"""The run configuration's schema: one typed dataclass per TOML table, every key with its default.

Loading (TOML, `--set`), validation and compatibility with earlier runs live beside it (`load`, `validate`,
`compat`); the facts a config implies (DP nodes, the resolved eval model, |K|, ...) in `resolve`. Settings
the federation or privacy code owns use that code's own types and registries: `federation.server_opt` is
`federation.server_opt.ServerOptConfig` (one default), the similarity and server-optimizer names are their
registries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from worldlm.data.prepared import DEFAULT_VOCAB
from worldlm.federation.server_opt import ServerOptConfig

METHODS = ("worldlm", "fl", "hierfavg", "fedper", "centralized", "local")
EVAL_MODELS = ("deliverable", "local", "deployed")
SCHEDULES = ("sequential", "parallel")
FL_ROUNDS = ("stage", "global")
SIMILARITY_ON = ("all", "matrices")
ATTACKS = ("random_tokens", "scaled_update")
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
    # Where and how to compute. device: auto (CUDA when present, else CPU) | cpu | cuda | cuda:N.
    # precision: auto (bf16 autocast on CUDA devices that support it, fp32 elsewhere) | fp32 | bf16 (autocast:
    # weights, gradients and optimizer state stay fp32). grad_accum: micro-batches of batch_size / grad_accum
    # sequences per step. compile: torch.compile the model (bitwise equality across runners and resumes is
    # then not promised).
    device: str = "auto"
    precision: str = "auto"
    grad_accum: int = 1
    compile: bool = False



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
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    # Keep node states (parameters, AdamW and server-optimizer state) in files under the run directory
    # between their uses, so memory does not grow with the number of nodes; results are bitwise the same.
    # "host": in host memory between uses when the model is on an accelerator (the same as false on
    # the CPU); results are bitwise the same in every case.
    offload_states: bool | str = False


@dataclass
class EvalConfig:
    batches: int = 8  # evaluation batches per node and split
    batch_size: int = 16
    every_round: bool = True  # validation perplexity after every round (test only at the end)
    # Which model a node is judged on (docs/design.md, "The metric"): "deliverable" = what the method delivers
    # (fl, hierfavg, centralized: their one shared model; worldlm, fedper, local: each node's own model
    # at the end of its training), with fl and hierfavg also scored after each client's last local steps
    # ("+ local fine-tuning", ppl_ft); "deployed" = what a node holds after the next downward pass
    # (parent backbone, keys aggregated with the parent's; FL: the global model); "local" = its own
    # state at the end of the round (leaves: after local training; inner nodes: after aggregation).
    model: str = "deliverable"
    # >= 0: in this global round (the hierarchy's round index; for engines with depth rounds per global
    # round, the rounds covering the same sequential steps), evaluate the model that travels: at the start,
    # after every local training and every aggregation (where a round loses progress).
    trace_round: int = -1


@dataclass
class CheckpointConfig:
    every: int = 1  # rounds between checkpoints of the whole federation
    keep: int = 2  # newest checkpoints kept


@dataclass
class DPConfig:
    """Differential privacy of the nodes flagged `dp = true` (paper §4.2; privacy/node.py, privacy/record.py)."""

    nodes: list[str] = field(default_factory=list)  # DP nodes by name, besides `dp = true` (a --set-able form)
    sigma: float = 0.5  # noise multiplier: N(0, sigma² C²) per coordinate (paper: 0.5)
    delta: float = 1e-5  # epsilon is reported at this delta
    clip: str = "median"  # median (paper: previous round's median norm) | adaptive (Andrew et al. 2021) | fixed
    initial_clip: float = 1.0  # C in the first round (paper: 1.0), and throughout with clip = "fixed"
    epsilon_budget: float = 0.0  # > 0: a node stops releasing before its epsilon would exceed this; 0: none
    target_quantile: float = 0.5  # adaptive: fraction of updates meant to fall under C (gamma)
    clip_lr: float = 0.2  # adaptive: eta_C of the geometric update C <- C exp(-eta_C (b - gamma))
    bit_sigma: float = 0.5  # adaptive: noise std on each node's clipped-or-not bit (accounted too)
    # What is protected: "node" = everything a node sends (DPFedAvg above: sigma, clip, ...);
    # "record" = each training window of a DP node (DP-SGD there: per-example clipping to max_grad_norm,
    # Poisson sampling, the noise multiplier calibrated so epsilon reaches target_epsilon at delta after the
    # node's planned steps; record_dp.py).
    unit: str = "node"
    # unit "node": "local" = each DP node adds the noise itself (trusts nobody); "central" = it sends its clipped
    # update and its parent adds the noise once to the sum of its DP children's (trusts its parent).
    noise: str = "local"
    max_grad_norm: float = 1.0
    target_epsilon: float = 8.0
    # false (the default): every DP noise generator and every DP node's record sampler is seeded from the
    # operating system's secure randomness at that node and kept in its private state and checkpoints, so
    # nobody else can regenerate the noise from the run config. true: seeded from the run's public seed, for
    # experiments and tests that compare runs bit for bit; such noise protects nothing against whoever holds
    # the config (summary.json says so, deploy-local and flower-app warn).
    reproducible_noise: bool = False


@dataclass
class AttackConfig:
    """Poisoned nodes, to test what the federation does with a member it should not trust.

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
    server_opt: ServerOptConfig | None = None  # overrides federation.server_opt at this node


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
