"""The similarity of key layers (weights, centered, updates; τ; matrices only), the attention
spread, outlier detection and what happens to an outlier's keys.

- batched forms against the naive references of `aggregation_reference` for every kind, τ and mask;
- hand-computed cases, NaN-free zero vectors;
- the engine: a member whose keys are noise gets the lowest weight at its parent, an `outlier` event
  after `outlier_rounds`, and is not carried on as a residual with `skip_outlier_residuals`;
- end to end: resume and offloaded states give the same run under a non-default similarity (the Flower
  runner's equality is in test_flower.py).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from tiny import TREE, FakeTrainer, summary_of, tiny_config, train_tiny
from worldlm import config as C
from worldlm.errors import ConfigError
from worldlm.federation import aggregation_reference as naive
from worldlm.federation.aggregation import (
    Similarity,
    aggregate_children_batched,
    aggregate_with_parent_batched,
    attention_spread,
    most_dissimilar_batched,
    route_batched,
)
from worldlm.federation.round import run_round
from worldlm.federation.server_opt import ServerOptConfig, make_server_opt
from worldlm.federation.types import FedOptions, NodeState, Split

E = math.e
KINDS = ["weights", "centered", "updates"]


def sims(d: int) -> list[Similarity]:
    """Every kind, at τ = 1 and τ = 0.1, on all elements and on a mask."""
    mask = torch.arange(d) % 3 != 1 if d > 1 else None
    return [Similarity(k, t, m) for k in KINDS for t in (1.0, 0.1) for m in (None, mask)]


def ref_for(sim: Similarity, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor | None:
    return torch.randn(shape, generator=gen, dtype=torch.float64) if sim.kind == "updates" else None


# --------------------------------------------------------------------------------------------------
# batched == naive


@pytest.mark.parametrize(("n_pos", "d", "n_mem"), [(1, 4, 2), (2, 9, 3), (3, 16, 5)])
def test_children_batched_matches_naive_for_every_similarity(n_pos: int, d: int, n_mem: int) -> None:
    gen = torch.Generator().manual_seed(n_pos * 100 + d)
    members = torch.randn(n_mem, n_pos, d, generator=gen, dtype=torch.float64)
    for sim in sims(d):
        for shape in [(n_pos, d), (n_mem, n_pos, d)]:  # a common reference, and one per member
            ref = ref_for(sim, shape, gen)
            pooled, lam = aggregate_children_batched(members, True, sim, ref)
            want_pooled, want_lam = naive.children(members, True, sim, ref)
            torch.testing.assert_close(lam, want_lam, rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(pooled, want_pooled, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("n_pos", "d", "n_res"), [(1, 4, 0), (2, 9, 3), (3, 16, 5)])
def test_with_parent_batched_matches_naive_for_every_similarity(n_pos: int, d: int, n_res: int) -> None:
    gen = torch.Generator().manual_seed(7 + n_res)
    own, parent = (torch.randn(n_pos, d, generator=gen, dtype=torch.float64) for _ in range(2))
    residuals = [(torch.randn(d, generator=gen, dtype=torch.float64), i % n_pos) for i in range(n_res)]
    for sim in sims(d):
        ref = ref_for(sim, (n_pos, d), gen)
        new, lam = aggregate_with_parent_batched(own, parent, residuals, True, sim, ref)
        want_new, want_lam = naive.with_parent(own, parent, residuals, True, sim, ref)
        torch.testing.assert_close(lam, want_lam, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(new, want_new, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(("n_pos", "d", "n_cand"), [(1, 5, 2), (2, 7, 4), (3, 16, 6)])
def test_most_dissimilar_and_route_match_naive_for_every_similarity(n_pos: int, d: int, n_cand: int) -> None:
    gen = torch.Generator().manual_seed(11 * n_cand)
    pooled = torch.randn(n_pos, d, generator=gen, dtype=torch.float64)
    cands = torch.randn(n_cand, n_pos, d, generator=gen, dtype=torch.float64)
    eligible = torch.rand(n_pos, n_cand, generator=gen) > 0.4
    residuals = torch.randn(5, d, generator=gen, dtype=torch.float64)
    positions = torch.tensor([i % n_pos for i in range(5)])
    for sim in sims(d):
        ref = ref_for(sim, (n_pos, d), gen)
        for nu in (1, 2):
            for ok in (None, eligible):
                idx, _ = most_dissimilar_batched(pooled, cands, nu, sim, ref, ok)
                assert idx.tolist() == naive.most_dissimilar(pooled, cands, nu, sim, ref, ok)
        dest, _ = route_batched(residuals, positions, cands, None, sim, ref)
        assert dest.tolist() == naive.route(residuals, positions.tolist(), cands, None, sim, ref)


# --------------------------------------------------------------------------------------------------
# hand-computed cases


def test_centered_removes_what_members_share_and_ignores_the_outlier() -> None:
    # Three members sharing a large common part (the initialisation, the LayerNorm gains): their flattened
    # cosines are all ~1, so the paper's weights are ~uniform. Centred, q and c1 point the same way and c2
    # the opposite way: cos = +1 / -1 exactly (the mean of three vectors on a line through it).
    common = torch.tensor([10.0, 10.0, 10.0], dtype=torch.float64)
    q, c1, c2 = (
        common + torch.tensor([1.0, 0, 0]),
        common + torch.tensor([1.0, 0, 0]),
        common - torch.tensor([2.0, 0, 0]),
    )
    members = torch.stack([q, c1, c2]).unsqueeze(1)  # [M=3, L=1, D=3]
    _, paper = aggregate_children_batched(members)
    assert float(paper[0, 0].max() - paper[0, 0].min()) < 0.02  # inert: 0.333 ± 0.01
    _, lam = aggregate_children_batched(members, sim=Similarity("centered", 0.5))
    # rows by hand: q and c1 score [1, 1, -1] / τ, c2 scores [-1, -1, 1] / τ
    z = 2 * E**2 + E**-2
    torch.testing.assert_close(lam[0, 0], torch.tensor([E**2 / z, E**2 / z, E**-2 / z], dtype=torch.float64))
    z2 = E**2 + 2 * E**-2
    torch.testing.assert_close(lam[0, 2], torch.tensor([E**-2 / z2, E**-2 / z2, E**2 / z2], dtype=torch.float64))


def test_updates_gives_a_member_without_change_similarity_zero() -> None:
    ref = torch.zeros(1, 2, dtype=torch.float64)
    members = torch.tensor([[[0.0, 0.0]], [[1.0, 0.0]], [[0.0, 3.0]]], dtype=torch.float64)  # q unchanged
    _, lam = aggregate_children_batched(members, sim=Similarity("updates"), reference=ref)
    z = E + 2.0  # q's row: [1, 0, 0]; c1's row: [0, 1, cos(c1, c2) = 0]
    torch.testing.assert_close(lam[0, 0], torch.tensor([E / z, 1 / z, 1 / z], dtype=torch.float64))
    torch.testing.assert_close(lam[0, 1], torch.tensor([1 / z, E / z, 1 / z], dtype=torch.float64))
    # step 2: own and parent changed orthogonally since the reference -> [e, 1] / (e + 1)
    own, parent = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 5.0]])
    _, lam2 = aggregate_with_parent_batched(own, parent, sim=Similarity("updates"), reference=torch.zeros(1, 2))
    torch.testing.assert_close(lam2[0], torch.tensor([E / (E + 1), 1 / (E + 1)], dtype=torch.float64))


def test_centered_with_parent_alone_is_minus_one_and_temperature_divides_every_score() -> None:
    own, parent = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 4.0]])
    _, lam = aggregate_with_parent_batched(own, parent, sim=Similarity("centered", 0.25))
    z = E**4 + E**-4  # scores [1, -1] / 0.25
    torch.testing.assert_close(lam[0], torch.tensor([E**4 / z, E**-4 / z], dtype=torch.float64))
    c = float(naive.cos(own[0], parent[0]))
    _, lam_w = aggregate_with_parent_batched(own, parent, sim=Similarity("weights", 0.1))
    z = math.exp(10) + math.exp(10 * c)
    torch.testing.assert_close(lam_w[0], torch.tensor([math.exp(10) / z, math.exp(10 * c) / z], dtype=torch.float64))


def test_masked_out_elements_do_not_change_the_weights() -> None:
    gen = torch.Generator().manual_seed(3)
    members = torch.randn(4, 2, 6, generator=gen, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, False, True])
    other = members.clone()
    other[..., ~mask] = torch.randn(4, 2, 2, generator=gen, dtype=torch.float64) * 100
    for kind in ("weights", "centered"):
        sim = Similarity(kind, 0.5, mask)
        torch.testing.assert_close(
            aggregate_children_batched(members, sim=sim)[1], aggregate_children_batched(other, sim=sim)[1]
        )


@pytest.mark.parametrize("kind", KINDS)
def test_zero_and_identical_vectors_give_no_nan(kind: str) -> None:
    zeros = torch.zeros(3, 2, 4)
    ref = torch.zeros(2, 4) if kind == "updates" else None
    sim = Similarity(kind, 0.05)
    for members in (zeros, torch.ones(3, 2, 4)):  # identical members: every centred vector is zero
        pooled, lam = aggregate_children_batched(members, sim=sim, reference=ref)
        assert not lam.isnan().any() and not pooled.isnan().any()
        new, lam2 = aggregate_with_parent_batched(members[0], members[1], [(members[2, 0], 0)], sim=sim, reference=ref)
        assert not lam2.isnan().any() and not new.isnan().any()
        idx, s = most_dissimilar_batched(members[0], members[1:], 1, sim, ref)
        assert not s.isnan().any() and idx.tolist() == [[0], [0]]
        dest, s2 = route_batched(members[0], torch.tensor([0, 1]), members[1:], None, sim, ref)
        assert not s2.isnan().any() and dest.tolist() == [0, 0]


def test_ineligible_candidates_are_never_picked() -> None:
    pooled = torch.tensor([[1.0, 0.0]])
    cands = torch.tensor([[[-1.0, 0.0]], [[0.0, 1.0]], [[1.0, 0.1]]])  # least similar first: 0, 1, 2
    everyone = most_dissimilar_batched(pooled, cands, 2)[0]
    assert everyone.tolist() == [[0, 1]]
    idx, _ = most_dissimilar_batched(pooled, cands, 2, eligible=torch.tensor([[False, True, True]]))
    assert idx.tolist() == [[1, 2]]
    idx, _ = most_dissimilar_batched(pooled, cands, 2, eligible=torch.tensor([[False, False, True]]))
    assert idx.tolist() == [[2, -1]]


def test_attention_spread_by_hand() -> None:
    uniform = attention_spread(torch.full((2, 4), 0.25))
    assert uniform["max"] == pytest.approx(0.25) and uniform["min"] == pytest.approx(0.25)
    assert uniform["entropy"] == pytest.approx(math.log(4))
    # a masked entry (weight 0, not taking part) counts neither in min nor in the entropy
    w = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    part = torch.tensor([[True, True, False], [True, True, True]])
    got = attention_spread(w, part)
    assert got["max"] == pytest.approx((0.5 + 0.5) / 2) and got["min"] == pytest.approx((0.5 + 0.2) / 2)
    h2 = -(0.2 * math.log(0.2) + 0.3 * math.log(0.3) + 0.5 * math.log(0.5))
    assert got["entropy"] == pytest.approx((math.log(2) + h2) / 2)


def test_bad_similarity_settings_raise() -> None:
    with pytest.raises(ValueError, match="similarity kind"):
        Similarity("cosine")
    with pytest.raises(ValueError, match="temperature"):
        Similarity("weights", 0.0)
    with pytest.raises(ValueError, match="reference"):
        aggregate_children_batched(torch.ones(2, 1, 3), sim=Similarity("updates"))
    with pytest.raises(ValueError, match="mask"):
        aggregate_children_batched(torch.ones(2, 1, 3), sim=Similarity(mask=torch.tensor([True, False])))


# --------------------------------------------------------------------------------------------------
# the engine: a noisy member


def _noisy_run(sim: Similarity, skip: bool, rounds: int = 4) -> tuple[list[dict[str, Any]], dict[str, NodeState]]:
    """Key layers of a1 pure noise after every training; the other leaves learn a shared direction."""
    size, n_pos, d = 6, 2, 24
    split = Split(size, n_pos, d)
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(size + n_pos * d, generator=gen, dtype=torch.float64)
    common = torch.randn(size + n_pos * d, generator=gen, dtype=torch.float64)
    opt = ServerOptConfig(kind="fedavg")
    states = {n: NodeState(init.clone(), make_server_opt(opt) if TREE[n].children else None) for n in TREE.order}

    class Trainer(FakeTrainer):
        def train(self, node: str, params: torch.Tensor, start_step: int, n_steps: int) -> torch.Tensor:
            out = super().train(node, params, start_step, n_steps) + 0.5 * common
            if node == "a1":  # its keys: noise of the same size as the others'
                keys = split.keys(out)
                keys.copy_(
                    torch.randn(keys.shape, generator=gen, dtype=torch.float64) * keys.norm() / keys.numel() ** 0.5
                )
            return out

    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, similarity=sim, skip_outlier_residuals=skip)
    events: list[dict[str, Any]] = []
    trainer = Trainer(size + n_pos * d, scale=0.05)
    for rnd in range(rounds):
        run_round(TREE, states, split, opts, rnd, trainer, events.append)
    return events, states


@pytest.mark.parametrize("kind", ["centered", "updates"])
def test_a_noisy_member_gets_the_lowest_weight_and_an_outlier_event(kind: str) -> None:
    events, states = _noisy_run(Similarity(kind, 0.2), skip=True)
    at_a = [e for e in events if e["event"] == "attention" and e["kind"] == "children" and e["node"] == "A"]
    for e in at_a[1:]:  # every round after the first: a1 (member 1) has the lowest weight in A's own row
        row = torch.tensor(e["weights"])[:, 0].mean(dim=0)
        assert int(row.argmin()) == 1, (e["round"], row)
        assert e["shares"][0] < 0.5 / 2 < e["shares"][1]
    outliers = [e for e in events if e["event"] == "outlier"]
    # at A only a1 (a region carrying a1's keys in its pooled layer may in turn look odd at the root)
    assert {e["member"] for e in outliers if e["node"] == "A"} == {"a1"}
    assert min(int(e["rounds"]) for e in outliers) == 2  # reported once under the threshold 2 aggregations in a row
    assert states["A"].low_rounds["a1"] >= 2
    # skip_outlier_residuals: a1's keys are never carried on once A's attention ignores them
    picked_a1 = [e for e in events if e["event"] == "residual_pick" and e["origin"] == "a1" and e["round"] >= 1]
    assert not picked_a1


def test_the_paper_similarity_picks_the_noisy_member_as_a_residual() -> None:
    events, _ = _noisy_run(Similarity("weights"), skip=False)
    assert any(e["event"] == "residual_pick" and e["origin"] == "a1" for e in events)


# --------------------------------------------------------------------------------------------------
# end to end: config, resume, Flower

SETS = [
    'federation.similarity="updates"',
    'federation.similarity_on="matrices"',
    "federation.temperature=0.1",
    "federation.outlier_weight=0.9",
    "federation.skip_outlier_residuals=true",
]


def test_config_rejects_unknown_similarity_in_one_line(data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, data)
    with pytest.raises(ConfigError, match=r"federation\.similarity 'cosine' is unknown"):
        C.load_config(cfg, ['federation.similarity="cosine"'])
    with pytest.raises(ConfigError, match=r"federation\.temperature"):
        C.load_config(cfg, ["federation.temperature=0"])


@pytest.mark.e2e
def test_updates_similarity_resumes_and_offloads_bitwise(data: Path, tmp_path: Path) -> None:
    full = train_tiny(tmp_path, data, "worldlm", "train.rounds=3", *SETS)
    records = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    spreads = [r for r in records if r.get("event") == "attention"]
    assert spreads and all("spread" in r for r in spreads)
    # resume from the round-2 checkpoint (the reference keys and outlier counts come from it)
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "final")
    for late in sorted((resumed / "checkpoints").glob("round-*"))[-1:]:
        shutil.rmtree(late)
    (resumed / "summary.json").unlink()
    from worldlm.cli import main

    cfg = tiny_config(tmp_path, data)
    args = ["train", str(cfg), "--out", str(resumed), "--quiet", "--resume", "--set", "train.rounds=3"]
    for s in SETS:
        args += ["--set", s]
    assert main(args) == 0
    assert summary_of(resumed) == summary_of(full)
    offloaded = train_tiny(tmp_path, data, "worldlm", "train.rounds=3", "federation.offload_states=true", *SETS)
    assert summary_of(offloaded) == summary_of(full)


# --------------------------------------------------------------------------------------------------
# poisoned nodes (attack) and what the experiment report shows of them


def test_random_token_sampler_and_scaled_update_trainer(data: Path) -> None:
    from worldlm.data.prepared import load_prepared
    from worldlm.data.samplers import BatchSampler
    from worldlm.model import GPT, ParamLayout, gpt_config
    from worldlm.runners.planning import tree_from_config
    from worldlm.runners.trainer import LocalTrainer
    from worldlm.training.loop import ClientOptConfig, Schedule

    prepared = load_prepared(data)
    cfg = C.load_config(tiny_config(data.parent, data), ['attack.nodes=["fr"]', 'attack.kind="random_tokens"'])
    from worldlm.data.mixture import assign_shards

    sizes = {s: prepared.splits[s]["train"].tokens for s in prepared.sources}
    spans = assign_shards(tree_from_config(cfg), sizes, 3, 2)["fr"]
    clean = BatchSampler(prepared, spans, 16, 4, seed=5)
    noisy = BatchSampler(prepared, spans, 16, 4, seed=5, noise_vocab=prepared.vocab_size)
    x, y = noisy.next()
    assert x.shape == (4, 16) and bool((x[:, 1:] == y[:, :-1]).all())
    assert int(x.max()) < prepared.vocab_size and not torch.equal(x, clean.next()[0])
    # scaled_update: the trained change times attack.scale, from the same start
    outs = []
    for scale in (1.0, -10.0):
        torch.manual_seed(0)
        model = GPT(gpt_config("nano", prepared.vocab_size, 16))
        layout = ParamLayout(model, 0)
        trainer = LocalTrainer(model, layout, ClientOptConfig(0.1, 0.9, 0.95, 1.0), Schedule(1e-3, 0.1, 1, 4))
        trainer.add_node("fr", BatchSampler(prepared, spans, 16, 4, seed=5), update_scale=scale)
        start = layout.flatten(model)
        outs.append((start, trainer.train("fr", start, 0, 2)))
    (start, honest), (_, attacked) = outs
    torch.testing.assert_close(attacked, start - 10.0 * (honest - start))


def test_attack_config_errors_are_one_line(data: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, data)
    with pytest.raises(ConfigError, match=r"attack\.nodes names 'xx'"):
        C.load_config(cfg, ['attack.nodes=["xx"]'])
    with pytest.raises(ConfigError, match=r"attack\.kind 'flip' is unknown"):
        C.load_config(cfg, ['attack.kind="flip"'])


@pytest.mark.e2e
def test_report_shows_clean_nodes_shares_and_outliers(data: Path, tmp_path: Path) -> None:
    from worldlm.cli import main

    tiny_config(tmp_path, data)  # writes worldlm.toml beside the experiment
    experiment = tmp_path / "robust.toml"
    experiment.write_text(
        """
