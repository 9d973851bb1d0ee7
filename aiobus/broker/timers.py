"""A clockless timer heap for the sans-IO core.

The core never reads a clock: callers pass ``now`` in (h11's rule), schedule callbacks
at absolute deadlines with :meth:`Timers.call_at`, and the shell asks for
:meth:`Timers.next_deadline` to arm one real timer. Entries cannot be removed; a
callback checks whether what it was armed for still holds (lazy deletion), so callers
keep one entry per *thing that can expire* (a queue's oldest lease, a delayed message),
not one per event.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["Timers"]


class Timers:
    __slots__ = ("_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Callable[[Any, float], None], Any]] = []
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def call_at(self, deadline: float, callback: Callable[[Any, float], None], arg: Any) -> None:
        """Run ``callback(arg, now)`` from the first :meth:`run_due` with now >= deadline."""
        heapq.heappush(self._heap, (deadline, next(self._seq), callback, arg))

    def next_deadline(self) -> float | None:
        """The earliest deadline, or None when nothing is scheduled."""
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> int:
        """Run every callback whose deadline has come; returns how many ran.

        Callbacks may schedule new entries; those that are already due run too.
        """
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            _, _, callback, arg = heapq.heappop(heap)
            callback(arg, now)
            ran += 1
        return ran
