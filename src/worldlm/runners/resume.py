"""Stopping and resuming a run: a graceful stop at a round boundary, and the files a resumed run trims."""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from worldlm.errors import WorldLMError
from worldlm.files import atomic_write_text


class Interrupted(WorldLMError):
    """SIGINT/SIGTERM: the run stopped at a round boundary after writing a checkpoint."""

    exit_code = 130


class StopFlag:
    """Set by the first SIGINT/SIGTERM: the runner checkpoints at the end of the round and stops."""

    requested = False


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopFlag]:
    """First SIGINT/SIGTERM: finish the round and checkpoint. A second one stops at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        print("worldlm: stopping after this round (checkpoint follows); press Ctrl-C again to abort", file=sys.stderr)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def truncate_lines(path: Path, lines: int) -> None:
    """Drop metrics written after the checkpoint (a partial round that will be redone)."""
    if not path.is_file():
        if lines:
            raise WorldLMError(f"{path} is missing but the checkpoint expects {lines} records; start a new run")
        return
    kept = path.read_text(encoding="utf-8").splitlines(keepends=True)[:lines]
    if len(kept) < lines:
        raise WorldLMError(f"{path} has fewer records than the checkpoint expects; start a new run")
    atomic_write_text(path, "".join(kept))


def drop_rounds_from(path: Path, first_round: int) -> None:
    """Drop timing records of rounds that a resumed run does again (and a line torn by a crash)."""

    def kept(line: str) -> bool:
        try:
            return int(json.loads(line)["round"]) < first_round
        except (ValueError, KeyError, TypeError):
            return False

    if path.is_file():
        atomic_write_text(
            path, "".join(x for x in path.read_text(encoding="utf-8").splitlines(keepends=True) if kept(x))
        )
