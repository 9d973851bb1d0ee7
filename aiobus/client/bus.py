"""The asyncio client: one connection to the broker, shared by every caller.

The protocol object decodes frames in ``data_received`` and dispatches them at once:
OK/ERROR (and OK_RANGE, for a run of rids) resolve the future of the request with that
``rid`` (so many concurrent sends are pipelined, not serialised), DELIVER/EVENT go to the
buffer of their stream,
RESPONSE to the pending request. Writes are packed into a list and flushed once per loop
iteration, or as soon as 64 KiB are waiting; while the socket is above its high-water
mark every send and publish waits (backpressure instead of unbounded buffering).
"""

from __future__ import annotations

import asyncio
import enum
import gc
import itertools
import logging
import os
import pwd
import socket
import stat
import struct
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Final, cast

import msgpack

from .._paths import is_explicit, resolve_socket_path
from ..errors import (
    BodyDecodeError,
    BrokerUnavailable,
    BusError,
    ConnectionClosed,
    ConnectionLost,
    FrameTooLarge,
    RemoteProtocolError,
    RequestTimeout,
    from_code,
)
from ..names import check_name, check_pattern, is_reserved
from ..protocol import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    FrameDecoder,
    Op,
    check_headers,
    decode_body,
    encode_body,
)
from .streams import Consumer, Subscription, _Stream

__all__ = ["Bus", "connect"]

log = logging.getLogger(__name__)

_FLUSH_AT = 64 * 1024
_CRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_SEND, _PUBLISH = int(Op.SEND), int(Op.PUBLISH)
_DELIVER, _EVENT, _EVENTS = int(Op.DELIVER), int(Op.EVENT), int(Op.EVENTS)
_ACK_BATCH = 1024  # tags per ACK_MANY frame at most
_HANDSHAKE_TIMEOUT = 5.0
_CLOSE_TIMEOUT = 5.0


class _Default(enum.Enum):
    """The type of :data:`DEFAULT`."""

    DEFAULT = "DEFAULT"


# "Not given: the broker's default applies." Queue defaults live in one table, the
# broker's (aiobus/broker/settings.py); the client never restates them.
DEFAULT: Final = _Default.DEFAULT


class _Protocol(asyncio.Protocol):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.decoder = FrameDecoder(2**31 - 1, max_array=2**20, max_map=2**20)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.bus._transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass

    def data_received(self, data: bytes) -> None:
        bus = self.bus
        # Every object decoded here survives into a stream's buffer or a future: a
        # collection during the decode (CPython runs one every 700 new container objects,
        # and a 256 KiB read holds ~1,500 messages of three each) would rescan them for
        # nothing. So the collector waits until the read is dispatched; no application
        # code runs in between (futures' callbacks are only scheduled). Receive path
        # -20% per message (docs/performance.md).
        enabled = gc.isenabled()
        gc.disable()
        try:
            frames = self.decoder.feed(data)
            handlers, streams = bus._handlers, bus._streams
            # DELIVER and EVENT, the per-message frames, inline: one read holds runs of
            # them for the same stream, which is looked up once per run.
            sid: Any = None
            stream: _Stream | None = None
            for frame in frames:
                op = frame[0]
                if op == _EVENT or op == _DELIVER or op == _EVENTS:
                    if frame[1] != sid:
                        sid = frame[1]
                        ref = streams.get(sid)
                        stream = ref() if ref is not None else None
                        if stream is not None and stream._stopped:
                            stream = None
                    if stream is not None:
                        if op == _EVENTS:
                            stream._push_many(frame)
                        else:
                            stream._push(frame)
                else:
                    handlers[op](frame)
                    sid = None  # whatever that frame did, look the next stream up again
        except (BusError, IndexError, TypeError, ValueError, KeyError) as exc:
            bus._protocol_violation(f"broker sent an invalid frame: {exc!r}")
        finally:
            if enabled:
                gc.enable()

    def connection_lost(self, exc: Exception | None) -> None:
        self.bus._connection_lost(exc)

    def pause_writing(self) -> None:
        self.bus._writable.clear()

    def resume_writing(self) -> None:
        self.bus._writable.set()


