"""The Flower runner: ClientApp/ServerApp through Flower messages must reproduce the in-process runner.

Fast tests drive the real apps over `InProcessGrid` (Flower Messages, pickled both ways). The
simulation engine (Ray) runs once; the loopback deployment (SuperLink + 7 SuperNodes) takes
minutes and is `slow` (run it with `pytest -m slow` or scripts/flower_smoke.sh).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from worldlm.runners.flower import quiet_flower_env

quiet_flower_env()  # before Flower is imported: no telemetry, no update checks

pytest.importorskip("flwr")

from tiny import summary_of, tiny_config  # noqa: E402
from worldlm import config as C  # noqa: E402
from worldlm.cli import main  # noqa: E402
from worldlm.errors import WorldLMError  # noqa: E402
from worldlm.federation.types import BYTES_PER_VALUE  # noqa: E402
from worldlm.runners.flower import wire  # noqa: E402
from worldlm.runners.flower.dispatch import Directory  # noqa: E402
from worldlm.runners.flower.engines import InProcessGrid, make_client_app, run_inprocess  # noqa: E402
from worldlm.runners.flower.node import NodeSide  # noqa: E402
from worldlm.runners.local import run  # noqa: E402


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _canonical(records: list[dict[str, Any]]) -> list[str]:
    """metrics.jsonl without wall-clock fields, order-free (nodes answer in parallel on Flower)."""
    drop = ("seconds", "tokens_per_s")
    return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True) for r in records)


@pytest.fixture(scope="module")
def local_worldlm(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("local")
    out = tmp / "run"
    assert main(["train", str(tiny_config(tmp, data, "worldlm")), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.e2e
def test_inprocess_messages_equal_local_runner_bitwise(data: Path, local_worldlm: Path, tmp_path: Path) -> None:
    # prepare: the same config through `worldlm train --runner flower-inproc`
    out = tmp_path / "flower"
    cfg = tiny_config(tmp_path, data, "worldlm")
    # execute
    assert main(["train", str(cfg), "--runner", "flower-inproc", "--out", str(out), "--quiet"]) == 0
    # assert: same summary (bitwise: same ops, same order, same threads), same records, same final models
    assert summary_of(out) == summary_of(local_worldlm)
    assert _canonical(_records(out)) == _canonical(_records(local_worldlm))
    assert (out / "config.toml").read_text() == (local_worldlm / "config.toml").read_text()
    for model in sorted((local_worldlm / "checkpoints" / "final").glob("*.safetensors")):
        assert (out / "checkpoints" / "final" / model.name).read_bytes() == model.read_bytes()


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "sets"),
    [
        # the data-less FL server is hosted by the root organisation; 3 FL rounds (A.1.2), global model + ft
        ("fl", ["train.rounds=1"]),
        ("hierfavg", ["train.rounds=1"]),  # deliverable: the root's model on every node, and each node's + ft
        ("fedper", ["eval.model=deployed", "train.rounds=1"]),  # keys stay home; deployed models go top-down
        ("worldlm", ["federation.sub_rounds=2", "train.rounds=1", "federation.route_to_origin=true"]),
        # DP: runners agree bit for bit under dp.reproducible_noise (by default every node's noise is its secret)
        # record-level DP-SGD at a DP node (its accountant, noise generator and sampler between messages)
        ("worldlm", ["dp.nodes=['fr']", "dp.reproducible_noise=true", 'dp.unit="record"', "train.rounds=2"]),
        # node-level DP (fixed bound), noise at the DP nodes, then at their parent with a budget stop
        ("worldlm", ["dp.nodes=['fr', 'it']", "dp.reproducible_noise=true", 'dp.clip="fixed"', "train.rounds=2"]),
        (
            "worldlm",
            [
                "dp.nodes=['fr', 'it']",
                "dp.reproducible_noise=true",
                'dp.clip="fixed"',
                'dp.noise="central"',
                "dp.epsilon_budget=12",
                "train.rounds=3",
            ],
        ),
        # the paper's median bound: the DP nodes' norms go up with their releases, the parent's bound comes down
        ("worldlm", ["dp.nodes=['fr', 'it']", "dp.reproducible_noise=true", "train.rounds=3"]),
        # adaptive bound (noisy clip bits) with sub-rounds, central noise, and a DP leaf of the FL server
        (
            "worldlm",
            [
                "dp.nodes=['fr', 'ru']",
                "dp.reproducible_noise=true",
                'dp.clip="adaptive"',
                "federation.sub_rounds=2",
                "train.rounds=2",
            ],
        ),
        (
            "fl",
            [
                "dp.nodes=['fr', 'it']",
                "dp.reproducible_noise=true",
                'dp.clip="adaptive"',
                'dp.noise="central"',
                "train.rounds=1",
            ],
        ),
        # the nodes keep their reference keys and outlier counts between messages
        (
            "worldlm",
            [
                'federation.similarity="updates"',
                'federation.similarity_on="matrices"',
                "federation.temperature=0.1",
                "federation.outlier_weight=0.9",
                "federation.skip_outlier_residuals=true",
            ],
        ),
    ],
)
def test_other_methods_and_options_equal_local_runner(data: Path, tmp_path: Path, method: str, sets: list[str]) -> None:
    cfg = C.load_config(tiny_config(tmp_path, data, method), sets)
    run(cfg, tmp_path / "local")
    run_inprocess(cfg, tmp_path / "flower")
    assert summary_of(tmp_path / "flower") == summary_of(tmp_path / "local")


@pytest.mark.e2e
def test_bytes_per_edge_are_the_message_payloads(data: Path, local_worldlm: Path, tmp_path: Path) -> None:
    grids: list[InProcessGrid] = []
    cfg = C.load_config(tiny_config(tmp_path, data, "worldlm"))
    summary = run_inprocess(cfg, tmp_path / "flower", grid_hook=grids.append)
    delivered = grids[0].delivered
    # every parent -> child model message: parameters in the message = bytes on that edge
    down: dict[str, int] = {}
    for msg in delivered:
        c = msg.content.config_records["cfg"]
        if msg.metadata.message_type == "train.visit" and "model" in msg.content.array_records:
            key = f"{c['parent']}->{c['node']}"
            nbytes = wire.value_bytes(msg.content.array_records["model"])
            down[key] = down.get(key, 0) + nbytes + wire.value_bytes(msg.content.array_records.get("routed"))
    # every child -> parent update, as forwarded to the parent in train.aggregate
    up: dict[str, int] = {}
    for msg in delivered:
        c = msg.content.config_records["cfg"]
        if msg.metadata.message_type == "train.aggregate":
            for child in c.get("senders", []):  # type: ignore[union-attr]
                key = f"{child}->{c['node']}"
                nbytes = wire.value_bytes(msg.content.array_records[f"update/{child}"])
                up[key] = (
                    up.get(key, 0) + nbytes + wire.value_bytes(msg.content.array_records.get(f"residuals/{child}"))
                )
    assert {**down, **up} == summary["bytes_per_edge"] == summary_of(local_worldlm)["bytes_per_edge"]
    # and the formula: backbone + key layers, all float32, per round (2 rounds; residuals only ride on some)
    params = int(summary["parameters"])
    assert summary["bytes_per_edge"]["it->fr-it"] == 2 * params * BYTES_PER_VALUE  # a leaf sends no residuals


@pytest.mark.e2e
def test_silent_node_is_left_out_and_a_restarted_node_rejoins(data: Path, tmp_path: Path) -> None:
    # prepare: 3 rounds; at the first message of round 1 SuperNode 'fr' is replaced by a new one
    # (new node id, empty state): round 1's messages to the old one are lost, round 2 finds the new one
    cfg = C.load_config(tiny_config(tmp_path, data, "worldlm"), ["train.rounds=3"])
    grids: list[InProcessGrid] = []
    restarted: list[int] = []

    def drop(msg: Any) -> bool:
        if msg.metadata.group_id == "1" and not restarted:
            restarted.append(grids[0].restart("fr"))
        return False

    # execute
    summary = run_inprocess(cfg, tmp_path / "flower", timeout=0.5, drop=drop, grid_hook=grids.append)
    # assert
    records = _records(tmp_path / "flower")
    left = [r for r in records if r.get("event") == "left_out"]
    assert sorted((r["round"], r["node"], r["message"]) for r in left) == [
        (1, "fr", "evaluate"),
        (1, "fr", "train.visit"),
    ]
    assert {"event": "rejoined", "round": 2, "node": "fr"} in records
    children = {(r["round"], r["node"]): r["members"] for r in records if r.get("kind") == "children"}
    assert children[(1, "fr-it")] == ["fr-it", "it"]  # aggregated without the silent leaf
    assert children[(2, "fr-it")] == ["fr-it", "fr", "it"]  # and with it again
    trained = {(r["round"], r["node"]) for r in records if r.get("split") == "train"}
    assert (1, "fr") not in trained and (2, "fr") in trained
    assert set(summary["nodes"]) == set(cfg_nodes(cfg)) and "missing_nodes" not in summary


def test_a_slow_supernode_is_greeted_until_it_answers(data: Path, tmp_path: Path) -> None:
    # prepare: 'fr' lets its first five hellos expire (a SuperNode still starting its ClientApp)
    cfg = C.load_config(tiny_config(tmp_path, data, "worldlm"))
    names = cfg_nodes(cfg)
    lost: list[str] = []

    def slow_fr(msg: Any) -> bool:
        if msg.metadata.dst_node_id == grid.names["fr"] and len(lost) < 5:
            lost.append(msg.metadata.message_type)
            return True
        return False

    grid = InProcessGrid(
        make_client_app({"worldlm-config": C.dumps(cfg)}), [{"node-name": n} for n in names], drop=slow_fr
    )
    directory = Directory(grid, ttl=0.05, log=lambda _m: None, poll=0.01)
    # execute
    directory.wait_for(names, connect_timeout=30.0)
    # assert: greeted again after each expiry, never given up on
    assert lost == ["query.hello"] * 5 and set(directory.ids) == set(names) and not directory.pending


def cfg_nodes(cfg: C.Config) -> list[str]:
    return [n.name for n in cfg.tree.nodes]


def test_node_private_state_round_trips(data: Path, tmp_path: Path) -> None:
    # prepare: a region after training (AdamW moments, sampler position, server optimizer state)
    cfg = C.load_config(tiny_config(tmp_path, data, "worldlm"), ["federation.server_opt.kind=fedavgm"])
    side = NodeSide(cfg, "fr-it")
    side.hosted["fr-it"].state.params = side.trainer.train("fr-it", side.hosted["fr-it"].state.params, 0, 2)
    blob = side.dump()
    # execute: a fresh process would start from this blob
    other = NodeSide(cfg, "fr-it")
    other.load(blob)
    # assert
    assert other.dump() == blob
    assert other.trainer.samplers["fr-it"].state() == side.trainer.samplers["fr-it"].state()


def test_an_unknown_node_name_is_quoted_on_one_line(data: Path, tmp_path: Path) -> None:
    # node-name comes from the SuperNode's --node-config: a user's value, escaped like the config's
    cfg = C.load_config(tiny_config(tmp_path, data, "worldlm"))
    with pytest.raises(WorldLMError, match=r"node-name 'fr\\nit' is not a node") as exc:
        NodeSide(cfg, "fr\nit")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    ("method", "sets", "message"),
    [
        ("centralized", [], "pools"),
        ("worldlm", ['federation.schedule="parallel"'], "parallel"),
        ("fl", ["eval.trace_round=0"], "trace_round"),
    ],
)
def test_unsupported_configs_fail_in_one_line(
    data: Path, tmp_path: Path, method: str, sets: list[str], message: str
) -> None:
    cfg = C.load_config(tiny_config(tmp_path, data, method), sets)
    with pytest.raises(WorldLMError, match=message):
        run_inprocess(cfg, tmp_path / "flower")


@pytest.mark.e2e
def test_simulation_engine_equals_local_runner(data: Path, local_worldlm: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    out = tmp_path / "sim"
    cfg = tiny_config(tmp_path, data, "worldlm")
    assert main(["train", str(cfg), "--runner", "flower-sim", "--out", str(out), "--quiet"]) == 0
    assert summary_of(out) == summary_of(local_worldlm)


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize(
    "options",
    [[], ["--nested"], ["--isolation", "subprocess"]],  # warm flat (the default), warm nested, Flower's own
)
def test_deploy_local_equals_local_runner_and_stops_its_processes(
    data: Path, local_worldlm: Path, tmp_path: Path, options: list[str]
) -> None:
    """A loopback deployment takes minutes: `pytest -m slow`, or scripts/flower_smoke.sh."""
    out = tmp_path / "deploy"
    cfg = tiny_config(tmp_path, data, "worldlm")
    assert main(["deploy-local", str(cfg), "--out", str(out), "--quiet", *options]) == 0
    assert summary_of(out) == summary_of(local_worldlm)
    assert _canonical(_records(out)) == _canonical(_records(local_worldlm))
    pids = json.loads((out / "flower" / "pids.json").read_text())
    assert pids == {}  # everything deploy-local started is gone
