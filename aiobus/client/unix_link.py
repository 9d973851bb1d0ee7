"""The Unix client's link to the broker: a transport dialled, lost, and dialled again.

The base of :class:`~aiobus.client.unix.UnixSocketBackend` (one class in the end, so the
per-message paths gain no call layer): the ``asyncio.Protocol`` that feeds every read to
the :class:`~aiobus.client.connection.ClientConnection`, the write of what it has to
send, and the connection's lifecycle: dialling (the socket's owner checked at a default
path), the handshake, closing, and reconnecting.

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
import logging
import os
import pwd
import random
import socket
import stat
import struct
from collections.abc import AsyncIterator
from typing import Any, Final, cast

from ..errors import (
    BrokerUnavailable,
    BusError,
    ConnectionClosed,
    ConnectionLost,
    QuotaExceeded,
    RemoteProtocolError,
)
from ..protocol import Op
from .backend import (
    ConnectionState,
    StateChange,
    StreamTarget,
    emit_state,
    state_change_stream,
    wait_until_connected,
)
from .connection import ClientConnection
from .deadlines import _Deadlines

__all__: list[str] = []

# (the name unix.py logged under before this module was split from it: README names it)
log = logging.getLogger("aiobus.client.unix")

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


class _Protocol(asyncio.Protocol):
    def __init__(self, backend: _UnixLink) -> None:
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



class _UnixLink:
    """A transport to the broker and its lifecycle (see the module's docstring)."""

    # Set by UnixSocketBackend.__init__ (unix.py), the connection with itself as its sink:
    _conn: ClientConnection
    _deadlines: _Deadlines

    def __init__(self, path: str, name: str | None, reconnect: bool, reconnect_delay: float,
                 max_reconnect_delay: float, max_reconnect_time: float | None) -> None:
        self.path = path
        self.name = name
        self.server_info: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.writable = True  # False while congested or disconnected
        self.connected = False  # a transport is open and WELCOMEd (and the session restored)
        self._flush_handle: asyncio.Handle | None = None
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
