"""The broker's graceful shutdown: stop accepting, let leases be answered, close, keep.

``Broker.aclose`` (here, in ``_Shutdown``, a base of :class:`~.server.Broker` between it
and durable.py's ``_Durable``): the server stops accepting and the core stops
delivering; consumers get up to ``drain_timeout`` seconds to answer the leases they hold;
then every client gets CLOSE ``shutdown`` and its connection is closed (aborted if it
does not drain in ``_SHUTDOWN_GRACE``); what survives is logged, queue by queue, the
socket file removed if it is still this broker's, and the journal written, synced and
closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

from .durable import _Durable
from .logs import log
from .monitor import LoopLagMonitor

__all__: list[str] = []

_SHUTDOWN_GRACE = 5.0  # seconds to let closing connections drain before aborting them


class _Shutdown(_Durable):
    """How a :class:`~.server.Broker` stops (see the module docstring)."""

    # Set by Broker.__init__ and start (server.py), which say what each is:
    path: str | None
    drain_timeout: float
    monitor: LoopLagMonitor
    _server: asyncio.AbstractServer | None
    _socket_inode: tuple[int, int] | None
    _closed: asyncio.Event
    _all_gone: asyncio.Event
    _drained: asyncio.Event | None
    _timer: asyncio.TimerHandle | None

    async def aclose(self) -> None:
        """Shut down gracefully.

        Stops accepting and delivering; gives the leases consumers hold up to
        ``drain_timeout`` seconds to be answered (an ack in that time counts); then sends
        every client a CLOSE frame with code ``shutdown`` (leases still held fail, one
        attempt each), closes the connections (aborting those that do not drain within
        5 s), logs per queue what it keeps (durable queues, in the journal) and what it
        discards (in-memory queues), writes and syncs the journal, and removes the
        socket file.
        """
        if self._server is None or self._closed.is_set():
            return
        self._server.close()
        self.core.drain()
        await self._wait_leases_answered()
        for conn in list(self._conns.values()):
            self.close(conn.id, "shutdown", "the broker is shutting down")
        if self._conns:
            self._all_gone.clear()
            try:
                await asyncio.wait_for(self._all_gone.wait(), _SHUTDOWN_GRACE)
            except TimeoutError:
                for conn in list(self._conns.values()):
                    if conn.transport is not None:
                        conn.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), _SHUTDOWN_GRACE)
        if self._timer is not None:
            self._timer.cancel()
        self.monitor.stop()
        self._log_what_remains()
        self._remove_socket_file()
        self._close_journal()
        self._closed.set()
        log.info("aiobus broker stopped")

    async def _wait_leases_answered(self) -> None:
        """Until no lease is held, or ``drain_timeout`` has passed."""
        held = self.core.held_leases()
        if not held or self.drain_timeout <= 0:
            return
        log.info("waiting up to %.1f s for consumers to answer %d leases",
                 self.drain_timeout, held)
        self._drained = asyncio.Event()  # set by _after_events once none is held
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.drain_timeout)
        if self.core.held_leases():
            log.info("%d leases still held after %.1f s: they fail (one attempt each)",
                     self.core.held_leases(), self.drain_timeout)

    def _log_what_remains(self) -> None:
        """The honest part of a shutdown: what survives it and what does not."""
        kept: dict[str, int] = {}
        lost: dict[str, int] = {}
        for name, queue in sorted(self.core.queues.queues.items()):
            count = queue.ready_len + queue.delayed
            if count:
                (kept if queue.journal is not None else lost)[name] = count
        for what, queues in (("keeping", kept), ("discarding", lost)):
            if queues:
                where = "durable queues" if what == "keeping" else "in-memory queues"
                log.info("%s %d messages in %d %s: %s", what, sum(queues.values()),
                         len(queues), where, ", ".join(f"{n} {c}" for n, c in queues.items()))

    def _remove_socket_file(self) -> None:
        if self.path is None or self._socket_inode is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._socket_inode:  # still ours, not a successor's
            os.unlink(self.path)
