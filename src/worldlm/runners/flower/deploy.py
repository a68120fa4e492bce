"""`worldlm deploy-local`: the Flower apps on Flower's deployment engine, every organisation its own process.

On 127.0.0.1 it starts one SuperLink and one SuperNode per tree node (`--insecure`, node config
`node-name=...`), submits the run with `flwr run`, follows metrics.jsonl for progress, and stops
exactly the processes it started — and what they started (SuperExec, ServerApp, ClientApps) —
on success, failure or Ctrl-C. PIDs are written to `<out>/flower/pids.json` as they change.

Layout of `<out>/flower/`: `app/` (the Flower app: a pyproject.toml naming
`worldlm.runners.flower.app`), `run-config.toml` (the resolved worldlm config and the run options),
`home/` (FLWR_HOME: the SuperLink connection, installed app bundles), `logs/` (one log per
process), `state/<node>/` (each node's private state between messages; removed after a successful
run unless kept).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from worldlm import config as C
from worldlm.errors import WorldLMError, quoted
from worldlm.files import atomic_write_text
from worldlm.runners.flower import FLOWER_ENV, require_flower
from worldlm.runners.flower.coordinator import RUN_FACTS, ProgressFn
from worldlm.runners.flower.dispatch import stderr_log
from worldlm.runners.flower.follow import MetricsFollower
from worldlm.runners.flower.nested import FINISHED, federation_dirs, merge_federations
from worldlm.runners.flower.node import check_nested, check_supported
from worldlm.runners.flower.processes import (
    Processes,
    Started,
    flower_command,
    free_port,
    sigterm_as_interrupt,
    wait_for_port,
)
from worldlm.runners.planning import tree_from_config

APP_PYPROJECT = """\
# A Flower app whose components live in the installed worldlm package (worldlm.runners.flower.app).
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "worldlm-app"
version = "1.0.0"
description = "WorldLM: federated pre-training over a tree of federations"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "worldlm"

[tool.flwr.app.components]
serverapp = "worldlm.runners.flower.app:server_app"
clientapp = "worldlm.runners.flower.app:client_app"

[tool.flwr.app.config]
worldlm-config = ""
out = ""
timeout = 600.0
connect-timeout = 300.0
federation = ""
bridge-socket = ""
run-key = ""
rejoin = 0
"""


def write_app(dest: Path) -> Path:
    """The Flower app directory `flwr run` bundles (also what a multi-host user runs)."""
    app = dest / "worldlm-app"
    app.mkdir(parents=True, exist_ok=True)
    atomic_write_text(app / "pyproject.toml", APP_PYPROJECT)
    return app


def write_run_config(
    path: Path, cfg: C.Config, out: Path, timeout: float, connect_timeout: float, extra: dict[str, Any] | None = None
) -> Path:
    """The run config overrides (`flwr run ... --run-config FILE`): the resolved config travels with the run.

    `extra`: a nested deployment's `federation`, `bridge-socket`, `run-key` and `rejoin` (see app.py)."""
    values = {"worldlm-config": C.dumps(cfg), "out": str(out), "timeout": timeout, "connect-timeout": connect_timeout}
    values |= extra or {}
    atomic_write_text(path, tomli_w.dumps(values))
    return path


def gpu_assignment(nodes: list[str], gpus: list[int]) -> dict[str, dict[str, str]]:
    """Each SuperNode's extra environment: one GPU each, round-robin over `gpus` (none: nothing added)."""
    return {n: {"CUDA_VISIBLE_DEVICES": str(gpus[i % len(gpus)])} if gpus else {} for i, n in enumerate(nodes)}


def check_gpus(cfg: C.Config, gpus: list[int]) -> None:
    """`--gpus`: the GPUs must exist here, and each SuperNode sees its one GPU as cuda:0."""
    import torch

    if not gpus:
        return
    n = torch.cuda.device_count()
    if n == 0:
        raise WorldLMError("--gpus needs CUDA devices and this machine has none; drop --gpus to train on the CPU")
    bad = [g for g in gpus if not 0 <= g < n]
    if bad:
        raise WorldLMError(f"--gpus names GPU {bad[0]}, but this machine has {n} (0..{n - 1})")
    if cfg.train.device not in ("auto", "cuda", "cuda:0"):
        raise WorldLMError(
            f"train.device = '{cfg.train.device}' with --gpus: each SuperNode sees its one GPU as cuda:0; "
            'use train.device = "auto" or "cuda"'
        )


