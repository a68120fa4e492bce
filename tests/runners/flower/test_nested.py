"""Nested federations: one SuperLink and coordinator per inner node, regions behind bridges.

The in-process version (one InProcessGrid per federation, bridges calling the regions' coordinators
directly) runs here in seconds: it must reproduce the in-process runner bitwise, and each federation's
messages must carry only what its own members send and receive. The loopback deployment with real
SuperLinks is `slow` (tests/test_flower_deploy.py and scripts/flower_smoke.sh).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from worldlm.runners.flower import quiet_flower_env

quiet_flower_env()  # before Flower is imported: no telemetry, no update checks

pytest.importorskip("flwr")

from flwr.app import Message  # noqa: E402

from tiny import LANG_TREE, summary_of, tiny_config  # noqa: E402
from worldlm import config as C  # noqa: E402
from worldlm.errors import WorldLMError  # noqa: E402
from worldlm.federation.steps import origin_node  # noqa: E402
from worldlm.runners.flower.aliases import Aliases  # noqa: E402
from worldlm.runners.flower.engines import run_nested_inprocess  # noqa: E402
from worldlm.runners.flower.nested import merge_federations  # noqa: E402
from worldlm.runners.local import run  # noqa: E402

# root -> west -> (fr, south -> (it, ru)), root -> east -> uk: a region inside a region
DEEP_TREE = """
[[tree.nodes]]
name = "root"

[[tree.nodes]]
name = "west"
parent = "root"

[[tree.nodes]]
name = "east"
parent = "root"

[[tree.nodes]]
name = "fr"
parent = "west"
sources = ["fr"]

[[tree.nodes]]
name = "south"
parent = "west"

[[tree.nodes]]
name = "it"
parent = "south"
sources = ["it"]

[[tree.nodes]]
name = "ru"
parent = "south"
sources = ["ru"]

[[tree.nodes]]
name = "uk"
parent = "east"
sources = ["uk"]
"""


def _config(tmp: Path, data: Path, method: str, sets: list[str], deep: bool = False) -> C.Config:
    path = tiny_config(tmp, data, method)
    if deep:
        path.write_text(path.read_text().replace(LANG_TREE, DEEP_TREE))
    return C.load_config(path, sets)


def _canonical(run_dir: Path) -> list[str]:
    """metrics.jsonl without wall-clock fields, order-free."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    drop = ("seconds", "tokens_per_s")
    return sorted(json.dumps({k: v for k, v in json.loads(x).items() if k not in drop}, sort_keys=True) for x in lines)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("method", "sets", "deep"),
    [
        ("worldlm", [], False),
        # the root routes residuals whose origins are region aliases; A.3.7's origin test must still hold
        ("worldlm", ["federation.route_to_origin=false", "federation.sub_rounds=2"], False),
        ("worldlm", ["federation.route_to_origin=false"], True),  # a region inside a region
        ("hierfavg", ["train.rounds=1"], True),  # the root's model everywhere, + ft from the regions
        ("fedper", ["eval.model=deployed", "train.rounds=1"], True),  # deployed models go down through bridges
        # DP (reproducible noise: runners compared bit for bit): privacy records, then node-level DP
        ("worldlm", ["dp.nodes=['fr']", "dp.reproducible_noise=true", 'dp.unit="record"', "train.rounds=2"], False),
        (
            "worldlm",
            ["dp.nodes=['fr', 'it']", "dp.reproducible_noise=true", 'dp.clip="fixed"', 'dp.noise="central"'],
            False,
        ),
        # median bounds, one of them a DP region's, across a bridge
        ("worldlm", ["dp.nodes=['fr', 'south']", "dp.reproducible_noise=true", "train.rounds=3"], True),
    ],
)
def test_nested_equals_the_in_process_runner_bitwise(
    data: Path, tmp_path: Path, method: str, sets: list[str], deep: bool
) -> None:
    # prepare
    cfg = _config(tmp_path, data, method, sets, deep)
    run(cfg, tmp_path / "local")
    # execute
    run_nested_inprocess(cfg, tmp_path / "nested")
    # assert: summary.json bitwise, every record (aliases resolved), every final model
    assert summary_of(tmp_path / "nested") == summary_of(tmp_path / "local")
    assert _canonical(tmp_path / "nested") == _canonical(tmp_path / "local")
    for model in sorted((tmp_path / "local" / "checkpoints" / "final").glob("*.safetensors")):
        assert (tmp_path / "nested" / "checkpoints" / "final" / model.name).read_bytes() == model.read_bytes()


def _strings(msg: Message) -> list[str]:
    """Every string in a message: record keys, config values (log JSON included)."""
    c = msg.content
    text: list[str] = [*c.array_records, *c.config_records, *c.metric_records]
    for rec in c.array_records.values():
        text += list(rec)
    for rec in c.metric_records.values():
        text += list(rec)
    for rec in c.config_records.values():
        for k, v in rec.items():
            text += [k, *(map(str, v) if isinstance(v, list) else [str(v)])]
    return text


