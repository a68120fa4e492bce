"""Three ways to run the Flower apps: in-process messages, the simulation engine, a local deployment.

- `run_inprocess`: the ServerApp's coordinator and one ClientApp per tree node in this process,
  talking through `InProcessGrid` (real Flower Messages, pickled both ways, as the simulation
  engine ships them to its actors). Seconds; used by the tests and `--runner flower-inproc`.
- `run_simulation_engine`: Flower's Simulation Engine (Ray actors run the ClientApps, the
  ServerApp runs in a thread here); `worldlm train CONFIG --runner flower-sim`.
- `run_nested_inprocess`: a nested deployment (`nested`) in this process: one grid and coordinator per
  inner node, bridges calling their regions' coordinators directly.
- `deploy_local`: `worldlm deploy-local CONFIG`; see `deploy.py`.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

import torch
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from worldlm import config as C
from worldlm.runners.flower import require_flower
from worldlm.runners.flower.app import make_client_app, make_server_app
from worldlm.runners.flower.bridge import inprocess_address, serve_inprocess
from worldlm.runners.flower.coordinator import Coordinator, ProgressFn
from worldlm.runners.flower.nested import RegionCoordinator, federation_dirs, merge_federations
from worldlm.runners.flower.node import check_nested, check_supported
from worldlm.runners.planning import tree_from_config


class InProcessGrid(Grid):
    """A Grid whose SuperNodes are ClientApps in this process; a ClientApp runs when its reply is pulled.

    `drop(message)` -> True loses a message (its node "does not answer"), to test timeouts;
    `restart(name)` replaces a SuperNode by a new one (new node id, empty Context.state).
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[dict[str, Any]],
        run_config: dict[str, Any] | None = None,
        drop: Callable[[Message], bool] | None = None,
    ) -> None:
        self.client_app = client_app
        self.run_config = dict(run_config or {})
        self.drop = drop or (lambda _m: False)
        self._run = Run.create_empty(run_id=1)
        # What the simulation engine sets for its in-process ServerApp: messages are stamped with it
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
        self.contexts: dict[int, Context] = {}
        self._next_id = 0
        self.names: dict[str, int] = {}
        for cfg in node_configs:
            self._add(cfg)
        self._inbox: dict[str, bytes] = {}
        self.delivered: list[Message] = []  # every instruction message a node received (tests inspect them)
        self.replies: list[Message] = []  # and every reply

    def _add(self, node_config: dict[str, Any]) -> int:
        node_id = 1000 + self._next_id  # ids are never reused, as on a SuperLink
        self._next_id += 1
        self.contexts[node_id] = Context(
            node_id=node_id, run_id=1, node_config=dict(node_config), state=RecordDict(), run_config=self.run_config
        )
        if "node-name" in node_config:
            self.names[str(node_config["node-name"])] = node_id
        return node_id

    def restart(self, name: str) -> int:
        old = self.names[name]
        node_config = self.contexts.pop(old).node_config
        return self._add(dict(node_config))

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            mid = uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            self._inbox[mid] = pickle.dumps(msg)
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for mid in list(message_ids):
            raw = self._inbox.pop(mid, None)
            if raw is None:
                continue
            msg = pickle.loads(raw)
            if msg.metadata.dst_node_id not in self.contexts or self.drop(msg):
                continue  # lost: the node is gone or does not answer
            self.delivered.append(msg)
            reply = self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
            reply.metadata.__dict__["_message_id"] = uuid4().hex
            replies.append(pickle.loads(pickle.dumps(reply)))
            self.replies.append(replies[-1])
        return replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def run_defaults(cfg: C.Config, out: Path) -> dict[str, Any]:
    tree = tree_from_config(cfg)
    return {
        "worldlm-config": C.dumps(cfg),
        "out-dir": str(out / "checkpoints"),  # each node writes its own final model (all local here)
        "node-names": list(tree.order),  # simulation: SuperNode i is tree node i
        "threads": torch.get_num_threads(),  # as the in-process runner would use here (same sums, same bits)
    }


