"""The federation's vocabulary: what a node holds, what travels between nodes, the options of a round.

Small dataclasses over flat parameter vectors and the two protocols a runner implements (local training,
differential privacy). Every other module of the federation, the model's split and both runners use these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from worldlm.federation.aggregation import WEIGHTS, Similarity
from worldlm.federation.server_opt import ServerOpt

Event = dict[str, object]
Emit = Callable[[Event], None]
BYTES_PER_VALUE = 4  # float32 on the wire
# observe(what, node, sequential step, params): see run_round
Observe = Callable[[str, str, int, Tensor], None]


@dataclass(frozen=True)
class Split:
    """Where the backbone and the key layers sit in a flat state vector (see model.ParamLayout)."""

    backbone_size: int
    key_blocks: int  # L
    key_size: int  # D

    def backbone(self, flat: Tensor) -> Tensor:
        return flat[: self.backbone_size]

    def keys(self, flat: Tensor) -> Tensor:
        return flat[self.backbone_size :].view(self.key_blocks, self.key_size)  # [L, D]

    def join(self, backbone: Tensor, keys: Tensor) -> Tensor:
        return torch.cat([backbone.reshape(-1), keys.reshape(-1)])


@dataclass(frozen=True)
class Residual:
    """A child's key layer at one position, picked as dissimilar (A.3.3 step 4.iv E)."""

    vector: Tensor  # [D]
    position: int  # l
    origin: str  # the node whose key layer it was


@dataclass
class NodeState:
    """What a node keeps between rounds on the federation side (training state lives in the runner)."""

    params: Tensor  # flat: backbone then key layers
    server_opt: ServerOpt | None = None  # inner nodes only (per-level momentum)
    to_aggregate: list[Residual] = field(default_factory=list)  # D_a (leaves)
    to_route: list[Residual] = field(default_factory=list)  # D_r (inner nodes; the root's for next round)
    # similarity "updates": the key layers [L, D] the node's latest visit started from (what it received)
    reference: Tensor | None = None
    # inner nodes: consecutive aggregations in which each child's weight here was under the outlier threshold
    low_rounds: dict[str, int] = field(default_factory=dict)
    # inner nodes: each child's key layers [L, D] as last received (its DP release for a DP child): what
    # routing reads (A.3.7); a parent never looks at a child's own state
    child_keys: dict[str, Tensor] = field(default_factory=dict)
    # inner nodes with FedOptions.keep_trained: the model after the node's latest local training, which its
    # aggregation then replaces in `params` ("+ local fine-tuning" scores each node's model after its last steps)
    trained: Tensor | None = None


@dataclass(frozen=True)
class FedOptions:
    local_steps: Mapping[str, int]  # steps each node trains per visit (0: an aggregation-only server)
    share_keys: bool = True  # False: FedPer (key layers stay local)
    attention: bool = True  # False: uniform averaging of key layers (ablation)
    nu: int = 1  # residuals per key position per inner node
    route_to_origin: bool = True  # A.3.7; False: never route a residual back into the subtree it came from
    sub_rounds: int = 1  # T_q
    parallel: bool = False  # §3.1 parallel mode: an inner node trains as a client beside its children
    similarity: Similarity = WEIGHTS  # how key layers are compared (attention, residual picking, routing)
    # A child whose share of its parent's attention over the children (`child_shares`) falls under
    # outlier_weight / C (C children; 0: off) for outlier_rounds aggregations in a row is an `outlier`; with
    # skip_outlier_residuals a child under it is not picked as a residual there (its keys are not carried
    # to other federations).
    outlier_weight: float = 0.5
    outlier_rounds: int = 2
    skip_outlier_residuals: bool = False
    keep_trained: bool = False  # inner nodes keep their trained model (NodeState.trained) beside the aggregate


@dataclass(frozen=True)
class Update:
    """What a child sends its parent after its subtree finished (A.3.3 step 4.iv inputs)."""

    params: Tensor
    residuals: list[Residual]


class NodeTrainer(Protocol):
    def train(self, node: str, params: Tensor, start_step: int, n_steps: int) -> Tensor:
        """Train `node` from `params` for `n_steps` with the LR of global steps start_step..; return params."""


class Privatizer(Protocol):
    """DP of flagged nodes (paper §4.2; implemented by privacy.node.Privacy)."""

    def applies(self, node: str) -> bool:
        """Whether `node` privatises what it sends to its parent."""

    def release(self, node: str, update: Update, received: Tensor, split: Split, share_keys: bool) -> Update | None:
        """The message `node` sends instead of `update` (`received`: its parent's state this visit); None: none."""

    def combine(
        self,
        parent: str,
        senders: Sequence[str],
        updates: Sequence[Update],
        sent: Tensor,
        split: Split,
        share_keys: bool,
    ) -> list[Update]:
        """What `parent` aggregates of its children's messages (central DP noise; else `updates` as they are)."""
