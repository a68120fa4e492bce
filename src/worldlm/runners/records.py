"""The records every runner writes alike: metrics.jsonl lines, the divergence rule and summary.json
(docs/design.md, "Run directory")."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from worldlm import config as C
from worldlm.federation.types import BYTES_PER_VALUE
from worldlm.privacy.record import RecordDP
from worldlm.training.loop import TrainStats


def train_record(rnd: int, level: int, node: str, end_step: int, stats: TrainStats) -> dict[str, Any]:
    """The metrics.jsonl record of one node's local training (4.i); stage = tree level + 1."""
    return {
        "round": rnd,
        "stage": level + 1,
        "node": node,
        "split": "train",
        "loss": stats.loss,
        "ppl": math.exp(min(stats.loss, 50.0)),
        "tokens": stats.tokens,
        "seconds": round(stats.seconds, 4),
        "tokens_per_s": round(stats.tokens / stats.seconds, 1),
        "step": end_step,
    }


def eval_record(rnd: int, node: str, split: str, loss: float, ppl: float, tokens: int, step: int) -> dict[str, Any]:
    """The metrics.jsonl record of one node's personalised evaluation (stage None: not a training stage)."""
    return {
        "round": rnd,
        "stage": None,
        "node": node,
        "split": split,
        "loss": loss,
        "ppl": ppl,
        "tokens": tokens,
        "step": step,
    }


def trace_record(rnd: int, node: str, what: str, step: int, own: float | None, everyone: float) -> dict[str, Any]:
    """eval.trace_round: validation loss of the model that travels at `node`, at `what` (start, trained, aggregated).

    `val_loss`: on the node's own validation windows (None for a node outside the tree, FL's server);
    `val_loss_all`: mean over every tree node's validation windows.
    """
    return {
        "event": "trace",
        "round": rnd,
        "node": node,
        "what": what,
        "step": step,
        "val_loss": own,
        "val_loss_all": everyone,
    }


def all_diverged(losses: Sequence[float]) -> bool:
    """Every node that trained this round ended with a NaN/inf loss: the run cannot recover, stop it.

    A non-finite loss means non-finite weights (the step's clipped gradient is NaN), and a NaN
    spreads through every aggregation it enters, so the remaining rounds would only burn compute.
    """
    return bool(losses) and not any(math.isfinite(x) for x in losses)


def budget_message(event: dict[str, Any], rnd: int) -> str:
    """The stderr line when a node-level DP node reaches dp.epsilon_budget (every runner)."""
    return (
        f"DP node '{event['node']}' stops releasing updates in round {rnd}: its next release would "
        f"reach epsilon {float(str(event['next_epsilon'])):.3g} > dp.epsilon_budget {event['budget']} "
        f"(spent {float(str(event['epsilon'])):.3g}); its parent aggregates without it"
    )


def diverged_message(rnd: int, rounds: int) -> str:
    return (
        f"round {rnd}: every node's training loss is NaN/inf, the run diverged; stopping after round {rnd + 1} of "
        f"{rounds} (summary.json reports NaN perplexities and diverged_round; lower train.lr_max or dp.sigma)"
    )


