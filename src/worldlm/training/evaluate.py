"""Deterministic perplexity of a model on fixed held-out windows."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldlm.training.device import CPU, Compute


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, batch_size: int, compute: Compute = CPU) -> tuple[float, float]:
    """Mean next-token NLL over all tokens of `windows` (N, T+1) and its perplexity exp(NLL), on
    `compute.device` under its autocast (the NLL itself in fp32)."""
    model.eval()
    total, count = 0.0, 0
    for chunk in torch.split(windows, batch_size):
        chunk = chunk.to(compute.device, non_blocking=True)
        x, y = chunk[:, :-1], chunk[:, 1:]
        with compute.autocasting():
            logits = model(x)  # (B, T, V)
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum")
        total += float(nll)
        count += y.numel()
    loss = total / count
    return loss, math.exp(min(loss, 50.0))  # cap: a diverged model reports a huge, finite perplexity
