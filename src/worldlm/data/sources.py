"""Users' own text: plain text, one document per line, JSONL, Parquet or a Hugging Face dataset.

What a *document* is (documents are the unit of the train/val/test split and are separated by
`<|endoftext|>` in the token streams):
- a plain-text **file**: blocks separated by one or more blank lines (one paragraph or article
  each), so a single large file can still be split into train/val/test;
- a **folder** of plain-text files: each file is one document;
- `lines`: every non-blank line of the file (or of each file in a folder) is one document, the
  common layout of line-per-document corpora;
- JSONL: each line is a JSON object; its `field` (a string) is one document;
- Parquet: each non-null value of the `field` column is one document;
- `hf`: a dataset saved with Hugging Face `datasets` (a `save_to_disk` folder, every split in name
  order), or local `.arrow` / `.parquet` files of one; each value of its `field` is one document,
  read offline.

A folder is read recursively in sorted path order (so the order never depends on the file
system), skipping hidden entries and symbolic links (a link may point outside the corpus or make
the same file count twice). In a folder, `jsonl` reads `*.jsonl` files and `parquet` `*.parquet`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

from worldlm.errors import DataError, quoted

Format = Literal["text", "lines", "jsonl", "parquet", "hf"]
FORMATS: tuple[str, ...] = get_args(Format)
_FOLDER_SUFFIX = {"jsonl": ".jsonl", "parquet": ".parquet"}
_HF_SUFFIXES = (".arrow", ".parquet")
_BLANK_LINES = re.compile(r"\n[^\S\n]*\n\s*")


@dataclass(frozen=True)
class SourceSpec:
    """Where one data source's text lives and how to read it."""

    path: str
    format: Format = "text"
    field: str = "text"  # the JSONL key / Parquet column holding the text

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise DataError(
                f"source {self.path}: unknown format {quoted(self.format)}; use one of {', '.join(FORMATS)}"
            )


def source_files(spec: SourceSpec) -> list[Path]:
    """The files a source reads, in reading order; DataError if there are none."""
    root = Path(spec.path).expanduser()
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise DataError(f"source path {root} does not exist; fix the path or create the file")
    files = _walk_sorted(root, _FOLDER_SUFFIX.get(spec.format, ""))
    if not files:
        kind = f"*{_FOLDER_SUFFIX[spec.format]} " if spec.format in _FOLDER_SUFFIX else ""
        raise DataError(f"source folder {root} holds no {kind}files; add {spec.format} files or fix the path")
    return files


def _walk_sorted(root: Path, suffix: str) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if not name.startswith(".") and name.endswith(suffix) and not path.is_symlink():
                files.append(path)
    return files


def read_documents(spec: SourceSpec) -> Iterator[str]:
    """Yield the source's non-blank documents in a stable order (see the module docstring)."""
    if spec.format == "hf":
        yield from _read_hf(Path(spec.path).expanduser(), spec.field)
        return
    files = source_files(spec)
    is_folder = Path(spec.path).expanduser().is_dir()
    for path in files:
        if spec.format == "lines":
            yield from (line.strip() for line in _read_text(path).splitlines() if line.strip())
        elif spec.format == "jsonl":
            yield from _read_jsonl(path, spec.field)
        elif spec.format == "parquet":
            yield from _read_parquet(path, spec.field)
        elif is_folder:
            text = _read_text(path)
            if text.strip():
                yield text.strip()
        else:
            yield from (block.strip() for block in _BLANK_LINES.split(_read_text(path)) if block.strip())


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text (bad byte at offset {exc.start}); convert it to UTF-8 or remove it"
        ) from exc
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror}); check the path and its permissions") from exc


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg}); fix or remove that line") from exc
        if not isinstance(record, dict) or field not in record:
            keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{path}:{lineno}: no field {quoted(field)} (found: {keys}); set the source's field to the text key"
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {quoted(field)} is {type(value).__name__}, expected a string")
        if value.strip():
            yield value.strip()


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"cannot read Parquet file {path} ({exc}); check that it is a Parquet file") from exc
    schema = parquet.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"{path}: no column {quoted(field)} (found: {', '.join(schema.names)}); "
            "set the source's field to the text column"
        )
    column_type = schema.field(field).type
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
        raise DataError(f"{path}: column {quoted(field)} holds {column_type}, expected strings")
    for batch in parquet.iter_batches(columns=[field]):
        for value in batch.column(0).to_pylist():
            if value is not None and value.strip():
                yield value.strip()


def _read_hf(root: Path, field: str) -> Iterator[str]:
    """A Hugging Face dataset on disk: a `save_to_disk` folder, or `.arrow` / `.parquet` files (offline)."""
    try:
        import datasets
    except ImportError as exc:
        raise DataError("format 'hf' needs Hugging Face datasets: pip install 'worldlm[hf]'") from exc
    if not root.exists():
        raise DataError(f"source path {root} does not exist; fix the path or save the dataset there")
    if root.is_dir() and ((root / "state.json").is_file() or (root / "dataset_dict.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(root))
        except Exception as exc:  # datasets raises many kinds for a damaged folder
            raise DataError(f"cannot load the Hugging Face dataset in {root} ({exc}); save it again") from exc
        parts = [loaded[k] for k in sorted(loaded)] if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for part in parts:
            yield from _hf_column(part, field, root)
        return
    files = [root] if root.is_file() else [p for p in _walk_sorted(root, "") if p.suffix in _HF_SUFFIXES]
    if not files or any(p.suffix not in _HF_SUFFIXES for p in files):
        raise DataError(
            f"{root} is neither a `save_to_disk` dataset folder nor .arrow/.parquet files; save it with "
            "Dataset.save_to_disk or point at its .arrow/.parquet files"
        )
    for path in files:
        if path.suffix == ".parquet":
            yield from _read_parquet(path, field)
            continue
        try:
            part = datasets.Dataset.from_file(str(path))
        except Exception as exc:
            raise DataError(f"cannot read {path} as a Hugging Face Arrow file ({exc})") from exc
        yield from _hf_column(part, field, path)


def _hf_column(part: object, field: str, where: Path) -> Iterator[str]:
    names = list(getattr(part, "column_names", []))
    if field not in names:
        raise DataError(
            f"{where}: no column {quoted(field)} (found: {', '.join(names)}); set the source's field to the text column"
        )
    for value in part[field]:  # type: ignore[index]
        if value is not None and not isinstance(value, str):
            raise DataError(f"{where}: column {quoted(field)} holds {type(value).__name__}, expected strings")
        if value is not None and value.strip():
            yield value.strip()
