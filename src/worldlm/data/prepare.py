"""Turn text sources into a prepared directory (layout and manifest: see `worldlm.data.prepared`).

Steps: read each source's documents, split them into train/val/test at the document level,
train a byte-level BPE on the union of the *training* splits only (held-out text must not shape
the vocabulary), encode every split into a flat token stream with `<|endoftext|>` after each
document, and write the manifest last.

Crash safety: every file is written to a temporary file in the same folder, fsynced and renamed
over its target; an existing manifest is removed before anything else is rewritten and the new
one is written only after all the files it names. So a manifest on disk always describes
complete files. Idempotence: the manifest stores an input fingerprint (`inputs`); when it
matches and the files' hashes check out, nothing is redone.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from worldlm.data.prepared import DEFAULT_VOCAB, FORMAT_VERSION, MANIFEST, SPLITS, Prepared, load_prepared
from worldlm.data.recipes import DEFAULT_MAX_CHARS, build_recipe, recipe_fingerprint
from worldlm.data.sources import SourceSpec, read_documents, source_files
from worldlm.data.tokenizer import (
    EOT,
    encode_documents,
    eot_id,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from worldlm.errors import DataError, quoted
from worldlm.files import atomic_write_bytes, atomic_write_json, file_sha256

Progress = Callable[[str], None]
TOKENIZER_FILE = "tokenizer.json"
# Bump when splitting, encoding or the manifest change, so older prepared directories are rebuilt.
PREPARE_VERSION = 1
_SOURCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def prepare_sources(
    specs: Mapping[str, SourceSpec],
    out: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB,
    seed: int = 0,
    val_fraction: float = 0.05,
    test_fraction: float = 0.05,
    progress: Progress | None = None,
    recipe: str = "custom",
    origin: Mapping[str, list[dict[str, str]]] | None = None,
    tokenizer_file: str | Path | None = None,
) -> Prepared:
    """Prepare users' own sources into `out`; `tokenizer_file` reuses a `tokenizers` JSON instead of training.

    The input fingerprint covers each source file's path, size and modification time (like make),
    so editing a file triggers a rebuild without hashing a large corpus on every call.
    """
    if not specs:
        raise DataError("no data sources given; add at least one source under data.sources")
    for name in specs:
        if not _SOURCE_NAME.fullmatch(name):  # it names a folder under tokens/
            raise DataError(f"source name {quoted(name)} is not usable; use letters, digits, '_' and '-' only")
    out = Path(out)
    settings = _settings(vocab_size, seed, val_fraction, test_fraction, tokenizer_file)
    fingerprint = {
        "kind": "sources",
        "sources": {name: _spec_fingerprint(spec) for name, spec in sorted(specs.items())},
        **settings,
    }
    if _up_to_date(out, fingerprint):
        return load_prepared(out)
    report = progress or (lambda _msg: None)
    documents = {}
    for name, spec in specs.items():
        report(f"reading source {name} from {spec.path}")
        documents[name] = list(read_documents(spec))
    default_origin = {name: [{"path": spec.path, "format": spec.format}] for name, spec in specs.items()}
    return _write_prepared(
        documents, out, fingerprint=fingerprint, vocab_size=vocab_size, seed=seed,
        fractions=(val_fraction, test_fraction), recipe=recipe, origin=dict(origin or default_origin),
        tokenizer_file=tokenizer_file, report=report,
    )  # fmt: skip


def prepare_recipe(
    name: str,
    out: str | Path,
    *,
    vocab_size: int = DEFAULT_VOCAB,
    seed: int = 0,
    progress: Progress | None = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Prepared:
    """Build recipe `languages` or `domains` into `out`, caching its packages in `out/downloads`."""
    out = Path(out)
    settings = _settings(vocab_size, seed, 0.05, 0.05, None)
    fingerprint = {"kind": "recipe", **recipe_fingerprint(name, max_chars), **settings}
    if _up_to_date(out, fingerprint):
        return load_prepared(out)
    report = progress or (lambda _msg: None)
    corpus = build_recipe(name, out / "downloads", max_chars=max_chars, progress=report)
    return _write_prepared(
        corpus.documents, out, fingerprint=fingerprint, vocab_size=vocab_size, seed=seed,
        fractions=(0.05, 0.05), recipe=name, origin=corpus.origin, tokenizer_file=None, report=report,
    )  # fmt: skip


def _settings(
    vocab_size: int, seed: int, val_fraction: float, test_fraction: float, tokenizer_file: str | Path | None
) -> dict[str, Any]:
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) and sum "
            "to less than 1; use e.g. 0.05 each"
        )
    tokenizer: str | None = None
    if tokenizer_file is not None:
        path = Path(tokenizer_file)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist; fix the path or omit it to train one")
        tokenizer = _sha256(path.read_bytes())
    return {
        "prepare_version": PREPARE_VERSION,
        "vocab_size": vocab_size if tokenizer is None else None,
        "tokenizer_sha256": tokenizer,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
    }


def _spec_fingerprint(spec: SourceSpec) -> dict[str, Any]:
    files = []
    for path in source_files(spec):
        stat = path.stat()
        files.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return {"format": spec.format, "field": spec.field, "files": files}


def _up_to_date(out: Path, fingerprint: dict[str, Any]) -> bool:
    """True when `out` was prepared from the same inputs and its files are intact."""
    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    # Compare through JSON so tuples/lists and int/float spellings match what was stored.
    if not isinstance(manifest, dict) or manifest.get("inputs") != json.loads(json.dumps(fingerprint)):
        return False
    try:
        expected = [(manifest["tokenizer"], manifest["tokenizer_sha256"])]
        for entry in manifest["sources"].values():
            expected += [(entry["splits"][s]["file"], entry["splits"][s]["sha256"]) for s in SPLITS]
        return all(file_sha256(out / file) == digest for file, digest in expected)
    except (KeyError, TypeError, OSError):
        return False


# --- writing ---------------------------------------------------------------------------------


def _write_prepared(
    documents: dict[str, list[str]],
    out: Path,
    *,
    fingerprint: dict[str, Any],
    vocab_size: int,
    seed: int,
    fractions: tuple[float, float],
    recipe: str,
    origin: dict[str, list[dict[str, str]]],
    tokenizer_file: str | Path | None,
    report: Progress,
) -> Prepared:
    out.mkdir(parents=True, exist_ok=True)
    # Remove the old manifest first: from here on files are replaced one by one, and a crash
    # must not leave a manifest describing a mix of old and new files.
    (out / MANIFEST).unlink(missing_ok=True)
    splits = {name: split_documents(name, docs, seed, *fractions) for name, docs in sorted(documents.items())}
    for name, parts in splits.items():
        sizes = ", ".join(f"{s} {_chars(parts[s]) / 1e6:.2f} M" for s in SPLITS)
        report(f"{name}: {sum(map(len, parts.values()))} documents; chars {sizes}")

    tokenizer = _write_tokenizer(out / TOKENIZER_FILE, splits, vocab_size, tokenizer_file, report)
    actual_vocab = tokenizer.get_vocab_size()
    dtype = np.dtype(np.uint16 if actual_vocab <= 2**16 else np.uint32)
    sources = {}
    for name, parts in splits.items():
        entry = _write_streams(out, name, parts, tokenizer, dtype)
        report(f"{name}: tokens " + ", ".join(f"{s} {entry[s]['tokens']:,}" for s in SPLITS))
        sources[name] = {"splits": entry, "origin": origin.get(name, [])}
    manifest = {
        "format": FORMAT_VERSION,
        "recipe": recipe,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": file_sha256(out / TOKENIZER_FILE),
        "vocab_size": actual_vocab,
        "dtype": dtype.name,
        "eot_id": eot_id(tokenizer),
        "inputs": fingerprint,
        "sources": sources,
    }
    atomic_write_json(out / MANIFEST, manifest)  # last: it vouches for every file above
    return load_prepared(out)


def _write_tokenizer(
    path: Path,
    splits: dict[str, dict[str, list[str]]],
    vocab_size: int,
    tokenizer_file: str | Path | None,
    report: Progress,
) -> Tokenizer:
    if tokenizer_file is not None:
        atomic_write_bytes(path, Path(tokenizer_file).read_bytes())
        return load_tokenizer(path)
    train_docs = [doc for parts in splits.values() for doc in parts["train"]]
    report(f"training a byte-level BPE (vocab {vocab_size}) on {_chars(train_docs) / 1e6:.1f} M chars")
    tokenizer = train_tokenizer(iter(train_docs), vocab_size, length=len(train_docs))
    save_tokenizer(tokenizer, path)
    return tokenizer


def _write_streams(
    out: Path, source: str, parts: dict[str, list[str]], tokenizer: Tokenizer, dtype: np.dtype
) -> dict[str, dict[str, Any]]:
    """Encode and write one source's splits; returns their manifest entries."""
    entry = {}
    for split in SPLITS:
        ids = encode_documents(tokenizer, parts[split], dtype)
        file = f"tokens/{source}/{split}.bin"
        data = ids.tobytes()
        atomic_write_bytes(out / file, data)
        entry[split] = {
            "file": file,
            "tokens": int(ids.size),
            "chars": _chars(parts[split]),
            "sha256": _sha256(data),
        }
    return entry