def run_summary(
    cfg: C.Config,
    order: Sequence[str],
    test: dict[str, dict[str, float]],
    val: dict[str, dict[str, float]],
    edges: dict[str, int],
    progress: tuple[int, int, int],
    model: tuple[int, int],
    wall_seconds: float,
    diverged_round: int | None = None,
    fine_tuned: tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]] | None = None,
) -> dict[str, Any]:
    """summary.json (docs/design.md, "Run directory") for every runner.

    `progress` = (engine rounds planned, sequential steps trained, training tokens of all nodes
    together: the run's compute); `model` = (parameters, key blocks). A node without a test result
    (a Flower node that never answered) gets None values, is left out of the mean and is listed
    under "missing_nodes". A run stopped because it diverged (see `all_diverged`) has
    "diverged_round" and the sequential steps it actually trained. `fine_tuned` = (test, val) of
    each client's model after its last local steps (FL / HierFAVG "+ local fine-tuning", see
    config.scores_fine_tuned): `ppl_ft`, `val_ppl_ft` per node and `mean_ppl_ft`, `std_ppl_ft`.
    """
    ppls = np.array([test[n]["ppl"] for n in order if n in test])
    rounds, sequential_steps, train_tokens = progress

    def sent(n: str) -> int:
        return sum(v for k, v in edges.items() if k.split("->")[0] == n)

    def received(n: str) -> int:
        return sum(v for k, v in edges.items() if k.split("->")[1] == n)

    summary: dict[str, Any] = {
        "name": cfg.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "nodes": {
            n: {
                "ppl": test[n]["ppl"] if n in test else None,
                "loss": test[n]["loss"] if n in test else None,
                "val_ppl": val[n]["ppl"] if n in val else None,
                "bytes_sent": sent(n),
                "bytes_received": received(n),
            }
            for n in order
        },
        "mean_ppl": float(ppls.mean()),
        "std_ppl": float(ppls.std()),
        "eval_model": C.eval_model(cfg),
        "rounds": rounds,
        "sequential_steps": sequential_steps,
        "train_tokens": train_tokens,
        "parameters": model[0],
        "key_blocks": model[1],
        "bytes_per_edge": dict(sorted(edges.items())),
        "bytes_total": sum(edges.values()),
        "bytes_per_value": BYTES_PER_VALUE,
        "wall_seconds": round(wall_seconds, 2),
    }
    if fine_tuned is not None:
        test_ft, val_ft = fine_tuned
        for n in order:
            summary["nodes"][n]["ppl_ft"] = test_ft[n]["ppl"] if n in test_ft else None
            summary["nodes"][n]["val_ppl_ft"] = val_ft[n]["ppl"] if n in val_ft else None
        ft = np.array([test_ft[n]["ppl"] for n in order if n in test_ft])
        summary["mean_ppl_ft"] = float(ft.mean())
        summary["std_ppl_ft"] = float(ft.std())
    if missing := [n for n in order if n not in test]:
        summary["missing_nodes"] = missing
    if diverged_round is not None:
        summary["diverged_round"] = diverged_round
    return summary


def record_dp_record(rnd: int, node: str, dp_sgd: RecordDP, delta: float) -> dict[str, Any]:
    """A record-level DP node's `privacy` record: ε so far at δ (Opacus RDP), its σ, q and steps (every runner)."""
    return {
        "event": "privacy",
        "round": rnd,
        "node": node,
        "unit": "record",
        "epsilon": dp_sgd.epsilon(delta),
        "delta": delta,
        "noise_multiplier": dp_sgd.noise_multiplier,
        "sample_rate": dp_sgd.sample_rate,
        "steps": sum(n for _, _, n in dp_sgd.accountant.history),
        "stopped": dp_sgd.stopped,
    }


def record_privacy_summary(cfg: C.Config, latest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's `privacy` of a record-level DP run from each DP node's latest `privacy` record."""
    return {
        "privacy": {
            "unit": "record",
            "reproducible_noise": cfg.dp.reproducible_noise,
            "delta": cfg.dp.delta,
            "epsilon": {n: r["epsilon"] for n, r in latest.items()},
            "target_epsilon": cfg.dp.target_epsilon,
            "max_grad_norm": cfg.dp.max_grad_norm,
            "noise_multiplier": {n: r["noise_multiplier"] for n, r in latest.items()},
            "sample_rate": {n: r["sample_rate"] for n, r in latest.items()},
            "steps": {n: r["steps"] for n, r in latest.items()},
            "stopped": sorted(n for n, r in latest.items() if r["stopped"]),
            "accountant": "Opacus RDP, Poisson-subsampled Gaussian per DP-SGD step, a record = one window",
        }
    }


def node_privacy_summary(cfg: C.Config, latest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's `privacy` of a node-level DP run (DPFedAvg, §4.2) from each DP node's latest record."""
    return {
        "privacy": {
            "unit": "node",
            "reproducible_noise": cfg.dp.reproducible_noise,
            "delta": cfg.dp.delta,
            "epsilon": {n: r["epsilon"] for n, r in latest.items()},
            "sigma": cfg.dp.sigma,
            "clip_rule": cfg.dp.clip,
            "releases": {n: r["releases"] for n, r in latest.items()},
            "stopped": sorted(n for n, r in latest.items() if r["stopped"]),
            "accountant": "dp-accounting RDP, Gaussian mechanism per release, add-or-remove adjacency",
        }
    }


def privacy_summary(cfg: C.Config, latest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """summary.json's `privacy` from each DP node's latest `privacy` record (record- or node-level); {} without DP."""
    if not latest:
        return {}
    if cfg.dp.unit == "record":
        return record_privacy_summary(cfg, latest)
    return node_privacy_summary(cfg, latest)
