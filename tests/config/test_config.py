"""Config loading/validation and tree construction: every bad input is one clear ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest

from worldlm.cli import main
from worldlm.config import dumps, key_blocks, load_config
from worldlm.errors import ConfigError
from worldlm.federation.tree import NodeSpec, build_tree, flat_tree


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


NODES = '[[tree.nodes]]\nname = "r"\nsources = ["a"]\n'


def test_defaults_and_overrides(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, NODES), ["train.rounds=7", "federation.attention=false", "name=x"])
    assert cfg.train.rounds == 7 and cfg.federation.attention is False and cfg.name == "x"
    assert key_blocks(cfg) == 2  # round(0.3 * 6) for nano
    assert load_config(write(tmp_path, dumps(cfg))) == cfg  # the resolved config round-trips


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("[train]\nrouns = 3\n" + NODES, [], "unknown config key 'train.rouns' (did you mean 'rounds'?)"),
        ("[train]\nrounds = 'x'\n" + NODES, [], "train.rounds must be an integer"),
        ("[train]\nrounds = 0\n" + NODES, [], "train.rounds must be >= 1"),
        ("method = 'fedx'\n" + NODES, [], "method 'fedx' is unknown"),
        ("[model]\npreset = 'huge'\n" + NODES, [], "model.preset 'huge' is unknown"),
        ("[model]\nkey_blocks = 6\n" + NODES, [], "model.key_blocks must be -1 (auto) or in [0, 5]"),
        (NODES, ["train.rounds"], "--set expects KEY=VALUE"),
        (NODES, ["federation.server_opt.kind=adam"], "federation.server_opt.kind 'adam' is unknown"),
        # ServerOptConfig checks itself (the federation owns it); the loader names the table in front
        (NODES, ["federation.server_opt.lr=0.0"], "federation.server_opt.lr must be > 0, got 0.0"),
        (NODES, ["federation.server_opt.momentum=1.0"], "federation.server_opt.momentum must be in [0, 1)"),
        (NODES + "[tree.nodes.server_opt]\ntau = -1.0\n", [], "tree.nodes[0].server_opt.tau must be > 0"),
        (NODES, ["dp.sigma=0.0"], "dp.sigma must be > 0 (the noise multiplier), got 0.0"),  # DPSettings' own check
        (NODES, ['dp.clip="median2"'], "dp.clip 'median2' is unknown (did you mean 'median'?)"),
        ("x = [1,\n", [], "is not valid TOML"),
        ("", [], "tree.nodes is empty"),
    ],
)
def test_config_errors(tmp_path: Path, text: str, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text), overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(tmp_path / "nope.toml"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("worldlm: error: config file") and err.count("\n") == 1


def test_cli_bad_key_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", str(write(tmp_path, NODES)), "--set", "train.bogus=1", "--quiet"]) == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().err


def specs(*rows: tuple[str, str, tuple[str, ...]]) -> list[NodeSpec]:
    return [NodeSpec(name, parent, sources) for name, parent, sources in rows]


@pytest.mark.parametrize(
    ("nodes", "message"),
    [
        (specs(("a", "b", ("x",)), ("b", "a", ("x",))), "no root"),
        (specs(("r", "", ("x",)), ("a", "b", ("x",)), ("b", "a", ("x",))), "form a cycle"),
        (specs(("r", "", ("x",)), ("a", "zz", ("x",))), "unknown parent 'zz'"),
        (specs(("r", "", ("x",)), ("s", "", ("x",))), "several roots (r, s)"),
        (specs(("r", "", ("x",)), ("a", "r", ("x",)), ("a", "r", ("y",))), "duplicate tree node name(s): a"),
        (specs(("r", "", ()), ("a", "r", ())), "tree node 'r' has no data"),
        (specs(("r", "", ("x",)), ("a", "a", ("x",))), "is its own parent"),
        (specs(("r", "", ("x",)), ("west#1", "r", ("x",))), "tree node name 'west#1' has characters"),
        ([], "no nodes"),
    ],
)
def test_tree_errors(nodes: list[NodeSpec], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_tree(nodes)
    assert message in str(err.value)


def test_tree_levels_and_inherited_sources() -> None:
    tree = build_tree(
        specs(
            ("root", "", ()),
            ("A", "root", ()),
            ("B", "root", ("z",)),
            ("a1", "A", ("x",)),
            ("a2", "A", ("y", "x")),
            ("b1", "B", ("z",)),
        )
    )
    assert tree.levels == [["root"], ["A", "B"], ["a1", "a2", "b1"]]
    assert tree["A"].sources == ("x", "y")  # the subtree's, first appearance order
    assert tree["root"].sources == ("x", "y", "z")
    assert tree["B"].sources == ("z",)
    assert tree.subtree("A") == ["A", "a1", "a2"] and tree.is_leaf("b1") and not tree.is_leaf("B")
    flat = flat_tree(tree)
    assert flat.depth == 2 and set(flat[flat.root].children) == set(tree.order)
    assert not flat[flat.root].trains


def test_non_finite_numbers_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train\.lr_max must be a finite number"):
        load_config(write(tmp_path, NODES), ["train.lr_max=inf"])
