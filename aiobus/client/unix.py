"""The Unix-socket :class:`~aiobus.client.backend.Backend`: the asyncio shell around a
:class:`~aiobus.client.connection.ClientConnection`.

The protocol object feeds every read to the connection at once; the connection answers
futures through this shell (its sink) and hands DELIVER/EVENT to the streams. Writes are
flushed once per loop iteration, or as soon as 64 KiB are waiting; while the socket is
above its high-water mark every send and publish waits (backpressure instead of
unbounded buffering). Many concurrent requests are pipelined on the one connection.

Reconnecting, and the transport's lifecycle: unix_link.py, this class's base.
Request timeouts: deadlines.py.
"""

from __future__ import annotations

import asyncio
import secrets
import weakref
from collections.abc import Callable
from typing import Any, cast

from ..errors import BusError, ConnectionLost, LeaseError, SendTimeout
from ..protocol import Op
from .backend import Outcome, StreamTarget
from .connection import FLUSH_AT, HOLD_BYTES, ClientConnection, StreamReceiver
from .deadlines import _Deadlines, _request_timeout
from .unix_link import _UnixLink, log

__all__ = ["UnixSocketBackend"]


class UnixSocketBackend(_UnixLink):
    """A connection to an aiobus broker over its Unix socket. Open with :meth:`open`."""

    def __init__(self, path: str, name: str | None, *, reconnect: bool = True,
                 reconnect_delay: float = 0.05, max_reconnect_delay: float = 2.0,
                 max_reconnect_time: float | None = None,
                 publish_buffer: int = HOLD_BYTES) -> None:
        super().__init__(path, name, reconnect, reconnect_delay, max_reconnect_delay,
                         max_reconnect_time)
        self._conn = conn = ClientConnection(
            self, new_waiter=self._loop.create_future, hold_bytes=publish_buffer,
            client_id=secrets.token_hex(8) if reconnect else None)
        # The per-message writes are the connection's own methods: no call in between.
        self.send_nowait = conn.send
        self.send_unconfirmed = conn.send_unconfirmed
        self.publish = conn.publish
        self.ack_nowait = conn.ack_nowait
        self.settle_nowait = conn.settle_nowait
        self.credit = conn.credit
        self.max_body = conn.max_frame
        self._deadlines = _Deadlines(self._loop)

    # -- the connection's sink ------------------------------------------------------------

    def completed(self, waiter: asyncio.Future[Any], result: Any) -> None:
        if not waiter.done():
            waiter.set_result(result)

    def completed_all(self, waiters: list[asyncio.Future[Any] | None]) -> None:
        for waiter in waiters:
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def failed(self, waiter: asyncio.Future[Any] | None, error: BusError) -> None:
        if waiter is None:
            log.warning("broker reported an error for a fire-and-forget frame: %s: %s",
                        error.code, error)
        elif not waiter.done():
            waiter.set_exception(error)

    def stream_failed(self, receiver: StreamReceiver, error: BusError) -> None:
        log.warning("the broker at %s refused to start a stream again after reconnecting:"
                    " %s: %s", self.path, error.code, error)
        cast(StreamTarget, receiver)._fail(error)

    def answer_failed(self, receiver: StreamReceiver, error: BusError) -> None:
        cast(StreamTarget, receiver)._answer_failed(error)

    def welcomed(self, info: dict[str, Any]) -> None:
        self.max_body = self._conn.max_frame  # an attribute: Bus reads it per message
        if not self._welcome.done():
            self._welcome.set_result(info)

    def flush_wanted(self) -> None:
        if self._conn.out_bytes >= FLUSH_AT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    @property
    def closed(self) -> bool:
        return self._conn.error is not None

    @property
    def async_errors(self) -> int:
        return self._conn.async_errors

    @property
    def dropped(self) -> int:
        return self._conn.dropped

    async def wait_writable(self) -> None:
        await self._writable.wait()

    async def _call(self, frame: list[Any], *, resend: bool = False) -> Any:
        """Send a request frame (rid at index 1) and wait for its OK result."""
        if not self._writable.is_set():
            await self._writable.wait()
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._conn.call(frame, fut, resend=resend)
        return await fut

    # -- producing ------------------------------------------------------------------------

    async def send(self, queue: str, data: bytes, kind: int, headers: dict[str, str] | None,
                   ttl: float | None, delay: float | None,
                   timeout: float | None = None) -> None:
        if timeout is None:
            if not self._writable.is_set():
                await self._writable.wait()
            await self._conn.send(queue, data, kind, headers, ttl, delay)
            return
        conn = self._conn
        rid = 0
        try:
            async with asyncio.timeout(timeout):
                if not self._writable.is_set():
                    await self._writable.wait()
                fut = conn.send(queue, data, kind, headers, ttl, delay)
                rid = next(reversed(conn.pending))  # the one just added
                await fut
        except TimeoutError:
            if rid:
                conn.abandon(rid)
            raise SendTimeout(f"a send to queue {queue!r} was not confirmed within"
                              f" {timeout} s" + ("" if self.connected else
                                                 "; the broker is not connected")) from None

    async def request(self, queue: str, data: bytes, kind: int,
                      headers: dict[str, str] | None, timeout: float) -> Any:
        loop = self._loop
        deadline = loop.time() + timeout
        if not self._writable.is_set():  # reconnecting, or the output is full
            try:
                async with asyncio.timeout_at(deadline):
                    await self._writable.wait()
            except TimeoutError:
                raise _request_timeout(queue, timeout) from None
        reply: asyncio.Future[Any] = loop.create_future()
        token = self._conn.request(queue, data, kind, headers, timeout, reply)
        self._deadlines.add(token, deadline, reply, queue, timeout)
        try:
            return await reply
        finally:
            self._conn.forget_reply(token)
            self._deadlines.discard(token)

    # -- receiving ------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int, target: StreamTarget,
                      create: bool = True) -> None:
        fut: asyncio.Future[Any] = self._loop.create_future()
        conn = self._conn
        if not self._writable.is_set() and self.connected:
            await self._writable.wait()
        target._handle = sid = conn.consume(queue, prefetch, weakref.ref(target), fut,
                                            create=create)
        await self._started(sid, fut)

    async def subscribe(self, pattern: str, max_pending: int, policy: str,
                        target: StreamTarget) -> None:
        fut: asyncio.Future[Any] = self._loop.create_future()
        conn = self._conn
        if not self._writable.is_set() and self.connected:
            await self._writable.wait()
        target._handle = sid = conn.subscribe(pattern, max_pending, policy,
                                              weakref.ref(target), fut)
        await self._started(sid, fut)

    async def _started(self, sid: int, fut: asyncio.Future[Any]) -> None:
        try:
            await fut
        except BaseException:
            # Refused (or never answered): there is nothing to CANCEL at the broker.
            self._conn.unregister(sid)
            raise

    def cancel(self, handle: Any) -> None:
        if self._transport is None:
            self._conn.unregister(handle)
        else:
            self._conn.cancel(handle)

    # -- leases ---------------------------------------------------------------------------

    async def settle(self, lease: Any, outcome: Outcome, delay: float | None = None,
                     reason: str | None = None) -> None:
        if not self._writable.is_set():
            self._conn.check_lease(lease)  # a lease of a lost transport: at once
            await self._writable.wait()
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._conn.settle(lease, outcome, delay, reason, fut)
        try:
            await fut
        except ConnectionLost as exc:
            raise self._lease_lost(exc) from exc

    def _lease_lost(self, exc: ConnectionLost) -> BusError:
        if self._conn.client_id is None:
            return exc
        return LeaseError(f"the connection was lost before the broker answered ({exc}); the"
                          " broker redelivers the message unless it got the answer first",
                          code="lease-lost")

    async def extend(self, lease: Any, seconds: float) -> None:
        await self._lease_call(lease, lambda fut: self._conn.extend(lease, seconds, fut))

    async def reply(self, lease: Any, data: bytes, kind: int,
                    headers: dict[str, str] | None) -> None:
        await self._lease_call(lease,
                               lambda fut: self._conn.reply(lease, data, kind, headers, fut))

    def reply_nowait(self, lease: Any, data: bytes, kind: int,
                     headers: dict[str, str] | None) -> None:
        self._conn.reply_nowait(lease, data, kind, headers)

    async def _lease_call(self, lease: Any, write: Callable[[asyncio.Future[Any]], object]
                          ) -> None:
        """What settle() does, for the lease operations off the per-message path."""
        if not self._writable.is_set():
            self._conn.check_lease(lease)
            await self._writable.wait()
        fut: asyncio.Future[Any] = self._loop.create_future()
        write(fut)
        try:
            await fut
        except ConnectionLost as exc:
            raise self._lease_lost(exc) from exc

    # -- administration -------------------------------------------------------------------

    async def declare(self, queue: str, options: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call([Op.DECLARE, 0, queue, options],
                                                  resend=True)
        self._conn.declared(queue, options)
        return result

    async def purge(self, queue: str) -> int:
        result: int = await self._call([Op.PURGE, 0, queue])
        return result

    async def delete(self, queue: str, if_empty: bool) -> int:
        result: int = await self._call([Op.DELETE, 0, queue, bool(if_empty)])
        self._conn.deleted(queue)
        return result

    async def stats(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        # Options only when asked for: a broker from before them refuses a 3-field STATS.
        frame: list[Any] = [Op.STATS, 0] if not options else [Op.STATS, 0, options]
        result: dict[str, Any] = await self._call(frame, resend=True)
        return result

    async def peek(self, queue: str, options: dict[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self._call([Op.PEEK, 0, queue, options], resend=True)
        return result

    async def ping(self) -> None:
        await self._call([Op.PING, 0], resend=True)

