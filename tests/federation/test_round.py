"""The WorldLM round (Algorithm 1) against hand-computed expectations and the baselines it must reduce to."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tiny import TREE, FakeTrainer, states_for, tiny_config, train_tiny
from worldlm.cli import main
from worldlm.federation.round import deployed_models, run_round, sequential_span, trainings_per_round
from worldlm.federation.server_opt import ServerOptConfig, make_server_opt
from worldlm.federation.steps import initial_child_keys, route_pending
from worldlm.federation.tree import flat_tree
from worldlm.federation.types import FedOptions, NodeState, Residual, Split, Update


def test_flat_tree_without_keys_is_fedavgm_by_hand() -> None:
    flat = flat_tree(TREE)
    size, steps = 6, 3
    opt = ServerOptConfig(kind="fedavgm", lr=1.0, momentum=0.9)
    states = states_for(flat, size, opt)
    trainer = FakeTrainer(size)
    opts = FedOptions(local_steps={n: 0 if n == flat.root else steps for n in flat.order})
    split = Split(size, 0, 0)
    server, momentum = states[flat.root].params.clone(), torch.zeros(size, dtype=torch.float64)
    for rnd in range(3):
        run_round(flat, states, split, opts, rnd, trainer, lambda e: None)
        # by hand: every client starts from the server model, trains, the server averages Δ with momentum 0.9
        clients = [server + 0.1 * steps * trainer.directions[c] for c in flat[flat.root].children]
        delta = torch.stack([c - server for c in clients]).mean(0)
        momentum = 0.9 * momentum + delta
        server = server + momentum
        assert torch.allclose(states[flat.root].params, server, atol=1e-12)
    deployed = dict(deployed_models(flat, states, split, opts))
    assert all(torch.equal(deployed[c], server) for c in flat.order)  # FL: everyone gets the global model


def test_sequential_clock_is_shared_across_levels() -> None:
    size, s = 4, 5
    states = states_for(TREE, size, ServerOptConfig(kind="fedavg"))
    trainer = FakeTrainer(size)
    opts = FedOptions(local_steps={n: s for n in TREE.order})
    for rnd in range(2):
        run_round(TREE, states, Split(size, 0, 0), opts, rnd, trainer, lambda e: None)
    starts = {(node, start) for node, start, _ in trainer.calls}
    for rnd in range(2):
        base = rnd * 3 * s
        assert {
            ("root", base),
            ("A", base + s),
            ("B", base + s),
            ("a1", base + 2 * s),
            ("b2", base + 2 * s),
        } <= starts


def test_hierarchical_backbone_by_hand_fedavg() -> None:
    size = 5
    states = states_for(TREE, size, ServerOptConfig(kind="fedavg", lr=1.0))
    trainer = FakeTrainer(size)
    init = states["root"].params.clone()
    run_round(
        TREE,
        states,
        Split(size, 0, 0),
        FedOptions(local_steps={n: 1 for n in TREE.order}),
        0,
        trainer,
        lambda e: None,
    )
    d = {n: 0.1 * trainer.directions[n] for n in TREE.order}
    root = init + d["root"]
    region_a = root + d["A"]
    new_a = region_a + ((region_a + d["a1"]) + (region_a + d["a2"])) / 2 - region_a
    region_b = root + d["B"]
    new_b = region_b + (d["b1"] + d["b2"]) / 2
    assert torch.allclose(states["A"].params, new_a)
    assert torch.allclose(states["root"].params, (new_a + new_b) / 2)


def keyed_split(backbone: int, blocks: int, key: int) -> Split:
    return Split(backbone, blocks, key)


def test_residuals_selected_sent_up_and_routed_away_from_origin() -> None:
    split = keyed_split(3, 2, 4)
    size = 3 + 2 * 4
    states = states_for(TREE, size, ServerOptConfig(kind="fedavg"))
    trainer = FakeTrainer(size, scale=1.0)
    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, nu=1, route_to_origin=False)
    events: list[dict[str, object]] = []
    run_round(TREE, states, split, opts, 0, trainer, events.append)
    picks = [e for e in events if e["event"] == "residual_pick"]
    # each inner node picks nu=1 child layer per key position: A, B (leaves) and root (regions)
    assert sorted((e["node"], e["position"]) for e in picks) == sorted(
        (n, p) for n in ("A", "B", "root") for p in (0, 1)
    )
    assert len(states["root"].to_route) == 6
    run_round(TREE, states, split, opts, 1, trainer, events.append)
    routes = [e for e in events if e["event"] == "residual_route" and e["round"] == 1]
    assert len([e for e in routes if e["node"] == "root"]) == 6
    leaf_routes = [e for e in routes if e["node"] in ("A", "B")]
    assert len(leaf_routes) == 6  # every residual continues down to a leaf
    for e in routes:
        dest = e["destination"]
        assert isinstance(dest, str) and e["origin"] not in TREE.subtree(dest)
    parent_att = [
        e
        for e in events
        if e["event"] == "attention"
        and e["kind"] == "parent"
        and e["round"] == 1
        and e["node"] in ("a1", "a2", "b1", "b2")
    ]
    assert sum(len(e["members"]) - 2 for e in parent_att) == 6  # leaves aggregate the residuals they got


def test_route_to_origin_allowed_can_return_home() -> None:
    split = keyed_split(3, 2, 4)
    size = 11
    states = states_for(TREE, size, ServerOptConfig(kind="fedavg"))
    trainer = FakeTrainer(size, scale=1.0)
    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, nu=1, route_to_origin=True)
    events: list[dict[str, object]] = []
    for rnd in range(2):
        run_round(TREE, states, split, opts, rnd, trainer, events.append)
    routes = [e for e in events if e["event"] == "residual_route" and e["node"] == "root"]
    assert any(str(e["origin"]) in TREE.subtree(str(e["destination"])) for e in routes)


def test_fedper_keys_never_leave_a_node() -> None:
    split = keyed_split(3, 2, 4)
    states = states_for(TREE, 11, ServerOptConfig(kind="fedavg"))
    trainer = FakeTrainer(11)
    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, share_keys=False)
    run_round(TREE, states, split, opts, 0, trainer, lambda e: None)
    init = torch.linspace(-1, 1, 11, dtype=torch.float64)
    for n in TREE.order:  # keys = init + own training only
        own = init + 0.1 * trainer.directions[n]
        assert torch.allclose(split.keys(states[n].params), split.keys(own))


def run_cli(tmp: Path, data: Path, method: str, *sets: str, extra: str = "") -> dict[str, object]:
    out = train_tiny(tmp, data, method, *sets, extra=extra)
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary


@pytest.mark.e2e
def test_worldlm_without_keys_attention_or_residuals_equals_hierfavg(tmp_path: Path, data: Path) -> None:
    # judged alike (each node's own final state): HierFAVG otherwise delivers its one global model
    same = 'eval.model="local"'
    a = run_cli(tmp_path, data, "worldlm", "model.key_blocks=0", "federation.attention=false", "federation.nu=0", same)
    b = run_cli(tmp_path, data, "hierfavg", same)
    assert a["nodes"] == b["nodes"] and a["mean_ppl"] == b["mean_ppl"]


@pytest.mark.e2e
def test_same_seed_same_summary_and_run_directory(tmp_path: Path, data: Path) -> None:
    a = run_cli(tmp_path, data, "worldlm")
    b = run_cli(tmp_path, data, "worldlm")
    assert {k: v for k, v in a.items() if k != "name"} == {k: v for k, v in b.items() if k != "name"}
    c = run_cli(tmp_path, data, "worldlm", "seed=1")
    assert c["mean_ppl"] != a["mean_ppl"]


@pytest.mark.e2e
def test_run_directory_contract(tmp_path: Path, data: Path) -> None:
    cfg = tiny_config(tmp_path, data, "worldlm")
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["nodes"]) == {"root", "fr-it", "uk-ru", "fr", "it", "uk", "ru"}
    assert summary["method"] == "worldlm" and summary["mean_ppl"] > 1 and summary["std_ppl"] >= 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split") == "train"]
    assert {r["stage"] for r in train} == {1, 2, 3}
    assert all(k in train[0] for k in ("round", "node", "loss", "ppl", "tokens", "seconds"))
    assert any(r.get("event") == "attention" for r in records)
    assert any(r.get("event") == "edge" for r in records)
    assert (out / "config.toml").is_file()
    assert len(list((out / "checkpoints" / "final").glob("*.safetensors"))) == 7
    assert (out / "checkpoints" / "round-0002" / "manifest.json").is_file()
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 2  # refuses to overwrite


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fl", "fedper", "centralized", "local"])
def test_every_method_runs_at_equal_sequential_steps(tmp_path: Path, data: Path, method: str) -> None:
    summary = run_cli(tmp_path, data, method)
    assert summary["sequential_steps"] == 2 * 3 * 3  # rounds x depth x local_steps
    assert len(summary["nodes"]) == 7


@pytest.mark.e2e
def test_depth_four_tree_runs(tmp_path: Path, data: Path) -> None:
    extra_tree = """
