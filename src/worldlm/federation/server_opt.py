"""Outer (server) optimisers for the backbone: FedAvg, FedAvgM, Nesterov, FedAdam (paper A.3.6).

Every inner node of the tree owns one instance ("per-level momentum"): after its
children return, it averages their pseudo-gradients Δ = mean_c(B_c − B) (A.3.3 step 4.iv A–B) and
calls `step(B, Δ)`. Δ already points downhill (it is the children's progress), so every rule
*adds* its update: B ← B + lr·(…). With kind="fedavg" and lr=1 the result is the children's mean.

Objects with state in the OpenDiLoCo / Photon style: the state is created lazily on the first
step, sized like the parameters, and `state_dict` / `load_state_dict` resume a run exactly.
Parameters are one flat tensor (the backbone flattened); any shape works as long as params and
delta agree. Arithmetic is float32 (float64 for float64 params); the result has params' dtype.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from worldlm.errors import quoted, suggest

__all__ = [
    "SERVER_OPTS",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "Nesterov",
    "ServerOpt",
    "ServerOptConfig",
    "average_pseudo_gradient",
    "make_server_opt",
    "register_server_opt",
]

# name -> class; filled by @register_server_opt below (torchtitan-style registry by name).
SERVER_OPTS: dict[str, type[ServerOpt]] = {}


def register_server_opt(name: str) -> Callable[[type[ServerOpt]], type[ServerOpt]]:
    """Class decorator: make a ServerOpt available as ServerOptConfig(kind=name)."""

    def deco(cls: type[ServerOpt]) -> type[ServerOpt]:
        if name in SERVER_OPTS:
            raise ValueError(f"server optimiser {name!r} is already registered")
        SERVER_OPTS[name] = cls
        cls.kind = name
        return cls

    return deco


@dataclass(frozen=True)
class ServerOptConfig:
    """Outer optimiser settings. `momentum` is used by fedavgm/nesterov, beta1/beta2/tau by fedadam.

    The default, plain FedAvg with server lr 1.0, was chosen on validation at the paper's budget
    (results/paper-regime-sweep): it beat the paper's FedAvgM (μ_s = 0.9, Table 5) for WorldLM, whose momentum
    compounds over the levels of the tree. This class is also the config's `federation.server_opt` table.
    """

    kind: str = "fedavg"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:  # messages start with the field: the config loader puts the table in front
        if self.kind not in SERVER_OPTS:
            raise ValueError(f"kind {quoted(self.kind)} is unknown{suggest(self.kind, SERVER_OPTS)}")

        def finite(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        if finite("lr") <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            if not 0.0 <= finite(name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if finite("tau") <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")


def average_pseudo_gradient(
    params: Tensor, children: Sequence[Tensor], weights: Sequence[float] | None = None
) -> Tensor:
    """A.3.6: Δ = Σ_c w_c (B_c − B) with weights normalised to sum 1 (default: plain mean).

    Computed in float32 (float64 for float64 params), returned in that dtype: feed it to step().
    """
    if not children:
        raise ValueError("average_pseudo_gradient needs at least one child")
    if weights is None:
        weights = [1.0] * len(children)
    if len(weights) != len(children):
        raise ValueError(f"{len(weights)} weights for {len(children)} children")
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {list(weights)}")
    acc = _acc_dtype(params)
    base = params.to(acc)
    total = float(sum(weights))
    out = torch.zeros_like(base)
    for w, child in zip(weights, children, strict=True):
        if child.shape != params.shape:
            raise ValueError(f"child shape {tuple(child.shape)} differs from params {tuple(params.shape)}")
        out += (w / total) * (child.to(device=base.device, dtype=acc) - base)
    return out


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


class ServerOpt(ABC):
    """An outer optimiser with state. One instance per inner tree node (per-level momentum)."""

    kind: str = ""
    # Names of the state tensors this rule keeps (besides the step counter), all sized like params.
    state_names: tuple[str, ...] = ()

    def __init__(self, cfg: ServerOptConfig) -> None:
        self.cfg = cfg
        self.steps = 0
        self._state: dict[str, Tensor] = {}

    def step(self, params: Tensor, delta: Tensor) -> Tensor:
        """Return the new parameters B + lr·(…); neither input is modified."""
        if not params.is_floating_point() or not delta.is_floating_point():
            raise TypeError(f"params and delta must be floating point, got {params.dtype}, {delta.dtype}")
        if params.shape != delta.shape:
            raise ValueError(f"delta shape {tuple(delta.shape)} differs from params {tuple(params.shape)}")
        acc = _acc_dtype(params)
        d = delta.to(device=params.device, dtype=acc)
        for name in self.state_names:  # lazily sized; moved to params' device after a CPU load
            buf = self._state.get(name)
            if buf is None:
                self._state[name] = torch.zeros(params.shape, dtype=acc, device=params.device)
            elif buf.shape != params.shape:
                raise ValueError(
                    f"{self.kind} state {name!r} has shape {tuple(buf.shape)}, params {tuple(params.shape)}"
                )
            else:
                self._state[name] = buf.to(device=params.device, dtype=acc)
        update = self._update(d)
        self.steps += 1
        return (params.to(acc) + self.cfg.lr * update).to(params.dtype)

    @abstractmethod
    def _update(self, delta: Tensor) -> Tensor:
        """Advance the state with Δ and return the direction to add (before lr)."""

    def state_dict(self) -> dict[str, Tensor]:
        """The step counter and the state tensors created so far (copies)."""
        out = {"step": torch.tensor(self.steps, dtype=torch.int64)}
        out.update({name: t.detach().clone() for name, t in self._state.items()})
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what state_dict returned (tensors are copied; device follows the next step)."""
        allowed = {"step", *self.state_names}
        unknown = set(state) - allowed
        if unknown or "step" not in state:
            raise ValueError(f"{self.kind} state must have 'step' and only {sorted(allowed)}; got {sorted(state)}")
        steps = int(state["step"])
        present = [n for n in self.state_names if n in state]
        if steps > 0 and len(present) != len(self.state_names):
            raise ValueError(
                f"{self.kind} state after {steps} steps lacks {sorted(set(self.state_names) - set(present))}"
            )
        self.steps = steps
        self._state = {n: state[n].detach().clone() for n in present}


