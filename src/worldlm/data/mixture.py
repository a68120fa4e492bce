"""Each node's data: equal shards of its sources (paper A.2) and a size-proportional batch mixture (A.1.1).

Every source's training stream is cut into equal contiguous shards; walking the tree
breadth-first, a leaf takes `leaf_shards` consecutive shards of each of its sources and every
other node `inner_shards`, so nodes never share training tokens. A node draws each sequence of a
batch from one of its sources with probability proportional to the tokens it holds of it.
Validation/test windows come from the sources' held-out splits in the same proportions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worldlm.data.prepared import Prepared
from worldlm.errors import DataError, quoted
from worldlm.federation.tree import Tree


@dataclass(frozen=True)
class Span:
    source: str
    start: int  # token offsets into the source's train stream, end exclusive
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


def assign_shards(
    tree: Tree, train_sizes: dict[str, int], leaf_shards: int, inner_shards: int
) -> dict[str, list[Span]]:
    """Paper A.2: split each source into equal shards; leaves get `leaf_shards`, other nodes `inner_shards`."""
    holders: dict[str, list[str]] = {}
    for name in tree.training_nodes:
        for src in tree[name].sources:
            holders.setdefault(src, []).append(name)
    spans: dict[str, list[Span]] = {name: [] for name in tree.training_nodes}
    for src, nodes in holders.items():
        if src not in train_sizes:
            raise DataError(
                f"tree uses source {quoted(src)} but the prepared data has only {', '.join(sorted(train_sizes))}"
            )
        counts = [leaf_shards if tree.is_leaf(n) else inner_shards for n in nodes]
        shard = train_sizes[src] // sum(counts)
        offset = 0
        for name, count in zip(nodes, counts, strict=True):
            spans[name].append(Span(src, offset, offset + count * shard))
            offset += count * shard
    return spans


def cap_spans(spans: list[Span], max_tokens: int) -> list[Span]:
    """At most `max_tokens` of a node's training tokens: the first ones of each span, in its mixture's proportions.

    The data-scarce regime (`data.max_train_tokens`): an organisation with little text. A node
    already under the cap keeps everything; its mixture proportions stay those of its shards.
    """
    total = sum(s.size for s in spans)
    if total <= max_tokens:
        return list(spans)
    return [Span(s.source, s.start, s.start + s.size * max_tokens // total) for s in spans]


def mixture_weights(spans: list[Span]) -> np.ndarray:
    """Paper A.1.1: a node samples its sources in proportion to their (shard) sizes."""
    sizes = np.array([s.size for s in spans], dtype=np.float64)
    return sizes / sizes.sum()


class BatchSampler:
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

    def state(self) -> dict[str, Any]:
        return dict(self.rng.bit_generator.state)

    def set_state(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state


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
