"""Round checkpoints of a whole federation: written atomically, verified by checksum on load.

A checkpoint is a directory `checkpoints/round-NNNN/` holding `state.safetensors` (every tensor:
node parameters, AdamW moments, server-optimizer momenta, residual queues), `state.json` (the
rest: counters, sampler RNG states, residual metadata, metrics offset) and `manifest.json` with
the sha256 of both. It is assembled in a temporary directory and renamed into place, so a kill at
any moment leaves either the complete new checkpoint or none; a corrupt one is skipped on load.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor

from worldlm.errors import WorldLMError
from worldlm.io import atomic_write_bytes, atomic_write_json

PREFIX = "round-"


@dataclass
class Snapshot:
    round: int  # rounds completed
    tensors: dict[str, Tensor]
    state: dict[str, Any]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_checkpoint(root: Path, snap: Snapshot, keep: int) -> Path:
    """Write `root/round-NNNN/` atomically, then drop all but the newest `keep` checkpoints."""
    final = root / f"{PREFIX}{snap.round:04d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {k: v.detach().contiguous() for k, v in snap.tensors.items()}
    atomic_write_bytes(tmp / "state.safetensors", save_safetensors(tensors))
    atomic_write_json(tmp / "state.json", snap.state)
    files = {name: _sha256(tmp / name) for name in ("state.safetensors", "state.json")}
    atomic_write_json(tmp / "manifest.json", {"round": snap.round, "files": files})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(checkpoint_dirs(root))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def _load_one(path: Path) -> Snapshot:
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    for name, digest in manifest["files"].items():
        if _sha256(path / name) != digest:
            raise ValueError(f"{name} does not match its checksum")
    tensors = load_safetensors((path / "state.safetensors").read_bytes())
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return Snapshot(int(manifest["round"]), tensors, state)


def load_latest(root: Path, warn: Callable[[str], None]) -> Snapshot:
    """The newest checkpoint that verifies; corrupt or truncated ones are reported and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            return _load_one(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"checkpoint {path} is unusable ({exc}); trying the previous one")
    raise WorldLMError(f"no valid checkpoint under {root}; start the run again without --resume")