name = "robust"
base = "worldlm.toml"
methods = ["worldlm"]
seeds = [0]
set = ["train.rounds=3", "train.local_steps=2", "train.threads=1", 'federation.similarity="updates"',
       "federation.temperature=0.05", "federation.outlier_weight=0.99", "federation.outlier_rounds=1"]

[variants.clean]

[variants.noise]
set = ['attack.nodes=["fr"]', 'attack.kind="scaled_update"', "attack.scale=-10.0"]
"""
    )
    out_root = tmp_path / "results"
    assert main(["experiment", str(experiment), "--out-root", str(out_root), "--quiet"]) == 0
    report = json.loads((out_root / "robust" / "report.json").read_text())
    md = (out_root / "robust" / "report.md").read_text()
    for variant in ("clean", "noise"):
        v = report["variants"][variant]
        wl = v["methods"]["worldlm"]
        clean_nodes = [n for n in wl["nodes"] if n != "fr"]
        assert wl["mean_ppl_clean"] == pytest.approx(sum(wl["nodes"][n] for n in clean_nodes) / len(clean_nodes))
        edges = {r["edge"]: r for r in v["attention"]}
        assert set(edges) == {"fr-it → fr", "fr-it → it", "uk-ru → uk", "uk-ru → ru", "root → fr-it", "root → uk-ru"}
        assert all(r["uniform"] == 0.5 for r in edges.values())
        assert all(r["share_min"] <= r["share_last"] + 1e-12 for r in edges.values())  # the last round is counted
        siblings = edges["fr-it → fr"]["share_last"] + edges["fr-it → it"]["share_last"]
        assert siblings == pytest.approx(1.0)
    # with a threshold of 0.99 x 1/C nearly every child is flagged somewhere: the count is what the events say
    runs = out_root / "robust" / "runs" / "noise" / "worldlm" / "seed0" / "metrics.jsonl"
    flagged = [json.loads(x) for x in runs.read_text().splitlines() if '"outlier"' in x]
    fr = report["variants"]["noise"]["attention"]
    want = sum(1 for e in flagged if e["node"] == "fr-it" and e["member"] == "fr")
    assert next(r for r in fr if r["edge"] == "fr-it → fr")["outlier_rounds"] == want
    assert "nodes that no variant attacks or privatises" in md and "| fr-it → fr |" in md
