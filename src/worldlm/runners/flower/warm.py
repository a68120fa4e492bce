"""Warm ClientApps: one long-lived ClientApp process per SuperNode.

Flower 1.41 runs every message in a fresh `flwr-clientapp` process (its SuperExec starts one per task,
in both `subprocess` and `process` isolation), so each message re-imports torch and worldlm and
rebuilds the node's set-up: ~4.5 s per message on this CPU, most of a deployment's wall time. Flower
offers no executor that keeps a ClientApp process (its warm pools are Kubernetes-only and still run
one task per pod). Two small stand-ins, for a SuperNode started with `--isolation process`:

- `worker`: takes the place of `flower-superexec` for one SuperNode: it claims the SuperNode's
  ClientApp tasks (the Runtime API's AcquireTask) and runs each in this process with the steps of
  Flower's own `run_clientapp` (pull the message and context, load the app, push the reply and the
  context) minus the process exit. Imports and the node's set-up cache (`node._SIDES`) stay warm;
  the node's private state is still loaded and stored around every message, so results are bitwise
  those of a fresh process. It exits with its SuperNode (`--parent-pid`).
- `supernode`: `flower-supernode` with its polls on a backoff (Flower 1.41 sleeps a hard-coded 3 s
  whenever the SuperLink has no message for it and 0.5 s while waiting for a reply; here 0.05 s right
  after a message, growing to 0.5 s while idle), since a tree round is a chain of messages.

`deploy-local --isolation warm` (the default) uses both; `--isolation subprocess` is Flower's own.
Both rely on Flower 1.41's internals (`flwr.supernode.runtime.run_clientapp`), which is why the Flower
extra is pinned to 1.41.x.

    python -m worldlm.runners.flower.warm worker --runtime-api-address 127.0.0.1:PORT --parent-pid PID
    python -m worldlm.runners.flower.warm supernode <flower-supernode arguments> --isolation process
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from logging import ERROR, INFO
from types import SimpleNamespace
from typing import Any

from worldlm.runners.flower import Backoff, quiet_flower_env


def _client(address: str, token: str | None) -> Any:
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=make_simple_http_retry_invoker(),
    )


class Worker:
    """Runs a SuperNode's ClientApp tasks one after another in this process (Flower's run_clientapp, kept alive)."""

    def __init__(self, address: str) -> None:
        from flwr.clientapp.utils import get_load_client_app_fn

        self.address = address
        self.installed: set[str] = set()
        self.load = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def run_task(self, token: str) -> None:
        from flwr.app import Message
        from flwr.app.error import Error
        from flwr.cli.install import install_from_fab
        from flwr.clientapp.client_app import LoadClientAppError
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore import log
        from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
        from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

        client = _client(self.address, token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message = context = reply = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = pull_task_input(client)
            if fab.hash_str not in self.installed:  # unpack the app bundle once per version, not per message
                install_from_fab(fab.content, skip_prompt=True)
                self.installed.add(fab.hash_str)
            app = self.load(run.fab_id, run.fab_version, fab.hash_str)
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as exc:  # the node's error goes back to the coordinator as Flower's would
            code = ErrorCode.CLIENT_APP_RAISED_EXCEPTION
            details = f"{type(exc)}:<'{exc}'>"
            if isinstance(exc, LoadClientAppError):
                code, details = ErrorCode.LOAD_CLIENT_APP_EXCEPTION, "the ClientApp could not be loaded"
            log(ERROR, "ClientApp raised an exception", exc_info=exc)
            if message is not None:
                reply = Message(Error(code=code, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            finally:
                push_task_output(client, context, status, details)
                heartbeat.stop()
                client.close()

    def serve(self, poll: Backoff) -> None:
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore import log
        from flwr.supercore.constant import TaskType

        log(INFO, "worldlm warm ClientApp worker (pid %s) for the SuperNode at %s", os.getpid(), self.address)
        tasks = _client(self.address, None)
        while True:
            try:
                res = tasks.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
            except Exception as exc:  # the SuperNode is starting (or gone: the parent monitor ends us)
                log(ERROR, "no task from the SuperNode yet: %s", exc)
                time.sleep(1.0)
                continue
            if res.HasField("task") and res.token:
                self.run_task(res.token)
                poll.active()
            else:
                poll.idle()


IDLE_SLEEP = 3  # Flower 1.41's SuperNode: seconds it sleeps when the SuperLink had no message for it


def _fast_supernode() -> None:
    """flower-supernode with its polls on a `Backoff`: its idle sleep (3 s in Flower 1.41) and its 0.5 s
    waits for a reply, which mean a message is being handled (activity)."""
    import flwr.supernode.start_client_internal as internal
    from flwr.supernode.cli import flower_supernode

    poll = Backoff(first=0.05)

    def sleep(seconds: float) -> None:
        if seconds == IDLE_SLEEP:
            poll.idle()
        else:
            poll.active()
            time.sleep(min(seconds, poll.first))

    capped = SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("_")})
    capped.sleep = sleep
    setattr(internal, "time", capped)  # noqa: B010 - the module's own `time`, only inside start_client_internal
    sys.argv[0] = "flower-supernode"
    flower_supernode()


def main(argv: list[str] | None = None) -> None:
    quiet_flower_env()
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["supernode"]:
        sys.argv = [sys.argv[0], *args[1:]]
        _fast_supernode()
        return
    p = argparse.ArgumentParser(prog="python -m worldlm.runners.flower.warm worker")
    p.add_argument("role", choices=["worker"])
    p.add_argument("--runtime-api-address", required=True, help="the SuperNode's --port, as host:port")
    p.add_argument("--parent-pid", type=int, help="exit when this process (the SuperNode) is gone")
    p.add_argument("--poll", type=float, default=0.5, help="longest wait between task polls when idle (seconds)")
    a = p.parse_args(args)
    if a.parent_pid:
        from flwr.supercore.app_utils import start_parent_process_monitor

        start_parent_process_monitor(a.parent_pid)
    Worker(a.runtime_api_address).serve(Backoff(cap=a.poll))


if __name__ == "__main__":
    main()