def run_inprocess(
    cfg: C.Config,
    out: Path,
    progress: ProgressFn | None = None,
    timeout: float = 600.0,
    drop: Callable[[Message], bool] | None = None,
    grid_hook: Callable[[InProcessGrid], None] | None = None,
) -> dict[str, Any]:
    """The Flower apps over in-process messages (no Ray, no sockets): the fast path for tests."""
    require_flower()
    check_supported(cfg)
    defaults = run_defaults(cfg, out)
    names = defaults["node-names"]
    grid = InProcessGrid(make_client_app(defaults), [{"node-name": n} for n in names], drop=drop)
    if grid_hook is not None:
        grid_hook(grid)
    threads = torch.get_num_threads()
    try:
        return Coordinator(grid, cfg, out, timeout=timeout, connect_timeout=10.0, progress=progress).run()
    finally:
        torch.set_num_threads(threads)  # the nodes' thread count applies to this run only, not to the caller


def run_simulation_engine(
    cfg: C.Config, out: Path, progress: ProgressFn | None = None, timeout: float = 600.0, verbose: bool = False
) -> dict[str, Any]:
    """The Flower apps on Flower's Simulation Engine (Ray): one virtual SuperNode per tree node."""
    require_flower()
    check_supported(cfg)
    from flwr.simulation import run_simulation

    defaults = run_defaults(cfg, out)
    result: dict[str, Any] = {}
    server = make_server_app(
        {"worldlm-config": defaults["worldlm-config"], "out": str(out), "timeout": timeout}, progress, result
    )
    cpus = os.cpu_count() or 1
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": cpus, "num_gpus": 0, "logging_level": "ERROR", "log_to_driver": verbose},
    }
    run_simulation(
        server_app=server,
        client_app=make_client_app(defaults),
        num_supernodes=len(defaults["node-names"]),
        backend_config=backend,  # type: ignore[arg-type]
        verbose_logging=verbose,
    )
    if "summary" not in result:
        raise RuntimeError("the simulation ended without a summary; see the log above")
    return dict(result["summary"])


def run_nested_inprocess(
    cfg: C.Config,
    out: Path,
    progress: ProgressFn | None = None,
    timeout: float = 600.0,
    grid_hook: Callable[[str, Any], None] | None = None,
) -> dict[str, Any]:
    """A nested deployment over in-process messages: one grid and coordinator per inner node, bridges
    calling the regions' coordinators directly (no sockets). `grid_hook(node, grid)` sees each grid."""
    require_flower()
    check_supported(cfg)
    check_nested(cfg)
    tree = tree_from_config(cfg)
    dirs = federation_dirs(cfg, out)
    app = make_client_app(run_defaults(cfg, out))
    threads = torch.get_num_threads()
    try:
        with contextlib.ExitStack() as served:
            coordinators: dict[str, Coordinator] = {}
            for q, part in dirs.items():
                configs: list[dict[str, str]] = [{"node-name": q}]
                for c in tree[q].children:  # an inner child is a region of its own, behind a bridge
                    configs.append({"node-name": c, **({"bridge": inprocess_address(c)} if c in dirs else {})})
                grid = InProcessGrid(app, configs)
                if grid_hook is not None:
                    grid_hook(q, grid)
                if q == tree.root:
                    coordinators[q] = Coordinator(grid, cfg, part, timeout, 10.0, progress=progress, scope=q)
                else:
                    coordinators[q] = region = RegionCoordinator(grid, cfg, part, q, timeout, 10.0)
                    served.enter_context(serve_inprocess(q, region.request))
            coordinators[tree.root].run()
            return merge_federations(cfg, out, list(dirs.values()))
    finally:
        torch.set_num_threads(threads)  # the nodes' thread count applies to this run only
