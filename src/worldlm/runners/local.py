"""The in-process runner: every node of the tree lives in this process, deterministically.

It runs the planned federations (runners/planning.py) round by round with the in-process trainer
(runners/trainer.py), evaluates each node's personalised model, checkpoints and resumes, and
writes the run directory (docs/design.md, "Run directory") with the records every runner shares (runners/records.py).
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from worldlm import config as C
from worldlm.data.prepared import load_prepared
from worldlm.data.samplers import eval_windows
from worldlm.errors import WorldLMError
from worldlm.federation.round import run_round
from worldlm.files import JsonlWriter, atomic_write_bytes, atomic_write_json, atomic_write_text
from worldlm.privacy.node import Privacy
from worldlm.runners.checkpoint import CannotResume, Part, Snapshot, load_latest, save_checkpoint
from worldlm.runners.metrics_log import metrics_writer
from worldlm.runners.planning import (
    FINE_TUNED,
    initial_state,
    make_privacy,
    personal_models,
    server_opt_for,
    set_up,
    stages_per_round,
    steps_per_round,
    train_tokens,
    training_node,
)
from worldlm.runners.records import (
    all_diverged,
    budget_message,
    diverged_message,
    eval_record,
    privacy_summary,
    record_dp_record,
    run_summary,
    trace_record,
    train_record,
)
from worldlm.runners.resume import Interrupted, StopFlag, drop_rounds_from, graceful_stop, truncate_lines
from worldlm.runners.state_store import DiskStates, HostStates, NodeStates, encode_state, load_state
from worldlm.runners.trainer import LocalTrainer
from worldlm.timing import PhaseTimer, round_record
from worldlm.training.evaluate import evaluate
from worldlm.training.loop import TrainStats

ProgressFn = Callable[[dict[str, Any]], None]


class LocalRun:
    """One method on one tree, in this process: set-up, rounds, evaluation, checkpoints, summary."""

    def __init__(self, cfg: C.Config, out: Path, progress: ProgressFn | None = None) -> None:
        self.cfg, self.out = cfg, out
        self.progress = progress or (lambda _e: None)
        if cfg.train.threads > 0:
            torch.set_num_threads(cfg.train.threads)
        self.data = load_prepared(cfg.data.path)
        setup = set_up(cfg, self.data)
        self.tree, self.spans, self.feds = setup.tree, setup.spans, setup.feds
        self.model, self.layout = setup.model, setup.layout
        self.compute, self.forward = setup.compute, setup.forward
        self.timer = PhaseTimer()
        self.offload = out / "offload" if cfg.federation.offload_states is True else None
        if self.offload is not None:  # federation.offload_states: node states in files between uses
            for i, fed in enumerate(self.feds):
                server_opt = partial(server_opt_for, self.cfg, fed)
                fed.states = DiskStates(self.offload / str(i), server_opt, self.timer.phase, self.compute.device)
        if cfg.federation.offload_states == "host":  # node states in host memory between uses
            for fed in self.feds:
                fed.states = HostStates(self.compute.device, self.timer.phase)
        # DP per federation index (only federations holding dp-flagged nodes with a parent)
        self.privacy = {i: p for i, fed in enumerate(self.feds) if (p := make_privacy(cfg, fed)) is not None}
        self.per_round = setup.per_round
        self.rounds = setup.rounds  # engine rounds: depth x train.rounds where a round is one stage (A.1.2)
        self.stages = stages_per_round(cfg, self.tree)
        self.eval_mode = C.eval_model(cfg)  # what `deliverable` means for this method
        self.trainer = LocalTrainer(
            self.model,
            self.layout,
            setup.client,
            setup.schedule,
            self.offload,
            self.timer.phase,
            self.compute,
            self.forward,
        )
        self.trainer.on_train, self.trainer.on_step = self._on_train, self._on_step
        self._init_nodes()
        n_windows = cfg.eval.batches * cfg.eval.batch_size
        self.windows = {
            (name, split): eval_windows(self.data, self.spans[name], split, cfg.model.seq_len, n_windows)
            for name in self.tree.order
            for split in ("val", "test")
        }
        self.round = 0  # rounds completed
        self.round_losses: list[float] = []  # this round's training losses, one per node visit
        self.diverged_round: int | None = None
        self.edge_bytes: dict[str, int] = {}
        self.val: dict[str, dict[str, float]] = {}
        self.metrics: JsonlWriter | None = None
        self.round_seconds: list[dict[str, float | int]] = []  # this session's timing.jsonl records
        self.tracing = False  # this round is eval.trace_round: evaluate the travelling model (see _observe)
        self.t_start = time.perf_counter()
        self.elapsed_before = 0.0  # wall seconds of earlier sessions of a resumed run

    def _init_nodes(self) -> None:
        init = self.layout.flatten(self.model)
        self.level: dict[str, int] = {}
        for fed in self.feds:
            for name in fed.tree.order:
                node = fed.tree[name]
                self.level[name] = node.level
                fed.states[name] = initial_state(self.cfg, fed, name, init)
                fed.states.release(name)
                if node.trains:
                    self.trainer.add_node(name, *training_node(self.cfg, self.data, fed, name, self.rounds))

    # ------------------------------------------------------------------ observability

    def _write(self, record: dict[str, Any]) -> None:
        assert self.metrics is not None
        self.metrics.write(record)

    def _on_train(self, node: str, start_step: int, n_steps: int, stats: TrainStats) -> None:
        self.round_losses.append(stats.loss)
        self._write(train_record(self.round, self.level[node], node, start_step + n_steps, stats))

    def _on_step(self, node: str, step: int, loss: float) -> None:
        tokens = self.cfg.train.batch_size * self.cfg.model.seq_len
        self.progress({"kind": "step", "node": node, "step": step, "loss": loss, "tokens": tokens})

    def _observe(self, what: str, node: str, step: int, params: Tensor) -> None:
        """eval.trace_round: the validation loss of the model that travels, after each training and aggregation.

        Scored on the node's own validation windows (when it is a tree node) and on every tree node's
        (the mean loss over nodes: the windows a shared model is judged on), so the stages of a round,
        and FL's global model over the same sequential steps, are on one scale.
        """
        if not self.tracing:
            return
        with self.timer.phase("evaluation"):
            self.layout.load(self.model, params)
            losses = {
                n: evaluate(self.forward, self.windows[(n, "val")], self.cfg.eval.batch_size, self.compute)[0]
                for n in self.tree.order
            }
        own = losses.get(node)
        self._write(trace_record(self.round, node, what, step, own, float(np.mean(list(losses.values())))))

    def _emit(self, event: dict[str, object]) -> None:
        if event["event"] == "edge":
            key = f"{event['src']}->{event['dst']}"
            self.edge_bytes[key] = self.edge_bytes.get(key, 0) + int(str(event["bytes"]))
        self._write(event)

    def _end_privacy_round(self, privacy: Privacy, rnd: int) -> None:
        """Paper §4.2: next round's clip bounds; epsilon per DP node into metrics.jsonl; budget stops, loudly."""
        privacy.end_round()
        for event in privacy.events:  # a node reached dp.epsilon_budget: logged once, here and on stderr
            self._write({**event, "round": rnd})
            print(f"worldlm: {budget_message(event, rnd)}", file=sys.stderr)
        privacy.events.clear()
        for record in privacy.records():
            self._write({"event": "privacy", "round": rnd, **record})

    # ------------------------------------------------------------------ evaluation

    def user_models(self, mode: str) -> Iterator[tuple[str, Tensor]]:
        """(user node, its model under `mode`: "local", "deployed" or FINE_TUNED) for every tree node, one at a time."""
        for fed in self.feds:
            users: dict[str, list[str]] = {}
            for user_node, engine_node in fed.evaluates.items():
                users.setdefault(engine_node, []).append(user_node)
            for engine_node, params in personal_models(fed, mode):
                for user_node in users.get(engine_node, []):
                    yield user_node, params

    def evaluate_all(self, split: str, rnd: int, fine_tuned: bool = False) -> dict[str, dict[str, float]]:
        """Every node's delivered model on its own `split` windows (docs/design.md, "The metric").

        `fine_tuned`: instead each client's model after its last local steps (an inner node's before it
        aggregated), the "+ local fine-tuning" baseline of FL and HierFAVG, logged as split "<split>_ft".
        """
        results: dict[str, dict[str, float]] = {}
        for user_node, params in self.user_models(FINE_TUNED if fine_tuned else self.eval_mode):
            self.layout.load(self.model, params)
            windows = self.windows[(user_node, split)]
            loss, ppl = evaluate(self.forward, windows, self.cfg.eval.batch_size, self.compute)
            results[user_node] = {"loss": loss, "ppl": ppl}
            tokens = int(windows[:, 1:].numel())
            name = f"{split}_ft" if fine_tuned else split
            self._write(eval_record(rnd, user_node, name, loss, ppl, tokens, (rnd + 1) * self.per_round))
        if not fine_tuned:
            self.progress({"kind": "eval", "split": split, "round": rnd, "results": results})
        return results

    # ------------------------------------------------------------------ checkpoints

    def snapshot(self) -> Snapshot:
        """Everything needed to continue exactly, as checkpoint parts made one at a time when written.

        Parts: `state` (counters, sampler RNG, DP state), `node-<fed>-<k>` per node state (k: its
        index in the tree order), `adam-<k>` per training node's AdamW state.
        """
        parts: dict[str, Callable[[], Part]] = {"state": self._run_part}
        for i, fed in enumerate(self.feds):
            for k, name in enumerate(fed.tree.order):
                parts[f"node-{i}-{k}"] = partial(_node_part, fed.states, name)
        for k, name in enumerate(self.trainer.opts):
            parts[f"adam-{k}"] = partial(self.trainer.adam_state, name)
        return Snapshot(self.round, parts)

    def _run_part(self) -> Part:
        tensors: dict[str, Tensor] = {}
        privacy: dict[str, Any] = {}
        for i, priv in self.privacy.items():  # accountant ledgers, clip bounds, noise RNG (resume = uninterrupted)
            priv_tensors, privacy[str(i)] = priv.state_dict()
            tensors.update({f"dp/{i}/{k}": v for k, v in priv_tensors.items()})
        for name, dp_sgd in self.trainer.private.items():  # record-level DP: noise RNG and accountant history
            dp_tensors, privacy[f"record/{name}"] = dp_sgd.state_dict()
            tensors.update({f"dp-record/{name}/{k}": v for k, v in dp_tensors.items()})
        assert self.metrics is not None
        state = {
            "round": self.round,
            "metrics_lines": self.metrics.lines,
            "edge_bytes": self.edge_bytes,
            "val": self.val,
            "samplers": {name: sampler.state() for name, sampler in self.trainer.samplers.items()},
            "privacy": privacy,
            "wall_seconds": self.elapsed_before + time.perf_counter() - self.t_start,
        }
        return Part(tensors, state)

    def restore(self, snap: Snapshot) -> int:
        """Continue from `snap`, one part at a time; returns the metrics.jsonl records it covers."""
        run = snap.parts["state"]()
        t, s = run.tensors, run.meta
        for i, fed in enumerate(self.feds):
            for k, name in enumerate(fed.tree.order):
                with fed.states.use(name) as st:
                    load_state(st, snap.parts[f"node-{i}-{k}"](), self.compute.device)
        for k, name in enumerate(self.trainer.opts):
            self.trainer.set_adam_state(name, snap.parts[f"adam-{k}"]())
        for name, sampler in self.trainer.samplers.items():
            sampler.set_state(s["samplers"][name])
        for name, dp_sgd in self.trainer.private.items():
            prefix = f"dp-record/{name}/"
            dp_sgd.load_state_dict(
                {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, s["privacy"][f"record/{name}"]
            )
        for i, priv in self.privacy.items():
            prefix = f"dp/{i}/"
            priv.load_state_dict(
                {k[len(prefix) :]: v for k, v in t.items() if k.startswith(prefix)}, s["privacy"][str(i)]
            )
        self.round = snap.round
        self.edge_bytes = dict(s["edge_bytes"])
        self.val = s["val"]
        self.elapsed_before = float(s["wall_seconds"])
        return int(s["metrics_lines"])

    # ------------------------------------------------------------------ driver

    def execute(self, resume: bool = False, warn: Callable[[str], None] = lambda _m: None) -> dict[str, Any]:
        """Run (or continue) all rounds, checkpointing each; then test, save models and summary.json.

        Each round's wall seconds, split into phases (see `run_round` and `LocalTrainer`; plus
        "evaluation" and "checkpoint"), go to `timing.jsonl` and `round_seconds`; `other` is the
        time in no phase (metrics, progress).
        """
        if resume:
            self._resume(warn)
        else:
            self._start_fresh()
        self.metrics = metrics_writer(self.out / "metrics.jsonl", self.cfg.log.tensorboard)
        timing = JsonlWriter(self.out / "timing.jsonl")
        per_round = steps_per_round(self.feds)
        self.progress(
            {
                "kind": "start",
                "method": self.cfg.method,
                "total_steps": per_round * self.rounds,
                "done_steps": per_round * self.round,
                "rounds": self.rounds,
            }
        )
        try:
            with graceful_stop() as stop:
                while self.round < self.rounds:
                    diverged = self._round(stop, timing)
                    if diverged:
                        break
                    if stop.requested and self.round < self.rounds:
                        raise Interrupted(
                            f"stopped after round {self.round} of {self.rounds} (checkpoint saved); "
                            f"continue with: worldlm train CONFIG --resume --out {self.out}"
                        )
            test = self.evaluate_all("test", self.round - 1)
            fine_tuned = None
            if C.scores_fine_tuned(self.cfg):  # FL / HierFAVG + local fine-tuning, from the same run
                fine_tuned = (
                    self.evaluate_all("test", self.round - 1, fine_tuned=True),
                    self.evaluate_all("val", self.round - 1, fine_tuned=True),
                )
        finally:
            self.metrics.close()
            timing.close()
        self._save_models()
        if self.offload is not None:  # scratch: the checkpoints hold what a resume needs
            shutil.rmtree(self.offload)
        summary = self._summary(test, fine_tuned)
        atomic_write_json(self.out / "summary.json", summary)
        return summary

    def _start_fresh(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / "config.toml", C.dumps(self.cfg))
        (self.out / "metrics.jsonl").unlink(missing_ok=True)
        (self.out / "timing.jsonl").unlink(missing_ok=True)

    def _resume(self, warn: Callable[[str], None]) -> None:
        """Restore the newest valid checkpoint and trim the records written after it."""
        saved = self.out / "config.toml"
        if not C.same_config(saved, self.cfg):
            raise WorldLMError(
                f"{saved} differs from this config (or is missing); resume with the same config and --set "
                "options, or start a new run directory"
            )
        try:
            lines = self.restore(load_latest(self.out / "checkpoints", warn))
            truncate_lines(self.out / "metrics.jsonl", lines)
        except CannotResume:
            raise
        except (WorldLMError, OSError, KeyError, ValueError, TypeError) as exc:  # checkpoint and files disagree
            raise CannotResume(f"cannot resume {self.out} ({exc}); start the run again without --resume") from exc
        drop_rounds_from(self.out / "timing.jsonl", self.round)

    def _round(self, stop: StopFlag, timing: JsonlWriter) -> bool:
        """One global round of every engine run, its validation and checkpoint (also when `stop` was requested
        during it); returns whether it diverged."""
        rnd, phase = self.round, self.timer.phase
        t0 = time.perf_counter()
        self.timer.take()  # a round's phases only
        self.round_losses = []
        self.tracing = rnd // self.stages == self.cfg.eval.trace_round
        for i, fed in enumerate(self.feds):
            privacy = self.privacy.get(i)
            run_round(
                fed.tree,
                fed.states,
                fed.split,
                fed.opts,
                rnd,
                self.trainer,
                self._emit,
                privacy,
                fed.states.release,
                phase,
                self._observe,
            )
            if privacy is not None:
                with phase("privacy"):
                    self._end_privacy_round(privacy, rnd)
        for name, dp_sgd in self.trainer.private.items():  # record-level DP: epsilon so far
            self._write(record_dp_record(rnd, name, dp_sgd, self.cfg.dp.delta))
        diverged = all_diverged(self.round_losses)
        if self.cfg.eval.every_round or diverged or rnd == self.rounds - 1:
            with phase("evaluation"):
                self.val = self.evaluate_all("val", rnd)
        self.round += 1
        if not diverged and (self.round % self.cfg.checkpoint.every == 0 or stop.requested):
            with phase("checkpoint"):
                self.metrics.sync()  # the records a checkpoint counts are on disk before it is
                save_checkpoint(self.out / "checkpoints", self.snapshot(), self.cfg.checkpoint.keep)
        self.round_seconds.append(round_record(rnd, time.perf_counter() - t0, self.timer.take()))
        timing.write(self.round_seconds[-1])
        if diverged:
            self.diverged_round = rnd
            self._write({"event": "diverged", "round": rnd})
            print(f"worldlm: {diverged_message(rnd, self.rounds)}", file=sys.stderr)
        return diverged

    def _save_models(self) -> None:
        for user_node, params in self.user_models(self.eval_mode):  # what the method delivers to each node
            self.layout.load(self.model, params)
            tensors = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
            path = self.out / "checkpoints" / "final" / f"{user_node}.safetensors"
            atomic_write_bytes(path, save_safetensors(tensors))

    def _summary(
        self,
        test: dict[str, dict[str, float]],
        fine_tuned: tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]] | None,
    ) -> dict[str, Any]:
        wall = self.elapsed_before + time.perf_counter() - self.t_start
        parts = (self.model.num_params(), self.layout.key_blocks)
        steps = self.per_round * self.round  # all rounds, unless the run diverged and stopped early
        tokens = train_tokens(self.cfg, self.feds, self.round)
        summary = run_summary(
            self.cfg,
            self.tree.order,
            test,
            self.val,
            self.edge_bytes,
            (self.rounds, steps, tokens),
            parts,
            wall,
            self.diverged_round,
            fine_tuned,
        )
        return {**summary, **self._privacy_summary()}

    def _privacy_summary(self) -> dict[str, Any]:
        """DP runs only (the run directory contract): epsilon per DP node at the configured delta."""
        if self.trainer.private:
            latest = {
                n: record_dp_record(self.round - 1, n, dp, self.cfg.dp.delta) for n, dp in self.trainer.private.items()
            }
        else:
            latest = {r["node"]: r for p in self.privacy.values() for r in p.records()}
        return privacy_summary(self.cfg, latest)


def _node_part(states: NodeStates, name: str) -> Part:
    with states.use(name) as st:
        return encode_state(st)


def run(
    cfg: C.Config,
    out: Path,
    progress: ProgressFn | None = None,
    resume: bool = False,
    warn: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Train `cfg.method` on the configured tree and write the run directory; returns summary.json."""
    threads = torch.get_num_threads()
    try:
        return LocalRun(cfg, out, progress).execute(resume=resume, warn=warn)
    finally:
        torch.set_num_threads(threads)  # train.threads applies to this run only, not to the caller
