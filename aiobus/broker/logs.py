"""The broker shell's log: one logger for all its modules, and a rate limit for floods.

The asyncio shell is split over ``server.py`` (lifecycle), ``output.py`` (the core's
output and the flush), ``durable.py`` (the journal's wiring), ``shutdown.py`` and
``connection.py`` (one client's protocol); its records keep the one logger name they had
before that split, ``aiobus.broker.server``, which operators filter on and README's
``--log-format json`` example shows.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["log"]

log = logging.getLogger("aiobus.broker.server")


class _RateLimitedLog:
    """At most ``burst`` records per ``period`` seconds, then one line saying how many were
    suppressed (nats-server's RateLimitErrorf): a client reconnecting in a loop with bad
    frames must not flood the operator's log."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._window_start = -period
        self._count = 0
        self._suppressed = 0

    def warning(self, now: float, msg: str, *args: object) -> None:
        self.log(logging.WARNING, now, msg, *args)

    def log(self, level: int, now: float, msg: str, *args: object,
            extra: dict[str, Any] | None = None) -> None:
        if now - self._window_start >= self.period:
            if self._suppressed:
                log.log(level, "%d similar messages suppressed in the last %.0f s",
                        self._suppressed, self.period)
            self._window_start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            log.log(level, msg, *args, extra=extra)
        else:
            self._suppressed += 1
