"""Samplers of a node's training data and its held-out windows.

`BatchSampler` draws a batch's sequences from the node's sources in proportion to its shards (A.1.1);
`PoissonWindows` takes each of a record-level DP node's windows independently with probability q (the
sampling DP-SGD's accounting assumes, `privacy.record`); `eval_windows` cuts the held-out splits
deterministically in the same proportions. A sampler's whole position is its numpy RNG state (resumable).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from worldlm.data.mixture import Span, mixture_weights
from worldlm.data.prepared import Prepared
from worldlm.errors import DataError, WorldLMError, quoted


class _Seeded:
    """A sampler whose whole position is its numpy RNG: `state` / `set_state` checkpoint and resume it."""

    rng: np.random.Generator

    def state(self) -> dict[str, Any]:
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


class BatchSampler(_Seeded):
    """Random windows from a node's spans; its whole position is the numpy RNG state (resumable)."""

    def __init__(
        self, data: Prepared, spans: list[Span], seq_len: int, batch_size: int, seed: int, noise_vocab: int = 0
    ) -> None:
        """noise_vocab > 0: every batch is uniformly random tokens in [0, noise_vocab) (a poisoned node)."""
        self.noise_vocab = noise_vocab
        self.streams = [data.tokens(s.source, "train") for s in spans]
        self.spans = spans
        self.weights = mixture_weights(spans)
        self.seq_len = seq_len
        self.batch_size = batch_size
        for s in spans:
            if s.size < seq_len + 2:
                raise DataError(
                    f"source {quoted(s.source)} gives a node only {s.size} training tokens, fewer than seq_len + 2 = "
                    f"{seq_len + 2}; add data, use fewer shards or a shorter model.seq_len"
                )
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """One batch: inputs (B, T) and next-token targets (B, T), int64."""
        if self.noise_vocab:
            noise = torch.from_numpy(self.rng.integers(0, self.noise_vocab, (self.batch_size, self.seq_len + 1)))
            return noise[:, :-1], noise[:, 1:]
        picks = self.rng.choice(len(self.spans), size=self.batch_size, p=self.weights)
        rows = []
        for k in picks:
            span = self.spans[k]
            start = span.start + int(self.rng.integers(0, span.size - self.seq_len - 1))
            rows.append(np.asarray(self.streams[k][start : start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        return batch[:, :-1], batch[:, 1:]


class PoissonWindows(_Seeded):
    """A DP node's records: the non-overlapping windows of its shards, each taken with probability q per step."""

    def __init__(self, data: Prepared, spans: list[Span], seq_len: int, batch_size: int, seed: int) -> None:
        self.streams = [data.tokens(s.source, "train") for s in spans]
        width = seq_len + 1
        self.windows = [(k, s.start + j * width) for k, s in enumerate(spans) for j in range(s.size // width)]
        if not self.windows:
            raise WorldLMError(f"a DP node's shards hold no window of {width} tokens; use a shorter model.seq_len")
        self.width = width
        self.sample_rate = min(1.0, batch_size / len(self.windows))
        self.rng = np.random.default_rng(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        """One Poisson sample: inputs (b, T) and targets (b, T), b ~ Binomial(N, q), possibly 0."""
        picked = np.flatnonzero(self.rng.random(len(self.windows)) < self.sample_rate)
        rows = [
            np.asarray(self.streams[k][s : s + self.width], dtype=np.int64)
            for k, s in (self.windows[i] for i in picked)
        ]
        batch = torch.from_numpy(np.stack(rows)) if rows else torch.zeros((0, self.width), dtype=torch.int64)
        return batch[:, :-1], batch[:, 1:]


def eval_windows(data: Prepared, spans: list[Span], split: str, seq_len: int, n_windows: int) -> Tensor:
    """Deterministic held-out windows (N, T+1): each source contributes in its mixture proportion.

    Windows are consecutive and non-overlapping from the start of the source's split; every node
    holding a source evaluates on the same held-out text of it (its distribution's test set).
    """
    weights = mixture_weights(spans)
    counts = np.maximum(1, np.round(weights * n_windows)).astype(int)
    rows = []
    for span, count in zip(spans, counts, strict=True):
        stream = data.tokens(span.source, split)
        available = (len(stream) - 1) // seq_len
        if available < 1:
            raise DataError(
                f"the {split} split of {quoted(span.source)} has {len(stream)} tokens, fewer than one window of "
                f"{seq_len + 1}; prepare more data or use a shorter model.seq_len"
            )
        for i in range(min(count, available)):
            rows.append(np.asarray(stream[i * seq_len : i * seq_len + seq_len + 1], dtype=np.int64))
    return torch.from_numpy(np.stack(rows))
