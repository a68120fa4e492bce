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

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from worldlm import config as C
from worldlm.errors import WorldLMError, quoted
from worldlm.files import atomic_write_text
from worldlm.runners.flower import FLOWER_ENV, require_flower
from worldlm.runners.flower.coordinator import RUN_FACTS, ProgressFn, engine_plan, step_events
from worldlm.runners.flower.nested import FINISHED, federation_dirs, merge_federations
from worldlm.runners.flower.node import check_nested, check_supported
from worldlm.runners.planning import engine_rounds, steps_per_round, tree_from_config

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


_TAKEN: set[int] = set()  # ports this process handed out: the OS may offer a port again once it is closed


def free_port() -> int:
    """A free TCP port on 127.0.0.1 that this process has not handed out before (two SuperNodes started
    one after another must not both get the port the first one has not bound yet)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _TAKEN:
            _TAKEN.add(port)
            return port


def _bin(name: str) -> str:
    """A Flower command from this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


# ---------------------------------------------------------------------- processes we own


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live process, from /proc (Linux); None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[1]), int(fields[19])


def _descendants(root: int) -> list[tuple[int, int]]:
    """(pid, start time) of every live descendant of `root` (their identity, so a reused PID is never hit)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))) is not None:
            children.setdefault(st[0], []).append((int(entry.name), st[1]))
    out, frontier = [], [root]
    while frontier:
        nxt = [c for p in frontier for c in children.get(p, [])]
        out.extend(nxt)
        frontier = [pid for pid, _ in nxt]
    return out


def _alive(pid: int, start: int) -> bool:
    st = _proc_stat(pid)
    return st is not None and st[1] == start


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM if worldlm itself dies (even by SIGKILL), so nothing is left behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Started:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes]
    start_time: int = 0


@dataclass
class Processes:
    """The processes deploy-local started; `stop_all` ends exactly them and their descendants."""

    env: dict[str, str]
    pid_file: Path
    log: Callable[[str], None]
    started: dict[str, Started] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], log: Path, env: dict[str, str] | None = None) -> Started:
        """Start `argv` (its output to `log`), with `env` added to the common environment."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(env or {})},
                start_new_session=True,  # Ctrl-C reaches worldlm, which stops them in order
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        st = _proc_stat(proc.pid)
        self.started[name] = Started(name, argv, log, proc, st[1] if st else 0)
        self._write_pids()
        return self.started[name]

    def _write_pids(self) -> None:
        pids = {name: s.proc.pid for name, s in self.started.items() if s.proc.poll() is None}
        atomic_write_text(self.pid_file, json.dumps(pids, indent=2) + "\n")  # read while it changes

    def stop(self, name: str, grace: float = 10.0) -> None:
        s = self.started.pop(name, None)
        if s is None:
            return
        family = _descendants(s.proc.pid) if s.proc.poll() is None else []
        if s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
            try:
                s.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.log(f"{name} (pid {s.proc.pid}) did not stop in {grace:g} s; killing it")
                s.proc.kill()
                s.proc.wait()
        self._reap(family)
        self._write_pids()

    def _reap(self, family: list[tuple[int, int]], grace: float = 5.0) -> None:
        """Descendants stop on their own once their parent is gone (Flower's parent monitors); make sure."""
        deadline = time.monotonic() + grace
        while any(_alive(*p) for p in family) and time.monotonic() < deadline:
            time.sleep(0.2)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            left = [p for p in family if _alive(*p)]
            for pid, _ in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if left:
                time.sleep(1.0)

    def stop_all(self) -> None:
        for name in reversed(list(self.started)):  # flwr run, the SuperNodes, then the SuperLink
            self.stop(name)


# ---------------------------------------------------------------------- progress from metrics.jsonl


class _Follower:
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


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM stops deploy-local like Ctrl-C: through the `finally` that stops every process."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
class _Federation:
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


def _federations(
    cfg: C.Config, out: Path, sockets: Path, nested: bool, node_cfg: Callable[[str], dict[str, Any]]
) -> list[_Federation]:
    """The SuperLinks to start, root first; each with the SuperNodes that connect to it and its run config."""
    tree = tree_from_config(cfg)
    if not nested:
        return [_Federation("", free_port(), {f"supernode:{n}": node_cfg(n) for n in tree.order}, {}, out)]
    feds = []
    for q, part in federation_dirs(cfg, out).items():
        nodes = {f"supernode:{q}": node_cfg(q)}
        for c in tree[q].children:
            if tree[c].children:  # a region of its own: a bridge to its coordinator's socket
                nodes[f"bridge:{c}"] = {"node-name": c, "bridge": str(sockets / f"{c}.sock")}
            else:
                nodes[f"supernode:{c}"] = node_cfg(c)
        run = {"federation": q, "bridge-socket": str(sockets / f"{q}.sock") if q != tree.root else ""}
        feds.append(_Federation(q, free_port(), nodes, run, part))
    return feds


