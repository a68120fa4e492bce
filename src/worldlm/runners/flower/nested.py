"""Nested federations: every inner node of the tree runs its own federation.

Each inner node q has its own SuperLink and coordinator (`Coordinator(scope=q)`), whose members are
q's own node (a SuperNode on q's SuperLink: q's data, optimizer and key-layer state) and q's children.
A child that is itself inner joins q's federation as a *bridge* SuperNode (node config `bridge`): on
`train.subtree` it hands the parent's model to the child's own coordinator (`RegionCoordinator`),
which runs the child's whole visit over its own SuperLink (its T_q sub-rounds, its members' training,
its aggregation) and replies with the child's update; `evaluate.subtree` and `query.finish` go the
same way. So the root's SuperLink and coordinator carry only what the root's children send and
receive, and a region's only what its members do:

- a region's coordinator keeps its members' records (training, attention, edges, evaluations) in its
  own `metrics.jsonl`; it tells its parent only its own update, how many of its nodes trained and
  whether any loss was finite (the divergence rule), and its own perplexity;
- residuals a region sends up keep their vectors and positions (the algorithm routes key layers across
  federations) but their origins below the region are hidden behind aliases `<region>#<k>` (A.3.7's
  `route_to_origin` test still works: an alias names a node in the region's subtree), which the region
  resolves again when residuals come back down. The table stays with the region (`aliases.json`).

`merge_federations` joins the parts (each federation's records, the root's run facts, the aliases)
into the run directory the in-process runner writes; with the same config and seed, summary.json is
bitwise the in-process runner's. The bridge reaches its region's coordinator through a channel on the
region's own host (`bridge`); `engines.run_nested_inprocess` runs every federation in one process.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid

from worldlm import config as C
from worldlm.errors import WorldLMError
from worldlm.files import atomic_write_json, atomic_write_text
from worldlm.runners.flower import wire
from worldlm.runners.flower.aliases import ALIASES, rename_origins
from worldlm.runners.flower.coordinator import (
    RUN_FACTS,
    Coordinator,
    Evaluation,
    federated_summary,
)
from worldlm.runners.flower.dispatch import LogFn, stderr_log
from worldlm.runners.metrics_log import metrics_writer
from worldlm.runners.planning import tree_from_config

FINISHED = "finished.json"  # a region's coordinator was told the run is over (its run's exit is no fault)
FEDERATIONS = "federations"  # <run>/federations/<inner node>/: each federation's part of the run directory


def federation_dirs(cfg: C.Config, out: Path) -> dict[str, Path]:
    """Each inner node's part of a nested run directory (on one machine; on several, each on its host)."""
    tree = tree_from_config(cfg)
    return {q: out / FEDERATIONS / q for q in tree.order if tree[q].children}


# ---------------------------------------------------------------------- what a region tells its parent


class RegionCoordinator(Coordinator):
    """The coordinator of an inner node's own federation, driven by its parent's through the bridge.

    `rejoin`: this coordinator was restarted mid-run (its records so far are kept; it waits only for its
    own node, the others are greeted as they answer)."""

    def __init__(
        self,
        grid: Grid,
        cfg: C.Config,
        out: Path,
        scope: str,
        timeout: float = 600.0,
        connect_timeout: float = 300.0,
        log: LogFn = stderr_log,
        rejoin: bool = False,
    ) -> None:
        super().__init__(grid, cfg, out, timeout, connect_timeout, None, log, scope=scope, rejoin=rejoin)
        self.region = scope
        self.rejoining = rejoin
        self.info: dict[str, Any] | None = None
        self.finished = False

    def _start(self) -> dict[str, Any]:
        if self.info is None:
            if self.rejoining:
                self.members, wanted = [self.region], self.members
                self.info = self.connect()
                self.members = wanted
                self.directory.refresh(wait=min(self.timeout, 30.0))
            else:
                self.open()
                (self.out / FINISHED).unlink(missing_ok=True)
                self.info = self.connect()
            if self.metrics is None:  # rejoined: append to this federation's records
                self.metrics = metrics_writer(self.out / "metrics.jsonl", False)
        return self.info

    def request(self, kind: str, content: RecordDict) -> RecordDict:
        """One message from the parent's coordinator, relayed by the bridge; the reply goes back the same way."""
        info = self._start()
        if kind == "hello":
            return RecordDict({"hello": ConfigRecord(info)})
        if kind == "visit":
            return self._visit_request(content)
        if kind == "evaluate":
            return self._evaluate_request(content)
        if kind == "finish":
            self.finish_regions(-1)
            assert self.metrics is not None
            self.metrics.close()
            self.finished = True
            atomic_write_json(self.out / FINISHED, {"federation": self.region})  # its run ends as planned
            return RecordDict()
        raise WorldLMError(f"region '{self.region}': unknown request '{kind}'")

    def _visit_request(self, content: RecordDict) -> RecordDict:
        c = content.config_records["cfg"]
        rnd, step = int(cast(int, c["round"])), int(cast(int, c["step"]))
        parent = str(c["parent"]) if "parent" in c else None
        if rnd > 0:
            self.rejoin(rnd)
        rename_origins(content, "routed", self.aliases.reveal)
        self.trained, self.round_losses = 0, []
        fed = self.feds[0]
        [final] = self.dispatcher.run([self._visit(fed, self.region, rnd, step, parent, content)])
        self.flush_privacy()
        if final is None:
            raise WorldLMError(f"round {rnd}: region '{self.region}': its own node did not answer")
        reply = RecordDict()
        if "update" in final.content.array_records:  # none: the region is a DP node that withheld it
            reply["update"] = final.content.array_records["update"]
        if "dp" in final.content.config_records:  # the region is a DP node: its release's statistics go up
            reply["dp"] = final.content.config_records["dp"]
        wire.copy_residuals(final.content, "residuals", reply, "residuals")
        rename_origins(reply, "residuals", self.aliases.hide_inside(self.tree.subtree(self.region), self.region))
        finite = any(math.isfinite(x) for x in self.round_losses)
        reply["subtree"] = ConfigRecord({"trained": self.trained, "finite": finite})
        return reply

    def _evaluate_request(self, content: RecordDict) -> RecordDict:
        ev = Evaluation.from_message(content.config_records["cfg"])
        results = self.evaluate_scope(ev, content.array_records.get("deployed"))
        if self.region not in results:
            raise WorldLMError(f"region '{self.region}': its own node did not answer the evaluation")
        own = results[self.region]
        return RecordDict({"metrics": MetricRecord({f"{self.region}/{k}": v for k, v in own.items()})})


