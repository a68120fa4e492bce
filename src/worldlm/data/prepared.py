"""A prepared dataset on disk: token streams per source and split, a tokenizer, a manifest.

Layout of a prepared directory (written by `worldlm prepare`, read by training)::

    <dir>/manifest.json
    <dir>/tokenizer.json                      a `tokenizers` byte-level BPE
    <dir>/tokens/<source>/<split>.bin          flat uint16 (or uint32) token ids, no header

manifest.json::

    {"format": 1, "recipe": "languages", "tokenizer": "tokenizer.json", "tokenizer_sha256": "...",
     "vocab_size": 8192, "dtype": "uint16", "eot_id": 0,
     "sources": {"fr": {"splits": {"train": {"file": "tokens/fr/train.bin", "tokens": 1, "chars": 1,
                                             "sha256": "..."}, "val": {...}, "test": {...}},
                        "origin": [{"package": "manpages-fr", "version": "4.18.1-1"}]}}}
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from worldlm.errors import DataError, quoted
from worldlm.files import atomic_write_bytes

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# 4k suits the tiny presets (at 8k the embedding is most of a ~1M model); recipes allow 4k–16k.
DEFAULT_VOCAB = 4096


@dataclass(frozen=True)
class SplitInfo:
    file: str
    tokens: int
    chars: int
    sha256: str


@dataclass(frozen=True)
class Prepared:
    root: Path
    vocab_size: int
    dtype: str
    eot_id: int
    tokenizer_file: Path
    tokenizer_sha256: str
    splits: dict[str, dict[str, SplitInfo]]  # source -> split -> info
    manifest: dict[str, object]

    @property
    def sources(self) -> list[str]:
        return sorted(self.splits)

    def tokens(self, source: str, split: str) -> np.ndarray:
        """Read-only memmap of one source's split (1-D token ids)."""
        if source not in self.splits:
            raise DataError(
                f"data source {quoted(source)} is not in {self.root / MANIFEST} "
                f"(available: {', '.join(self.sources)}); fix the tree's sources or re-run `worldlm prepare`"
            )
        info = self.splits[source][split]
        path = self.root / info.file
        if not path.is_file():
            raise DataError(f"token file {path} is missing; re-run `worldlm prepare`")
        arr = np.memmap(path, dtype=np.dtype(self.dtype), mode="r")
        if arr.shape[0] != info.tokens:
            raise DataError(
                f"token file {path} holds {arr.shape[0]} tokens but the manifest says {info.tokens}; "
                "it is truncated or stale: re-run `worldlm prepare`"
            )
        return arr


def load_prepared(root: str | Path) -> Prepared:
    """Open a prepared directory, checking the manifest is present and well-formed."""
    root = Path(root)
    mpath = root / MANIFEST
    if not mpath.is_file():
        from worldlm.data.recipes import RECIPES  # only on this error path: recipes.py is heavy to import

        fix = (
            f"run `worldlm prepare --recipe {root.name} --out {root}`"
            if root.name in RECIPES
            else "run `worldlm prepare CONFIG` with the config whose data.path this is"
        )
        raise DataError(f"no prepared data at {root} (missing {MANIFEST}); {fix}, or point data.path at prepared data")
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
        splits = {
            src: {sp: SplitInfo(**entry["splits"][sp]) for sp in SPLITS} for src, entry in manifest["sources"].items()
        }
        prepared = Prepared(
            root=root,
            vocab_size=int(manifest["vocab_size"]),
            dtype=str(manifest["dtype"]),
            eot_id=int(manifest.get("eot_id", 0)),
            tokenizer_file=root / manifest["tokenizer"],
            tokenizer_sha256=str(manifest.get("tokenizer_sha256", "")),
            splits=splits,
            manifest=manifest,
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{mpath} is malformed ({exc}); delete {root} and re-run `worldlm prepare`") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{mpath} has format {manifest.get('format')}, expected {FORMAT_VERSION}; re-run prepare")
    _check_tokenizer(prepared)
    return prepared


def _check_tokenizer(prepared: Prepared) -> None:
    """The token streams are only meaningful with the tokenizer that made them."""
    path = prepared.tokenizer_file
    if not path.is_file():
        raise DataError(f"tokenizer {path} is missing; re-run `worldlm prepare` for {prepared.root}")
    if prepared.tokenizer_sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != prepared.tokenizer_sha256:
        raise DataError(
            f"tokenizer {path} does not match the one the token streams in {prepared.root} were made with; "
            "restore it or re-run `worldlm prepare`"
        )


def write_token_streams(root: Path, streams: dict[str, dict[str, np.ndarray]], vocab_size: int) -> Prepared:
    """A prepared directory from token ids (source -> split -> ids) and no real tokenizer: for tests and the bench.

    The tokenizer file is a placeholder (its checksum is left empty, so it is not checked). Files are
    renamed into place but not fsynced: throwaway data, made again in a moment if lost.
    """
    sources = {}
    for src, splits in streams.items():
        entry = {}
        for split in SPLITS:
            ids = splits[split].astype(np.uint16)
            file = f"tokens/{src}/{split}.bin"
            atomic_write_bytes(root / file, ids.tobytes(), fsync=False)
            entry[split] = {
                "file": file,
                "tokens": int(ids.size),
                "chars": int(ids.size) * 4,
                "sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            }
        sources[src] = {"splits": entry, "origin": [{"package": "synthetic", "version": "0"}]}
    atomic_write_bytes(root / "tokenizer.json", b"{}", fsync=False)
    manifest = {
        "format": FORMAT_VERSION,
        "recipe": "synthetic",
        "tokenizer": "tokenizer.json",
        "tokenizer_sha256": "",
        "vocab_size": vocab_size,
        "dtype": "uint16",
        "eot_id": 0,
        "sources": sources,
    }
    atomic_write_bytes(root / MANIFEST, json.dumps(manifest, indent=2).encode(), fsync=False)
    return load_prepared(root)
