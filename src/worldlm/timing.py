"""Wall time per named phase of a round (training, aggregation, routing, ...), for `timing.jsonl` and the bench.

Phases may nest: time is charged to the innermost open phase only, so the seconds of all phases
never add up to more than the wall time they cover (e.g. a node state loaded from disk while
aggregating counts as "offload", not also as "aggregation").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

PhaseFn = Callable[[str], AbstractContextManager[None]]


def no_phase(_name: str) -> AbstractContextManager[None]:
    """The phase hook of untimed callers (tests, the Flower runner)."""
    return contextlib.nullcontext()


class PhaseTimer:
    """Accumulates wall seconds per phase name until `take()` hands them out and starts afresh."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._open: list[str] = []
        self._since = 0.0

    def _charge(self, now: float) -> None:
        if self._open:
            name = self._open[-1]
            self.seconds[name] = self.seconds.get(name, 0.0) + now - self._since
        self._since = now

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._charge(time.perf_counter())
        self._open.append(name)
        try:
            yield
        finally:
            self._charge(time.perf_counter())
            self._open.pop()

    def take(self) -> dict[str, float]:
        """The seconds per phase since the last call (phases still open keep running)."""
        self._charge(time.perf_counter())
        out, self.seconds = self.seconds, {}
        return out


def round_record(rnd: int, total: float, phases: dict[str, float]) -> dict[str, float | int]:
    """One line of timing.jsonl: the round's wall seconds, each phase, and `other` (time in no phase)."""
    return {
        "round": rnd,
        "seconds": round(total, 6),
        **{name: round(s, 6) for name, s in sorted(phases.items())},
        "other": round(total - sum(phases.values()), 6),
    }
