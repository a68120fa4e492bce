"""Node-level differential privacy (paper §4.2): DPFedAvg clipping and noise, bounds, accountant."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.rdp import RdpAccountant
from torch import Tensor

from tiny import TREE, FakeTrainer, make_prepared, states_for, tiny_config
from worldlm.cli import main
from worldlm.config import dumps, load_config
from worldlm.data.prepared import load_prepared
from worldlm.data.samplers import PoissonWindows
from worldlm.errors import ConfigError
from worldlm.federation.round import run_round
from worldlm.federation.server_opt import ServerOptConfig
from worldlm.federation.types import FedOptions, NodeState, Residual, Split, Update
from worldlm.privacy.node import (
    DPSettings,
    Privacy,
    apply_difference,
    clip_to_norm,
    gaussian_epsilon,
    message_difference,
    privatize_vector,
)
from worldlm.runners.planning import make_privacy, make_record_dp, node_sampler, record_dp_nodes, set_up

SPLIT = Split(3, 2, 4)  # backbone 3 values, 2 key layers of 4
SIZE = 3 + 2 * 4


def privacy_for(nodes: dict[str, str], **settings: float | str) -> Privacy:
    return Privacy(DPSettings(**settings), nodes, {n: 1000 + i for i, n in enumerate(nodes)})  # type: ignore[arg-type]


def update_with_norm(received: Tensor, norm: float, seed: int) -> Update:
    direction = torch.randn(SIZE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return Update(received + norm * direction / direction.norm(), [])


# ---------------------------------------------------------------------------- clipping and noise


def test_clipped_norms_never_exceed_the_bound() -> None:
    gen = torch.Generator().manual_seed(0)
    for bound in (1e-3, 0.5, 1.0, 7.0):
        for scale in (1e-4, 0.1, 1.0, 10.0, 1e4):
            diff = scale * torch.randn(1000, generator=gen)
            clipped, raw = clip_to_norm(diff, bound)
            assert raw == pytest.approx(float(diff.double().norm()))
            assert float(clipped.double().norm()) <= bound * (1 + 1e-6)
            if raw <= bound:  # inside the ball: untouched
                assert torch.equal(clipped, diff)
    zero, raw = clip_to_norm(torch.zeros(5), 1.0)
    assert raw == 0.0 and torch.equal(zero, torch.zeros(5))


def test_noise_standard_deviation_is_sigma_times_clip() -> None:
    gen = torch.Generator().manual_seed(1)
    n, sigma, bound = 200_000, 0.5, 2.0
    diff = torch.full((n,), 10.0, dtype=torch.float64)  # far outside the ball: clipped to norm 2
    private, raw = privatize_vector(diff, bound, sigma, gen)
    noise = private - diff * (bound / raw)
    # sample std of n Gaussians: relative standard error 1/sqrt(2n) ≈ 0.16%; allow 5 of them
    assert float(noise.std()) == pytest.approx(sigma * bound, rel=5 / math.sqrt(2 * n))
    assert abs(float(noise.mean())) < 5 * sigma * bound / math.sqrt(n)


def test_message_difference_and_apply_difference_are_inverse_with_residuals() -> None:
    gen = torch.Generator().manual_seed(2)
    received = torch.randn(SIZE, generator=gen)
    residuals = [Residual(torch.randn(4, generator=gen), pos, "x") for pos in (1, 0, 1)]
    update = Update(torch.randn(SIZE, generator=gen), residuals)
    diff = message_difference(update, received, SPLIT, share_keys=True)
    assert diff.numel() == SIZE + 3 * 4
    assert torch.allclose(diff[SIZE:], torch.cat([r.vector - SPLIT.keys(received)[r.position] for r in residuals]))
    back = apply_difference(update, received, diff, SPLIT, share_keys=True)
    assert torch.allclose(back.params, update.params)
    assert [(r.position, r.origin) for r in back.residuals] == [(r.position, r.origin) for r in residuals]
    assert all(torch.allclose(a.vector, b.vector) for a, b in zip(back.residuals, residuals, strict=True))
    # FedPer: key layers never leave the node, so they are neither in the difference nor in the message
    personal = message_difference(update, received, SPLIT, share_keys=False)
    assert personal.numel() == 3 + 3 * 4
    msg = apply_difference(Update(update.params, []), received, personal[:3], SPLIT, share_keys=False)
    assert torch.equal(SPLIT.keys(msg.params), SPLIT.keys(received))


def test_release_is_received_plus_clipped_noisy_difference() -> None:
    priv = privacy_for({"a": "P"}, sigma=0.5, clip="fixed", initial_clip=1.0)
    received = torch.zeros(SIZE, dtype=torch.float64)
    raw = update_with_norm(received, 3.0, seed=0)
    released = priv.release("a", raw, received, SPLIT, share_keys=True)
    assert released is not None and not torch.equal(released.params, raw.params)
    expected_noise = 0.5 * torch.randn(SIZE, generator=torch.Generator().manual_seed(1000), dtype=torch.float64)
    assert torch.allclose(released.params - raw.params / 3.0, expected_noise)  # clip 3 -> 1, then N(0, 0.25)


# ---------------------------------------------------------------------------- clip bounds


def test_median_bound_is_the_previous_rounds_median_of_raw_norms() -> None:
    priv = privacy_for({"a": "P", "b": "P", "c": "P", "d": "Q"})
    received = torch.zeros(SIZE, dtype=torch.float64)
    norms = {"a": 3.0, "b": 10.0, "c": 5.0, "d": 0.25}
    for i, (node, norm) in enumerate(norms.items()):
        priv.release(node, update_with_norm(received, norm, i), received, SPLIT, share_keys=True)
    assert priv.clip == {"P": 1.0, "Q": 1.0}  # the first round uses 1.0 (paper §4.2)
    priv.end_round()
    assert priv.clip["P"] == pytest.approx(statistics.median([3.0, 10.0, 5.0]))  # per parent
    assert priv.clip["Q"] == pytest.approx(0.25)
    priv.release("a", update_with_norm(received, 100.0, 9), received, SPLIT, share_keys=True)
    assert priv.last_clip["a"] == pytest.approx(5.0)
    priv.end_round()
    assert priv.clip["P"] == pytest.approx(100.0)  # the previous round only
    assert priv.clip["Q"] == pytest.approx(0.25)  # no release at Q: bound kept


def test_fixed_bound_stays() -> None:
    priv = privacy_for({"a": "P"}, clip="fixed", initial_clip=2.5)
    received = torch.zeros(SIZE, dtype=torch.float64)
    priv.release("a", update_with_norm(received, 10.0, 0), received, SPLIT, share_keys=True)
    priv.end_round()
    assert priv.clip["P"] == 2.5


def test_adaptive_bound_follows_the_geometric_quantile_update() -> None:
    # nearly noiseless bits make b̄ exact: Andrew et al. 2021, C <- C exp(-eta (b̄ - gamma))
    priv = privacy_for({"a": "P", "b": "P"}, clip="adaptive", bit_sigma=1e-12, clip_lr=0.2, target_quantile=0.5)
    received = torch.zeros(SIZE, dtype=torch.float64)
    for i, node in enumerate(("a", "b")):  # both far above C = 1: b̄ = 0, the bound grows
        priv.release(node, update_with_norm(received, 50.0, i), received, SPLIT, share_keys=True)
    priv.end_round()
    assert priv.clip["P"] == pytest.approx(math.exp(0.2 * 0.5))
    grown = priv.clip["P"]
    for i, node in enumerate(("a", "b")):  # both under C: b̄ = 1, the bound shrinks
        priv.release(node, update_with_norm(received, 0.01, i), received, SPLIT, share_keys=True)
    priv.end_round()
    assert priv.clip["P"] == pytest.approx(grown * math.exp(-0.2 * 0.5))
    # each release is two Gaussian mechanisms: the update (sigma) and the bit (2 sigma_b), both accounted
    assert priv.accountants["a"].ledger == [(0.5, 1), (2e-12, 1), (0.5, 1), (2e-12, 1)]


def test_adaptive_bound_converges_to_the_target_quantile_with_noisy_bits() -> None:
    nodes = {f"n{i}": "P" for i in range(20)}
    priv = privacy_for(nodes, clip="adaptive", bit_sigma=0.5, clip_lr=0.2, target_quantile=0.5)
    received = torch.zeros(SIZE, dtype=torch.float64)
    norms = [float(v) for v in torch.linspace(1.0, 20.0, 20)]  # median 10.5
    for _ in range(150):
        for i, node in enumerate(nodes):
            priv.release(node, update_with_norm(received, norms[i], i), received, SPLIT, share_keys=True)
        priv.end_round()
    assert 5.0 < priv.clip["P"] < 16.0


# ---------------------------------------------------------------------------- accountant


def test_epsilon_matches_dp_accounting_called_directly() -> None:
    sigma, delta, rounds = 0.8, 1e-6, 7
    priv = privacy_for({"a": "P"}, sigma=sigma, delta=delta)
    received = torch.zeros(SIZE, dtype=torch.float64)
    for r in range(rounds):
        priv.release("a", update_with_norm(received, 1.0, r), received, SPLIT, share_keys=True)
    reference = RdpAccountant()
    for _ in range(rounds):
        reference.compose(dp_accounting.GaussianDpEvent(sigma))
    assert priv.epsilon("a") == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert gaussian_epsilon([(sigma, rounds)], delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert gaussian_epsilon([], delta) == 0.0
    assert priv.records()[0] == {
        "node": "a",
        "epsilon": priv.epsilon("a"),
        "delta": delta,
        "sigma": sigma,
        "clip": 1.0,
        "releases": rounds,
        "stopped": False,
    }


def test_budget_stops_releases() -> None:
    budget = (gaussian_epsilon([(0.5, 2)], 1e-5) + gaussian_epsilon([(0.5, 3)], 1e-5)) / 2
    priv = privacy_for({"a": "P"}, epsilon_budget=budget)
    received = torch.zeros(SIZE, dtype=torch.float64)
    out = [priv.release("a", update_with_norm(received, 1.0, r), received, SPLIT, share_keys=True) for r in range(5)]
    assert [u is not None for u in out] == [True, True, False, False, False]
    assert priv.epsilon("a") <= budget and priv.releases["a"] == 2 and priv.stopped == {"a"}
    assert len(priv.events) == 1 and priv.events[0]["event"] == "dp_budget_exhausted"


# ---------------------------------------------------------------------------- the engine


class Spy:
    """A Privacy that records what the engine hands it and what it releases."""

    def __init__(self, inner: Privacy) -> None:
        self.inner = inner
        self.calls: list[tuple[str, Update, Update | None]] = []

    def applies(self, node: str) -> bool:
        return self.inner.applies(node)

    def release(self, node: str, update: Update, received: Tensor, split: Split, share_keys: bool) -> Update | None:
        out = self.inner.release(node, update, received, split, share_keys)
        self.calls.append((node, update, out))
        return out

    def combine(self, parent: str, senders: list[str], updates: list[Update], *rest: object) -> list[Update]:
        return self.inner.combine(parent, senders, updates, *rest)  # type: ignore[arg-type]


def one_round(privacy: Spy | None, opts: FedOptions) -> tuple[dict[str, NodeState], list[dict[str, object]]]:
    states = states_for(TREE, SIZE, ServerOptConfig(kind="fedavg"))
    events: list[dict[str, object]] = []
    trainer = FakeTrainer(SIZE, scale=1.0)
    for rnd in range(2):
        run_round(TREE, states, SPLIT, opts, rnd, trainer, events.append, privacy)
        if privacy is not None:
            privacy.inner.end_round()
    return states, events


def test_dp_nodes_release_privatised_tensors_and_other_nodes_are_untouched() -> None:
    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, nu=1)
    _, plain_events = one_round(None, opts)
    spy = Spy(privacy_for({"a1": "A", "a2": "A", "B": "root"}))  # two leaves and a region (it sends residuals)
    _, private_events = one_round(spy, opts)
    assert sorted({node for node, _, _ in spy.calls}) == ["B", "a1", "a2"]  # only DP nodes, every visit
    for node, raw, released in spy.calls:
        assert released is not None
        assert not torch.equal(SPLIT.backbone(raw.params), SPLIT.backbone(released.params))
        assert not torch.equal(SPLIT.keys(raw.params), SPLIT.keys(released.params))
        assert len(raw.residuals) == len(released.residuals) == (2 if node == "B" else 0)  # nu x L picks of B
        assert all(not torch.equal(a.vector, b.vector) for a, b in zip(raw.residuals, released.residuals, strict=True))

    # byte counts are unchanged: noise adds no values on the wire (round 0: routing has not diverged yet)
    def edges(events: list[dict[str, object]]) -> list[dict[str, object]]:
        return [e for e in events if e["event"] == "edge" and e["round"] == 0]

    assert edges(plain_events) == edges(private_events)


def test_non_dp_subtree_is_bit_for_bit_a_run_without_dp() -> None:
    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, nu=1)
    states = {k: states_for(TREE, SIZE, ServerOptConfig(kind="fedavg")) for k in ("plain", "dp")}
    spy = Spy(privacy_for({"a1": "A", "a2": "A"}))
    run_round(TREE, states["plain"], SPLIT, opts, 0, FakeTrainer(SIZE), lambda e: None)
    run_round(TREE, states["dp"], SPLIT, opts, 0, FakeTrainer(SIZE), lambda e: None, spy)
    for n in ("B", "b1", "b2", "a1", "a2"):  # region B's subtree; DP leaves keep their raw own state
        assert torch.equal(states["plain"][n].params, states["dp"][n].params), n
    assert not torch.equal(states["plain"]["A"].params, states["dp"]["A"].params)  # A aggregated released updates
    # a privacy object that applies to nobody changes nothing at all
    nobody = {k: states_for(TREE, SIZE, ServerOptConfig(kind="fedavg")) for k in ("plain", "dp")}
    for rnd in range(2):
        run_round(TREE, nobody["plain"], SPLIT, opts, rnd, FakeTrainer(SIZE), lambda e: None)
        run_round(TREE, nobody["dp"], SPLIT, opts, rnd, FakeTrainer(SIZE), lambda e: None, privacy_for({}))
    assert all(torch.equal(nobody["plain"][n].params, nobody["dp"][n].params) for n in TREE.order)


def test_spent_budget_leaves_the_node_out_of_its_parents_aggregation() -> None:
    budget = gaussian_epsilon([(0.5, 1)], 1e-5) * 1.01  # exactly one release
    priv = privacy_for({"a1": "A"}, epsilon_budget=budget)
    states = states_for(TREE, SIZE, ServerOptConfig(kind="fedavg"))
    events: list[dict[str, object]] = []
    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, nu=1)
    for rnd in range(3):
        run_round(TREE, states, SPLIT, opts, rnd, FakeTrainer(SIZE), events.append, priv)
        priv.end_round()
    withheld = [e for e in events if e["event"] == "dp_withheld"]
    assert [(e["round"], e["node"], e["parent"]) for e in withheld] == [(1, "a1", "A"), (2, "a1", "A")]
    edges = {(e["round"], e["src"]) for e in events if e["event"] == "edge"}
    assert (0, "a1") in edges and (1, "a1") not in edges and (1, "a2") in edges
    members = [
        e["members"] for e in events if e["event"] == "attention" and e["kind"] == "children" and e["node"] == "A"
    ]
    assert members == [["A", "a1", "a2"], ["A", "a2"], ["A", "a2"]]


# ---------------------------------------------------------------------------- config and runs


DP_LEAVES = 'dp.nodes=["fr", "it"]'


def test_dp_config_validation(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "worldlm")
    assert load_config(cfg, [DP_LEAVES]).dp.nodes == ["fr", "it"]
    for bad, message in (
        ('dp.nodes=["fx"]', "not a tree node"),
        ('dp.nodes=["root"]', "is the root"),
        ("dp.clip=mean", "dp.clip"),
        ("dp.sigma=0", "dp.sigma"),
        ("dp.delta=1.5", "dp.delta"),
        ("dp.epsilon_budget=-1", "epsilon_budget"),
        ("dp.target_quantile=1", "target_quantile"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(cfg, [bad])
    assert load_config(cfg, ['dp.nodes=["root"]', "method=fl"]).dp.nodes == ["root"]  # FL: the root is a client


def run(tmp: Path, cfg: Path, name: str, *sets: str, resume: bool = False) -> Path:
    """`worldlm train` with one local step per visit (the CPU is shared: keep end-to-end runs short)."""
    out = tmp / name
    args = ["train", str(cfg), "--out", str(out), "--quiet", "--set", "train.local_steps=1"]
    args += ["--resume"] if resume else []
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return out


def records(out: Path) -> list[dict[str, object]]:
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        r.pop("seconds", None)
        r.pop("tokens_per_s", None)
    return recs


def summary(out: Path) -> dict[str, object]:
    s = json.loads((out / "summary.json").read_text())
    s.pop("wall_seconds")
    return dict(s)


def dp_leaves_config(tmp: Path, data: Path, method: str) -> Path:
    """The tiny tree with the node flag form: dp = true on the [[tree.nodes]] entries of fr and it."""
    cfg = tiny_config(tmp, data, method)
    text = cfg.read_text()
    for leaf in ("fr", "it"):
        text = text.replace(f'name = "{leaf}"\n', f'name = "{leaf}"\ndp = true\n')
    cfg.write_text(text)
    return cfg


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory: pytest.TempPathFactory, data: Path) -> tuple[Path, Path]:
    """A 2-round WorldLM run with DP on two leaves (default median clipping); (config, run directory)."""
    tmp = tmp_path_factory.mktemp("dprun")
    cfg = dp_leaves_config(tmp, data, "worldlm")
    return cfg, run(tmp, cfg, "dp")


def check_privacy_outputs(out: Path) -> None:
    rounds = int(str(summary(out)["rounds"]))  # FL (A.1.2) runs depth x as many rounds as WorldLM
    expected = gaussian_epsilon([(0.5, rounds)], 1e-5)  # one release per round
    priv = summary(out)["privacy"]
    assert isinstance(priv, dict) and priv["delta"] == 1e-5
    assert priv["epsilon"] == pytest.approx({"fr": expected, "it": expected})
    per_round = [r for r in records(out) if r.get("event") == "privacy"]
    assert [(r["round"], r["node"]) for r in per_round] == [(k, n) for k in range(rounds) for n in ("fr", "it")]
    assert per_round[0]["epsilon"] == pytest.approx(gaussian_epsilon([(0.5, 1)], 1e-5))
    assert per_round[0]["clip"] == 1.0 and per_round[0]["sigma"] == 0.5 and per_round[0]["delta"] == 1e-5
    assert per_round[2]["clip"] != 1.0  # round 2 clips at the median of round 1's norms
    assert "dp = true" in (out / "config.toml").read_text()


@pytest.mark.e2e
def test_end_to_end_worldlm_with_dp_on_two_leaves_reports_epsilon(dp_run: tuple[Path, Path]) -> None:
    check_privacy_outputs(dp_run[1])


@pytest.mark.e2e
def test_end_to_end_fl_with_dp_on_two_clients_reports_epsilon(tmp_path: Path, data: Path) -> None:
    out = run(tmp_path, dp_leaves_config(tmp_path, data, "fl"), "fl")
    assert summary(out)["rounds"] == 3 * 2
    check_privacy_outputs(out)


def test_config_of_a_run_without_dp_has_no_dp_section(tmp_path: Path, data: Path) -> None:
    plain = load_config(tiny_config(tmp_path, data, "worldlm"))
    assert "[dp]" not in dumps(plain) and "dp = false" in dumps(plain)  # configs without DP write no [dp] table
    assert "[dp]" in dumps(load_config(tiny_config(tmp_path, data, "worldlm"), [DP_LEAVES]))


@pytest.mark.e2e
def test_budget_stops_a_node_in_a_run_and_says_so_once(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, data, "worldlm")
    budget = (gaussian_epsilon([(0.5, 1)], 1e-5) + gaussian_epsilon([(0.5, 2)], 1e-5)) / 2
    out = run(tmp_path, cfg, "budget", DP_LEAVES, f"dp.epsilon_budget={budget}")
    err = capsys.readouterr().err
    assert err.count("stops releasing") == 2 and "'fr'" in err and "'it'" in err  # once per node
    recs = records(out)
    stops = [r for r in recs if r.get("event") == "dp_budget_exhausted"]
    assert [(r["round"], r["node"]) for r in stops] == [(1, "fr"), (1, "it")]
    withheld = [(r["round"], r["node"]) for r in recs if r.get("event") == "dp_withheld"]
    assert withheld == [(1, "fr"), (1, "it")]
    priv = summary(out)["privacy"]
    assert isinstance(priv, dict) and priv["stopped"] == ["fr", "it"] and priv["releases"] == {"fr": 1, "it": 1}
    assert max(priv["epsilon"].values()) <= budget


@pytest.mark.e2e
def test_dp_run_resumed_from_a_checkpoint_equals_the_uninterrupted_run(
    tmp_path: Path, dp_run: tuple[Path, Path]
) -> None:
    cfg, reference = dp_run
    # a run killed after its round-1 checkpoint: the reference directory as it stood then
    killed = tmp_path / "killed"
    shutil.copytree(reference, killed)
    shutil.rmtree(killed / "checkpoints" / "round-0002")
    shutil.rmtree(killed / "checkpoints" / "final")
    (killed / "summary.json").unlink()
    resumed = run(tmp_path, cfg, "killed", resume=True)
    assert summary(resumed) == summary(reference)  # noise RNG, clip bounds and ledgers came back
    assert records(resumed) == records(reference)


@pytest.mark.parametrize("clip", ["median", "adaptive"])
def test_privacy_state_dict_round_trip_continues_identically(clip: str) -> None:
    nodes = {"a": "P", "b": "P"}
    received = torch.zeros(SIZE, dtype=torch.float64)

    def step(priv: Privacy, r: int) -> list[Tensor]:
        out = [
            priv.release(n, update_with_norm(received, 2.0 + i, r), received, SPLIT, True) for i, n in enumerate(nodes)
        ]
        priv.end_round()
        return [u.params for u in out if u is not None]

    first = privacy_for(nodes, clip=clip)
    step(first, 0)
    tensors, state = first.state_dict()
    state = json.loads(json.dumps(state))  # as the checkpoint stores it
    second = privacy_for(nodes, clip=clip)
    second.load_state_dict(tensors, state)
    for r in (1, 2):
        assert all(torch.equal(x, y) for x, y in zip(step(first, r), step(second, r), strict=True))
    assert first.clip == second.clip and first.epsilon("a") == second.epsilon("a")


@pytest.mark.parametrize("clip", ["median", "adaptive"])
def test_bounds_moved_along_edges_equal_end_round(clip: str) -> None:
    """The Flower runner's form: each DP node and its parent in its own process (its own Privacy), the
    statistics of a release going up with it, the parent's bound coming down with its model, a checkpoint
    of the parent between rounds and a parent visited twice a round; the bounds are end_round's."""
    nodes = {"a": "P", "b": "P"}
    received = torch.zeros(SIZE, dtype=torch.float64)
    one = privacy_for(nodes, clip=clip)  # the in-process runner: one object, end_round after every round
    procs = {n: privacy_for(nodes, clip=clip) for n in (*nodes, "P")}  # one per process
    for rnd in range(4):
        for visit in range(2):  # two visits of P per round (a parent's own sub-rounds above it)
            procs["P"].begin("P", rnd)
            for i, n in enumerate(nodes):
                update = update_with_norm(received, 0.5 + 3 * i + rnd + visit, 10 * rnd + i)
                expected = one.release(n, update, received, SPLIT, True)
                procs[n].set_bound(n, procs["P"].clip["P"])
                got = procs[n].release(n, update, received, SPLIT, True)
                assert expected is not None and got is not None and torch.equal(got.params, expected.params)
                procs["P"].note("P", rnd, *procs[n].drain(n))
        one.end_round()
        tensors, state = procs["P"].state_dict()  # the parent's process restarts between rounds
        procs["P"] = privacy_for(nodes, clip=clip)
        procs["P"].load_state_dict(tensors, json.loads(json.dumps(state)))
    procs["P"].begin("P", 4)
    assert procs["P"].clip == one.clip and one.clip["P"] != 1.0