# ---------------------------------------------------------------------- joining the parts


def _dealias(rec: dict[str, Any], resolve: Callable[[str], str]) -> dict[str, Any]:
    """A record with the region aliases in its residual origins resolved to node names."""
    if "origin" in rec:
        rec = {**rec, "origin": resolve(str(rec["origin"]))}
    if rec.get("event") == "attention":
        members = []
        for m in rec["members"]:
            if str(m).startswith("residual:"):
                origin, position = str(m).removeprefix("residual:").rsplit("@", 1)
                m = f"residual:{resolve(origin)}@{position}"
            members.append(m)
        rec = {**rec, "members": members}
    return rec


def merge_federations(cfg: C.Config, out: Path, parts: list[Path]) -> dict[str, Any]:
    """The run directory from a nested run's parts: metrics.jsonl (every federation's records, in round
    order, aliases resolved), summary.json (bitwise what the in-process runner writes) and config.toml.

    Whoever holds every part can do this (deploy-local does; across organisations, only with every
    region's consent: each part is that federation's own record of the run)."""
    roots = [p for p in parts if (p / RUN_FACTS).is_file()]
    if len(roots) != 1:
        raise WorldLMError(f"expected the root federation's {RUN_FACTS} in exactly one part, found {len(roots)}")
    facts = json.loads((roots[0] / RUN_FACTS).read_text())
    table: dict[str, str] = {}
    for p in parts:
        if (p / ALIASES).is_file():
            table |= json.loads((p / ALIASES).read_text())

    def resolve(origin: str) -> str:
        while origin in table:
            origin = table[origin]
        return origin

    records: list[dict[str, Any]] = []
    for p in roots + [p for p in parts if p not in roots]:
        if (p / "metrics.jsonl").is_file():
            records += [json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines() if line]
    records = [_dealias(r, resolve) for r in records]
    records.sort(key=lambda r: int(r.get("round", -1)))  # stable: each federation's order within a round
    evals: dict[str, dict[str, dict[str, float]]] = {}
    edges: dict[str, int] = {}
    record_dp: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("split") in ("val", "test", "val_ft", "test_ft"):
            evals.setdefault(str(r["split"]), {})[str(r["node"])] = {"loss": r["loss"], "ppl": r["ppl"]}
        elif r.get("event") == "edge":
            key = f"{r['src']}->{r['dst']}"
            edges[key] = edges.get(key, 0) + int(r["bytes"])
        elif r.get("event") == "privacy":
            record_dp[str(r["node"])] = r
    tree = tree_from_config(cfg)
    summary = federated_summary(cfg, list(tree.order), evals, edges, record_dp, facts)
    text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    atomic_write_text(out / "metrics.jsonl", text)
    if cfg.log.tensorboard:
        metrics_writer(out / "metrics.jsonl", True).close()  # the events, built from the merged records
    atomic_write_text(out / "config.toml", C.dumps(cfg))
    atomic_write_json(out / "summary.json", summary)
    return summary
