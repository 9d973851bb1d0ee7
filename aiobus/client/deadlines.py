"""The Unix client's request timeouts: many requests, one loop timer.

Used by unix.py's ``request``; tests/unit/test_client_deadlines.py drives it with a
loop's clock alone.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from typing import Any

from ..errors import RequestTimeout

__all__: list[str] = []


def _request_timeout(queue: str, timeout: float) -> RequestTimeout:
    return RequestTimeout(
        f"no reply from queue {queue!r} within {timeout} s; is a consumer running?")


class _Deadlines:
    """The timeouts of a connection's requests, on one loop timer.

    ``asyncio.timeout()`` around each request armed and cancelled a loop timer per
    request (~7 µs, a twentieth of a request's round trip). Here a heap holds
    (deadline, token) and one timer waits for the earliest; an answered request only
    leaves the dict, and its heap entry is dropped when it comes up (or when stale
    entries outnumber the live ones), so a request costs a heap push and two dict
    operations. At a deadline the request's reply future fails with RequestTimeout.
    """

    __slots__ = ("_at", "_handle", "_heap", "_live", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int]] = []
        self._live: dict[int, tuple[float, asyncio.Future[Any], str, float]] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._at = math.inf

    def add(self, token: int, deadline: float, reply: asyncio.Future[Any], queue: str,
            timeout: float) -> None:
        self._live[token] = (deadline, reply, queue, timeout)
        heapq.heappush(self._heap, (deadline, token))
        if deadline < self._at:
            self._arm(deadline)

    def discard(self, token: int) -> None:
        live = self._live
        live.pop(token, None)
        if len(self._heap) > 2 * len(live) + 1024:
            self._heap = [(entry[0], token) for token, entry in live.items()]
            heapq.heapify(self._heap)

    def _arm(self, at: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._at = at
        self._handle = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._handle, self._at = None, math.inf
        heap, live = self._heap, self._live
        now = self._loop.time()
        while heap and (heap[0][0] <= now or heap[0][1] not in live):
            _, token = heapq.heappop(heap)
            entry = live.get(token)
            if entry is not None and entry[0] <= now:
                del live[token]
                reply, queue, timeout = entry[1:]
                if not reply.done():
                    reply.set_exception(_request_timeout(queue, timeout))
        if heap:
            self._arm(heap[0][0])

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

