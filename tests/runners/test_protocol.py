"""The paper's comparison protocol: evaluation by deliverable, FL rounds as in A.1.2,
the parallel schedule (§3.1), the round trace, data-scarce nodes and the compute axis."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tiny import TREE, FakeTrainer, tiny_config, train_tiny
from worldlm import config as C
from worldlm.data.mixture import Span, cap_spans, mixture_weights
from worldlm.errors import ConfigError
from worldlm.federation.round import run_round, sequential_span
from worldlm.federation.server_opt import ServerOptConfig, make_server_opt
from worldlm.federation.tree import FL_SERVER
from worldlm.federation.types import FedOptions, NodeState, Split
from worldlm.runners.planning import engine_rounds, plan, stages_per_round, tree_from_config


def run_cli(tmp: Path, data: Path, method: str, *sets: str) -> tuple[dict[str, object], list[dict[str, object]]]:
    out = train_tiny(tmp, data, method, *sets)
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("wall_seconds")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def node_ppl(summary: dict[str, object], key: str = "ppl") -> dict[str, float]:
    nodes = summary["nodes"]
    assert isinstance(nodes, dict)
    return {n: v[key] for n, v in nodes.items()}


# ---------------------------------------------------------------------------- planning (A.1.2)


def config_for(method: str, *sets: str) -> C.Config:
    lang_tree = [
        'tree.nodes=[{name="root"}, {name="A", parent="root"}, {name="B", parent="root"}, '
        '{name="a1", parent="A", sources=["a"]}, {name="a2", parent="A", sources=["a"]}, '
        '{name="b1", parent="B", sources=["b"]}, {name="b2", parent="B", sources=["b"]}]'
    ]
    return C.load_config(None, [f'method="{method}"', "train.rounds=4", "train.local_steps=5", *lang_tree, *sets])


class _Layout:
    split = Split(10, 0, 0)
    total = 10


def test_fl_rounds_follow_a12_one_stage_of_local_steps_per_round() -> None:
    # A.1.2: FL clients train local_steps per round and FL runs depth x as many rounds as the hierarchy
    cfg = config_for("fl")
    tree = tree_from_config(cfg)
    (fed,) = plan(cfg, tree, {n: [] for n in tree.order}, _Layout())  # type: ignore[arg-type]
    assert {fed.opts.local_steps[c] for c in fed.tree[fed.tree.root].children} == {5}
    assert fed.opts.local_steps[fed.tree.root] == 0
    assert stages_per_round(cfg, tree) == 3 and engine_rounds(cfg, tree) == 3 * 4
    # equal sequential steps: 12 rounds x 5 = 4 rounds x (3 levels x 5)
    assert engine_rounds(cfg, tree) * sequential_span(fed.tree, fed.tree.root, fed.opts) == 4 * 3 * 5
    # the previous shape stays an option: one FL round per hierarchy round, depth x local_steps per client
    old = config_for("fl", 'federation.fl_round="global"')
    (fed_old,) = plan(old, tree, {n: [] for n in tree.order}, _Layout())  # type: ignore[arg-type]
    assert engine_rounds(old, tree) == 4 and fed_old.opts.local_steps["a1"] == 15


@pytest.mark.parametrize("method", ["worldlm", "hierfavg", "fedper", "centralized", "local"])
def test_other_methods_keep_one_engine_round_per_global_round(method: str) -> None:
    cfg = config_for(method)
    assert engine_rounds(cfg, tree_from_config(cfg)) == 4


def test_parallel_schedule_runs_depth_rounds_of_one_stage() -> None:
    cfg = config_for("worldlm", 'federation.schedule="parallel"')
    tree = tree_from_config(cfg)
    (fed,) = plan(cfg, tree, {n: [] for n in tree.order}, _Layout())  # type: ignore[arg-type]
    assert fed.opts.parallel and sequential_span(fed.tree, "root", fed.opts) == 5
    assert engine_rounds(cfg, tree) == 12


@pytest.mark.e2e
def test_fl_e2e_summary_counts_a12_rounds_and_compute(tmp_path: Path, data: Path) -> None:
    fl, records = run_cli(tmp_path, data, "fl")
    wl, _ = run_cli(tmp_path, data, "worldlm")
    assert fl["rounds"] == 3 * 2 and wl["rounds"] == 2  # depth x WorldLM's rounds
    assert fl["sequential_steps"] == wl["sequential_steps"] == 2 * 3 * 3
    train = [r for r in records if r.get("split") == "train"]
    assert {r["tokens"] for r in train} == {3 * 4 * 32}  # every client trains local_steps (3) x batch 4 x seq 32
    assert len(train) == 7 * 6
    # compute: FL's 7 clients train every sequential step; WorldLM's 7 nodes one level (a third) each
    assert fl["train_tokens"] == 7 * 18 * 4 * 32
    assert wl["train_tokens"] == 7 * 2 * 3 * 4 * 32


# ---------------------------------------------------------------------------- evaluation by deliverable


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["fl", "hierfavg"])
def test_shared_model_methods_deliver_their_global_model_and_report_fine_tuned(
    tmp_path: Path, data: Path, method: str
) -> None:
    # eval.model = "deliverable" is the default; the last round (1) traced: every training's model scored
    deliverable, records = run_cli(tmp_path, data, method, "eval.trace_round=1")
    deployed, _ = run_cli(tmp_path, data, method, 'eval.model="deployed"')
    local, _ = run_cli(tmp_path, data, method, 'eval.model="local"')
    assert deliverable["eval_model"] == "deployed"
    assert node_ppl(deliverable) == node_ppl(deployed)  # one global model on every node's test windows
    # + local fine-tuning: each node's model after its last local training, as the trace scored it then
    last_trained = {r["node"]: r["val_loss"] for r in records if r.get("event") == "trace" and r["what"] == "trained"}
    assert {r["node"]: r["loss"] for r in records if r.get("split") == "val_ft"} == last_trained
    # a leaf's (every FL client's) is its final state; a HierFAVG inner node's final state is its aggregate instead
    ft, own = node_ppl(deliverable, "ppl_ft"), node_ppl(local)
    clients = list(ft) if method == "fl" else ["fr", "it", "uk", "ru"]
    assert {n: ft[n] for n in clients} == {n: own[n] for n in clients}
    assert all(ft[n] != own[n] for n in ft if n not in clients)
    assert "mean_ppl_ft" not in deployed and "mean_ppl_ft" not in local
    ft_records = [r for r in records if r.get("split") in ("test_ft", "val_ft")]
    assert len(ft_records) == 2 * 7
    # the fine-tuned numbers come from the same run: no extra training
    assert deliverable["train_tokens"] == local["train_tokens"]


@pytest.mark.e2e
def test_the_global_model_is_one_model(tmp_path: Path, data: Path) -> None:
    summary, _ = run_cli(tmp_path, data, "fl")
    out = next(p for p in tmp_path.iterdir() if p.name.startswith("run-fl"))
    from safetensors.torch import load_file

    models = [load_file(str(p)) for p in sorted((out / "checkpoints" / "final").glob("*.safetensors"))]
    assert len(models) == 7
    assert all(all(torch.equal(m[k], models[0][k]) for k in m) for m in models[1:])
    assert len(set(node_ppl(summary).values())) > 1  # one model, judged on each node's own windows


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["worldlm", "fedper", "local"])
def test_personalised_methods_deliver_each_nodes_own_model(tmp_path: Path, data: Path, method: str) -> None:
    deliverable, _ = run_cli(tmp_path, data, method)
    local, _ = run_cli(tmp_path, data, method, 'eval.model="local"')
    assert deliverable["eval_model"] == "local" and "mean_ppl_ft" not in deliverable
    assert node_ppl(deliverable) == node_ppl(local)


@pytest.mark.e2e
def test_centralized_delivers_its_one_model(tmp_path: Path, data: Path) -> None:
    summary, _ = run_cli(tmp_path, data, "centralized")
    assert summary["eval_model"] == "deployed" and "mean_ppl_ft" not in summary


# ---------------------------------------------------------------------------- the parallel schedule (§3.1)


def test_parallel_schedule_by_hand() -> None:
    # prepare: a 3-level tree without key layers, FedAvg (lr 1) at every inner node, 2 steps per node
    size, s = 5, 2
    init = torch.linspace(-1, 1, size, dtype=torch.float64)
    opt = ServerOptConfig(kind="fedavg")
    states = {n: NodeState(init.clone(), make_server_opt(opt) if TREE[n].children else None) for n in TREE.order}
    trainer = FakeTrainer(size)
    opts = FedOptions(local_steps={n: s for n in TREE.order}, parallel=True)
    observed: list[tuple[str, str, int]] = []

    # execute: round 1 (every node trains in the window [2, 4))
    def observe(what: str, node: str, step: int, params: torch.Tensor) -> None:
        observed.append((what, node, step))

    run_round(TREE, states, Split(size, 0, 0), opts, 1, trainer, lambda e: None, observe=observe)
    # assert: every node trained once, all in the same sequential window
    assert sorted(trainer.calls) == sorted((n, s, s) for n in TREE.order)
    d = {n: 0.1 * s * trainer.directions[n] for n in TREE.order}
    # a region averages its own update with its leaves' (all from the model it received), then the root likewise
    region = {r: init + (d[r] + sum(d[c] for c in TREE[r].children)) / 3 for r in ("A", "B")}
    root = init + (d["root"] + (region["A"] - init) + (region["B"] - init)) / 3
    for r in ("A", "B"):
        assert torch.allclose(states[r].params, region[r], atol=1e-12)
    assert torch.allclose(states["root"].params, root, atol=1e-12)
    assert sequential_span(TREE, "root", opts) == s
    # the trace sees every training and every aggregation, each at the end of the shared window
    assert sorted(observed) == sorted(
        [("start", "root", s)]
        + [("trained", n, 2 * s) for n in TREE.order]
        + [("aggregated", n, 2 * s) for n in ("root", "A", "B")]
    )


@pytest.mark.e2e
def test_sequential_schedule_trace_follows_the_round(tmp_path: Path, data: Path) -> None:
    _, records = run_cli(tmp_path, data, "hierfavg", "eval.trace_round=1")
    trace = [r for r in records if r.get("event") == "trace"]
    assert all(r["round"] == 1 for r in trace)
    points = [(r["what"], r["node"], r["step"]) for r in trace]
    base = 9  # round 1 starts after 3 levels x 3 steps
    assert points[:2] == [("start", "root", base), ("trained", "root", base + 3)]
    assert ("trained", "fr", base + 9) in points and ("aggregated", "fr-it", base + 9) in points
    assert points[-1] == ("aggregated", "root", base + 9)
    assert len(points) == 1 + 7 + 3
    assert all(r["val_loss_all"] > 0 and r["val_loss"] > 0 for r in trace)


@pytest.mark.e2e
def test_worldlm_trace_scores_each_node_after_it_takes_its_parents_model(tmp_path: Path, data: Path) -> None:
    _, records = run_cli(tmp_path, data, "worldlm", "eval.trace_round=1")
    points = [(r["what"], r["node"], r["step"]) for r in records if r.get("event") == "trace"]
    base = 9  # round 1 starts after 3 levels x 3 steps
    received = [p for p in points if p[0] == "received"]
    # steps 2-3 change the model (the parent's backbone, key layers mixed with the node's own): every non-root
    # node gets a point where its window starts, right before its own training
    assert sorted(received) == sorted(
        [("received", r, base + 3) for r in ("fr-it", "uk-ru")]
        + [("received", n, base + 6) for n in ("fr", "it", "uk", "ru")]
    )
    for _, node, step in received:
        assert points[points.index(("received", node, step)) + 1] == ("trained", node, step + 3)
    assert len(points) == 1 + 6 + 7 + 3


@pytest.mark.e2e
def test_fl_trace_covers_the_same_sequential_steps(tmp_path: Path, data: Path) -> None:
    _, records = run_cli(tmp_path, data, "fl", "eval.trace_round=1")
    trace = [r for r in records if r.get("event") == "trace"]
    assert {r["round"] for r in trace} == {3, 4, 5}  # the 3 FL rounds of global round 1
    agg = [(r["node"], r["step"]) for r in trace if r["what"] in ("start", "aggregated")]
    # each FL round starts from the global model the previous one ended with
    assert agg == [(FL_SERVER, s) for s in (9, 12, 12, 15, 15, 18)]
    assert all(r["val_loss"] is None for r in trace if r["node"] == FL_SERVER)


@pytest.mark.e2e
def test_parallel_schedule_end_to_end_at_equal_sequential_steps(tmp_path: Path, data: Path) -> None:
    summary, records = run_cli(tmp_path, data, "worldlm", 'federation.schedule="parallel"')
    assert summary["rounds"] == 6 and summary["sequential_steps"] == 18
    assert max(int(r["step"]) for r in records if r.get("split") == "train") == 18
    # every node trains every round: 3x the compute of the sequential schedule at equal sequential steps
    assert summary["train_tokens"] == 7 * 18 * 4 * 32


# ---------------------------------------------------------------------------- data-scarce nodes


def test_cap_spans_keeps_proportions_and_the_first_tokens() -> None:
    spans = [Span("a", 0, 3000), Span("b", 100, 1100)]
    capped = cap_spans(spans, 400)
    assert capped == [Span("a", 0, 300), Span("b", 100, 200)]
    assert list(mixture_weights(capped)) == list(mixture_weights(spans))
    assert cap_spans(spans, 10_000) == spans


def test_max_train_tokens_caps_every_node(tmp_path: Path, data: Path) -> None:
    from worldlm.data.prepared import load_prepared
    from worldlm.runners.planning import set_up

    cfg = C.load_config(tiny_config(tmp_path, data), ["data.max_train_tokens=2000"])
    setup = set_up(cfg, load_prepared(cfg.data.path))
    assert all(0 < sum(s.size for s in spans) <= 2000 for spans in setup.spans.values())
    full = set_up(C.load_config(tiny_config(tmp_path, data)), load_prepared(cfg.data.path))
    assert all(sum(s.size for s in spans) > 2000 for spans in full.spans.values())


# ---------------------------------------------------------------------------- configuration errors


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('federation.schedule="paralel"', "federation.schedule 'paralel' is unknown (did you mean 'parallel'?)"),
        ('federation.fl_round="round"', "federation.fl_round 'round' is unknown"),
        ('eval.model="global"', "eval.model 'global' is unknown"),
        ("eval.trace_round=4", "eval.trace_round must be -1 (off) or a round index in [0, 1]"),
        ("data.max_train_tokens=-1", "data.max_train_tokens must be >= 0"),
        ('federation.schedule="parallel"', "needs federation.sub_rounds = 1"),
    ],
)
def test_protocol_options_are_validated(tmp_path: Path, data: Path, override: str, message: str) -> None:
    extra = ["federation.sub_rounds=2"] if "parallel" in override and "paralel" not in override else []
    with pytest.raises(ConfigError, match=re.escape(message)):
        C.load_config(tiny_config(tmp_path, data), [override, *extra])


def test_new_defaults_are_the_papers() -> None:
    cfg = C.Config()
    assert cfg.eval.model == "deliverable" and cfg.federation.fl_round == "stage"
    # the paper's FedAvgM (mu_s = 0.9) lost to plain FedAvg on validation (results/paper-regime-sweep)
    assert cfg.federation.server_opt.kind == "fedavg" and cfg.federation.server_opt.momentum == 0.9
    assert cfg.federation.route_to_origin and cfg.train.lr_alpha == 0.01
    assert cfg.federation.schedule == "sequential"