class Bus:
    """A connection to an aiobus broker. Get one with :func:`connect`.

    Every method may be called concurrently from many tasks; requests are pipelined on
    the one connection.
    """

    def __init__(self, path: str, name: str | None) -> None:
        self.path = path
        self.name = name
        self.server_info: dict[str, Any] = {}
        self.async_errors = 0  # errors reported for fire-and-forget frames
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._acks: list[int] = []  # ack_nowait tags waiting for the next flush
        self._out_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._packb = msgpack.Packer().pack
        self._rids = itertools.count(1)
        self._sids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._replies: dict[int, asyncio.Future[Any]] = {}
        # Weak: a stream the application dropped must be freed so that its __del__ can
        # CANCEL it (streams.py explains why).
        self._streams: dict[int, weakref.ref[_Stream]] = {}
        self._handlers: dict[int, Callable[[list[Any]], None]] = {
            Op.OK: self._on_ok,
            Op.OK_RANGE: self._on_ok_range,
            Op.ERROR: self._on_error,
            Op.RESPONSE: self._on_response,
            Op.WELCOME: self._on_welcome,
            Op.CLOSE: self._on_close,
        }
        self._writable = asyncio.Event()
        self._writable.set()
        self._welcome: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._lost = asyncio.Event()
        self._error: BusError | None = None  # set once the bus is unusable
        self._closing = False  # aclose() is waiting for the broker's last answers
        self._close_frame: tuple[str, str] | None = None
        self._max_frame = DEFAULT_MAX_FRAME
        self._names: set[str] = set()  # names already checked (hot-path cache)

    # -- connection lifecycle -------------------------------------------------------

    async def _open(self, *, explicit: bool = True) -> None:
        """Connect and say HELLO. A broker found at a default path (``explicit`` False)
        must run as this user or root: another user's broker there is refused."""
        try:
            await self._loop.create_unix_connection(lambda: _Protocol(self), self.path)
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
        if not explicit:
            self._check_broker_owner()
        options = {"name": self.name} if self.name is not None else {}
        self._write([Op.HELLO, PROTOCOL_VERSION, options])
        try:
            async with asyncio.timeout(_HANDSHAKE_TIMEOUT):
                info = await self._welcome
        except TimeoutError:
            self._abort()
            raise BrokerUnavailable(f"the broker at {self.path} did not answer HELLO") from None
        self.server_info = info
        self._max_frame = int(info.get("max_frame", DEFAULT_MAX_FRAME))

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
        """Close the connection gracefully.

        Consumers stop first, so the broker returns their unacked messages to the queue
        without counting an attempt. What was already sent or buffered is written, and
        the broker gets up to 5 s to answer it: a ``send_nowait()`` future or a
        concurrent ``send()`` whose message the broker accepts in that time succeeds.
        Whatever is still unanswered then (a send parked on a full queue, which the
        broker drops when the connection closes) fails with ``ConnectionClosed``, as do
        streams, pending requests and every later call.
        """
        if self._error is None:
            for ref in list(self._streams.values()):
                stream = ref()
                if isinstance(stream, Consumer) and not stream._stopped:
                    stream._stop()
            closed = ConnectionClosed("the bus was closed")
            # The broker answers in order: the OK of a PING written after everything
            # else means it has answered all of that (parked sends aside).
            drained: asyncio.Future[Any] | None = None
            if self._pending and self._transport is not None:
                rid = next(self._rids)
                self._write([Op.PING, rid])
                drained = self._pending[rid] = self._loop.create_future()
            self._error = closed  # nothing new from here on
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

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._error is not None

    def _abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _connection_lost(self, exc: Exception | None) -> None:
        if self._error is None or self._closing:
            if self._close_frame is not None:
                code, message = self._close_frame
                error = ConnectionLost(f"the broker closed the connection: {message}", code=code)
            else:
                error = ConnectionLost(f"connection to the broker at {self.path} was lost"
                                       + (f": {exc}" if exc else ""))
            self._fail_all(error)
        if not self._welcome.done():
            self._welcome.set_exception(BrokerUnavailable("the broker closed the connection"
                                                          " during the handshake"))
        self._writable.set()
        self._lost.set()

    def _fail_all(self, error: BusError) -> None:
        self._error = error
        for fut in list(self._pending.values()) + list(self._replies.values()):
            if not fut.done():
                fut.set_exception(error)
        self._pending.clear()
        self._replies.clear()
        for ref in list(self._streams.values()):
            stream = ref()
            if stream is not None:
                stream._fail(error)

    def _protocol_violation(self, message: str) -> None:
        log.error("closing the connection to %s: %s", self.path, message)
        if self._error is None:
            self._fail_all(RemoteProtocolError(message))
        self._abort()

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error

    # -- writing --------------------------------------------------------------------

    def _ack_nowait(self, tag: int) -> None:
        self._check_open()
        acks = self._acks
        acks.append(tag)
        if len(acks) >= _ACK_BATCH:
            self._write_acks()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _write_acks(self) -> None:
        acks, self._acks = self._acks, []
        data = self._packb([Op.ACK_MANY, acks])
        self._out.append(data)
        self._out_bytes += len(data)

    def _write(self, frame: list[Any]) -> None:
        self._check_open()
        if self._acks:  # keep frame order: acks asked for earlier go out first
            self._write_acks()
        data = self._packb(frame)
        if len(data) > self._max_frame:  # exact: the broker bounds whole frames
            raise FrameTooLarge(
                f"a frame of {len(data)} bytes exceeds the broker's max_frame of"
                f" {self._max_frame} bytes; send a smaller body or fewer headers"
            )
        self._out.append(data)
        self._out_bytes += len(data)
        if self._out_bytes >= _FLUSH_AT:
            self._flush()
        elif self._flush_handle is None:
            self._flush_handle = self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._acks:
            self._write_acks()
        if self._out and self._transport is not None and not self._transport.is_closing():
            self._transport.writelines(self._out)
        self._out = []
        self._out_bytes = 0

    async def _call(self, frame: list[Any]) -> Any:
        """Send a request frame (rid at index 1) and wait for its OK result."""
        if not self._writable.is_set():
            await self._writable.wait()
        rid = next(self._rids)
        frame[1] = rid
        self._write(frame)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._pending[rid] = fut
        return await fut

    def _prepare(self, name: str, what: str, body: Any) -> tuple[bytes, int]:
        """Check ``name`` (cached) and encode ``body`` for SEND/PUBLISH: the per-message
        checks in one call, with the common case (a known name, a bytes body) inline."""
        if name not in self._names:
            self._check_name(name, what)
        if type(body) is bytes:
            data, kind = body, 0
        else:
            data, kind = encode_body(body)
        if len(data) > self._max_frame:
            self._check_size(data)
        return data, kind

    def _check_size(self, body: bytes) -> None:
        if len(body) > self._max_frame:
            raise FrameTooLarge(
                f"message body of {len(body)} bytes exceeds the broker's max_frame of"
                f" {self._max_frame} bytes; split it, or raise the broker's --max-frame"
            )

    def _check_name(self, name: str, what: str) -> None:
        if name not in self._names:
            check_name(name, what)
            if is_reserved(name):
                from ..errors import Forbidden

                raise Forbidden(f"{what} {name!r}: names starting with '$' are reserved")
            if len(self._names) < 10_000:
                self._names.add(name)

    # -- reading --------------------------------------------------------------------

    def _on_ok(self, frame: list[Any]) -> None:
        fut = self._pending.pop(frame[1], None)
        if fut is not None and not fut.done():
            fut.set_result(frame[2])

    def _on_ok_range(self, frame: list[Any]) -> None:
        _, first, last = frame
        pending = self._pending
        # Bounded by what is pending, whatever range the broker names.
        rids = (range(first, last + 1) if last - first < len(pending)
                else [rid for rid in pending if first <= rid <= last])
        for rid in rids:
            fut = pending.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    def _on_error(self, frame: list[Any]) -> None:
        _, rid, code, message = frame
        fut = self._pending.pop(rid, None)
        if fut is not None:
            if not fut.done():
                fut.set_exception(from_code(code, message))
        else:
            self.async_errors += 1
            log.warning("broker reported an error for a fire-and-forget frame: %s: %s",
                        code, message)

    def _on_response(self, frame: list[Any]) -> None:
        _, token, body, kind, _headers = frame
        fut = self._replies.pop(token, None)
        if fut is not None and not fut.done():
            try:
                fut.set_result(decode_body(body, kind))
            except Exception as exc:  # the replier's bug, not this connection's
                fut.set_exception(BodyDecodeError(f"the reply's body is undecodable: {exc}"))

    def _on_welcome(self, frame: list[Any]) -> None:
        if not self._welcome.done():
            self._welcome.set_result(frame[2])

    def _on_close(self, frame: list[Any]) -> None:
        self._close_frame = (frame[1], frame[2])

    # -- stream registry (used by streams.py) ---------------------------------------

    def _register(self, stream: _Stream) -> int:
        self._check_open()
        sid = next(self._sids)
        self._streams[sid] = weakref.ref(stream)
        return sid

    def _unregister(self, sid: int, *, tell_broker: bool = True) -> None:
        self._streams.pop(sid, None)
        if tell_broker and self._error is None and self._transport is not None:
            # The OK is not awaited (this runs from __del__ too); rid 0 means no reply.
            self._write([Op.CANCEL, 0, sid])

    # -- public API -----------------------------------------------------------------

    async def send(
        self,
        queue: str,
        body: Any,
        headers: Mapping[str, str] | None = None,
        ttl: float | None = None,
        *,
        confirm: bool = True,
        delay: float | None = None,
    ) -> None:
        """Put a message on a queue, for delivery now or, with ``delay``, later.

        Args:
            queue: queue name (created with defaults on first use).
            body: bytes, or any msgpack-serialisable value (str, int, float, bool, None,
                list, dict), which the consumer receives as the same value.
            headers: str to str.
            ttl: seconds the message may wait in the queue before it is dead-lettered
                with reason ``expired``; default the queue's ``ttl``. With ``delay``,
                counted from when the message is due.
            confirm: when True (default) return once the broker has accepted the message
                (for ``overflow="block"`` queues: once there was room); when False return
                once it is buffered for writing (bulk producers; errors are logged).
            delay: seconds (0 up to 1e9) before the message can be delivered: it waits
                in the queue as ``delayed`` (counting against ``max_length``; kept by a
                durable queue across restarts), then joins the back of the queue.
                None or 0: at once.

        Raises:
            TypeError: the body is not msgpack-serialisable (nothing was sent).
            InvalidName: bad queue name. FrameTooLarge: body above the broker's max_frame.
            InvalidOption: ``ttl`` or ``delay`` out of range.
            QueueFull: the queue is full and its overflow policy is ``"reject"``.
            NoSuchQueue: the queue was deleted while the send waited for room in it.
            ConnectionLost: the broker went away before confirming.

        Example::

            await bus.send("jobs", {"url": "https://example.org"}, ttl=60)
            await bus.send("reminders", "call back", delay=15 * 60)
        """
        data, kind = self._prepare(queue, "queue name", body)
        hdrs = _headers(headers) if headers else None
        frame = [_SEND, 0, queue, data, kind, hdrs, ttl, None]
        if delay is not None:  # else the 8-field SEND every broker version understands
            frame.append(delay)
        if confirm:
            await self._call(frame)
        else:
            if not self._writable.is_set():
                await self._writable.wait()
            self._write(frame)

    def send_nowait(self, queue: str, body: Any, headers: Mapping[str, str] | None = None,
                    ttl: float | None = None, *, delay: float | None = None
                    ) -> asyncio.Future[None]:
        """Put a message on a queue and return at once with a future of its confirmation:
        the way to keep many confirmed sends in flight (pipelining).

        The future completes when the broker has accepted the message (as ``send()``
        returns), or fails with the exception ``send()`` would raise (``QueueFull``,
        ``ConnectionLost``, ...). Confirmations of consecutive sends travel as one frame.
        Nothing here waits, not even for a congested connection: bound the number in
        flight by awaiting the futures, as in the example.

        Args:
            queue, body, headers, ttl, delay: as for :meth:`send`.

        Returns:
            An ``asyncio.Future`` whose result is ``None``.

        Raises:
            TypeError, InvalidName, FrameTooLarge: at once, and nothing was sent.
            ConnectionClosed, ConnectionLost: the bus is no longer usable.

        Example::

            in_flight: collections.deque[asyncio.Future[None]] = collections.deque()
            for job in jobs:
                in_flight.append(bus.send_nowait("jobs", job))
                if len(in_flight) >= 10_000:
                    await in_flight.popleft()  # raises if that send failed
            for fut in in_flight:
                await fut
        """
        data, kind = self._prepare(queue, "queue name", body)
        rid = next(self._rids)
        frame = [_SEND, rid, queue, data, kind, _headers(headers) if headers else None,
                 ttl, None]
        if delay is not None:
            frame.append(delay)
        self._write(frame)
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending[rid] = fut
        return fut

    async def publish(self, topic: str, body: Any, headers: Mapping[str, str] | None = None
                      ) -> None:
        """Publish to a topic: every subscription matching it at this moment gets a copy;
        with no subscriber the message is dropped (pub/sub is at-most-once).

        Returns once the message is buffered for writing; waits while the connection is
        congested (backpressure).

        Raises:
            TypeError, InvalidName, FrameTooLarge: as for :meth:`send`.
            Forbidden: topics starting with ``$`` belong to the broker.
        """
        data, kind = self._prepare(topic, "topic", body)
        if not self._writable.is_set():
            await self._writable.wait()
        self._write([_PUBLISH, topic, data, kind, _headers(headers) if headers else None])

    def subscribe(self, pattern: str, *, max_pending: int = 1024,
                  policy: str = "drop-oldest") -> Subscription:
        """Receive messages published on topics matching ``pattern``.

        ``*`` matches one token, ``>`` one or more trailing tokens. The broker holds at
        most ``max_pending`` messages in flight to this subscriber plus ``max_pending``
        waiting; beyond that ``policy`` applies: ``"drop-oldest"``, ``"drop-newest"`` or
        ``"disconnect"``. ``msg.dropped`` tells how many were dropped before a message.

        Raises (when iteration starts):
            InvalidName: bad pattern.

        Example::

            async for msg in bus.subscribe("weather.*"):
                print(msg.topic, msg.body)
        """
        check_pattern(pattern)
        return Subscription(self, pattern, max_pending, policy)

    def consume(self, queue: str, *, prefetch: int = 16) -> Consumer:
        """Receive messages from a queue, competing with its other consumers.

        At most ``prefetch`` messages are unacknowledged at a time. Leaving the
        ``async for`` (break, exception, cancellation) stops the consumer and returns its
        unacked messages to the queue at once, without counting an attempt.

        Example::

            async for msg in bus.consume("jobs", prefetch=16):
                async with msg.process():
                    await handle(msg.body)
        """
        self._check_name(queue, "queue name")
        return Consumer(self, queue, prefetch)

    async def request(self, queue: str, body: Any, *, timeout: float = 5.0,
                      headers: Mapping[str, str] | None = None) -> Any:
        """Send ``body`` to ``queue`` and wait for a consumer's ``msg.reply(...)``.

        The request expires from the queue after ``timeout`` seconds, so nobody works on
        a request whose caller gave up.

        Returns:
            The reply's body.

        Raises:
            RequestTimeout: no reply within ``timeout`` seconds.

        Example::

            total = await bus.request("rpc.add", [2, 5], timeout=5.0)
        """
        self._check_name(queue, "queue name")
        data, kind = encode_body(body)
        self._check_size(data)
        token = next(self._tokens)
        reply: asyncio.Future[Any] = self._loop.create_future()
        self._replies[token] = reply
        try:
            async with asyncio.timeout(timeout):
                await self._call([Op.SEND, 0, queue, data, kind, _headers(headers), timeout,
                                  token])
                return await reply
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from queue {queue!r} within {timeout} s; is a consumer running?"
            ) from None
        finally:
            self._replies.pop(token, None)

    async def declare_queue(
        self,
        queue: str,
        *,
        max_deliveries: int | _Default | None = DEFAULT,
        ack_timeout: float | _Default = DEFAULT,
        retry_delays: tuple[float, ...] | list[float] | _Default = DEFAULT,
        dead_letter: str | _Default | None = DEFAULT,
        ttl: float | _Default | None = DEFAULT,
        max_length: int | _Default | None = DEFAULT,
        overflow: str | _Default = DEFAULT,
        durable: bool | _Default = DEFAULT,
    ) -> dict[str, Any]:
        """Create a queue with settings, or check that it has them.

        Only the settings passed are sent; the others take the broker's defaults for
        this queue's name (README "Defaults"; a ``*.dlq`` queue has its own), which is
        also what a queue created by use gets.

        Args:
            max_deliveries: attempts before a message is dead-lettered (None: no limit;
                default 5, for a ``*.dlq`` queue None).
            ack_timeout: seconds a consumer may hold a message before it is redelivered
                (default 30).
            retry_delays: the n-th retry of a failed message waits
                ``retry_delays[min(n, len)-1]`` seconds; empty (the default): at once.
            dead_letter: dead-letter queue; default ``"<queue>.dlq"`` (for a ``*.dlq``
                queue None); None: discard.
            ttl: seconds a message may wait before it expires to the dead-letter queue.
            max_length: most messages waiting (ready or delayed); None: no limit.
            overflow: when full, ``"block"`` senders (the default), ``"reject"`` them
                with QueueFull, or ``"dead-letter"`` the oldest message.
            durable: journal the queue and its messages so they survive a broker restart
                or crash (default False: in memory only). Its settings are journaled too,
                and its dead-letter queue becomes durable with it unless already in use.
                Must be given before the queue is first used.

        Returns:
            The queue's settings as the broker holds them, every key present.

        Raises:
            QueueMismatch: the queue was declared before with other settings.
            InvalidOption: a setting is invalid (the message names it).

        Example::

            await bus.declare_queue("jobs", retry_delays=[1, 5, 30], max_deliveries=5)
        """
        self._check_name(queue, "queue name")
        given = {
            "max_deliveries": max_deliveries, "ack_timeout": ack_timeout,
            "retry_delays": retry_delays, "dead_letter": dead_letter, "ttl": ttl,
            "max_length": max_length, "overflow": overflow, "durable": durable,
        }
        options = {key: value for key, value in given.items() if value is not DEFAULT}
        if "retry_delays" in options:
            options["retry_delays"] = list(retry_delays)  # type: ignore[arg-type]
        result: dict[str, Any] = await self._call([Op.DECLARE, 0, queue, options])
        return result

    async def purge_queue(self, queue: str) -> int:
        """Remove every message waiting in a queue: ready and delayed ones. Messages
        consumers hold (leased) stay and are answered as usual, as RabbitMQ's purge.
        A durable queue stays purged across a broker restart.

        Returns:
            How many messages were removed.

        Raises:
            NoSuchQueue: the broker has no such queue.
            InvalidName, Forbidden: a bad or reserved (``$...``) name.

        Example::

            removed = await bus.purge_queue("jobs")
        """
        self._check_name(queue, "queue name")
        result: int = await self._call([Op.PURGE, 0, queue])
        return result

    async def delete_queue(self, queue: str, *, if_empty: bool = False) -> int:
        """Remove a queue: its settings and all its messages, leased ones included. A
        durable queue stays deleted across a broker restart.

        Leases on it end: a consumer's later ``ack()`` (or nack, ...) of such a message
        raises ``LeaseError`` (``lease-unknown``). Its consumers stay registered, and as
        with any use of a queue name, the queue exists again at once, empty and with the
        default settings; so do sends to it, and ``declare_queue`` may give it new
        settings. Sends waiting for room in it fail with ``NoSuchQueue``.

        Args:
            if_empty: refuse (``QueueNotEmpty``) if it holds any message, ready,
                delayed or leased, or a send waits for room in it.

        Returns:
            How many messages were removed.

        Raises:
            NoSuchQueue: the broker has no such queue.
            QueueNotEmpty: ``if_empty`` and the queue is not empty; nothing changed.
            InvalidName, Forbidden: a bad or reserved (``$...``) name.

        Example::

            await bus.delete_queue("scratch", if_empty=True)
        """
        self._check_name(queue, "queue name")
        result: int = await self._call([Op.DELETE, 0, queue, bool(if_empty)])
        return result

    async def stats(self) -> dict[str, Any]:
        """Broker statistics: per queue ``ready``, ``unacked``, ``delayed``,
        ``consumers``, ``dead_lettered`` and counters; topic subscriptions with their
        drops; connections with name, pid and uid."""
        result: dict[str, Any] = await self._call([Op.STATS, 0])
        return result

    async def ping(self) -> None:
        """Round trip to the broker; returns once every earlier frame was processed."""
        await self._call([Op.PING, 0])


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


