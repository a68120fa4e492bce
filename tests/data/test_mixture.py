"""Shard assignment (paper A.2), mixture ratios (A.1.1), batches and evaluation windows."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest

from tiny import make_prepared
from worldlm.data.mixture import Span, assign_shards, mixture_weights
from worldlm.data.prepared import load_prepared
from worldlm.data.samplers import BatchSampler, eval_windows
from worldlm.errors import DataError
from worldlm.federation.tree import NodeSpec, build_tree

TREE = build_tree(
    [
        NodeSpec("root"),
        NodeSpec("A", "root"),
        NodeSpec("B", "root"),
        NodeSpec("fr", "A", ("fr",)),
        NodeSpec("it", "A", ("it",)),
        NodeSpec("uk", "B", ("uk",)),
        NodeSpec("ru", "B", ("ru",)),
    ]
)


def test_shards_leaf_three_inner_two_disjoint() -> None:
    sizes = {"fr": 700, "it": 1400, "uk": 70, "ru": 7000}
    spans = assign_shards(TREE, sizes, leaf_shards=3, inner_shards=2)
    # fr is held by root (2 shards), A (2) and the leaf fr (3): 7 equal shards of 100 tokens.
    fr = {n: [s for s in spans[n] if s.source == "fr"] for n in ("root", "A", "fr")}
    assert [(s.start, s.end) for n in ("root", "A", "fr") for s in fr[n]] == [
        (0, 200),
        (200, 400),
        (400, 700),
    ]
    assert spans["B"] == [Span("uk", 20, 40), Span("ru", 2000, 4000)]
    for src in sizes:  # no token is used by two nodes
        ranges = sorted((s.start, s.end) for n in spans for s in spans[n] if s.source == src)
        assert all(a[1] <= b[0] for a, b in pairwise(ranges))


def test_mixture_proportional_to_held_sizes() -> None:
    w = mixture_weights([Span("a", 0, 100), Span("b", 0, 300)])
    assert w.tolist() == [0.25, 0.75]


def test_sampler_draws_sources_in_proportion(tmp_path: Path) -> None:
    data = load_prepared(make_prepared(tmp_path / "d"))
    spans = [Span("fr", 0, 10_000), Span("uk", 0, 30_000)]
    sampler = BatchSampler(data, spans, seq_len=16, batch_size=4000, seed=1)
    x, y = sampler.next()
    assert x.shape == (4000, 16) and y.shape == (4000, 16)
    assert (x[:, 1:] == y[:, :-1]).all()  # targets are inputs shifted by one
    half = (data.vocab_size - 1) // 2
    frac_uk = float((x[:, 0] > half).float().mean())  # uk tokens live in the upper half of the vocab
    assert abs(frac_uk - 0.75) < 0.03
    state = sampler.state()
    a = sampler.next()[0]
    sampler.set_state(state)
    assert (sampler.next()[0] == a).all()  # the RNG state is the whole data position


def test_eval_windows_deterministic_and_weighted(tmp_path: Path) -> None:
    data = load_prepared(make_prepared(tmp_path / "d"))
    spans = [Span("fr", 0, 100), Span("it", 0, 300)]
    w1 = eval_windows(data, spans, "val", 32, 8)
    assert w1.shape == (8, 33) and (w1 == eval_windows(data, spans, "val", 32, 8)).all()


def test_too_small_source_is_a_clear_error(tmp_path: Path) -> None:
    data = load_prepared(make_prepared(tmp_path / "d"))
    with pytest.raises(DataError, match="fewer than seq_len"):
        BatchSampler(data, [Span("fr", 0, 10)], seq_len=32, batch_size=2, seed=0)
    with pytest.raises(DataError, match="not in"):
        data.tokens("de", "train")
    assert np.asarray(data.tokens("fr", "train")).size == 60_000


def test_an_unknown_source_with_a_line_break_is_named_on_one_line() -> None:
    tree = build_tree([NodeSpec("root"), NodeSpec("a", "root", ("fr\n",))])
    with pytest.raises(DataError, match=r"tree uses source 'fr\\n' but") as exc:
        assign_shards(tree, {"fr": 700}, leaf_shards=3, inner_shards=2)
    assert "\n" not in str(exc.value)