@register_server_opt("fedavg")
class FedAvg(ServerOpt):
    """B ← B + lr·Δ (lr = 1: plain FedAvg, the mean of the children's backbones)."""

    def _update(self, delta: Tensor) -> Tensor:
        return delta


@register_server_opt("fedavgm")
class FedAvgM(ServerOpt):
    """Heavy-ball server momentum (Hsu et al. 2019): m ← μ·m + Δ; B ← B + lr·m."""

    state_names = ("momentum",)

    def _update(self, delta: Tensor) -> Tensor:
        m = self._state["momentum"]
        m.mul_(self.cfg.momentum).add_(delta)
        return m  # only read by step(); state_dict() hands out copies


@register_server_opt("nesterov")
class Nesterov(ServerOpt):
    """Nesterov server momentum (DiLoCo's outer optimiser): m ← μ·m + Δ; B ← B + lr·(Δ + μ·m)."""

    state_names = ("momentum",)

    def _update(self, delta: Tensor) -> Tensor:
        m = self._state["momentum"]
        m.mul_(self.cfg.momentum).add_(delta)
        return delta + self.cfg.momentum * m


@register_server_opt("fedadam")
class FedAdam(ServerOpt):
    """FedAdam (Reddi et al. 2021, Alg. 2; no bias correction):
    m ← β1·m + (1−β1)·Δ; v ← β2·v + (1−β2)·Δ²; B ← B + lr·m / (√v + τ)."""

    state_names = ("m", "v")

    def _update(self, delta: Tensor) -> Tensor:
        m, v = self._state["m"], self._state["v"]
        m.mul_(self.cfg.beta1).add_(delta, alpha=1.0 - self.cfg.beta1)
        v.mul_(self.cfg.beta2).addcmul_(delta, delta, value=1.0 - self.cfg.beta2)
        return m / (v.sqrt() + self.cfg.tau)


def make_server_opt(cfg: ServerOptConfig) -> ServerOpt:
    """Build the outer optimiser named by cfg.kind (fresh state)."""
    return SERVER_OPTS[cfg.kind](cfg)
