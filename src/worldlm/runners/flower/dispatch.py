"""Getting messages to tree nodes over a Flower grid, whatever the messages mean.

`Directory` knows which SuperNode hosts which tree node (from the names nodes report, refreshed every
round, so a restarted SuperNode rejoins); `Dispatcher` runs message jobs (generators yielding `Call`s
and `Gather`s) so that every sibling subtree proceeds at its own pace. The coordinators build on both.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from worldlm.errors import WorldLMError
from worldlm.runners.flower import Backoff

LogFn = Callable[[str], None]


def stderr_log(msg: str) -> None:
    """The default log of the Flower runner (coordinators, the directory, deploy-local): one line on stderr."""
    print(f"worldlm: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- a tiny message scheduler


@dataclass
class Call:
    """Send one message to the SuperNode hosting engine node `node`; the job resumes with the reply (None: none)."""

    node: str
    kind: str
    content: RecordDict
    round: int


@dataclass
class Gather:
    """Run these jobs concurrently; the job resumes with the list of their results."""

    jobs: list[Job]


Job = Generator[Call | Gather, Any, Any]


@dataclass
class _Task:
    gen: Job
    parent: _Task | None
    slot: int
    waiting: int = 0
    results: list[Any] = field(default_factory=list)


class Dispatcher:
    """Runs jobs (generators) that yield Calls and Gathers: every sibling subtree proceeds independently.

    Messages are pushed as soon as a job needs them and replies pulled as they come, so a slow
    node only holds up its own subtree. A Call without a reply within `timeout` resumes with None.
    """

    def __init__(
        self,
        grid: Grid,
        resolve: Callable[[str], int | None],
        timeout: float,
        on_missing: Callable[[Call, str], None],
    ) -> None:
        self.grid, self.resolve, self.timeout, self.on_missing = grid, resolve, timeout, on_missing
        self.poll = Backoff(first=0.02)  # replies come in bursts; long trainings in between
        self.pending: dict[str, tuple[_Task, float, Call]] = {}
        self.results: list[Any] = []

    def run(self, jobs: list[Job]) -> list[Any]:
        self.results = [None] * len(jobs)
        for i, job in enumerate(jobs):
            self._step(_Task(job, None, i), None)
        while self.pending:
            replies = list(self.grid.pull_messages(list(self.pending)))
            for reply in replies:
                entry = self.pending.pop(reply.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                task, _, call = entry
                if reply.has_error():
                    self.on_missing(call, f"error: {reply.error.reason}")
                    self._step(task, None)
                else:
                    self._step(task, reply)
            now = time.monotonic()
            for mid, (task, deadline, call) in list(self.pending.items()):
                if now > deadline and mid in self.pending:
                    del self.pending[mid]
                    self.on_missing(call, f"no reply within {self.timeout:g} s")
                    self._step(task, None)
            if replies:
                self.poll.active()
            elif self.pending:
                self.poll.idle()
        return self.results

    def _step(self, task: _Task, value: Any) -> None:
        while True:
            try:
                request = task.gen.send(value)
            except StopIteration as stop:
                self._finish(task, stop.value)
                return
            if isinstance(request, Gather):
                if not request.jobs:
                    value = []
                    continue
                task.waiting, task.results = len(request.jobs), [None] * len(request.jobs)
                for i, job in enumerate(request.jobs):
                    self._step(_Task(job, task, i), None)
                return
            node_id = self.resolve(request.node)
            if node_id is None:
                self.on_missing(request, "not connected")
                value = None
                continue
            msg = Message(
                request.content,
                node_id,
                request.kind,
                ttl=max(self.timeout, 10.0),  # a message nobody took in time expires instead of running late
                group_id=str(request.round),
            )
            ids = list(self.grid.push_messages([msg]))
            if not ids or not ids[0]:
                self.on_missing(request, "could not be pushed to the SuperLink")
                value = None
                continue
            self.pending[ids[0]] = (task, time.monotonic() + self.timeout, request)
            return

    def _finish(self, task: _Task, value: Any) -> None:
        if task.parent is None:
            self.results[task.slot] = value
            return
        parent = task.parent
        parent.results[task.slot] = value
        parent.waiting -= 1
        if parent.waiting == 0:
            self._step(parent, parent.results)


# ---------------------------------------------------------------------- which SuperNode is which tree node


class Directory:
    """Tree node name -> SuperNode id, from the names nodes report (`query.hello`); refreshed every round.

    Every SuperNode not yet known is greeted once, with a message that lives `ttl` seconds (a
    SuperNode may take long to start its ClientApp: Ray actors, a loaded machine); it is greeted
    again only after that message expired unanswered, and never again after it refused.
    """

    def __init__(self, grid: Grid, ttl: float, log: LogFn, poll: float = 0.2) -> None:
        self.grid, self.ttl, self.log, self.poll = grid, ttl, log, poll
        self.ids: dict[str, int] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.pending: dict[str, tuple[int, float]] = {}  # hello message id -> (SuperNode id, expiry)
        self.refused: set[int] = set()  # SuperNodes that answered with an error
        self.retired: set[int] = set()  # ids of SuperNodes that were replaced by a restarted one

    def _greet_new(self) -> None:
        asked = {node for node, _ in self.pending.values()}
        known = set(self.ids.values()) | self.retired | self.refused | asked
        new = [i for i in self.grid.get_node_ids() if i not in known]
        msgs = [Message(RecordDict({"cfg": ConfigRecord({})}), i, "query.hello", ttl=self.ttl) for i in new]
        expiry = time.monotonic() + self.ttl
        for node, mid in zip(new, self.grid.push_messages(msgs) if msgs else [], strict=True):
            if mid:
                self.pending[mid] = (node, expiry)

    def _collect(self) -> list[str]:
        joined = []
        for reply in self.grid.pull_messages(list(self.pending)):
            if self.pending.pop(reply.metadata.reply_to_message_id, None) is None:
                continue
            src = reply.metadata.src_node_id
            if reply.has_error():
                self.log(f"SuperNode {src} cannot take part: {reply.error.reason}")
                self.refused.add(src)
                continue
            info = dict(reply.content.config_records["hello"])
            name = str(info["node-name"])
            if name in self.ids and self.ids[name] != src:
                self.log(f"tree node '{name}' rejoined as SuperNode {src} (was {self.ids[name]})")
                self.retired.add(self.ids[name])
            self.ids[name] = src
            self.info[name] = info
            joined.append(name)
        now = time.monotonic()
        for mid in [m for m, (_, expiry) in self.pending.items() if now > expiry]:
            del self.pending[mid]  # expired unanswered: greeted again at the next refresh
        return joined

    def refresh(self, wait: float) -> list[str]:
        """Greet SuperNodes not yet known, collect answers for up to `wait` s; returns tree nodes that (re)joined."""
        self._greet_new()
        deadline = time.monotonic() + wait
        joined = self._collect()
        while self.pending and time.monotonic() < deadline:
            time.sleep(self.poll)
            joined += self._collect()
        return joined

    def wait_for(self, names: list[str], connect_timeout: float) -> None:
        deadline = time.monotonic() + connect_timeout
        while True:
            self.refresh(wait=1.0)
            missing = [n for n in names if n not in self.ids]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise WorldLMError(
                    f"tree node(s) {', '.join(missing)} did not connect within {connect_timeout:g} s; start a "
                    "SuperNode for each with --node-config 'node-name=\"<name>\"'"
                )