def deploy_local(
    cfg: C.Config,
    out: Path,
    progress: ProgressFn | None = None,
    timeout: float = 600.0,
    connect_timeout: float = 300.0,
    restart_dead: bool = False,
    restart_delay: float = 5.0,
    keep_state: bool = False,
    log: Callable[[str], None] = lambda m: print(f"worldlm: {m}", file=sys.stderr, flush=True),
    gpus: list[int] | None = None,
    nested: bool = False,
    isolation: str = "warm",
) -> dict[str, Any]:
    """Run `cfg` through Flower SuperLinks and SuperNodes on 127.0.0.1; returns summary.json.

    Flat: one SuperLink, a SuperNode per tree node. `nested`: a SuperLink and coordinator per inner node
    (nested.py); the regions' runs start first, the root's last; a region whose SuperLink or coordinator
    exits sits out until it is back (`restart_dead` restarts it). `gpus`: pin the SuperNodes to these
    GPUs round-robin (one CUDA_VISIBLE_DEVICES each), as organisations with a GPU each would run them.
    `isolation`: "warm" (one long-lived ClientApp process per SuperNode, warm.py) or "subprocess"
    (Flower's own: a fresh ClientApp process per message); both give the same results bitwise.
    """
    if isolation not in ("warm", "subprocess"):
        raise WorldLMError(f"--isolation is 'warm' or 'subprocess', not {quoted(isolation)}")
    require_flower()
    check_supported(cfg)
    if nested:
        check_nested(cfg)
    check_gpus(cfg, gpus or [])
    import torch

    progress = progress or (lambda _e: None)
    out = out.resolve()
    work = out / "flower"
    logs = work / "logs"
    for sub in ("logs", "home", "state"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    app = write_app(work)
    tree = tree_from_config(cfg)
    node_env = gpu_assignment(list(tree.order), gpus or [])
    threads = torch.get_num_threads()  # nodes sum in the same order as the in-process runner here
    data_path = Path(cfg.data.path).resolve()
    sockets = Path(tempfile.mkdtemp(prefix="worldlm-bridges-"))  # short: a Unix socket path has < 108 bytes

    def node_cfg(name: str) -> dict[str, Any]:  # what each organisation would set on its own host
        return {
            "node-name": name,
            "data-path": str(data_path),
            "state-dir": str(work / "state" / name),
            "out-dir": str(out / "checkpoints"),
            "threads": threads,
        }

    feds = _federations(cfg, out, sockets, nested, node_cfg)
    run_key = uuid.uuid4().hex[:12]  # the nodes' state files survive a region's run being resubmitted

    def run_config(f: _Federation, rejoin: bool) -> Path:
        name = f"run-config-{f.name}{'-rejoin' if rejoin else ''}.toml" if f.name else "run-config.toml"
        extra = {**f.run_config, "run-key": run_key, "rejoin": int(rejoin)} if f.name else {}
        return write_run_config(work / name, cfg, f.out, timeout, connect_timeout, extra)

    connections = {f.connection: {"address": f"127.0.0.1:{f.port}", "insecure": True} for f in feds}
    atomic_write_text(
        work / "home" / "config.toml",
        tomli_w.dumps({"superlink": {"default": feds[0].connection, **connections}}),
    )
    env = {**os.environ, **FLOWER_ENV, "FLWR_HOME": str(work / "home")}
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    procs = Processes(env, work / "pids.json", log)

    def start_superlink(f: _Federation) -> Started:
        argv = [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(f.port)]
        argv.append("--disable-runtime-dependency-installation")
        return procs.start(f.key("superlink"), argv, logs / f"{f.log_name(f.key('superlink'))}.log")

    def start_supernode(f: _Federation, key: str) -> None:
        """A SuperNode (and, warm, its ClientApp worker: one process for all its messages, see warm.py)."""
        values = f.supernodes[key]
        node_config = " ".join(f'{k}="{v}"' if isinstance(v, str) else f"{k}={v}" for k, v in values.items())
        port = free_port()
        warm = [sys.executable, "-m", "worldlm.runners.flower.warm"]
        argv = [*warm, "supernode"] if isolation == "warm" else [_bin("flower-supernode")]
        argv += ["--insecure", "--superlink", f"127.0.0.1:{f.port}", "--port", str(port), "--node-config", node_config]
        if isolation == "warm":
            argv += ["--isolation", "process"]
        extra = node_env[values["node-name"]] if key.startswith("supernode:") else {}
        node = procs.start(key, argv, logs / f"{f.log_name(key)}.log", extra)
        if isolation == "warm":
            worker = [*warm, "worker", "--runtime-api-address", f"127.0.0.1:{port}", "--parent-pid", str(node.proc.pid)]
            procs.start(f"worker@{key}", worker, logs / f"{f.log_name('worker@' + key)}.log", extra)

    def stop_supernode(key: str) -> None:
        procs.stop(f"worker@{key}")
        procs.stop(key)

    def start_run(f: _Federation, rejoin: bool = False) -> Started:
        argv = [_bin("flwr"), "run", str(app), f.connection, "--run-config"]
        argv += [str(run_config(f, rejoin)), "--stream"]
        return procs.start(f.key("flwr-run"), argv, logs / f"{f.log_name(f.key('run'))}.log")

    def restart_region(f: _Federation, why: str) -> None:
        log(f"region '{f.name}': {why}; restarting its SuperLink, SuperNodes and coordinator")
        procs.stop(f.key("flwr-run"))
        for key in f.supernodes:
            stop_supernode(key)
        procs.stop(f.key("superlink"))
        _wait_for_port(f.port, start_superlink(f), 120.0)
        for key in f.supernodes:
            start_supernode(f, key)
        start_run(f, rejoin=True)
        log(f"region '{f.name}' restarted; it rejoins at the next round")

    t0 = time.perf_counter()
    try:
        with _sigterm_as_interrupt():
            for f in feds:
                start_superlink(f)
            for f in feds:
                _wait_for_port(f.port, procs.started[f.key("superlink")], 120.0)
                for key in f.supernodes:
                    start_supernode(f, key)
            where = ", ".join(f"127.0.0.1:{f.port}" + (f" ({f.name})" if f.name else "") for f in feds)
            n_nodes = sum(len(f.supernodes) for f in feds)
            log(f"SuperLink(s) on {where}; {n_nodes} SuperNodes; logs in {logs}")
            for f in reversed(feds):  # the regions' coordinators first: the root's run needs them
                start_run(f)
            root_run = procs.started[feds[0].key("flwr-run")]
            follower = _Follower([f.out / "metrics.jsonl" for f in feds], cfg, progress)
            dead_since: dict[str, float] = {}

            def dead(key: str, what: str, consequence: str) -> bool:
                """Whether process `key` exited and `restart_delay` has passed (logged once, when noticed)."""
                s = procs.started.get(key)
                if s is None or s.proc.poll() is None:
                    dead_since.pop(key, None)
                    return False
                if key not in dead_since:
                    log(f"{what} exited (code {s.proc.returncode}); {consequence} until it is back")
                    dead_since[key] = time.monotonic()
                return restart_dead and time.monotonic() - dead_since[key] > restart_delay

            while root_run.proc.poll() is None:
                time.sleep(0.5)
                follower.poll()
                root_link = procs.started[feds[0].key("superlink")]
                if root_link.proc.poll() is not None:
                    raise WorldLMError(f"the SuperLink exited (code {root_link.proc.returncode}); see {root_link.log}")
                for f in feds:
                    if f is not feds[0] and not (f.out / FINISHED).is_file():
                        link, run = f.key("superlink"), f.key("flwr-run")
                        out_ = "its subtree sits out"
                        if dead(link, f"region '{f.name}': its SuperLink", out_) or dead(
                            run, f"region '{f.name}': its coordinator's run", out_
                        ):
                            dead_since.pop(link, None)
                            dead_since.pop(run, None)
                            restart_region(f, "its SuperLink or coordinator is gone")
                            continue
                    for key in f.supernodes:
                        node = f"SuperNode '{key.split(':', 1)[1]}'"
                        if dead(key, node, "its node is left out") or dead(f"worker@{key}", f"{node}'s worker", "it"):
                            stop_supernode(key)
                            start_supernode(f, key)
                            dead_since.pop(key, None)
                            dead_since.pop(f"worker@{key}", None)
                            log(f"restarted SuperNode '{key.split(':', 1)[1]}'; it rejoins at the next round")
            follower.poll()
            summary = _result(cfg, out, feds, procs, root_run)
    finally:
        procs.stop_all()
        shutil.rmtree(sockets, ignore_errors=True)
    if not keep_state:
        shutil.rmtree(work / "state", ignore_errors=True)
    log(f"deploy-local finished in {time.perf_counter() - t0:.1f} s; all Flower processes stopped")
    return summary


def _result(cfg: C.Config, out: Path, feds: list[_Federation], procs: Processes, root_run: Started) -> dict[str, Any]:
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


def _wait_for_port(port: int, proc: Started, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.proc.poll() is not None:
            raise WorldLMError(f"{proc.name} exited at start (code {proc.proc.returncode}); see {proc.log}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise WorldLMError(f"{proc.name} did not open port {port} within {limit:g} s; see {proc.log}")