# ---------------------------------------------------------------------------- central noise


def test_central_noise_is_one_draw_on_the_sum_of_clipped_updates() -> None:
    settings = DPSettings(sigma=0.5, clip="fixed", initial_clip=1.0, noise="central")
    priv = Privacy(settings, {"a": "P", "b": "P"}, {"a": 1, "b": 2}, {"P": 7})
    sent = torch.zeros(SIZE, dtype=torch.float64)
    raw = {"a": update_with_norm(sent, 3.0, seed=0), "b": update_with_norm(sent, 0.5, seed=1)}
    released = {n: priv.release(n, u, sent, SPLIT, share_keys=True) for n, u in raw.items()}
    # a DP child sends its clipped update only (no noise of its own): a clipped to 1, b under the bound
    assert released["a"] is not None and released["b"] is not None
    torch.testing.assert_close(released["a"].params, raw["a"].params / 3.0)
    torch.testing.assert_close(released["b"].params, raw["b"].params)
    other = Update(torch.full((SIZE,), 9.0, dtype=torch.float64), [])  # a non-DP sibling passes untouched
    out = priv.combine("P", ["a", "c", "b"], [released["a"], other, released["b"]], sent, SPLIT, True)
    noise = 0.5 * torch.randn(SIZE, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    group = (raw["a"].params / 3.0 + raw["b"].params + noise) / 2  # (Σ clip(d_i) + N(0, σ²C²)) / n
    torch.testing.assert_close(out[0].params, group)
    torch.testing.assert_close(out[2].params, group)
    assert out[1] is other
    # accounting: each DP child ran one Gaussian mechanism with multiplier σ, as under local noise
    local = privacy_for({"a": "P"}, sigma=0.5, clip="fixed", initial_clip=1.0)
    local.release("a", raw["a"], sent, SPLIT, share_keys=True)
    assert priv.epsilon("a") == pytest.approx(local.epsilon("a"))


@pytest.mark.e2e
def test_central_noise_needs_leaf_dp_nodes_and_runs(tmp_path: Path) -> None:
    data = make_prepared(tmp_path / "data")
    cfg = tiny_config(tmp_path, data)
    with pytest.raises(ConfigError, match=r"dp\.noise = 'central' needs DP nodes that are leaves, but fr-it"):
        load_config(cfg, ["dp.nodes=['fr-it']", 'dp.noise="central"'])
    out = tmp_path / "central"
    args = [
        "train",
        str(cfg),
        "--out",
        str(out),
        "--quiet",
        "--set",
        "dp.nodes=['fr', 'it']",
        "--set",
        'dp.noise="central"',
    ]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["privacy"]["epsilon"]) == {"fr", "it"} and summary["privacy"]["epsilon"]["fr"] > 0


