"""On the CPU: device and precision settings, gradient accumulation, and their errors.

A CUDA machine is not needed: `device = "cpu"` must be today's run bit for bit, bf16 autocast must run
and stay near fp32, k micro-batches must give one batch's step, and what this machine cannot do is a
one-line error.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

from tiny import summary_of, tiny_config, train_tiny
from worldlm import config as C
from worldlm.cli import main
from worldlm.errors import ConfigError
from worldlm.model import GPT, GPTConfig
from worldlm.training.device import Compute, resolve_compute
from worldlm.training.loop import ClientOptConfig, Schedule, make_client_opt, train_steps


def _batches(n: int, batch: int, seq: int, vocab: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
        out.append((ids[:, :-1], ids[:, 1:]))
    return out


def _train(model: GPT, compute: Compute, steps: int = 3) -> list[float]:
    opt = make_client_opt(model, ClientOptConfig())
    batches = iter(_batches(steps, 8, 16, model.cfg.vocab_size))
    losses: list[float] = []
    train_steps(
        model,
        opt,
        lambda: next(batches),
        Schedule(1e-3, 0.1, 1, steps),
        0,
        steps,
        1.0,
        on_step=lambda _s, loss: losses.append(loss),
        compute=compute,
    )
    return losses


def test_gradient_accumulation_equals_one_batch() -> None:
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, seq_len=16))
    cpu = torch.device("cpu")
    results = {}
    for k in (1, 2, 4):
        model = copy.deepcopy(base)
        losses = _train(model, Compute(cpu, None, k))
        results[k] = (losses, torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    for k in (2, 4):  # k micro-batches of 8/k sequences: the same losses and the same weights, within rounding
        assert results[k][0] == pytest.approx(results[1][0], rel=1e-6)
        torch.testing.assert_close(results[k][1], results[1][1], rtol=0, atol=1e-6)


def test_bf16_autocast_runs_on_the_cpu_near_fp32() -> None:
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, vocab_size=64, seq_len=16))
    cpu = torch.device("cpu")
    fp32 = _train(copy.deepcopy(base), Compute(cpu, None, 1))
    bf16_model = copy.deepcopy(base)
    bf16 = _train(bf16_model, Compute(cpu, torch.bfloat16, 1))
    assert all(p.dtype == torch.float32 for p in bf16_model.parameters())  # master weights stay fp32
    # stated tolerance: bf16 autocast losses within 2 % of fp32's over these steps (measured here: 5e-6 relative)
    assert bf16 == pytest.approx(fp32, rel=0.02) and bf16 != fp32


@pytest.mark.e2e
def test_device_cpu_is_todays_run_and_resumes_under_auto(data: Path, tmp_path: Path) -> None:
    default = train_tiny(tmp_path, data, "worldlm")
    cpu = train_tiny(tmp_path, data, "worldlm", 'train.device="cpu"', 'train.precision="fp32"')
    assert summary_of(cpu) == summary_of(default)
    # train.device is not part of a run's identity: a run checkpointed under one setting resumes under another
    shutil.rmtree(cpu / "checkpoints" / "final")
    shutil.rmtree(sorted((cpu / "checkpoints").glob("round-*"))[-1])
    (cpu / "summary.json").unlink()
    cfg = tiny_config(tmp_path, data)
    args = ["train", str(cfg), "--out", str(cpu), "--quiet", "--resume", "--set", 'train.precision="fp32"']
    assert main([*args, "--set", 'train.device="auto"']) == 0
    assert summary_of(cpu) == summary_of(default)


def test_what_the_machine_cannot_do_is_one_line(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tiny_config(tmp_path, data)
    with pytest.raises(ConfigError, match=r"grad_accum = 3 must be >= 1 and divide train\.batch_size = 4"):
        C.load_config(cfg, ["train.grad_accum=3"])
    with pytest.raises(ConfigError, match=r"train\.precision 'fp16' is unknown"):
        C.load_config(cfg, ['train.precision="fp16"'])
    with pytest.raises(ConfigError, match=r"train\.device 'gpu' is unknown"):
        C.load_config(cfg, ['train.device="gpu"'])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="has no CUDA device"):
        resolve_compute("cuda:1", "auto", 1)
    assert main(["train", str(cfg), "--out", str(tmp_path / "x"), "--set", 'train.device="cuda"']) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err
    auto = resolve_compute("auto", "auto", 1)
    assert auto.device.type == "cpu" and auto.autocast is None and auto.accum == 1


@pytest.mark.e2e
def test_gpu_check_dry_run_writes_its_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the same code as on a GPU, on the CPU at a tiny size (scripts/gpu_check.sh runs this without CUDA)
    assert main(["gpu-check", "--dry-run", "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["dry_run"] and result["matmul_peak_flops"] > 0
    assert [r["preset"] for r in result["throughput"]] == ["nano"] and result["throughput"][0]["tokens_per_s"] > 0
    methods = result["tree"]["methods"]
    assert set(methods) == {"worldlm", "fl"}
    assert methods["worldlm"]["sequential_steps"] == methods["fl"]["sequential_steps"] == 3 * 2
    assert methods["fl"]["train_tokens"] == 3 * methods["worldlm"]["train_tokens"]  # A.1.2: FL's 3x compute
    assert "CPU dry run" in (tmp_path / "results.md").read_text()
    if not torch.cuda.is_available():  # without --dry-run: one line, the dry run in a scratch directory, exit 0
        assert main(["gpu-check", "--out", str(tmp_path / "none"), "--quiet"]) == 0
        assert capsys.readouterr().out.startswith("gpu-check: no CUDA device") and not (tmp_path / "none").exists()


def test_memory_plan_of_the_paper_presets_matches_a_hand_count() -> None:
    from worldlm.tools.memory import memory_plan

    # 125m by hand: V·C + T·C (embeddings) + L·(12C² + 4C) (blocks: qkv 3C², proj C², MLP 8C², two LayerNorms)
    # + 2C (final LayerNorm), with V = 50304, T = 1024, C = 768, L = 12
    v, t, c, layers = 50304, 1024, 768, 12
    params = v * c + t * c + layers * (12 * c * c + 4 * c) + 2 * c
    assert params == 124_392_960
    plan = memory_plan("125m", v, t, micro_batch=8, bf16=True, server_opt="fedavgm", key_blocks=4)
    assert plan.parameters == params
    assert (plan.weights, plan.gradients, plan.optimizer, plan.node_state) == (
        4 * params,
        4 * params,
        8 * params,
        4 * params,
    )
    backbone = params - 4 * (12 * c * c + 4 * c)
    assert plan.server_state == 4 * backbone  # one momentum buffer over the backbone
    per_token = 38 * c * layers + 6 * c + 4 * v  # bf16 autocast, by the module's list
    assert plan.activations == per_token * 8 * t
    assert plan.total == 20 * params + 4 * backbone + per_token * 8 * t
    # fp32 keeps more per token; a leaf (no server optimizer) nothing for it
    leaf32 = memory_plan("125m", v, t, micro_batch=8, bf16=False)
    assert leaf32.server_state == 0 and leaf32.activations == (68 * c * layers + 8 * c + 4 * v) * 8 * t
    for preset in ("75m", "250m", "400m"):
        assert memory_plan(preset, v, t, 8).total > 0


def test_deploy_local_gpus_round_robin_and_errors(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("flwr")
    from worldlm.runners.flower.deploy import gpu_assignment

    nodes = ["root", "fr-it", "uk-ru", "fr", "it", "uk", "ru"]
    env = gpu_assignment(nodes, [0, 1, 3])
    assert [env[n]["CUDA_VISIBLE_DEVICES"] for n in nodes] == ["0", "1", "3", "0", "1", "3", "0"]
    assert gpu_assignment(nodes, []) == {n: {} for n in nodes}
    cfg = tiny_config(tmp_path, data)
    assert main(["deploy-local", str(cfg), "--out", str(tmp_path / "x"), "--gpus", "0,a"]) == 2
    assert "--gpus takes GPU indices" in capsys.readouterr().err
    if not torch.cuda.is_available():  # checked before any process starts
        assert main(["deploy-local", str(cfg), "--out", str(tmp_path / "y"), "--gpus", "0"]) == 2
        assert "this machine has none" in capsys.readouterr().err


@pytest.mark.e2e
def test_states_in_host_memory_give_the_same_run(data: Path, tmp_path: Path) -> None:
    default = train_tiny(tmp_path, data, "worldlm")
    host = train_tiny(tmp_path, data, "worldlm", 'federation.offload_states="host"')
    assert summary_of(host) == summary_of(default)
    with pytest.raises(ConfigError, match='must be false, true \\(disk\\) or "host"'):
        C.load_config(tiny_config(tmp_path, data), ['federation.offload_states="gpu"'])


def test_host_states_move_every_tensor_of_a_node_state() -> None:
    from worldlm.federation.types import NodeState, Residual
    from worldlm.runners.state_store import HostStates

    # prepare: a state with every tensor the checkpoint holds but the server optimizer's (its load_state_dict
    # reads its step count, which a device without values cannot give; resume tests cover its round trip)
    st = NodeState(torch.zeros(6), None, [Residual(torch.ones(3), 0, "a")], [Residual(torch.ones(3), 1, "b")])
    st.reference, st.child_keys, st.low_rounds = torch.ones(2, 3), {"a": torch.ones(2, 3)}, {"a": 2}
    states = HostStates(torch.device("meta"))  # a device without values: anything left behind shows
    states["q"] = st
    # execute
    moved = states["q"]
    # assert: the same object, every tensor on the working device, the metadata kept
    tensors = [moved.params, moved.reference, *moved.child_keys.values()]
    tensors += [r.vector for r in moved.to_aggregate + moved.to_route]
    assert moved is st
    assert {t.device.type for t in tensors if t is not None} == {"meta"}
    assert [(r.position, r.origin) for r in moved.to_aggregate + moved.to_route] == [(0, "a"), (1, "b")]
    assert moved.low_rounds == {"a": 2} and list(moved.child_keys) == ["a"]
