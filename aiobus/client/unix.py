"""The Unix-socket :class:`~aiobus.client.backend.Backend`: the asyncio shell around a
:class:`~aiobus.client.connection.ClientConnection`.

The protocol object feeds every read to the connection at once; the connection answers
futures through this shell (its sink) and hands DELIVER/EVENT to the streams. Writes are
flushed once per loop iteration, or as soon as 64 KiB are waiting; while the socket is
above its high-water mark every send and publish waits (backpressure instead of
unbounded buffering). Many concurrent requests are pipelined on the one connection.

Reconnecting. With ``reconnect`` (the default) the connection is a session (see
``connection.py``, "Sessions outlive transports"). When the transport is lost for any
reason but a protocol violation, the shell tells the connection, fails what cannot be
carried over, tells the streams to forget what the old transport gave them, and starts
one task, owned by this backend and awaited by :meth:`aclose`, that dials again with
exponential backoff and jitter (``reconnect_delay`` doubling up to
``max_reconnect_delay``, each sleep drawn uniformly from its upper half, as AWS's "equal
jitter"), forever or until ``max_reconnect_time``. Once a broker WELCOMEs it, the
connection writes the session again and everything that waited goes on. Each change is
logged at INFO and given to every ``state_changes()`` iterator.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import heapq
import logging
import math
import os
import pwd
import random
import secrets
import socket
import stat
import struct
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Final, cast

from ..errors import (
    BrokerUnavailable,
    BusError,
    ConnectionClosed,
    ConnectionLost,
    LeaseError,
    QuotaExceeded,
    RemoteProtocolError,
    RequestTimeout,
    SendTimeout,
)
from ..protocol import Op
from .backend import (
    ConnectionState,
    Outcome,
    StateChange,
    StreamTarget,
    emit_state,
    state_change_stream,
    wait_until_connected,
)
from .connection import FLUSH_AT, HOLD_BYTES, ClientConnection, StreamReceiver

__all__ = ["UnixSocketBackend"]

log = logging.getLogger(__name__)

_CRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_HANDSHAKE_TIMEOUT = 5.0
# A Unix-socket connect fails at once with EAGAIN when the broker's listen backlog is
# full (a burst of clients, a broker busy for a moment): retried with a short jittered
# backoff, 2 ms doubling up to 100 ms, for up to this long before BrokerUnavailable.
_CONNECT_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 5.0
# CLOSE codes after which the client does not dial again: it broke the protocol (dialling
# again would repeat it), or a subscription it made with policy "disconnect" fell behind
# (it asked to be disconnected, so its loop must hear about it).
_FATAL_CLOSES: Final = frozenset({"protocol", "bad-field", "unknown-frame",
                                  "unsupported-version", "frame-too-large", "slow-consumer"})


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


class _Protocol(asyncio.Protocol):
    def __init__(self, backend: UnixSocketBackend) -> None:
        self.backend = backend
        self.receive_data = backend._conn.receive_data

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.backend._transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        # Every object decoded here survives into a stream's buffer or a future: a
        # collection during the decode (CPython runs one every 700 new container objects,
        # and a 256 KiB read holds ~1,500 messages of three each) would rescan them for
        # nothing. So the collector waits until the read is dispatched; no application
        # code runs in between (futures' callbacks are only scheduled). Receive path
        # -20% per message (docs/performance.md).
        enabled = gc.isenabled()
        gc.disable()
        try:
            self.receive_data(data)
        except RemoteProtocolError as exc:
            self.backend._protocol_violation(str(exc))
        finally:
            if enabled:
                gc.enable()
        # The flush goes behind the tasks this read woke (their wake-ups were scheduled
        # while it was dispatched): what they write in answer (an ack, a reply, the next
        # request) leaves in this loop turn. Scheduled by their own writes instead, it
        # would come after them and cost the loop another turn and an epoll_wait each
        # time (W4: one more system call per request on each side).
        backend = self.backend
        if backend._flush_handle is None:
            backend._flush_handle = backend._loop.call_soon(backend._flush)

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend._connection_lost(exc)

    def pause_writing(self) -> None:
        self.backend.writable = False
        self.backend._writable.clear()

    def resume_writing(self) -> None:
        if self.backend.connected:
            self.backend.writable = True
            self.backend._writable.set()


class UnixSocketBackend:
    """A connection to an aiobus broker over its Unix socket. Open with :meth:`open`."""

    def __init__(self, path: str, name: str | None, *, reconnect: bool = True,
                 reconnect_delay: float = 0.05, max_reconnect_delay: float = 2.0,
                 max_reconnect_time: float | None = None,
                 publish_buffer: int = HOLD_BYTES) -> None:
        self.path = path
        self.name = name
        self.server_info: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
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
        self.writable = True  # False while congested or disconnected
        self.connected = False  # a transport is open and WELCOMEd (and the session restored)
        self._flush_handle: asyncio.Handle | None = None
        self._deadlines = _Deadlines(self._loop)
        self._writable = asyncio.Event()
        self._writable.set()
        self._welcome: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._lost = asyncio.Event()  # this transport's connection_lost has run
        self._closing = False  # aclose() is waiting for the broker's last answers
        self._explicit = True
        self._reconnect = reconnect
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._max_reconnect_time = max_reconnect_time
        self._reconnector: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()  # set and replaced on every change of state
        self._listeners: list[collections.deque[StateChange]] = []
        self.reconnects = 0

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

    # -- connection lifecycle -------------------------------------------------------------

    async def open(self, *, explicit: bool = True) -> None:
        """Connect and say HELLO. A broker found at a default path (``explicit`` False)
        must run as this user or root: another user's broker there is refused."""
        self._explicit = explicit
        await self._dial()
        self._set_connected(True)

    async def _dial(self) -> None:
        """Open a transport, check its owner, HELLO, wait for WELCOME."""
        self._welcome = self._loop.create_future()
        self._lost = asyncio.Event()
        try:
            sock = await self._connect_socket()
            try:
                await self._loop.create_unix_connection(lambda: _Protocol(self), sock=sock)
            except BaseException:
                sock.close()
                raise
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise BrokerUnavailable(
                f"no aiobus broker is listening on {self.path} ({exc.strerror}); start one with"
                " `aiobus-broker` (or `make run`), or pass the right path"
            ) from exc
        except PermissionError as exc:
            raise BrokerUnavailable(
                f"permission denied connecting to {self.path} ({_describe_file(self.path)});"
                " the broker's --socket-mode/--socket-group decide who may connect"
            ) from exc
        except OSError as exc:  # ENOTSOCK, ...
            raise BrokerUnavailable(f"cannot connect to {self.path}: {exc}") from exc
        if not self._explicit:
            try:
                self._check_broker_owner()
            except BrokerUnavailable:
                self._welcome.cancel()  # never awaited now: no "exception never retrieved"
                raise
        self._conn.hello(self.name)
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                info = await self._welcome
        except TimeoutError:
            self._abort()
            raise BrokerUnavailable(f"the broker at {self.path} did not answer HELLO") from None
        self.server_info = info

    async def _connect_socket(self) -> socket.socket:
        """A socket connected to the broker. connect() on a Unix socket never is "in
        progress": it succeeds or fails at once, with EAGAIN when the listen backlog is
        full, which is retried until _CONNECT_TIMEOUT (asyncio's sock_connect would take
        EAGAIN for "in progress" and hand back a socket that is not connected).

        Raises:
            BrokerUnavailable: the backlog stayed full.
            OSError: any other failure of connect().
        """
        deadline = self._loop.time() + _CONNECT_TIMEOUT
        delay = 0.002
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            try:
                sock.connect(self.path)
                return sock
            except BlockingIOError:
                sock.close()
                if self._loop.time() >= deadline:
                    raise BrokerUnavailable(
                        f"cannot connect to {self.path}: its listen backlog stayed full for"
                        f" {_CONNECT_TIMEOUT:g} s (EAGAIN); the broker is overloaded or"
                        " stopped accepting") from None
            except BaseException:
                sock.close()
                raise
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(2 * delay, 0.1)

    def _check_broker_owner(self) -> None:
        assert self._transport is not None
        sock = self._transport.get_extra_info("socket")
        _, uid, _ = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                 _CRED.size))
        if uid not in (os.getuid(), 0):
            self._abort()
            raise BrokerUnavailable(
                f"the broker at the default path {self.path} runs as uid {uid}, not as you"
                f" (uid {os.getuid()}) or root: refusing to send it anything; if you trust"
                " it, pass the path explicitly (connect(path) or $AIOBUS_SOCKET)")

    async def aclose(self) -> None:
        conn = self._conn
        if self._reconnector is not None:
            self._reconnector.cancel()
            try:
                await self._reconnector
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise
            self._reconnector = None
        if conn.error is None:
            for consumer in conn.consumers():
                cast(StreamTarget, consumer)._stop()
            closed = ConnectionClosed("the bus was closed")
            # The broker answers in order: the OK of a PING written after everything
            # else means it has answered all of that (parked sends aside).
            drained: asyncio.Future[Any] | None = None
            if conn.pending and self.connected and self._transport is not None:
                drained = self._loop.create_future()
                conn.call([Op.PING, 0], drained)
            conn.close(closed)  # nothing new from here on
            self._closing = True
            self._flush()
            if drained is not None:
                try:
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        await drained
                except (TimeoutError, BusError):
                    pass  # answered or not, what is left fails below
            self._closing = False
            self._fail_all(closed)
        self._flush()
        if self._transport is not None:
            self._transport.close()
            try:
                async with asyncio.timeout(_CLOSE_TIMEOUT):
                    await self._lost.wait()
            except TimeoutError:
                self._transport.abort()
        self._deadlines.close()  # the requests all failed above: no timer left behind

    @property
    def closed(self) -> bool:
        return self._conn.error is not None

    @property
    def async_errors(self) -> int:
        return self._conn.async_errors

    @property
    def dropped(self) -> int:
        return self._conn.dropped

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._lost.set()
        conn = self._conn
        if not self._welcome.done():
            if conn.close_reason is not None and conn.close_reason[0] == "quota-exceeded":
                # Refused for its uid's connection quota: say so, typed.
                self._welcome.set_exception(QuotaExceeded(
                    f"the broker refused the connection: {conn.close_reason[1]}",
                    code="quota-exceeded"))
            else:
                self._welcome.set_exception(BrokerUnavailable(
                    f"the broker at {self.path} closed the connection during the handshake"))
        if conn.error is not None and not self._closing:
            return  # failed or closed before: nothing left to tell anyone
        if conn.close_reason is not None:
            code, message = conn.close_reason
            error = ConnectionLost(f"the broker closed the connection: {message}", code=code)
        else:
            error = ConnectionLost(f"connection to the broker at {self.path} was lost"
                                   + (f": {exc}" if exc else ""))
        if self._closing or not self._reconnect or (
                conn.close_reason is not None and conn.close_reason[0] in _FATAL_CLOSES):
            self._fail_all(error)
            return
        was_connected = self.connected
        for waiter in conn.connection_lost():
            if not waiter.done():
                waiter.set_exception(error)
        if not was_connected:
            return  # a dial of the reconnect loop failed: the loop goes on
        for receiver in conn.receivers():
            cast(StreamTarget, receiver)._reset()
        self._set_connected(False)
        log.info("connection to the broker at %s lost (%s); reconnecting", self.path, error)
        self._emit(StateChange(ConnectionState.DISCONNECTED, error))
        self._reconnector = self._loop.create_task(self._redial(error))

    async def _redial(self, cause: BusError) -> None:
        loop = self._loop
        started = loop.time()
        delay = self._reconnect_delay
        last: BusError = cause
        attempts = 0
        while True:
            attempts += 1
            if self._conn.error is not None:  # failed for good meanwhile (fatal CLOSE)
                self._reconnector = None
                return
            try:
                await self._dial()
            except (BrokerUnavailable, QuotaExceeded) as exc:  # the quota may free up
                last = exc
                self._abort()
            else:
                if self._transport is not None and self._conn.welcomed:
                    break
            elapsed = loop.time() - started
            if self._max_reconnect_time is not None and elapsed >= self._max_reconnect_time:
                error = ConnectionLost(
                    f"gave up reconnecting to {self.path} after {elapsed:.1f} s and"
                    f" {attempts} attempts; last: {last}")
                log.warning("%s", error)
                self._reconnector = None
                self._fail_all(error)
                return
            await asyncio.sleep(random.uniform(delay / 2, delay))
            delay = min(delay * 2, self._max_reconnect_delay)
        self._conn.restore()
        self._flush()
        self.reconnects += 1
        self._reconnector = None
        self._set_connected(True)
        downtime = loop.time() - started
        log.info("reconnected to the broker at %s after %.2f s (%d attempts)",
                 self.path, downtime, attempts)
        self._emit(StateChange(ConnectionState.RECONNECTED, None, downtime, attempts))

    def _set_connected(self, connected: bool) -> None:
        self.connected = self.writable = connected
        if connected:
            self._writable.set()
        else:
            self._writable.clear()
        self._changed.set()
        self._changed = asyncio.Event()

    def _fail_all(self, error: BusError) -> None:
        waiters, receivers = self._conn.fail(error)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(error)
        for receiver in receivers:
            cast(StreamTarget, receiver)._fail(error)
        self.connected = False
        self.writable = True  # whoever waits to write goes on, and meets the error
        self._writable.set()
        self._changed.set()
        self._emit(StateChange(ConnectionState.CLOSED, error))

    def _protocol_violation(self, message: str) -> None:
        log.error("closing the connection to %s: %s", self.path, message)
        if self._conn.error is None:
            self._fail_all(RemoteProtocolError(message))
        self._abort()

    # -- state ----------------------------------------------------------------------------

    def _emit(self, change: StateChange) -> None:
        self._changed = emit_state(self._listeners, self._changed, change)

    async def wait_connected(self) -> None:
        await wait_until_connected(lambda: self.connected, lambda: self._changed,
                                   lambda: self._conn.error)

    def state_changes(self) -> AsyncIterator[StateChange]:
        return state_change_stream(self._listeners, lambda: self._changed,
                                   lambda: self._conn.error)

    # -- writing --------------------------------------------------------------------------

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return  # the connection keeps what it has: a session writes it again
        out = self._conn.data_to_send()
        if out:
            transport.writelines(out)

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


def _describe_file(path: str) -> str:
    """``owner root (uid 0), mode srw-------`` for an error message."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"cannot stat it: {exc.strerror}"
    try:
        owner = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        owner = "?"
    return f"owner {owner} (uid {st.st_uid}), mode {stat.filemode(st.st_mode)}"