# ---------------------------------------------------------------------------- noise only its owner knows


def _generators(cfg_path: Path, data: Path, *sets: str) -> dict[str, Tensor]:
    """The initial state of every noise generator and DP record sampler a runner builds for this config."""
    cfg = load_config(cfg_path, list(sets))
    prepared = load_prepared(data)
    setup = set_up(cfg, prepared)
    fed = setup.feds[0]
    out: dict[str, Tensor] = {}
    privacy = make_privacy(cfg, fed)
    if privacy is not None:
        out |= {f"noise/{n}": g.get_state() for n, g in privacy.generators.items()}
        out |= {f"central/{p}": g.get_state() for p, g in privacy.central_generators.items()}
    for name in record_dp_nodes(cfg):
        sampler = node_sampler(cfg, prepared, fed, name)
        assert isinstance(sampler, PoissonWindows)
        out[f"sampler/{name}"] = torch.tensor(sampler.rng.integers(0, 2**62, 4))
        out[f"dp-sgd/{name}"] = make_record_dp(cfg, fed, name, sampler, setup.rounds).gen.get_state()
    return out


@pytest.mark.parametrize("sets", [['dp.noise="central"'], ['dp.unit="record"']])
def test_privacy_generators_are_secret_unless_reproducible(tmp_path: Path, data: Path, sets: list[str]) -> None:
    cfg = dp_leaves_config(tmp_path, data, "worldlm")
    # what whoever holds the run config could rebuild: the generators seeded from the public seed
    public = _generators(cfg, data, *sets, "dp.reproducible_noise=true")
    again = _generators(cfg, data, *sets, "dp.reproducible_noise=true")  # the explicit experiment setting
    assert all(torch.equal(public[k], again[k]) for k in public)
    first, second = _generators(cfg, data, *sets), _generators(cfg, data, *sets)
    assert set(first) == set(public) and len(first) >= 3
    for key in first:  # by default no generator can be regenerated, nor does it repeat between runs
        assert not torch.equal(first[key], public[key]), key
        assert not torch.equal(first[key], second[key]), key


