"""Bad input never gives a traceback: property-based tests of the config loader and tree validation,
plus unreadable data, a swapped tokenizer and a full disk."""

from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tiny import make_prepared, tiny_config
from worldlm import files as wio
from worldlm.cli import main
from worldlm.config import load_config
from worldlm.data.prepared import load_prepared
from worldlm.errors import ConfigError, DataError
from worldlm.federation.tree import NodeSpec, build_tree

SECTIONS = ["data", "model", "train", "federation", "eval", "checkpoint", "tree", "bogus"]
KEYS = ["rounds", "preset", "seq_len", "nu", "attention", "lr", "path", "nodes", "kind", "name", "x"]
scalars = st.one_of(
    st.integers(-5, 10**6),
    st.floats(allow_nan=True),
    st.booleans(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=3),
)
tables = st.dictionaries(
    st.sampled_from(KEYS), scalars | st.lists(st.dictionaries(st.sampled_from(KEYS), scalars)), max_size=4
)
configs = st.dictionaries(st.sampled_from([*SECTIONS, "method", "seed", "name"]), scalars | tables, max_size=6)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=configs)
def test_any_config_loads_or_fails_with_one_line(tmp_path: Path, raw: dict[str, object]) -> None:
    path = tmp_path / "c.toml"
    try:
        path.write_text(tomli_w.dumps(raw))
    except (TypeError, ValueError):  # not representable as TOML (e.g. NaN inside lists is fine; None is not)
        return
    try:
        load_config(path)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("raw", [{"method": "\n"}, {"model": {"preset": "a\rb"}}, {"federation": {"x\u2028": 1}}])
def test_a_value_with_a_line_break_is_quoted_on_one_line(tmp_path: Path, raw: dict[str, object]) -> None:
    # Hypothesis found {"method": "\n"}: the message printed the value raw, over two lines.
    path = tmp_path / "c.toml"
    path.write_text(tomli_w.dumps(raw))
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value).isprintable(), str(exc.value)


@settings(max_examples=200, deadline=None)
@given(
    edges=st.lists(
        st.tuples(st.sampled_from("abcdef"), st.sampled_from(["", "a", "b", "c", "d", "e", "f", "z"])), max_size=7
    ),
    with_data=st.booleans(),
)
def test_any_tree_is_valid_or_rejected_clearly(edges: list[tuple[str, str]], with_data: bool) -> None:
    specs = [NodeSpec(name, parent, ("s",) if with_data else ()) for name, parent in edges]
    try:
        tree = build_tree(specs)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    # a valid tree: one root, every node reachable, parents consistent, every node has data
    assert len(tree.order) == len(specs) == len(set(tree.order))
    assert sum(tree[n].parent is None for n in tree.order) == 1
    for n in tree.order:
        parent = tree[n].parent
        assert parent is None or n in tree[parent].children
        assert tree[n].sources


def test_unreadable_config_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.toml"
    path.write_bytes(b"\xff\xfe not utf-8")
    assert main(["train", str(path), "--quiet"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_swapped_tokenizer_is_detected(tmp_path: Path) -> None:
    root = make_prepared(tmp_path / "d")
    import json

    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer_sha256"] = "0" * 64
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="does not match"):
        load_prepared(root)


def test_missing_data_directory_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path, tmp_path / "nowhere", "worldlm")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no prepared data" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "fix"), [("domains", "--recipe domains --out"), ("mine", "worldlm prepare CONFIG")])
def test_missing_data_names_the_command_that_prepares_it(tmp_path: Path, name: str, fix: str) -> None:
    with pytest.raises(DataError, match=f"no prepared data at .*{name}.*{fix}"):
        load_prepared(tmp_path / name)


def test_source_too_small_for_seq_len_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = make_prepared(tmp_path / "d")
    cfg = tiny_config(tmp_path, data, "worldlm")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--quiet", "--set", "model.seq_len=5000"]) == 2
    assert "seq_len" in capsys.readouterr().err


def test_full_disk_keeps_the_previous_file_and_reports_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old")

    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(wio.os, "fsync", no_space)
    with pytest.raises(OSError):
        wio.atomic_write_text(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]

    data = make_prepared(tmp_path / "d")
    cfg = tiny_config(tmp_path, data, "worldlm")
    assert main(["train", str(cfg), "--out", str(tmp_path / "r"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and err.count("\n") == 1


@pytest.mark.e2e
def test_a_diverged_run_stops_early_with_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """lr 1e30 makes every weight NaN in round 0: both runners stop after it, say so, write the same summary."""
    cfg = tiny_config(tmp_path, make_prepared(tmp_path / "data"), "worldlm")
    sets = ["--set", "train.lr_max=1e30", "--set", "train.rounds=3", "--set", "eval.every_round=false"]
    summaries = []
    for runner in ("local", "flower-inproc"):
        out = tmp_path / runner
        assert main(["train", str(cfg), *sets, "--runner", runner, "--out", str(out), "--quiet"]) == 0
        assert capsys.readouterr().err.count("round 0: every node's training loss is NaN/inf, the run diverged") == 1
        summary = json.loads((out / "summary.json").read_text())
        assert summary["diverged_round"] == 0 and summary["sequential_steps"] == 9  # 1 of 3 rounds: 3 levels x 3
        assert math.isnan(summary["mean_ppl"]) and all(math.isnan(n["ppl"]) for n in summary["nodes"].values())
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert {"event": "diverged", "round": 0} in records
        assert max(r["round"] for r in records if r.get("split") == "train") == 0  # nothing trained after it
        val = [r for r in records if r.get("split") == "val"]  # evaluated in that round despite every_round=false
        assert len(val) == 7 and all(r["round"] == 0 and math.isnan(r["loss"]) for r in val)
        summary.pop("wall_seconds")
        summaries.append(json.dumps(summary, sort_keys=True))  # NaN-safe comparison: as text
    assert summaries[0] == summaries[1]
    timing = [json.loads(line) for line in (tmp_path / "local" / "timing.jsonl").read_text().splitlines()]
    assert [t["round"] for t in timing] == [0]
