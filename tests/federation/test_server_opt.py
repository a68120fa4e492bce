"""Outer optimisers (paper A.3.6; per-level server momentum): hand-computed two-step sequences,
FedAvg = mean of the children, exact resume through state_dict, one state per instance."""

from __future__ import annotations

import io
import math

import pytest
import torch

from worldlm.federation.server_opt import (
    SERVER_OPTS,
    FedAdam,
    FedAvg,
    FedAvgM,
    Nesterov,
    ServerOptConfig,
    average_pseudo_gradient,
    make_server_opt,
)


def t64(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


B0 = t64(1.0, 2.0)
D1 = t64(1.0, -1.0)
D2 = t64(2.0, 0.0)


def two_steps(cfg: ServerOptConfig) -> tuple[torch.Tensor, torch.Tensor]:
    opt = make_server_opt(cfg)
    b1 = opt.step(B0, D1)
    b2 = opt.step(b1, D2)
    return b1, b2


def test_fedavg_two_steps() -> None:
    b1, b2 = two_steps(ServerOptConfig(kind="fedavg", lr=0.5))
    # B1 = B0 + 0.5·Δ1 ; B2 = B1 + 0.5·Δ2
    torch.testing.assert_close(b1, t64(1.5, 1.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(b2, t64(2.5, 1.5), rtol=0, atol=1e-15)


def test_fedavgm_two_steps() -> None:
    b1, b2 = two_steps(ServerOptConfig(kind="fedavgm", lr=0.5, momentum=0.9))
    # m1 = Δ1 = (1, -1)           B1 = (1, 2) + 0.5·(1, -1)       = (1.5, 1.5)
    # m2 = 0.9·m1 + Δ2 = (2.9, -0.9)  B2 = (1.5, 1.5) + 0.5·(2.9, -0.9) = (2.95, 1.05)
    torch.testing.assert_close(b1, t64(1.5, 1.5), rtol=0, atol=1e-15)
    torch.testing.assert_close(b2, t64(2.95, 1.05), rtol=0, atol=1e-15)


def test_nesterov_two_steps() -> None:
    b1, b2 = two_steps(ServerOptConfig(kind="nesterov", lr=0.5, momentum=0.9))
    # m1 = (1, -1); step = Δ1 + 0.9·m1 = (1.9, -1.9); B1 = (1, 2) + 0.5·step = (1.95, 1.05)
    # m2 = (2.9, -0.9); step = Δ2 + 0.9·m2 = (4.61, -0.81); B2 = (1.95 + 2.305, 1.05 - 0.405)
    torch.testing.assert_close(b1, t64(1.95, 1.05), rtol=0, atol=1e-15)
    torch.testing.assert_close(b2, t64(4.255, 0.645), rtol=0, atol=1e-14)


def test_fedadam_two_steps() -> None:
    cfg = ServerOptConfig(kind="fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    b1, b2 = two_steps(cfg)
    # m1 = 0.1·Δ1 = (0.1, -0.1); v1 = 0.01·Δ1² = (0.01, 0.01); √v1 = (0.1, 0.1)
    step1 = [0.1 / (0.1 + 1e-3), -0.1 / (0.1 + 1e-3)]
    want1 = [1.0 + 0.1 * step1[0], 2.0 + 0.1 * step1[1]]
    # m2 = 0.9·m1 + 0.1·Δ2 = (0.29, -0.09); v2 = 0.99·v1 + 0.01·Δ2² = (0.0499, 0.0099)
    step2 = [0.29 / (math.sqrt(0.0499) + 1e-3), -0.09 / (math.sqrt(0.0099) + 1e-3)]
    want2 = [want1[0] + 0.1 * step2[0], want1[1] + 0.1 * step2[1]]
    torch.testing.assert_close(b1, t64(*want1), rtol=0, atol=1e-14)
    torch.testing.assert_close(b2, t64(*want2), rtol=0, atol=1e-14)


def test_fedavg_lr1_equals_mean_of_children() -> None:
    # prepare
    g = torch.Generator().manual_seed(0)
    parent = torch.randn(10, generator=g)
    children = [torch.randn(10, generator=g) for _ in range(3)]
    opt = make_server_opt(ServerOptConfig(kind="fedavg", lr=1.0))
    # execute
    new = opt.step(parent, average_pseudo_gradient(parent, children))
    # assert
    torch.testing.assert_close(new, torch.stack(children).mean(0), rtol=0, atol=1e-6)


def test_average_pseudo_gradient_weights() -> None:
    parent = t64(0.0, 0.0)
    children = [t64(1.0, 0.0), t64(0.0, 4.0)]

    torch.testing.assert_close(average_pseudo_gradient(parent, children), t64(0.5, 2.0), rtol=0, atol=0)
    torch.testing.assert_close(
        average_pseudo_gradient(parent, children, weights=[3.0, 1.0]), t64(0.75, 1.0), rtol=0, atol=0
    )
    with pytest.raises(ValueError):
        average_pseudo_gradient(parent, [])
    with pytest.raises(ValueError):
        average_pseudo_gradient(parent, children, weights=[0.0, 0.0])


@pytest.mark.parametrize("kind", sorted(SERVER_OPTS))
def test_step_does_not_mutate_inputs(kind: str) -> None:
    params, delta = t64(1.0, 2.0, 3.0), t64(0.5, -0.5, 0.0)
    p_copy, d_copy = params.clone(), delta.clone()

    out = make_server_opt(ServerOptConfig(kind=kind)).step(params, delta)

    assert torch.equal(params, p_copy) and torch.equal(delta, d_copy)
    assert out.data_ptr() != params.data_ptr()


@pytest.mark.parametrize("kind", sorted(SERVER_OPTS))
def test_state_dict_round_trip_continues_identically(kind: str) -> None:
    # prepare: a run that takes 5 steps, and a run saved after 2 steps and restarted
    g = torch.Generator().manual_seed(1)
    deltas = [torch.randn(64, generator=g) for _ in range(5)]
    cfg = ServerOptConfig(kind=kind, lr=0.7)
    straight = make_server_opt(cfg)
    b = torch.randn(64, generator=g)
    b_saved = b
    for i, d in enumerate(deltas):
        b = straight.step(b, d)
        if i == 1:
            b_saved = b.clone()
            buf = io.BytesIO()
            torch.save(straight.state_dict(), buf)
    # execute: restore into a fresh instance (through bytes, as a checkpoint would) and continue
    resumed = make_server_opt(cfg)
    buf.seek(0)
    resumed.load_state_dict(torch.load(buf))
    r = b_saved
    for d in deltas[2:]:
        r = resumed.step(r, d)
    # assert: bit-identical
    assert torch.equal(r, b)
    assert resumed.steps == straight.steps == 5
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value)


def test_state_dict_is_a_copy() -> None:
    opt = make_server_opt(ServerOptConfig(kind="fedavgm"))
    opt.step(t64(0.0), t64(1.0))
    saved = opt.state_dict()
    opt.step(t64(0.0), t64(1.0))
    assert saved["momentum"].tolist() == [1.0]
    assert int(saved["step"]) == 1


def test_momentum_state_is_per_instance() -> None:
    # two inner nodes, each with its own optimiser: stepping one never moves the other
    cfg = ServerOptConfig(kind="fedavgm", lr=1.0, momentum=0.5)
    region_a, region_b = make_server_opt(cfg), make_server_opt(cfg)
    region_a.step(t64(0.0), t64(10.0))
    region_a.step(t64(0.0), t64(10.0))

    out_b = region_b.step(t64(0.0), t64(1.0))

    assert out_b.tolist() == [1.0]  # fresh momentum: m = Δ
    assert region_a.state_dict()["momentum"].tolist() == [15.0]
    assert region_b.state_dict()["momentum"].tolist() == [1.0]


def test_state_is_lazily_sized() -> None:
    opt = make_server_opt(ServerOptConfig(kind="fedadam"))
    assert set(opt.state_dict()) == {"step"}

    opt.step(torch.zeros(7), torch.ones(7))

    sd = opt.state_dict()
    assert set(sd) == {"step", "m", "v"} and sd["m"].shape == (7,) and sd["v"].shape == (7,)
    with pytest.raises(ValueError, match="shape"):
        opt.step(torch.zeros(8), torch.ones(8))


def test_load_state_dict_rejects_foreign_state() -> None:
    adam = make_server_opt(ServerOptConfig(kind="fedadam"))
    adam.step(torch.zeros(3), torch.ones(3))
    momentum = make_server_opt(ServerOptConfig(kind="fedavgm"))
    with pytest.raises(ValueError):
        momentum.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError):
        momentum.load_state_dict({"step": torch.tensor(3)})  # momentum missing after 3 steps


def test_dtype_is_preserved_and_state_is_float32() -> None:
    opt = make_server_opt(ServerOptConfig(kind="nesterov"))
    out = opt.step(torch.ones(4, dtype=torch.bfloat16), torch.ones(4, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert opt.state_dict()["momentum"].dtype == torch.float32


def test_registry_and_factory() -> None:
    assert set(SERVER_OPTS) == {"fedavg", "fedavgm", "nesterov", "fedadam"}
    expected = {"fedavg": FedAvg, "fedavgm": FedAvgM, "nesterov": Nesterov, "fedadam": FedAdam}
    for kind, cls in expected.items():
        opt = make_server_opt(ServerOptConfig(kind=kind))
        assert type(opt) is cls and opt.kind == kind
    assert ServerOptConfig().kind == "fedavg" and ServerOptConfig().momentum == 0.9  # one default: the config's


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "sgd"}, "fedadam, fedavg, fedavgm, nesterov"),
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"momentum": -0.1}, "momentum"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": 1.5}, "beta2"),
        ({"tau": 0.0}, "tau"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ServerOptConfig(**kwargs)  # type: ignore[arg-type]


def test_step_rejects_mismatched_shapes() -> None:
    opt = make_server_opt(ServerOptConfig(kind="fedavg"))
    with pytest.raises(ValueError):
        opt.step(torch.zeros(3), torch.zeros(4))
