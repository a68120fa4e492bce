"""Round checkpoints of a whole federation: written atomically, verified by checksum on load.

A checkpoint is a directory `checkpoints/round-NNNN/` of *parts*, one safetensors file each with
its JSON metadata in the header: `state` (counters, sampler RNG states, metrics offset, DP state)
and one part per node state and per AdamW state, plus `manifest.json` with the sha256 of every
file. Parts are produced and written one at a time, and read back one at a time, so writing or
restoring a checkpoint never holds more than one node's state besides the run's own (node states
kept on disk stay there). It is assembled in a temporary directory and renamed into place, so a
kill at any moment leaves either the complete new checkpoint or none; a corrupt one is skipped on
load.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from worldlm.errors import WorldLMError
from worldlm.files import atomic_write_json, atomic_write_with, file_sha256

PREFIX = "round-"
FORMAT = 2  # 1: one state.safetensors + state.json (before node states could live on disk)


class CannotResume(WorldLMError):
    """No checkpoint verifies, or the run directory disagrees with it: the run has to start again."""


@dataclass
class Part:
    """One file of a checkpoint (or of a node state kept on disk): tensors and JSON-able metadata."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]


def write_part(path: Path, part: Part, durable: bool = True) -> None:
    """Atomically write `part`; `durable=False` skips the fsync (scratch files rebuilt on resume).

    safetensors writes straight from the tensors' memory: no intermediate copy of the file's bytes. Tensors
    on an accelerator are brought to the CPU first (`cpu()` of a CPU tensor is the tensor itself), so a
    checkpoint never depends on the device it was written on.
    """
    tensors = {k: v.detach().cpu().contiguous() for k, v in part.tensors.items()}
    metadata = {"meta": json.dumps(part.meta)}
    atomic_write_with(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), fsync=durable)


def read_part(path: Path) -> Part:
    """The tensors (in memory of their own: read, not mapped, so later writes to the file cannot
    reach them) and metadata of a part."""
    with safe_open(path, framework="pt", backend="pread") as f:
        return Part(f.get_tensors(), json.loads(f.metadata()["meta"]))


@dataclass
class Snapshot:
    """A checkpoint: rounds completed and its parts by name, each made (or loaded) when called."""

    round: int
    parts: Mapping[str, Callable[[], Part]]


def save_checkpoint(root: Path, snap: Snapshot, keep: int) -> Path:
    """Write `root/round-NNNN/` atomically, then drop all but the newest `keep` checkpoints."""
    final = root / f"{PREFIX}{snap.round:04d}"
    tmp = root / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for name, make in snap.parts.items():
        file = f"{name}.safetensors"
        write_part(tmp / file, make())
        files[file] = file_sha256(tmp / file)
    atomic_write_json(tmp / "manifest.json", {"format": FORMAT, "round": snap.round, "files": files})
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
    if manifest.get("format") != FORMAT:
        raise ValueError(f"format {manifest.get('format', 1)} (written by an older worldlm), expected {FORMAT}")
    for name, digest in manifest["files"].items():
        if file_sha256(path / name) != digest:
            raise ValueError(f"{name} does not match its checksum")
    parts = {name.removesuffix(".safetensors"): partial(read_part, path / name) for name in manifest["files"]}
    return Snapshot(int(manifest["round"]), parts)


def load_latest(root: Path, warn: Callable[[str], None]) -> Snapshot:
    """The newest checkpoint that verifies; corrupt or truncated ones are reported and skipped."""
    for path in reversed(checkpoint_dirs(root)):
        try:
            return _load_one(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            warn(f"checkpoint {path} is unusable ({exc}); trying the previous one")
    raise CannotResume(f"no valid checkpoint under {root}; start the run again without --resume")