def split_documents(
    source: str, documents: list[str], seed: int, val_fraction: float, test_fraction: float
) -> dict[str, list[str]]:
    """Deterministic document-level split, sized by characters; every split gets at least one document.

    Documents are shuffled with `seed`; each goes to val or test while it fits within that split's
    share of the characters, otherwise to train. A held-out split left empty takes the shortest
    training document. Train keeps the shuffled order, so the contiguous shards that nodes take
    of it (paper A.2) all look alike.
    """
    # A literal "<|endoftext|>" in the text would be encoded as the separator and fake a boundary.
    docs = [d.replace(EOT, "") for d in documents]
    docs = [d for d in docs if d.strip()]
    if len(docs) < len(SPLITS):
        raise DataError(
            f"source {quoted(source)} has {len(docs)} non-empty document(s); train, val and test each need one: "
            "add text (a text file splits into documents at blank lines; for one document per line use "
            'format = "lines")'
        )
    random.Random(seed).shuffle(docs)
    total = _chars(docs)
    budget = {"val": val_fraction * total, "test": test_fraction * total}
    parts: dict[str, list[str]] = {split: [] for split in SPLITS}
    used = {"val": 0, "test": 0}
    for doc in docs:
        split = next((s for s in ("val", "test") if used[s] + len(doc) <= budget[s]), "train")
        parts[split].append(doc)
        if split != "train":
            used[split] += len(doc)
    for split in ("val", "test"):
        if not parts[split]:
            if len(parts["train"]) < 2:
                raise DataError(f"source {quoted(source)} is too small to split into train/val/test; add more text")
            shortest = min(range(len(parts["train"])), key=lambda i: len(parts["train"][i]))
            parts[split].append(parts["train"].pop(shortest))
    return parts


def _chars(documents: list[str]) -> int:
    return sum(len(d) for d in documents)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
