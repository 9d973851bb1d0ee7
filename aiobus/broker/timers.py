"""A clockless timer heap for the sans-IO core.

The core never reads a clock: callers pass ``now`` in (h11's rule), schedule callbacks
at absolute deadlines with :meth:`Timers.call_at`, and the shell asks for
:meth:`Timers.next_deadline` to arm one real timer.

An entry that is no longer wanted is cancelled: :meth:`Timers.cancel` drops its callback
and argument at once, so a cancelled entry keeps nothing alive (an acked message with a
TTL of a day must not stay in memory until then), and leaves an empty shell in the heap.
Shells are skipped when they reach the top, and when they outnumber the live entries
the heap is rebuilt without them, which keeps it within twice the live entries at an
amortised O(1) per cancel (asyncio's event loop does the same with its cancelled
TimerHandles: ``_MIN_CANCELLED_TIMER_HANDLES_FRACTION``). Callers that would rather not
track an entry may still check, when it fires, whether what it was armed for still holds.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any

__all__ = ["TimerEntry", "Timers"]

# [deadline, sequence, callback, arg]: a list, so cancel() can clear it in place. The
# unique sequence number decides ties, so heap comparisons never reach the callback.
TimerEntry = list[Any]

_COMPACT_MIN = 64  # below this many shells the heap is never rebuilt


class Timers:
    __slots__ = ("_cancelled", "_heap", "_seq")

    def __init__(self) -> None:
        self._heap: list[TimerEntry] = []
        self._seq = itertools.count()
        self._cancelled = 0  # shells (cancelled entries) still in the heap

    def call_at(self, deadline: float, callback: Callable[[Any, float], None],
                arg: Any) -> TimerEntry:
        """Run ``callback(arg, now)`` from the first :meth:`run_due` with now >= deadline.

        Returns the entry, for :meth:`cancel`.
        """
        entry = [deadline, next(self._seq), callback, arg]
        heapq.heappush(self._heap, entry)
        return entry

    def cancel(self, entry: TimerEntry) -> None:
        """Forget ``entry`` (and its argument) if it has not run yet; else do nothing."""
        if entry[2] is None:
            return  # ran or cancelled already
        entry[2] = entry[3] = None
        self._cancelled += 1
        if self._cancelled > _COMPACT_MIN and 2 * self._cancelled > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None when nothing is scheduled."""
        heap = self._heap
        while heap and heap[0][2] is None:
            heapq.heappop(heap)
            self._cancelled -= 1
        return heap[0][0] if heap else None

    def run_due(self, now: float) -> int:
        """Run every callback whose deadline has come; returns how many ran.

        Callbacks may schedule new entries; those that are already due run too.
        """
        heap = self._heap
        ran = 0
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            callback, arg = entry[2], entry[3]
            if callback is None:
                self._cancelled -= 1
                continue
            entry[2] = entry[3] = None  # ran: a later cancel() is a no-op
            callback(arg, now)
            ran += 1
        return ran

    def statistics(self) -> tuple[int, int]:
        """``(entries, cancelled)``: the heap's size and how many of those are shells."""
        return len(self._heap), self._cancelled
