"""Record-level DP-SGD at DP nodes (`dp.unit = "record"`).

Per-example gradients against a one-example-at-a-time loop (tied embeddings included), clipping and noise
by hand, the noise calibration against Opacus' own accountant, ε growing every round, the budget stop, and
a resumed run equal to the uninterrupted one; nodes without DP train exactly as without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tiny import summary_of, tiny_config, train_tiny
from worldlm.cli import main
from worldlm.model import GPT, GPTConfig

opacus = pytest.importorskip("opacus")

from worldlm.privacy.record import RecordDP, calibrate, per_example_grads  # noqa: E402

RECORD = ['dp.nodes=["fr"]', 'dp.unit="record"', "dp.target_epsilon=8.0", "dp.max_grad_norm=1.0"]


def _tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, seq_len=16))


def test_per_example_gradients_equal_one_example_at_a_time() -> None:
    model = _tiny_gpt()
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(1))
    grads, losses = per_example_grads(model, ids[:, :-1], ids[:, 1:])
    for i in range(3):
        model.zero_grad()
        loss = model(ids[i : i + 1, :-1], ids[i : i + 1, 1:])
        loss.backward()
        assert float(losses[i]) == pytest.approx(float(loss.detach()), rel=1e-6)
        for name, p in model.named_parameters():  # wte: embedding and tied LM head together
            torch.testing.assert_close(grads[name][i], p.grad, rtol=1e-5, atol=1e-7)


def test_clip_and_noise_by_hand() -> None:
    model = _tiny_gpt()
    ids = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(2))
    x, y = ids[:, :-1], ids[:, 1:]
    grads, _ = per_example_grads(model, x, y)
    norms = torch.sqrt(sum(g.reshape(4, -1).square().sum(dim=1) for g in grads.values()))
    clip, sigma, n_records, rate = 0.5, 0.7, 100, 0.04
    dp = RecordDP(sigma, rate, n_records, clip, seed=3)
    dp.backward(model, x, y)
    noise_gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        clipped = sum(grads[name][i] * min(1.0, clip / (float(norms[i]) + 1e-6)) for i in range(4))
        noise = torch.randn(p.shape, generator=noise_gen) * sigma * clip
        torch.testing.assert_close(p.grad, (clipped + noise) / (rate * n_records), rtol=1e-5, atol=1e-7)
    assert dp.accountant.history == [(sigma, rate, 1)]


def test_noise_calibration_matches_opacus_accountant() -> None:
    from opacus.accountants import RDPAccountant

    rate, steps = 0.01, 300
    sigma = calibrate(8.0, 1e-5, rate, steps)
    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=rate)
    assert acc.get_epsilon(1e-5) == pytest.approx(8.0, abs=0.05)
    assert calibrate(2.0, 1e-5, rate, steps) > sigma  # a tighter budget needs more noise


@pytest.mark.e2e
def test_record_level_run_epsilon_grows_and_resumes_exactly(data: Path, tmp_path: Path) -> None:
    run = train_tiny(tmp_path, data, "worldlm", "train.rounds=3", *RECORD)
    summary = summary_of(run)
    privacy = summary["privacy"]
    assert privacy["unit"] == "record" and set(privacy["epsilon"]) == {"fr"} and privacy["delta"] == 1e-5
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    eps = [r["epsilon"] for r in records if r.get("event") == "privacy"]
    assert len(eps) == 3 and eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(8.0, abs=0.1)  # calibrated to reach the target after the planned steps
    # the nodes without DP train exactly as without it: a run without DP has the same first-round losses there
    plain = train_tiny(tmp_path, data, "worldlm", "train.rounds=3")
    first = [json.loads(x) for x in (plain / "metrics.jsonl").read_text().splitlines()][:1]
    assert records[0]["node"] == first[0]["node"] == "root" and records[0]["loss"] == first[0]["loss"]
    # resumed from round 2: the same run (accountant, noise generator and Poisson sampler checkpointed)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "final")
    shutil.rmtree(sorted((resumed / "checkpoints").glob("round-*"))[-1])
    (resumed / "summary.json").unlink()
    args = ["train", str(tiny_config(tmp_path, data)), "--out", str(resumed), "--quiet", "--resume"]
    for s in ["train.rounds=3", *RECORD]:
        args += ["--set", s]
    assert main(args) == 0
    assert summary_of(resumed) == summary


@pytest.mark.e2e
def test_budget_stops_a_record_level_node(data: Path, tmp_path: Path) -> None:
    run = train_tiny(tmp_path, data, "worldlm", "train.rounds=3", *RECORD, "dp.epsilon_budget=4.0")
    privacy = summary_of(run)["privacy"]
    assert privacy["stopped"] == ["fr"] and privacy["epsilon"]["fr"] <= 4.0
    assert privacy["steps"]["fr"] < 3 * 3  # it stopped stepping before its planned 9 steps
