"""The Flower runner (a runner, docs/design.md): one ClientApp per tree node, one ServerApp coordinating rounds.

- `node.py`: the organisation's side — the tree node(s) a SuperNode hosts, with its data, AdamW
  and server-optimizer state, key layers and residual queues; it trains and aggregates.
- `coordinator.py`: the ServerApp's side — it drives the tree by messages (`train.visit`,
  `train.aggregate`, `evaluate`), relays models along tree edges, counts their bytes, writes the
  run directory. It never trains, aggregates or sees data.
- `wire.py`: what travels (float32 ArrayRecords) and how many bytes that is.
- `app.py`: the `ServerApp` / `ClientApp` objects (`flwr run` loads them from here).
- `engines.py`: the in-process message path, the simulation engine, and `deploy-local`.
- `nested.py`, `aliases.py`: nested federations (a SuperLink and coordinator per inner node, regions
  behind bridge SuperNodes, residual origins aliased at federation borders); `deploy.py`: `deploy-local`.
- `warm.py`: one long-lived ClientApp process per SuperNode (deploy-local's default isolation).

Both sides call the same pure functions of `worldlm.federation.round` as the in-process runner,
so the same config and seed give the same numbers. Flower is an optional extra: `pip install -e ".[flower]"`.
"""

from __future__ import annotations

import os
import time

from worldlm.errors import WorldLMError

# No telemetry, no update checks, no `uv sync` of app dependencies at run time (offline machines: no network
# beyond the package registries).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


def quiet_flower_env() -> None:
    for key, value in FLOWER_ENV.items():
        os.environ.setdefault(key, value)


def require_flower() -> None:
    """A one-line error instead of an ImportError when the optional extra is missing."""
    quiet_flower_env()
    try:
        import flwr  # noqa: F401
    except ImportError as exc:
        raise WorldLMError(
            'the Flower runner needs Flower: pip install -e ".[flower]" (flwr[simulation] 1.41)'
        ) from exc


class Backoff:
    """Idle polling that is quick right after activity and slows down while nothing comes: a node's
    messages come in bursts (visit, then aggregate), and on one machine many idle pollers would eat the
    CPU the training needs (7 SuperNodes polling every 20 ms cost both cores here)."""

    def __init__(self, first: float = 0.02, cap: float = 0.5, factor: float = 1.5) -> None:
        self.first, self.cap, self.factor = first, cap, factor
        self.delay = first

    def active(self) -> None:
        self.delay = self.first

    def idle(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.delay * self.factor, self.cap)