@dataclass
class SuperLinkPlan:
    """One SuperLink of a deployment, its SuperNodes (process key -> node config) and its run.

    Flat: one for the whole tree (name ""). Nested: one per inner node q, whose SuperNodes are q's own
    node, its leaf children and a bridge for each inner child."""

    name: str
    port: int
    supernodes: dict[str, dict[str, Any]]
    run_config: dict[str, Any]
    out: Path

    @property
    def connection(self) -> str:
        """Its entry in FLWR_HOME/config.toml, which `flwr run` names."""
        return f"worldlm-{self.name or 'local'}"

    def key(self, what: str) -> str:
        return f"{what}:{self.name}" if self.name else what

    def log_name(self, key: str) -> str:
        return key.replace(":", "-").replace("@", "-")


def plan_superlinks(
    cfg: C.Config, out: Path, sockets: Path, nested: bool, node_cfg: Callable[[str], dict[str, Any]]
) -> list[SuperLinkPlan]:
    """The SuperLinks to start, root first; each with the SuperNodes that connect to it and its run config."""
    tree = tree_from_config(cfg)
    if not nested:
        return [SuperLinkPlan("", free_port(), {f"supernode:{n}": node_cfg(n) for n in tree.order}, {}, out)]
    feds = []
    for q, part in federation_dirs(cfg, out).items():
        nodes = {f"supernode:{q}": node_cfg(q)}
        for c in tree[q].children:
            if tree[c].children:  # a region of its own: a bridge to its coordinator's socket
                nodes[f"bridge:{c}"] = {"node-name": c, "bridge": str(sockets / f"{c}.sock")}
            else:
                nodes[f"supernode:{c}"] = node_cfg(c)
        run = {"federation": q, "bridge-socket": str(sockets / f"{q}.sock") if q != tree.root else ""}
        feds.append(SuperLinkPlan(q, free_port(), nodes, run, part))
    return feds


@dataclass(frozen=True)
class DeployOptions:
    """How `deploy_local` runs (the `worldlm deploy-local` flags).

    `timeout`: seconds a node may take to answer a message before it is left out of that round;
    `connect_timeout`: seconds every node has to connect. Flat: one SuperLink, a SuperNode per tree node.
    `nested`: a SuperLink and coordinator per inner node (nested.py); the regions' runs start first, the
    root's last; a region whose SuperLink or coordinator exits sits out until it is back. `restart_dead`:
    restart an exited SuperNode or region after `restart_delay` seconds. `gpus`: pin the SuperNodes to
    these GPUs round-robin (one CUDA_VISIBLE_DEVICES each), as organisations with a GPU each would run
    them. `isolation`: "warm" (one long-lived ClientApp process per SuperNode, warm.py) or "subprocess"
    (Flower's own: a fresh ClientApp process per message); both give the same results bitwise.
    `keep_state`: keep the nodes' state directories after a successful run.
    """

    timeout: float = 600.0
    connect_timeout: float = 300.0
    restart_dead: bool = False
    restart_delay: float = 5.0
    keep_state: bool = False
    gpus: tuple[int, ...] = ()
    nested: bool = False
    isolation: str = "warm"