def _headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    result = dict(headers)
    try:
        check_headers(result)
    except RemoteProtocolError as exc:
        raise TypeError(str(exc).replace("None.headers", "headers")) from None
    return result


class connect:
    """Connect to a broker: ``async with aiobus.connect(path) as bus: ...``.

    Args:
        path: the broker's socket; default as the broker's (``$AIOBUS_SOCKET``, else
            ``$XDG_RUNTIME_DIR/aiobus.sock``, else ``/tmp/aiobus-<uid>/aiobus.sock``). A
            broker found at a default path must run as this user or root.
        name: a name for this client, shown in stats and presence events.

    Raises:
        BrokerUnavailable: nothing listens on the socket, or the handshake failed; the
            socket's permissions keep this user out (the message names its owner and
            mode); or the broker at a default path runs as another user (not root).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 name: str | None = None) -> None:
        self._path = resolve_socket_path(path)
        self._explicit = is_explicit(path)
        self._name = name
        self._bus: Bus | None = None

    async def __aenter__(self) -> Bus:
        bus = Bus(self._path, self._name)
        await bus._open(explicit=self._explicit)
        self._bus = bus
        return bus

    async def __aexit__(self, *exc_info: object) -> None:
        if self._bus is not None:
            await self._bus.aclose()

    def __await__(self) -> Any:
        """``bus = await aiobus.connect()`` also works; then ``await bus.aclose()``."""
        return self.__aenter__().__await__()