def _names_in(msg: Message) -> set[str]:
    return {tok for s in _strings(msg) for tok in re.findall(r"[A-Za-z0-9_.-]+", s)}


@pytest.mark.e2e
def test_each_federation_sees_only_its_members(data: Path, tmp_path: Path) -> None:
    # prepare: residuals cross regions (routing by similarity), three levels of federations
    cfg = _config(tmp_path, data, "worldlm", ["federation.route_to_origin=false"], deep=True)
    grids: dict[str, Any] = {}
    # execute
    run_nested_inprocess(cfg, tmp_path / "nested", grid_hook=grids.__setitem__)
    # assert: a federation's messages name only its members, its parent and aliases of other regions
    nodes = {"root", "west", "east", "fr", "south", "it", "ru", "uk"}
    visible = {
        "root": {"root", "west", "east"},
        "west": {"west", "fr", "south", "root"},
        "south": {"south", "it", "ru", "west"},
        "east": {"east", "uk", "root"},
    }
    for fed, grid in grids.items():
        messages = grid.delivered + grid.replies
        assert messages
        seen = set().union(*(_names_in(m) for m in messages)) & nodes
        assert seen <= visible[fed], (fed, seen - visible[fed])
        # no array arrives from or goes to a node outside the federation
        for m in grid.delivered:
            assert grid.contexts[m.metadata.dst_node_id].node_config["node-name"] in visible[fed]
    # the residuals did cross the root under aliases (so the test above saw them)
    root_text = " ".join(t for m in grids["root"].delivered + grids["root"].replies for t in _strings(m))
    assert re.search(r"\b(west|east)#\d", root_text)


def test_aliases_hide_members_and_resolve_back(tmp_path: Path) -> None:
    # prepare
    aliases = Aliases("west", tmp_path / "aliases.json")
    up = aliases.hide_inside(["west", "fr", "south", "it"], keep="west")
    down = aliases.hide_outside(["west", "fr", "south", "it"])
    # execute
    sent_up = [up(o) for o in ["fr", "south#1", "fr", "west", "root#3"]]
    sent_down = [down(o) for o in ["uk", "east#2", "fr", "south#1"]]
    # assert: members hidden going up (the region's own name and its parent's aliases kept), outsiders hidden
    # going down, one alias per origin, persisted, and every alias names a node its receiver may test against
    assert sent_up == ["west#1", "west#2", "west#1", "west", "root#3"]
    assert sent_down == ["west#3", "west#4", "fr", "south#1"]
    assert Aliases("west", tmp_path / "aliases.json").reveal("west#2") == "south#1"
    assert [origin_node(h) for h in sent_up] == ["west"] * 4 + ["root"]


def test_nested_refuses_one_federation_methods(data: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, data, "fl", [])
    with pytest.raises(WorldLMError, match="single federation; deploy it without --nested"):
        run_nested_inprocess(cfg, tmp_path / "out")


def test_merge_needs_the_root_part(data: Path, tmp_path: Path) -> None:
    cfg = _config(tmp_path, data, "worldlm", [])
    with pytest.raises(WorldLMError, match=r"root federation's run\.json in exactly one part"):
        merge_federations(cfg, tmp_path / "out", [tmp_path / "a", tmp_path / "b"])


@pytest.mark.e2e
def test_flower_app_nested_writes_a_run_config_per_federation_and_merge_joins_the_parts(
    data: Path, tmp_path: Path
) -> None:
    import tomllib

    from worldlm.cli import main

    # prepare: a nested run whose parts a user joins with the CLI, as after a multi-host deployment
    cfg_path = tiny_config(tmp_path, data, "worldlm")
    run_nested_inprocess(C.load_config(cfg_path), tmp_path / "nested")
    parts = [str(tmp_path / "nested" / "federations" / q) for q in ("root", "fr-it", "uk-ru")]
    # execute
    assert main(["flower-app", str(cfg_path), "--out", str(tmp_path / "job"), "--run-out", "/srv/run", "--nested"]) == 0
    assert main(["merge-federations", str(cfg_path), *parts, "--out", str(tmp_path / "merged"), "--quiet"]) == 0
    # assert: one run config per inner node, regions with their bridge socket, one state key for all
    configs = {
        q: tomllib.loads((tmp_path / "job" / f"run-config-{q}.toml").read_text()) for q in ("root", "fr-it", "uk-ru")
    }
    assert {q: c["federation"] for q, c in configs.items()} == {"root": "root", "fr-it": "fr-it", "uk-ru": "uk-ru"}
    assert configs["root"]["bridge-socket"] == "" and configs["fr-it"]["bridge-socket"] == "/run/worldlm/fr-it.sock"
    assert configs["uk-ru"]["out"] == "/srv/run/federations/uk-ru"
    assert len({c["run-key"] for c in configs.values()}) == 1
    assert summary_of(tmp_path / "merged") == summary_of(tmp_path / "nested")
    assert main(["merge-federations", str(cfg_path), str(tmp_path), "--out", str(tmp_path / "x"), "--quiet"]) == 2