@pytest.mark.e2e
def test_two_runs_release_different_noise_and_summary_says_which(
    tmp_path: Path, data: Path, dp_run: tuple[Path, Path]
) -> None:
    cfg, first = dp_run
    second = run(tmp_path, cfg, "again")
    released = [r for r in records(first) if r.get("event") == "privacy"]
    assert released == [r for r in records(second) if r.get("event") == "privacy"]  # the same accounting ...
    assert summary(first)["nodes"] != summary(second)["nodes"]  # ... but other noise: other models
    assert summary(first)["privacy"]["reproducible_noise"] is False  # type: ignore[index]
    a = run(tmp_path, cfg, "public-a", "dp.reproducible_noise=true")
    b = run(tmp_path, cfg, "public-b", "dp.reproducible_noise=true")
    assert summary(a) == summary(b) and summary(a)["privacy"]["reproducible_noise"] is True  # type: ignore[index]


def test_deployments_warn_about_reproducible_noise(
    tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = dp_leaves_config(tmp_path, data, "worldlm")
    args = ["flower-app", str(cfg), "--out", str(tmp_path / "app"), "--run-out", str(tmp_path / "run")]
    assert main(args) == 0
    assert "reproducible_noise" not in capsys.readouterr().err
    assert main([*args, "--set", "dp.reproducible_noise=true"]) == 0
    err = capsys.readouterr().err
    assert err.count("dp.reproducible_noise = true") == 1 and "regenerate" in err
