"""Checkpoint and resume: a killed run continues to exactly the result of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import make_prepared, summary_of, tiny_config
from worldlm.cli import main

# tiny_config pins one thread: the killed subprocess and the in-process runs must sum and round alike.
ROUNDS = ["--set", "train.rounds=5"]

pytestmark = pytest.mark.e2e  # every test here runs the system end to end


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, object]]:
    tmp = tmp_path_factory.mktemp("resume")
    cfg = tiny_config(tmp, make_prepared(tmp / "data"), "worldlm")
    reference = tmp / "reference"
    assert main(["train", str(cfg), "--out", str(reference), "--quiet", *ROUNDS]) == 0
    return tmp, cfg, summary_of(reference)


def records_of(run: Path) -> list[dict[str, object]]:
    """metrics.jsonl without the timing fields that differ between any two runs."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rec.pop("seconds", None)
        rec.pop("tokens_per_s", None)
        out.append(rec)
    return out


def test_kill_9_mid_round_then_resume_matches_uninterrupted(setup: tuple[Path, Path, dict[str, object]]) -> None:
    tmp, cfg, reference = setup
    out = tmp / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldlm", "train", str(cfg), "--out", str(out), "--quiet", *ROUNDS], env=env
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "round-0002" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its second checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # somewhere in round 3: no chance to clean up
    proc.wait()
    assert not (out / "summary.json").exists()
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume", *ROUNDS]) == 0
    # Records first: should this ever fail, the first differing record names the round and node that diverged.
    assert records_of(out) == records_of(tmp / "reference")
    assert summary_of(out) == reference


def test_corrupt_newest_checkpoint_falls_back_to_previous(
    setup: tuple[Path, Path, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, cfg, reference = setup
    out = tmp / "corrupt"
    assert main(["train", str(cfg), "--out", str(out), "--quiet", *ROUNDS]) == 0
    (out / "summary.json").unlink()
    newest = out / "checkpoints" / "round-0005" / "state.safetensors"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume", *ROUNDS]) == 0
    assert "round-0005 is unusable" in capsys.readouterr().err
    assert summary_of(out) == reference
    assert sorted(p.name for p in (out / "checkpoints").glob("round-*")) == ["round-0004", "round-0005"]


def test_resume_with_a_different_config_is_refused(
    setup: tuple[Path, Path, dict[str, object]], capsys: pytest.CaptureFixture[str]
) -> None:
    tmp, cfg, _ = setup
    out = tmp / "reference"
    (out / "summary.json").rename(out / "summary.bak")
    try:
        assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume", "--set", "train.rounds=6"]) == 2
        assert "differs from this config" in capsys.readouterr().err
    finally:
        (out / "summary.bak").rename(out / "summary.json")
    assert main(["train", str(cfg), "--out", str(tmp / "nowhere"), "--quiet", "--resume"]) == 2


def test_sigterm_stops_at_a_round_boundary_with_a_checkpoint(setup: tuple[Path, Path, dict[str, object]]) -> None:
    tmp, cfg, reference = setup
    out = tmp / "term"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worldlm", "train", str(cfg), "--out", str(out), "--quiet", *ROUNDS],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "checkpoints" / "round-0001" / "manifest.json").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    if proc.returncode == 0:  # the run finished its last round before the signal was handled
        return
    assert proc.returncode == 130 and "--resume" in err
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume", *ROUNDS]) == 0
    assert summary_of(out) == reference


def test_offloaded_node_states_give_bitwise_identical_results_and_resume(
    setup: tuple[Path, Path, dict[str, object]],
) -> None:
    tmp, cfg, reference = setup
    out = tmp / "offload"
    offload = [*ROUNDS, "--set", "federation.offload_states=true"]
    assert main(["train", str(cfg), "--out", str(out), "--quiet", *offload]) == 0
    assert summary_of(out) == reference
    assert records_of(out) == records_of(tmp / "reference")
    for model in sorted((tmp / "reference" / "checkpoints" / "final").glob("*.safetensors")):
        assert (out / "checkpoints" / "final" / model.name).read_bytes() == model.read_bytes()
    assert not (out / "offload").exists()  # scratch files go once the run is complete
    # resumed from its round-4 checkpoint, node states again on disk: still the same run
    shutil.rmtree(out / "checkpoints" / "round-0005")
    shutil.rmtree(out / "checkpoints" / "final")
    (out / "summary.json").unlink()
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume", *offload]) == 0
    assert summary_of(out) == reference
    assert records_of(out) == records_of(tmp / "reference")


def test_hierfavg_fine_tuned_models_survive_a_resume_after_the_last_round(tmp_path: Path) -> None:
    """An inner node's model after its last training (what "+ ft" scores) is in the checkpoint: a run resumed
    after its last round, before its summary, scores the same models as the run that went through."""
    cfg = tiny_config(tmp_path, make_prepared(tmp_path / "data"), "hierfavg")
    sets = ["--set", "train.rounds=2"]
    reference, out = tmp_path / "reference", tmp_path / "resumed"
    assert main(["train", str(cfg), "--out", str(reference), "--quiet", *sets]) == 0
    assert main(["train", str(cfg), "--out", str(out), "--quiet", *sets]) == 0
    shutil.rmtree(out / "checkpoints" / "final")
    (out / "summary.json").unlink()  # as if killed after the last checkpoint
    assert main(["train", str(cfg), "--out", str(out), "--quiet", "--resume", *sets]) == 0
    summary = summary_of(out)
    assert summary == summary_of(reference) and "mean_ppl_ft" in summary
