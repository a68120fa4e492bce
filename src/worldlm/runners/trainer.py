"""The in-process trainer: the one working model, each node's AdamW state and data sampler (engine's NodeTrainer)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from worldlm.data.samplers import BatchSampler, PoissonWindows
from worldlm.model import GPT, ParamLayout
from worldlm.privacy.record import RecordDP
from worldlm.runners.checkpoint import Part, read_part, write_part
from worldlm.runners.state_store import adam_part, load_adam
from worldlm.timing import PhaseFn, no_phase
from worldlm.training.device import CPU, Compute
from worldlm.training.loop import ClientOptConfig, Schedule, TrainStats, make_client_opt, train_steps

Sampler = BatchSampler | PoissonWindows


class LocalTrainer:
    """Owns the working model and, per node, an AdamW state and a data sampler (engine's NodeTrainer).

    It trains `forward` (the model, or its torch.compile) on `compute` (device, autocast, micro-batches).

    With `offload`, a node's AdamW moments live in a file there between its visits (see
    federation.offload_states). `phase` times "serialisation" (a node's flat state into and out of
    the working model), "training" and "offload".
    """

    def __init__(
        self,
        model: GPT,
        layout: ParamLayout,
        client: ClientOptConfig,
        schedule: Schedule,
        offload: Path | None = None,
        phase: PhaseFn = no_phase,
        compute: Compute = CPU,
        forward: nn.Module | None = None,
    ) -> None:
        self.model = model
        self.compute = compute
        self.forward = forward or model  # torch.compile of `model` with train.compile (same parameters)
        self.layout = layout
        self.client = client
        self.schedule = schedule
        self.offload = offload
        self.phase = phase
        self.samplers: dict[str, Sampler] = {}
        self.scales: dict[str, float] = {}
        self.private: dict[str, RecordDP] = {}
        self.opts: dict[str, torch.optim.Optimizer] = {}
        self.on_train: Callable[[str, int, int, TrainStats], None] = lambda *_: None
        self.on_step: Callable[[str, int, float], None] = lambda *_: None

    def add_node(self, name: str, sampler: Sampler, update_scale: float = 1.0, private: RecordDP | None = None) -> None:
        """`update_scale` != 1: the node's training change is scaled before it is returned (attack.scale);
        `private`: the node trains with DP-SGD (dp.unit = "record"; its sampler then draws Poisson samples)."""
        self.samplers[name] = sampler
        self.scales[name] = update_scale
        if private is not None:
            self.private[name] = private
        # Each node's AdamW holds its own moments for the shared working parameters (ClientOpt state).
        self.opts[name] = make_client_opt(self.model, self.client)

    def _adam_file(self, node: str) -> Path:
        assert self.offload is not None
        return self.offload / f"adam-{list(self.opts).index(node)}.safetensors"

    def adam_state(self, node: str) -> Part:
        """The node's AdamW state (read from its file when offloaded; empty before it first trained)."""
        if self.offload is None:
            return adam_part(self.opts[node])
        file = self._adam_file(node)
        return read_part(file) if file.is_file() else Part({}, {})

    def set_adam_state(self, node: str, part: Part) -> None:
        if self.offload is None:
            load_adam(self.opts[node], part)
        else:
            write_part(self._adam_file(node), part, durable=False)

    def train(self, node: str, params: Tensor, start_step: int, n_steps: int) -> Tensor:
        opt = self.opts[node]
        with self.phase("serialisation"):
            self.layout.load(self.model, params)
        if self.offload is not None:
            with self.phase("offload"):
                load_adam(opt, self.adam_state(node))
        with self.phase("training"):
            stats = train_steps(
                self.forward,
                opt,
                self.samplers[node].next,
                self.schedule,
                start_step,
                n_steps,
                self.client.grad_clip,
                on_step=lambda step, loss: self.on_step(node, step, loss),
                compute=self.compute,
                private=self.private[node].backward if node in self.private else None,
            )
        if self.offload is not None:
            with self.phase("offload"):
                self.set_adam_state(node, adam_part(opt))
                opt.state.clear()
        self.on_train(node, start_step, n_steps, stats)
        with self.phase("serialisation"):
            trained = self.layout.flatten(self.model)
        scale = self.scales.get(node, 1.0)
        return trained if scale == 1.0 else params + scale * (trained - params)
