"""What the broker process measures about itself for STATS ``process``: resident
memory and event-loop lag.

Loop lag is how late a timer ran: a callback scheduled every ``interval`` seconds notes
``loop.time() - due`` when it runs. A loop busy with a burst, or blocked by a slow
callback, runs it late by that much (the number Node's ``monitorEventLoopDelay`` and
aiomonitor report). One timer handle, twice a second: no task, nothing per message.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time

from ..stats import ProcessStats

__all__ = ["LoopLagMonitor", "resident_bytes"]

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident set size now (Linux: /proc/self/statm), else its peak."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class LoopLagMonitor:
    """Measures ``loop_lag`` from ``start()`` until ``stop()``."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.lag = 0.0  # seconds, the last measurement
        self.started = time.time()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm()

    def _arm(self) -> None:
        assert self._loop is not None
        self._due = self._loop.time() + self.interval
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        self.lag = max(0.0, self._loop.time() - self._due)
        self._arm()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def process_stats(self) -> ProcessStats:
        """STATS ``process``: read when asked (one small read of /proc)."""
        return {"pid": os.getpid(), "rss_bytes": resident_bytes(), "loop_lag": self.lag,
                "started": self.started}
