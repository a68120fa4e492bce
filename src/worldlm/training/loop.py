"""The one local training loop every method uses (ClientOpt = AdamW), and the shared LR schedule.

All nodes and levels share one clock (paper A.3.3): the learning rate of a step is indexed by the
global *sequential* step, so a leaf at stage 3 of round k uses the rate of sequential step
k * steps_per_round + 2 * local_steps + i, whichever method or node it is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from worldlm.training.device import CPU, Compute


@dataclass(frozen=True)
class Schedule:
    """Linear warm-up from alpha * lr_max to lr_max, cosine decay to alpha * lr_max at step `total`."""

    lr_max: float
    alpha: float
    warmup: int
    total: int

    def lr(self, step: int) -> float:
        lo = self.alpha * self.lr_max
        if step < self.warmup:
            return lo + (self.lr_max - lo) * step / self.warmup
        if step >= self.total:
            return lo
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return lo + (self.lr_max - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ClientOptConfig:
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0


@dataclass(frozen=True)
class TrainStats:
    steps: int
    tokens: int
    seconds: float
    loss: float  # mean training loss over the steps
    last_loss: float


def make_client_opt(model: nn.Module, cfg: ClientOptConfig) -> torch.optim.AdamW:
    # No weight decay on gains/biases/embedding of positions, as in nanoGPT (decay only 2-D matrices).
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = bool(params) and params[0].device.type == "cuda"  # one fused kernel on CUDA; foreach on the CPU
    return torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), foreach=not fused, fused=fused)


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    next_batch: Callable[[], tuple[Tensor, Tensor]],
    schedule: Schedule,
    start_step: int,
    n_steps: int,
    grad_clip: float,
    on_step: Callable[[int, float], None] | None = None,
    compute: Compute = CPU,
    private: Callable[[nn.Module, Tensor, Tensor], float] | None = None,
) -> TrainStats:
    """Run `n_steps` AdamW steps; the LR of step i is schedule.lr(start_step + i) (the global clock).

    Batches go to `compute.device`; forward passes run under its autocast; with `compute.accum` = k each
    batch is k equal micro-batches whose gradients add up to the whole batch's (the loss is a mean, so each
    micro-batch's loss is divided by k): the same step as one batch, within rounding.
    `private` (a record-level DP node, record_dp.RecordDP.backward): sets the privatised gradient of the
    batch (per-example clipping and noise) instead of the backward pass and the global clip; returns the loss.
    """
    model.train()
    losses: list[float] = []
    tokens = 0
    t0 = time.perf_counter()
    for i in range(n_steps):
        lr = schedule.lr(start_step + i)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = next_batch()
        x, y = x.to(compute.device, non_blocking=True), y.to(compute.device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        if private is not None:
            value = private(model, x, y)
        elif compute.accum == 1:
            with compute.autocasting():
                loss = model(x, y)
            loss.backward()
        else:
            loss = torch.zeros((), device=compute.device)
            for xs, ys in zip(x.chunk(compute.accum), y.chunk(compute.accum), strict=True):
                with compute.autocasting():
                    part = model(xs, ys) / compute.accum
                part.backward()
                loss += part.detach()
        if private is None:
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            value = float(loss.detach())
        opt.step()
        if y.numel():  # a DP node's Poisson sample can be empty: a noise-only step with no loss
            losses.append(value)
        tokens += y.numel()
        if on_step is not None:
            on_step(start_step + i, value)
    seconds = time.perf_counter() - t0
    return TrainStats(n_steps, tokens, seconds, sum(losses) / max(1, len(losses)), losses[-1] if losses else math.nan)
