"""Where a runner keeps each node's state between uses: where it is computed on, in host memory, or on disk
(`federation.offload_states` false, "host", true).

Both stores serialise a state the same way a checkpoint does (one `Part` per node), so a state
read back from disk is bitwise the one written, and checkpoints are assembled one node at a time.
With states on disk, memory holds the node states in use (the path of the round's depth-first
visit and the updates its parents are collecting) plus the one working model, not all nodes.
"""

from __future__ import annotations

import contextlib
from abc import abstractmethod
from collections.abc import Callable, Iterator, MutableMapping
from pathlib import Path

import torch
from torch import Tensor

from worldlm.federation.server_opt import ServerOpt
from worldlm.federation.types import NodeState, Residual
from worldlm.runners.checkpoint import Part, read_part, write_part
from worldlm.timing import PhaseFn, no_phase

QUEUES = ("to_aggregate", "to_route")


def encode_state(st: NodeState) -> Part:
    """A node's federation state as tensors (parameters, server-optimizer state, residual queues, the
    similarity reference, the children's key layers as received, the model after its last training where
    kept) and metadata (residual origins, outlier counts)."""
    tensors = {"params": st.params}
    if st.server_opt is not None:
        tensors.update({f"server/{k}": v for k, v in st.server_opt.state_dict().items()})
    meta = {}
    for qname in QUEUES:
        queue: list[Residual] = getattr(st, qname)
        tensors.update({f"{qname}/{j}": r.vector for j, r in enumerate(queue)})
        meta[qname] = [[r.position, r.origin] for r in queue]
    if st.reference is not None:
        tensors["reference"] = st.reference
    if st.trained is not None:
        tensors["trained"] = st.trained
    if st.low_rounds:
        meta["low_rounds"] = st.low_rounds
    tensors.update({f"child_keys/{j}": k for j, k in enumerate(st.child_keys.values())})
    meta["child_keys"] = list(st.child_keys)  # by index: node names may hold any character
    return Part(tensors, meta)


def load_state(st: NodeState, part: Part, device: torch.device | None = None) -> None:
    """Set `st` (in place, its server optimizer included) to what `encode_state` wrote, its tensors on
    `device` (None: where they were read, the CPU)."""
    t = part.tensors if device is None else {k: v.to(device) for k, v in part.tensors.items()}
    st.params = t["params"]
    if st.server_opt is not None:
        st.server_opt.load_state_dict({k.removeprefix("server/"): v for k, v in t.items() if k.startswith("server/")})
    for qname in QUEUES:
        queue = [Residual(t[f"{qname}/{j}"], int(pos), str(origin)) for j, (pos, origin) in enumerate(part.meta[qname])]
        setattr(st, qname, queue)
    st.reference = t.get("reference")
    st.trained = t.get("trained")
    st.low_rounds = {str(k): int(v) for k, v in part.meta.get("low_rounds", {}).items()}
    st.child_keys = {str(c): t[f"child_keys/{j}"] for j, c in enumerate(part.meta.get("child_keys", []))}


def adam_part(opt: torch.optim.Optimizer) -> Part:
    """An AdamW's per-parameter moments and step counts (its param groups come from the config)."""
    tensors = {f"{idx}/{k}": v for idx, entry in opt.state_dict()["state"].items() for k, v in entry.items()}
    return Part(tensors, {})


def load_adam(opt: torch.optim.Optimizer, part: Part) -> None:
    states: dict[int, dict[str, Tensor]] = {}
    for key, v in part.tensors.items():
        idx, field = key.split("/")
        states.setdefault(int(idx), {})[field] = v
    opt.load_state_dict({"state": states, "param_groups": opt.state_dict()["param_groups"]})


class NodeStates(MutableMapping[str, NodeState]):
    """One federation's node states by name; `release(name)`: not needed until it is next looked up."""

    @abstractmethod
    def release(self, name: str) -> None: ...

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[NodeState]:
        try:
            yield self[name]
        finally:
            self.release(name)


class MemoryStates(NodeStates):
    """Every node state in memory (the default)."""

    def __init__(self) -> None:
        self._states: dict[str, NodeState] = {}

    def __getitem__(self, name: str) -> NodeState:
        return self._states[name]

    def __setitem__(self, name: str, st: NodeState) -> None:
        self._states[name] = st

    def __delitem__(self, name: str) -> None:
        del self._states[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._states)

    def __len__(self) -> int:
        return len(self._states)

    def release(self, name: str) -> None:
        """Nothing to do: the state stays where it is."""


class DiskStates(NodeStates):
    """Node states in files under `root` between uses: loaded on lookup, written back on `release`.

    `server_opt_for(name)` makes a fresh server optimizer for an inner node (its state comes from
    the file). Loads and writes are timed as the phase "offload".
    """

    def __init__(
        self,
        root: Path,
        server_opt_for: Callable[[str], ServerOpt | None],
        phase: PhaseFn = no_phase,
        device: torch.device | None = None,
    ) -> None:
        self.root = root
        self.device = device  # where a loaded state's tensors go (the working model's device)
        self.server_opt_for = server_opt_for
        self.phase = phase
        self._files: dict[str, Path] = {}  # by index, not name: node names may hold any character
        self._live: dict[str, NodeState] = {}

    def __getitem__(self, name: str) -> NodeState:
        if name not in self._live:
            file = self._files[name]
            with self.phase("offload"):
                st = NodeState(params=torch.empty(0), server_opt=self.server_opt_for(name))
                load_state(st, read_part(file), self.device)
            self._live[name] = st
        return self._live[name]

    def __setitem__(self, name: str, st: NodeState) -> None:
        self._files.setdefault(name, self.root / f"node-{len(self._files)}.safetensors")
        self._live[name] = st

    def __delitem__(self, name: str) -> None:
        self._live.pop(name, None)
        self._files.pop(name).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def release(self, name: str) -> None:
        st = self._live.pop(name, None)
        if st is not None:
            with self.phase("offload"):
                write_part(self._files[name], encode_state(st), durable=False)


def _moved(st: NodeState, device: torch.device) -> NodeState:
    """`st` with every tensor on `device`: what `encode_state` holds of it, loaded back there (the same
    object, its server optimizer included), so a field added to the checkpoint moves with it."""
    if st.params.device != device:
        load_state(st, encode_state(st), device)
    return st


class HostStates(MemoryStates):
    """Node states in host memory between uses, on `device` (the working model's) while in use.

    With the model on the CPU this is `MemoryStates`; on an accelerator it keeps the device's memory for
    the states in use (the round's path and the updates being collected). Moves are timed as "offload".
    """

    def __init__(self, device: torch.device, phase: PhaseFn = no_phase) -> None:
        super().__init__()
        self.device = device
        self.phase = phase

    def __getitem__(self, name: str) -> NodeState:
        st = super().__getitem__(name)
        if st.params.device != self.device:
            with self.phase("offload"):
                _moved(st, self.device)
        return st

    def release(self, name: str) -> None:
        st = super().__getitem__(name)
        if st.params.device.type != "cpu":
            with self.phase("offload"):
                _moved(st, torch.device("cpu"))
