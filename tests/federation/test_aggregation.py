"""Key-layer aggregation (paper A.3.3 steps 2, 4.ii–iv; A.3.5–A.3.7).

Two kinds of tests:
- picotron-style: the NAIVE references of `federation.aggregation_reference` (loops over
  positions and members, cosine and softmax on Python floats) checked against the batched
  implementation on random inputs of several shapes;
- Flower-style prepare / execute / assert tests with hand-computable expectations.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from worldlm.federation import aggregation_reference as naive
from worldlm.federation.aggregation import (
    aggregate_children,
    aggregate_children_batched,
    aggregate_with_parent,
    aggregate_with_parent_batched,
    cosine,
    cosine_matrix,
    most_dissimilar,
    most_dissimilar_batched,
    route,
    route_batched,
)

E = math.e


def t64(x: object) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


SHAPES = [(1, 1, 1), (1, 5, 2), (2, 7, 4), (3, 16, 6), (4, 33, 17)]  # (L, D, M)


# --------------------------------------------------------------------------------------------------
# batched == naive on random inputs


@pytest.mark.parametrize(("n_pos", "d", "n_mem"), SHAPES)
@pytest.mark.parametrize("attention", [True, False])
def test_children_batched_matches_naive(n_pos: int, d: int, n_mem: int, attention: bool) -> None:
    # prepare
    g = torch.Generator().manual_seed(100 * n_pos + d + n_mem)
    members = torch.randn(n_mem, n_pos, d, generator=g, dtype=torch.float64)
    # execute
    pooled, lam = aggregate_children_batched(members, attention=attention)
    ref_pooled, ref_lam = naive.children(members, attention=attention)
    # assert
    assert pooled.shape == (n_pos, d) and lam.shape == (n_pos, n_mem, n_mem)
    torch.testing.assert_close(pooled, ref_pooled, rtol=0, atol=1e-12)
    torch.testing.assert_close(lam, ref_lam, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n_pos", "d", "n_res"), [(1, 3, 0), (1, 4, 2), (2, 9, 3), (3, 16, 5), (4, 33, 7)])
@pytest.mark.parametrize("attention", [True, False])
def test_with_parent_batched_matches_naive(n_pos: int, d: int, n_res: int, attention: bool) -> None:
    # prepare: residuals on a random subset of positions (some positions get none, some several)
    g = torch.Generator().manual_seed(7 * n_pos + d + n_res)
    own = torch.randn(n_pos, d, generator=g, dtype=torch.float64)
    parent = torch.randn(n_pos, d, generator=g, dtype=torch.float64)
    covered = list(range(0, n_pos, 2)) or [0]
    residuals = [
        (
            torch.randn(d, generator=g, dtype=torch.float64),
            covered[int(torch.randint(len(covered), (1,), generator=g))],
        )
        for _ in range(n_res)
    ]
    # execute
    new, lam = aggregate_with_parent_batched(own, parent, residuals, attention=attention)
    ref_new, ref_lam = naive.with_parent(own, parent, residuals, attention)
    # assert
    assert new.shape == (n_pos, d) and lam.shape == (n_pos, 2 + n_res)
    torch.testing.assert_close(new, ref_new, rtol=0, atol=1e-12)
    torch.testing.assert_close(lam, ref_lam, rtol=0, atol=1e-12)
    for r, (_, at) in enumerate(residuals):  # masked out exactly, not approximately
        assert all(lam[pos, 2 + r].item() == 0.0 for pos in range(n_pos) if pos != at)


@pytest.mark.parametrize(("n_pos", "d", "n_cand"), SHAPES)
@pytest.mark.parametrize("nu", [0, 1, 2, 5, 40])
def test_most_dissimilar_batched_matches_naive(n_pos: int, d: int, n_cand: int, nu: int) -> None:
    g = torch.Generator().manual_seed(n_pos + 3 * d + 5 * n_cand + nu)
    pooled = torch.randn(n_pos, d, generator=g, dtype=torch.float64)
    cands = torch.randn(n_cand, n_pos, d, generator=g, dtype=torch.float64)

    idx, sims = most_dissimilar_batched(pooled, cands, nu)

    assert idx.dtype == torch.int64 and idx.shape == (n_pos, min(nu, n_cand))
    assert idx.tolist() == naive.most_dissimilar(pooled, cands, nu)
    ref_sims = [[naive.cos(pooled[p], cands[c, p]) for c in range(n_cand)] for p in range(n_pos)]
    torch.testing.assert_close(sims, t64(ref_sims), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("n_pos", "d", "n_child"), SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_route_batched_matches_naive(n_pos: int, d: int, n_child: int, masked: bool) -> None:
    g = torch.Generator().manual_seed(11 * n_pos + d + n_child)
    n_res = 6
    residuals = torch.randn(n_res, d, generator=g, dtype=torch.float64)
    positions = torch.randint(n_pos, (n_res,), generator=g)
    children = torch.randn(n_child, n_pos, d, generator=g, dtype=torch.float64)
    allowed = torch.rand(n_res, n_child, generator=g) > 0.4 if masked else None
    if allowed is not None:
        allowed[0] = False  # one residual with nowhere to go

    best, sim = route_batched(residuals, positions, children, allowed)

    ref = naive.route(residuals, positions.tolist(), children, allowed)
    assert best.dtype == torch.int64 and best.tolist() == ref
    for r, c in enumerate(ref):
        want = 0.0 if c < 0 else naive.cos(residuals[r], children[c, int(positions[r])])
        assert sim[r].item() == pytest.approx(want, abs=1e-12)


def test_cosine_matrix_matches_naive() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 4, 10, generator=g, dtype=torch.float64)
    y = torch.randn(3, 5, 10, generator=g, dtype=torch.float64)
    y[1, 2] = 0.0  # a zero vector

    got = cosine_matrix(x, y)

    ref = [[[naive.cos(x[p, m], y[p, n]) for n in range(5)] for m in range(4)] for p in range(3)]
    torch.testing.assert_close(got, t64(ref), rtol=0, atol=1e-12)
    assert torch.all(got[1, :, 2] == 0)


def test_cosine_broadcasts_and_matches_naive() -> None:
    g = torch.Generator().manual_seed(4)
    a = torch.randn(4, 1, 6, generator=g, dtype=torch.float64)
    b = torch.randn(3, 6, generator=g, dtype=torch.float64)

    got = cosine(a, b)

    assert got.shape == (4, 3)
    ref = [[naive.cos(a[i, 0], b[j]) for j in range(3)] for i in range(4)]
    torch.testing.assert_close(got, t64(ref), rtol=0, atol=1e-12)


def test_float32_inputs_keep_dtype_and_agree_with_naive() -> None:
    g = torch.Generator().manual_seed(5)
    members = torch.randn(5, 2, 50, generator=g)  # float32
    pooled, _ = aggregate_children_batched(members)
    ref, _ = naive.children(members)
    assert pooled.dtype == torch.float32
    torch.testing.assert_close(pooled.double(), ref, rtol=0, atol=1e-6)

    new, _ = aggregate_with_parent_batched(members[0], members[1], [(members[2, 1], 1)])
    ref_new, _ = naive.with_parent(members[0], members[1], [(members[2, 1], 1)])
    assert new.dtype == torch.float32
    torch.testing.assert_close(new.double(), ref_new, rtol=0, atol=1e-6)


def test_bfloat16_inputs_keep_dtype() -> None:
    members = torch.randn(3, 2, 8).to(torch.bfloat16)
    pooled, lam = aggregate_children_batched(members)
    assert pooled.dtype == torch.bfloat16 and lam.dtype == torch.float64
    assert aggregate_with_parent(members[0, 0], members[1, 0]).dtype == torch.bfloat16


def test_single_vector_wrappers_equal_batched_forms() -> None:
    g = torch.Generator().manual_seed(6)
    node, c1, c2, c3 = torch.randn(4, 12, generator=g, dtype=torch.float64)

    assert torch.equal(
        aggregate_children(node, [c1, c2, c3]),
        aggregate_children_batched(torch.stack([node, c1, c2, c3])[:, None])[0][0],
    )
    assert torch.equal(
        aggregate_with_parent(node, c1, [c2, c3]),
        aggregate_with_parent_batched(node[None], c1[None], [(c2, 0), (c3, 0)])[0][0],
    )
    ref_new, _ = naive.with_parent(node[None], c1[None], [(c2, 0), (c3, 0)])
    torch.testing.assert_close(aggregate_with_parent(node, c1, [c2, c3]), ref_new[0], rtol=0, atol=1e-12)
    stacked = torch.stack([c1, c2, c3])[:, None]  # [C=3, L=1, D]
    assert most_dissimilar(node, [c1, c2, c3], 2) == naive.most_dissimilar(node[None], stacked, 2)[0]
    assert route(node, [c1, c2, c3]) == naive.route(node[None], [0], stacked)[0]


# --------------------------------------------------------------------------------------------------
# hand-computable expectations (prepare / execute / assert)


def test_identical_members_attention_equals_plain_mean() -> None:
    # prepare: the node and its children hold the same layer -> every cosine is 1
    v = t64([1.0, -2.0, 3.0])
    # execute
    pooled, lam = aggregate_children_batched(torch.stack([v, v, v, v])[:, None])
    # assert: uniform λ, pooled = the (identical) plain mean
    torch.testing.assert_close(lam, torch.full((1, 4, 4), 0.25, dtype=torch.float64), rtol=0, atol=1e-15)
    torch.testing.assert_close(pooled[0], v, rtol=0, atol=1e-15)
    torch.testing.assert_close(aggregate_children(v, [v, v]), v, rtol=0, atol=1e-15)


def test_identical_children_with_different_node_match_naive_and_plain_mean_when_orthogonal() -> None:
    # prepare: mutually orthogonal members -> off-diagonal cos 0, diagonal 1 -> λ is symmetric and
    # doubly stochastic, so the pooled layer is exactly the plain mean
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    # execute
    pooled, lam = aggregate_children_batched(torch.stack([e1, e2, e3])[:, None])
    # assert
    assert lam[0, 0].tolist() == pytest.approx([E / (E + 2), 1 / (E + 2), 1 / (E + 2)], abs=1e-15)
    torch.testing.assert_close(pooled[0], t64([1 / 3, 1 / 3, 1 / 3]), rtol=0, atol=1e-15)


def test_parent_aggregation_hand_values() -> None:
    e1, e2 = t64([1.0, 0.0]), t64([0.0, 1.0])
    # same direction: scores [1, 1] -> λ = [1/2, 1/2]
    torch.testing.assert_close(aggregate_with_parent(e1, 2 * e1), t64([1.5, 0.0]), rtol=0, atol=1e-15)
    # orthogonal parent: scores [1, 0] -> λ = [e, 1] / (e + 1)
    torch.testing.assert_close(aggregate_with_parent(e1, e2), t64([E / (E + 1), 1 / (E + 1)]), rtol=0, atol=1e-15)
    # plus an opposite residual: scores [1, 0, -1] -> λ ∝ [e, 1, 1/e]
    z = E + 1 + 1 / E
    torch.testing.assert_close(aggregate_with_parent(e1, e2, [-e1]), t64([(E - 1 / E) / z, 1 / z]), rtol=0, atol=1e-15)


def test_attention_off_is_uniform_over_participants() -> None:
    own = t64([[1.0, 0.0], [0.0, 1.0]])
    parent = t64([[0.0, 1.0], [1.0, 0.0]])
    res = t64([3.0, 3.0])

    new, lam = aggregate_with_parent_batched(own, parent, [(res, 1)], attention=False)

    assert lam.tolist() == [
        [0.5, 0.5, 0.0],
        [pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(1 / 3)],
    ]
    torch.testing.assert_close(new, t64([[0.5, 0.5], [4 / 3, 4 / 3]]), rtol=0, atol=1e-15)
    pooled, lam_c = aggregate_children_batched(torch.stack([own, parent]), attention=False)
    torch.testing.assert_close(pooled, t64([[0.5, 0.5], [0.5, 0.5]]), rtol=0, atol=0)
    assert torch.all(lam_c == 0.5)


def test_zero_and_orthogonal_vectors_give_zero_cosine_and_no_nan() -> None:
    zero, e1 = t64([0.0, 0.0]), t64([1.0, 0.0])

    assert cosine(zero, e1).item() == 0.0
    assert cosine(zero, zero).item() == 0.0
    assert cosine(e1, t64([0.0, 5.0])).item() == 0.0
    # parent aggregation with a zero parent: scores [1, 0] -> λ = [e, 1] / (e + 1)
    torch.testing.assert_close(aggregate_with_parent(e1, zero), e1 * E / (E + 1), rtol=0, atol=1e-15)
    # children: zero node + e1 child: λ = [[e, 1], [1, e]] / (e + 1) -> column means 1/2
    pooled = aggregate_children(zero, [e1])
    assert not torch.isnan(pooled).any()
    torch.testing.assert_close(pooled, t64([0.5, 0.0]), rtol=0, atol=1e-15)
    assert most_dissimilar(e1, [zero, e1], 1) == [0]
    assert route(zero, [e1, -e1]) == 0  # all cosines 0 -> lowest index
    # float32 layers with tiny entries: their squares underflow in float32 but not in the float64
    # accumulation, so the cosine is still right
    tiny = torch.tensor([1e-25, 2e-25], dtype=torch.float32)
    assert cosine(tiny, tiny).item() == pytest.approx(1.0)
    # a vector whose squared norm underflows even in float64 counts as zero: 0, never NaN
    assert cosine(t64([1e-200, 1e-200]), e1).item() == 0.0


def test_dissimilar_member_gets_lowest_attention_from_the_others() -> None:
    # prepare: node and two children close to each other, one child pointing the other way
    base = t64([1.0, 1.0, 1.0, 1.0])
    members = torch.stack([base, base + t64([0.1, 0, 0, 0]), base + t64([0, 0.1, 0, 0]), -base])[:, None]
    # execute
    _, lam = aggregate_children_batched(members)
    # assert: for each of the similar members, the outlier (3) has the smallest weight in its row
    for c in range(3):
        row = lam[0, c]
        assert int(torch.argmin(row)) == 3
        assert row.sum().item() == pytest.approx(1.0, abs=1e-15)


def test_most_dissimilar_picks_planted_outlier_and_edge_cases() -> None:
    base = t64([1.0, 2.0, 3.0])
    members = [base + 0.01 * i for i in range(5)]
    members[3] = t64([3.0, -2.0, 0.0])  # planted outlier

    assert most_dissimilar(base, members, 1) == [3]
    assert most_dissimilar(base, members, 0) == []
    assert most_dissimilar(base, members, 99) == [0, 1, 2, 3, 4]
    assert most_dissimilar(base, [], 2) == []
    two = most_dissimilar(base, members, 2)
    assert 3 in two and two == sorted(two)
    # ties go to the lowest index
    assert most_dissimilar(base, [base, base, base], 2) == [0, 1]


def test_most_dissimilar_batched_per_position() -> None:
    pooled = t64([[1.0, 0.0], [0.0, 1.0]])
    cands = t64([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.1], [1.0, 0.0]]])  # [C=3, L=2, D=2]

    idx, sims = most_dissimilar_batched(pooled, cands, 1)

    assert idx.tolist() == [[1], [0]]
    assert sims.shape == (2, 3)


def test_route_picks_planted_nearest_child_and_respects_allowed() -> None:
    e1, e2, e3 = torch.eye(3, dtype=torch.float64)
    children = [e2, e1 + 0.1 * e3, e3]
    v = e1

    assert route(v, children) == 1
    stacked = torch.stack(children)[:, None]  # [C=3, L=1, D=3]
    best, sim = route_batched(v[None], torch.tensor([0]), stacked, torch.tensor([[True, False, True]]))
    assert best.tolist() == [0]  # child 1 excluded; e2 and e3 tie at 0 -> lowest index
    best, sim = route_batched(v[None], torch.tensor([0]), stacked, torch.tensor([[False, False, False]]))
    assert best.tolist() == [-1] and sim.tolist() == [0.0]
    assert route(e1, [e1, e1]) == 0  # tie -> lowest index


def test_route_uses_the_residuals_own_position() -> None:
    # child 0 matches at position 0, child 1 at position 1
    children = t64([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])  # [C=2, L=2, D=2]
    residuals = t64([[1.0, 0.0], [1.0, 0.0]])

    best, sim = route_batched(residuals, torch.tensor([0, 1]), children)

    assert best.tolist() == [0, 1]
    assert sim.tolist() == [1.0, 1.0]


def test_residual_at_position_1_does_not_affect_position_0() -> None:
    g = torch.Generator().manual_seed(9)
    own = torch.randn(2, 5, generator=g, dtype=torch.float64)
    parent = torch.randn(2, 5, generator=g, dtype=torch.float64)
    res = torch.randn(5, generator=g, dtype=torch.float64)

    with_res, lam = aggregate_with_parent_batched(own, parent, [(res, 1)])
    without, lam0 = aggregate_with_parent_batched(own, parent)

    assert torch.equal(with_res[0], without[0])
    assert torch.equal(lam[0, :2], lam0[0]) and lam[0, 2].item() == 0.0
    assert not torch.equal(with_res[1], without[1])


def test_softmax_weights_sum_to_one() -> None:
    g = torch.Generator().manual_seed(10)
    members = torch.randn(6, 3, 20, generator=g)
    _, lam = aggregate_children_batched(members)
    torch.testing.assert_close(lam.sum(-1), torch.ones(3, 6, dtype=torch.float64), rtol=0, atol=1e-12)
    _, lam_p = aggregate_with_parent_batched(members[0], members[1], [(members[2, 0], 0), (members[3, 2], 2)])
    torch.testing.assert_close(lam_p.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-12)


def test_invalid_inputs_raise() -> None:
    v = torch.zeros(3)
    with pytest.raises(ValueError, match="position"):
        aggregate_with_parent_batched(torch.zeros(2, 3), torch.zeros(2, 3), [(v, 2)])
    with pytest.raises(ValueError):
        aggregate_with_parent(v, torch.zeros(4))
    with pytest.raises(ValueError, match="nu"):
        most_dissimilar(v, [v], -1)
    with pytest.raises(ValueError, match="child"):
        route(v, [])
    with pytest.raises(ValueError):
        aggregate_children_batched(torch.zeros(0, 1, 3))
    with pytest.raises(TypeError):
        aggregate_children(torch.zeros(3, dtype=torch.long), [])
    with pytest.raises(ValueError):
        route_batched(torch.zeros(1, 3), torch.tensor([5]), torch.zeros(2, 2, 3))


# --------------------------------------------------------------------------------------------------
# properties


@settings(max_examples=40, deadline=None)
@given(
    n_mem=st.integers(1, 6),
    n_pos=st.integers(1, 3),
    d=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    zero_rows=st.integers(0, 2),
)
def test_children_pooled_is_a_convex_combination(n_mem: int, n_pos: int, d: int, seed: int, zero_rows: int) -> None:
    g = torch.Generator().manual_seed(seed)
    members = torch.randn(n_mem, n_pos, d, generator=g, dtype=torch.float64)
    members[: min(zero_rows, n_mem), 0] = 0.0
    pooled, lam = aggregate_children_batched(members)
    assert not torch.isnan(pooled).any() and not torch.isnan(lam).any()
    assert torch.all(lam >= 0)
    torch.testing.assert_close(lam.sum(-1), torch.ones(n_pos, n_mem, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.all(pooled <= members.max(0).values + 1e-12)
    assert torch.all(pooled >= members.min(0).values - 1e-12)
