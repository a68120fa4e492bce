"""Progress of a deployment whose coordinator runs in another process, read from its metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from worldlm import config as C
from worldlm.runners.flower.coordinator import ProgressFn, engine_plan, step_events
from worldlm.runners.planning import engine_rounds, steps_per_round, tree_from_config


class MetricsFollower:
    """Turns new metrics.jsonl records into progress events (the ServerApp runs in another process);
    a nested deployment has one metrics.jsonl per federation, followed together."""

    def __init__(self, paths: list[Path], cfg: C.Config, progress: ProgressFn) -> None:
        self.paths, self.cfg, self.progress = paths, cfg, progress
        feds = engine_plan(cfg, tree_from_config(cfg))
        self.steps = {n: f.opts.local_steps[n] for f in feds for n in f.tree.order}
        rounds = engine_rounds(cfg, tree_from_config(cfg))
        total = steps_per_round(feds) * rounds
        progress({"kind": "start", "method": cfg.method, "total_steps": total, "rounds": rounds})
        self.offsets = dict.fromkeys(paths, 0)
        self.evals: dict[tuple[int, str], dict[str, dict[str, float]]] = {}

    def poll(self) -> None:
        for path in self.paths:
            if path.is_file():
                self._read(path)

    def _read(self, path: Path) -> None:
        with path.open("rb") as fh:
            fh.seek(self.offsets[path])
            data = fh.read()
        end = data.rfind(b"\n") + 1
        self.offsets[path] += end
        for line in data[:end].splitlines():
            rec = json.loads(line)
            for event in step_events(rec, self.steps, self.cfg):
                self.progress(event)
            if rec.get("split") in ("val", "test"):
                key = (int(rec["round"]), str(rec["split"]))
                self.evals.setdefault(key, {})[rec["node"]] = {"loss": rec["loss"], "ppl": rec["ppl"]}
                if len(self.evals[key]) == len(self.cfg.tree.nodes):
                    self.progress({"kind": "eval", "split": key[1], "round": key[0], "results": self.evals[key]})
            elif rec.get("event") == "left_out":
                self.progress({"kind": "note", "message": f"round {rec['round']}: {rec['node']} left out"})