[[tree.nodes]]
name = "fr-a"
parent = "fr"
sources = ["fr"]

[[tree.nodes]]
name = "fr-b"
parent = "fr"
sources = ["fr"]
"""
    cfg = tiny_config(tmp_path, data, "worldlm")
    cfg.write_text(cfg.read_text() + extra_tree)
    out = tmp_path / "deep"
    assert main(["train", str(cfg), "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sequential_steps"] == 2 * 4 * 3 and len(summary["nodes"]) == 9
    stages = {json.loads(line).get("stage") for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert {1, 2, 3, 4} <= stages


@pytest.mark.e2e
def test_eval_model_local_uses_each_nodes_own_state(tmp_path: Path, data: Path) -> None:
    deployed = run_cli(tmp_path, data, "worldlm", "eval.model=deployed")
    local = run_cli(tmp_path, data, "worldlm")  # eval.model = "deliverable" is "local" for WorldLM
    # node states kept on disk give the same deployed models (built depth-first, one path at a time)
    assert run_cli(tmp_path, data, "worldlm", "eval.model=deployed", "federation.offload_states=true") == deployed
    nodes_d, nodes_l = deployed["nodes"], local["nodes"]
    assert isinstance(nodes_d, dict) and isinstance(nodes_l, dict)
    assert nodes_d["root"] == nodes_l["root"]  # the root's deployed model is its own state
    assert all(nodes_d[n]["ppl"] != nodes_l[n]["ppl"] for n in ("fr", "it", "uk", "ru"))


@pytest.mark.e2e
def test_bytes_per_edge_are_the_exchanged_parameters(tmp_path: Path, data: Path) -> None:
    hier = run_cli(tmp_path, data, "hierfavg")
    fedper = run_cli(tmp_path, data, "fedper")
    params = int(str(hier["parameters"]))
    edges = hier["bytes_per_edge"]
    assert isinstance(edges, dict) and len(edges) == 12  # 6 tree edges, both directions
    assert set(edges.values()) == {2 * params * 4}  # 2 rounds x all parameters x float32
    # FedPer keeps its key blocks home: every edge carries the backbone only
    fedper_edges = fedper["bytes_per_edge"]
    assert isinstance(fedper_edges, dict) and max(fedper_edges.values()) < 2 * params * 4
    nodes = hier["nodes"]
    assert isinstance(nodes, dict) and nodes["fr"]["bytes_sent"] == 2 * params * 4


def test_sub_rounds_repeat_subtrees_on_one_clock() -> None:
    size, s = 4, 2
    states = states_for(TREE, size, ServerOptConfig(kind="fedavg"))
    trainer = FakeTrainer(size)
    opts = FedOptions(local_steps={n: s for n in TREE.order}, sub_rounds=2, nu=1)
    split = keyed_split(2, 1, 2)
    events: list[dict[str, object]] = []
    run_round(TREE, states, split, opts, 0, trainer, events.append)
    counts = {n: sum(1 for node, _, _ in trainer.calls if node == n) for n in TREE.order}
    assert counts == {n: trainings_per_round(TREE, n, opts) for n in TREE.order}
    assert (counts["root"], counts["A"], counts["a1"]) == (2, 4, 4)
    assert sequential_span(TREE, "root", opts) == 2 * (s + 2 * (s + s))
    assert max(start + n for _, start, n in trainer.calls) == sequential_span(TREE, "root", opts)
    # residuals picked by a region in both of its sub-rounds reach the root
    region_picks = [e for e in events if e["event"] == "residual_pick" and e["node"] in ("A", "B")]
    assert len(region_picks) == 2 * 2 * 2  # 2 regions x 2 root sub-rounds x 2 own sub-rounds (nu=1, L=1)


def test_a_parent_routes_with_the_keys_it_received_not_the_childs_own_state() -> None:
    # a DP child's release (here: its keys shifted) is all its parent may use, for routing too
    size, n_pos, d = 4, 2, 5
    split = Split(size, n_pos, d)
    init = torch.linspace(-1, 1, size + n_pos * d, dtype=torch.float64)
    opt = ServerOptConfig(kind="fedavg")
    states = {n: NodeState(init.clone(), make_server_opt(opt) if TREE[n].children else None) for n in TREE.order}
    for n in TREE.order:
        initial_child_keys(states[n], list(TREE[n].children), split, FedOptions(local_steps={}))
    shift = torch.arange(n_pos * d, dtype=torch.float64).view(n_pos, d)

    class ShiftKeys:
        def applies(self, node: str) -> bool:
            return node == "a1"

        def release(self, node: str, update: Update, received: torch.Tensor, split: Split, share_keys: bool) -> Update:
            sent = update.params.clone()
            split.keys(sent).add_(shift)
            return Update(sent, update.residuals)

        def combine(self, parent: str, senders: object, updates: list[Update], *_: object) -> list[Update]:
            return list(updates)

    opts = FedOptions(local_steps={n: 1 for n in TREE.order}, nu=1)
    events: list[dict[str, object]] = []
    trainer = FakeTrainer(size + n_pos * d, scale=1.0)
    for rnd in range(2):
        run_round(TREE, states, split, opts, rnd, trainer, events.append, privacy=ShiftKeys())
    # what A holds of a1 is a1's release (its sent state, keys shifted), never a1's own state
    torch.testing.assert_close(states["A"].child_keys["a1"], split.keys(states["a1"].params) + shift)
    torch.testing.assert_close(states["A"].child_keys["a2"], split.keys(states["a2"].params))
    assert any(e["event"] == "residual_route" and e["node"] == "A" for e in events)
    # and routing reads those keys: a residual goes where the received keys point, whatever the states say
    st = NodeState(init.clone(), make_server_opt(opt))
    near_a2 = torch.ones(d, dtype=torch.float64)
    st.child_keys = {"a1": -torch.ones(n_pos, d, dtype=torch.float64), "a2": torch.ones(n_pos, d, dtype=torch.float64)}
    st.to_route = [Residual(near_a2, 0, "b1")]
    ((_, dest, sim),) = route_pending(st, ["a1", "a2"], TREE, split, opts)
    assert dest == "a2" and sim == pytest.approx(1.0)
