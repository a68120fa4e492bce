"""The processes a local deployment owns: started, watched, and stopped with everything they started.

`Processes.stop_all` ends exactly the processes it started and their descendants (identified by PID and
start time, so a reused PID is never hit), on success, failure or Ctrl-C; children also get SIGTERM if
worldlm itself dies. Linux (/proc) for the descendants; elsewhere only the direct children are stopped.
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
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worldlm.errors import WorldLMError
from worldlm.files import atomic_write_text

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


def flower_command(name: str) -> str:
    """A Flower command from this interpreter's environment (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


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


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
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


def wait_for_port(port: int, proc: Started, limit: float) -> None:
    """Wait until `proc` listens on `port` of 127.0.0.1 (a one-line error if it exits or takes longer than `limit`)."""
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