class LoopbackDeployment:
    """The processes of one deployment on 127.0.0.1: SuperLinks, SuperNodes (and their warm workers), runs."""

    def __init__(self, cfg: C.Config, out: Path, opts: DeployOptions, log: Callable[[str], None]) -> None:
        import torch

        self.cfg, self.out, self.opts, self.log = cfg, out, opts, log
        self.work = out / "flower"
        self.logs = self.work / "logs"
        for sub in ("logs", "home", "state"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.app = write_app(self.work)
        tree = tree_from_config(cfg)
        self.node_env = gpu_assignment(list(tree.order), list(opts.gpus))
        self.threads = torch.get_num_threads()  # nodes sum in the same order as the in-process runner here
        self.data_path = Path(cfg.data.path).resolve()
        self.sockets = Path(tempfile.mkdtemp(prefix="worldlm-bridges-"))  # short: a Unix socket path has < 108 bytes
        self.feds = plan_superlinks(cfg, out, self.sockets, opts.nested, self.node_cfg)
        self.run_key = uuid.uuid4().hex[:12]  # the nodes' state files survive a region's run being resubmitted
        connections = {f.connection: {"address": f"127.0.0.1:{f.port}", "insecure": True} for f in self.feds}
        atomic_write_text(
            self.work / "home" / "config.toml",
            tomli_w.dumps({"superlink": {"default": self.feds[0].connection, **connections}}),
        )
        env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(self.work / "home")}
        # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        self.procs = Processes(env, self.work / "pids.json", log)
        self.dead_since: dict[str, float] = {}

    def node_cfg(self, name: str) -> dict[str, Any]:
        """What each organisation would set on its own host (the SuperNode's --node-config)."""
        return {
            "node-name": name,
            "data-path": str(self.data_path),
            "state-dir": str(self.work / "state" / name),
            "out-dir": str(self.out / "checkpoints"),
            "threads": self.threads,
        }

    def run_config(self, f: SuperLinkPlan, rejoin: bool) -> Path:
        name = f"run-config-{f.name}{'-rejoin' if rejoin else ''}.toml" if f.name else "run-config.toml"
        extra = {**f.run_config, "run-key": self.run_key, "rejoin": int(rejoin)} if f.name else {}
        return write_run_config(self.work / name, self.cfg, f.out, self.opts.timeout, self.opts.connect_timeout, extra)

    def start_superlink(self, f: SuperLinkPlan) -> Started:
        argv = [flower_command("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(f.port)]
        argv.append("--disable-runtime-dependency-installation")
        return self.procs.start(f.key("superlink"), argv, self.logs / f"{f.log_name(f.key('superlink'))}.log")

    def start_supernode(self, f: SuperLinkPlan, key: str) -> None:
        """A SuperNode (and, warm, its ClientApp worker: one process for all its messages, see warm.py)."""
        values = f.supernodes[key]
        node_config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in values.items())
        port = free_port()
        warm = [sys.executable, "-m", "worldlm.runners.flower.warm"]
        is_warm = self.opts.isolation == "warm"
        argv = [*warm, "supernode"] if is_warm else [flower_command("flower-supernode")]
        argv += ["--insecure", "--superlink", f"127.0.0.1:{f.port}", "--port", str(port), "--node-config", node_config]
        if is_warm:
            argv += ["--isolation", "process"]
        extra = self.node_env[values["node-name"]] if key.startswith("supernode:") else {}
        node = self.procs.start(key, argv, self.logs / f"{f.log_name(key)}.log", extra)
        if is_warm:
            worker = [*warm, "worker", "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid", str(node.proc.pid)]
            self.procs.start(f"worker@{key}", worker, self.logs / f"{f.log_name('worker@' + key)}.log", extra)

    def stop_supernode(self, key: str) -> None:
        self.procs.stop(f"worker@{key}")
        self.procs.stop(key)

    def start_run(self, f: SuperLinkPlan, rejoin: bool = False) -> Started:
        argv = [flower_command("flwr"), "run", str(self.app), f.connection, "--run-config"]
        argv += [str(self.run_config(f, rejoin)), "--stream"]
        return self.procs.start(f.key("flwr-run"), argv, self.logs / f"{f.log_name(f.key('run'))}.log")

    def restart_region(self, f: SuperLinkPlan, why: str) -> None:
        self.log(f"region '{f.name}': {why}; restarting its SuperLink, SuperNodes and coordinator")
        self.procs.stop(f.key("flwr-run"))
        for key in f.supernodes:
            self.stop_supernode(key)
        self.procs.stop(f.key("superlink"))
        wait_for_port(f.port, self.start_superlink(f), 120.0)
        for key in f.supernodes:
            self.start_supernode(f, key)
        self.start_run(f, rejoin=True)
        self.log(f"region '{f.name}' restarted; it rejoins at the next round")

    def start(self) -> Started:
        """Every SuperLink, then their SuperNodes, then the runs (the regions' first); returns the root's run."""
        for f in self.feds:
            self.start_superlink(f)
        for f in self.feds:
            wait_for_port(f.port, self.procs.started[f.key("superlink")], 120.0)
            for key in f.supernodes:
                self.start_supernode(f, key)
        where = ", ".join(f"127.0.0.1:{f.port}" + (f" ({f.name})" if f.name else "") for f in self.feds)
        n_nodes = sum(len(f.supernodes) for f in self.feds)
        self.log(f"SuperLink(s) on {where}; {n_nodes} SuperNodes; logs in {self.logs}")
        for f in reversed(self.feds):  # the regions' coordinators first: the root's run needs them
            self.start_run(f)
        return self.procs.started[self.feds[0].key("flwr-run")]

    def dead(self, key: str, what: str, consequence: str) -> bool:
        """Whether process `key` exited and `restart_delay` has passed (logged once, when noticed)."""
        s = self.procs.started.get(key)
        if s is None or s.proc.poll() is None:
            self.dead_since.pop(key, None)
            return False
        if key not in self.dead_since:
            self.log(f"{what} exited (code {s.proc.returncode}); {consequence} until it is back")
            self.dead_since[key] = time.monotonic()
        return self.opts.restart_dead and time.monotonic() - self.dead_since[key] > self.opts.restart_delay

    def watch(self) -> None:
        """One look at every process: the root's SuperLink must live; dead regions and SuperNodes sit out, or
        are restarted with `restart_dead`."""
        root_link = self.procs.started[self.feds[0].key("superlink")]
        if root_link.proc.poll() is not None:
            raise WorldLMError(f"the SuperLink exited (code {root_link.proc.returncode}); see {root_link.log}")
        for f in self.feds:
            if f is not self.feds[0] and not (f.out / FINISHED).is_file():
                link, run = f.key("superlink"), f.key("flwr-run")
                out_ = "its subtree sits out"
                if self.dead(link, f"region '{f.name}': its SuperLink", out_) or self.dead(
                    run, f"region '{f.name}': its coordinator's run", out_
                ):
                    self.dead_since.pop(link, None)
                    self.dead_since.pop(run, None)
                    self.restart_region(f, "its SuperLink or coordinator is gone")
                    continue
            for key in f.supernodes:
                node = f"SuperNode '{key.split(':', 1)[1]}'"
                if self.dead(key, node, "its node is left out") or self.dead(f"worker@{key}", f"{node}'s worker", "it"):
                    self.stop_supernode(key)
                    self.start_supernode(f, key)
                    self.dead_since.pop(key, None)
                    self.dead_since.pop(f"worker@{key}", None)
                    self.log(f"restarted SuperNode '{key.split(':', 1)[1]}'; it rejoins at the next round")

    def close(self) -> None:
        self.procs.stop_all()
        shutil.rmtree(self.sockets, ignore_errors=True)


def deploy_local(
    cfg: C.Config,
    out: Path,
    progress: ProgressFn | None = None,
    opts: DeployOptions = DeployOptions(),
    log: Callable[[str], None] = stderr_log,
) -> dict[str, Any]:
    """Run `cfg` through Flower SuperLinks and SuperNodes on 127.0.0.1 (see DeployOptions); returns summary.json."""
    if opts.isolation not in ("warm", "subprocess"):
        raise WorldLMError(f"--isolation is 'warm' or 'subprocess', not {quoted(opts.isolation)}")
    require_flower()
    check_supported(cfg)
    if opts.nested:
        check_nested(cfg)
    check_gpus(cfg, list(opts.gpus))
    out = out.resolve()
    t0 = time.perf_counter()
    deployment = LoopbackDeployment(cfg, out, opts, log)
    try:
        with sigterm_as_interrupt():
            root_run = deployment.start()
            follower = MetricsFollower([f.out / "metrics.jsonl" for f in deployment.feds], cfg, progress or _ignore)
            while root_run.proc.poll() is None:
                time.sleep(0.5)
                follower.poll()
                deployment.watch()
            follower.poll()
            summary = _result(cfg, out, deployment.feds, deployment.procs, root_run)
    finally:
        deployment.close()
    if not opts.keep_state:
        shutil.rmtree(deployment.work / "state", ignore_errors=True)
    log(f"deploy-local finished in {time.perf_counter() - t0:.1f} s; all Flower processes stopped")
    return summary


def _ignore(_event: dict[str, Any]) -> None:
    """The progress callback of a quiet deployment."""


def _result(cfg: C.Config, out: Path, feds: list[SuperLinkPlan], procs: Processes, root_run: Started) -> dict[str, Any]:
    """summary.json once the root's run has ended (nested: after the regions' runs end too, merged)."""
    done = out / "summary.json" if len(feds) == 1 and not feds[0].name else feds[0].out / RUN_FACTS
    if not done.is_file():
        tail = "".join(root_run.log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise WorldLMError(f"the Flower run ended without {done.name}; the end of {root_run.log}:\n{tail}")
    if done.name != RUN_FACTS:
        return dict(json.loads(done.read_text()))
    deadline = time.monotonic() + 60.0  # the regions' coordinators end once the root has finished them
    runs = [procs.started[f.key("flwr-run")] for f in feds[1:] if f.key("flwr-run") in procs.started]
    while any(r.proc.poll() is None for r in runs) and time.monotonic() < deadline:
        time.sleep(0.5)
    return merge_federations(cfg, out, [f.out for f in feds])


