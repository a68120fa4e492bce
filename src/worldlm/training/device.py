"""Where and how a run computes: device, autocast precision, gradient accumulation.

`resolve_compute` turns `train.device` / `train.precision` / `train.grad_accum` into a `Compute` once
per run (every runner alike, through `runners.planning`), with one-line errors for what this machine
cannot do. On the CPU with the
defaults it is fp32 and one micro-batch, so runs are bitwise what they were before these settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from worldlm.errors import ConfigError


@dataclass(frozen=True)
class Compute:
    device: torch.device
    autocast: torch.dtype | None  # None: fp32 throughout; else the autocast dtype (weights stay fp32)
    accum: int  # micro-batches per optimizer step

    @contextlib.contextmanager
    def autocasting(self) -> Iterator[None]:
        """The forward passes' precision: autocast to `self.autocast` on the device, or nothing."""
        if self.autocast is None:
            yield
            return
        with torch.autocast(self.device.type, dtype=self.autocast):
            yield


def resolve_device(name: str) -> torch.device:
    """train.device as a torch device; ConfigError (exit 2) for a CUDA device this machine lacks."""
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f'train.device = \'{name}\' but this machine has no CUDA device; use "cpu" or "auto"')
    device = torch.device("cuda" if name == "auto" else name)
    if device.index is None:  # always with an index, so it compares equal to the device tensors report
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"train.device = '{name}' but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1})")
    return device


def resolve_compute(name: str, precision: str, grad_accum: int, private: bool = False) -> Compute:
    """The run's device (`train.device`), autocast dtype (`train.precision`) and micro-batches
    (`train.grad_accum`); `private`: the run has DP nodes."""
    device = resolve_device(name)
    cuda = device.type == "cuda"
    if cuda and private:  # the DP mechanism's noise and accountant state live on the CPU
        raise ConfigError('differential privacy (dp nodes) runs on the CPU for now; set train.device = "cpu"')
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "bf16" and cuda and not bf16_ok:
        raise ConfigError(f"train.precision = 'bf16' but {torch.cuda.get_device_name(device)} has no bf16; use fp32")
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_ok)
    if cuda:  # TF32 matmuls for the fp32 parts (never in the federation's similarities: those are float64)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Compute(device, torch.bfloat16 if use_bf16 else None, grad_accum)


CPU = Compute(torch.device("cpu"), None, 1)  # the default of the training and evaluation functions
