"""The Flower apps: `server_app` (the coordinator) and `client_app` (one tree node per SuperNode).

`flwr run` loads them from here (the app's pyproject.toml names `worldlm.runners.flower.app:server_app`
and `:client_app`); the simulation engine and the in-process message path build their own with
`make_server_app` / `make_client_app`, which take settings that would otherwise come from the run
config (`worldlm-config`: the resolved config TOML, `out`, `timeout`, `connect-timeout`; nested deployments
also `federation`: the inner node whose federation this run is, `bridge-socket`: where a region's coordinator
serves its bridge, `run-key`: the nodes' state key across resubmitted runs, `rejoin`: 1 for a region's
coordinator restarted mid-run) and the node config (`node-name`, `data-path`, `state-dir`, `out-dir`; a
bridge SuperNode: `node-name` and `bridge`, its region's socket, and `bridge-wait`).

Message types (ClientApp handlers):
    query.hello      which tree node this SuperNode is, and the model layout it built
    train.visit      steps 2–3 with the parent's model, 4.i training, 4.ii–iii routing
    train.aggregate  step 4.iv over the children's updates
    evaluate         personalised perplexity on the node's own held-out split
    train.subtree, evaluate.subtree, query.finish
                     a bridge SuperNode (nested deployments): relayed to its region's coordinator
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from worldlm.runners.flower import quiet_flower_env
from worldlm.runners.flower.bridge import forward, serve_socket
from worldlm.runners.flower.coordinator import Coordinator, ProgressFn
from worldlm.runners.flower.nested import RegionCoordinator
from worldlm.runners.flower.node import config_from_text, handle

quiet_flower_env()


def make_client_app(defaults: dict[str, Any] | None = None) -> ClientApp:
    settings = dict(defaults or {})
    app = ClientApp()

    def handler(kind: str) -> Any:
        def fn(msg: Message, context: Context) -> Message:
            bridge = context.node_config.get("bridge")
            if bridge:  # nested: this SuperNode stands for a region whose own coordinator does the work
                wait = float(context.node_config.get("bridge-wait", 300.0))
                ttl = msg.metadata.ttl
                reply = forward(str(bridge), msg.metadata.message_type, msg.content, wait, ttl)
                return Message(reply, reply_to=msg)
            return Message(handle(kind, msg.content, context, settings), reply_to=msg)

        return fn

    app.query("hello")(handler("hello"))
    app.train("visit")(handler("visit"))
    app.train("aggregate")(handler("aggregate"))
    app.evaluate()(handler("evaluate"))
    for register in (app.train, app.evaluate):  # a bridge's messages (nested deployments)
        register("subtree")(handler("subtree"))
    app.query("finish")(handler("finish"))
    return app


def make_server_app(
    defaults: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
    result: dict[str, Any] | None = None,
) -> ServerApp:
    base = dict(defaults or {})
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        settings = {**base, **{k: v for k, v in context.run_config.items() if v != ""}}
        if not settings.get("worldlm-config") or not settings.get("out"):
            raise ValueError("the run needs worldlm-config and out in its run config (see worldlm deploy-local)")
        cfg, out = config_from_text(str(settings["worldlm-config"])), Path(str(settings["out"]))
        timeout, connect_timeout = float(settings.get("timeout", 600.0)), float(settings.get("connect-timeout", 300.0))
        scope = str(settings.get("federation", "")) or None
        if scope is not None and settings.get("bridge-socket"):  # nested: a region's coordinator, serving its bridge
            rejoin = bool(int(settings.get("rejoin", 0)))
            region = RegionCoordinator(grid, cfg, out, scope, timeout, connect_timeout, rejoin=rejoin)
            serve_socket(region, Path(str(settings["bridge-socket"])))
            return
        coordinator = Coordinator(grid, cfg, out, timeout, connect_timeout, progress=progress, scope=scope)
        summary = coordinator.run()
        if result is not None:
            result["summary"] = summary

    return app


server_app = make_server_app()
client_app = make_client_app()
