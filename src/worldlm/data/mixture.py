"""Each node's data: equal shards of its sources (paper A.2) and a size-proportional batch mixture (A.1.1).

Every source's training stream is cut into equal contiguous shards; walking the tree
breadth-first, a leaf takes `leaf_shards` consecutive shards of each of its sources and every
other node `inner_shards`, so nodes never share training tokens. A node draws each sequence of a
batch from one of its sources with probability proportional to the tokens it holds of it
(the samplers are in `data.samplers`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
