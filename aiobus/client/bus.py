"""The public client API: :class:`Bus`, over a :class:`~aiobus.client.backend.Backend`.

``Bus`` checks names, encodes bodies and documents the API; the backend moves the encoded
messages (``client/unix.py`` over the broker's Unix socket: the asyncio shell around the
sans-IO ``client/connection.py``). Every method may be called concurrently from many
tasks; requests are pipelined on the one connection.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

from .._paths import is_explicit, resolve_socket_path
from ..errors import BrokerUnavailable, RemoteProtocolError
from ..names import check_pattern
from ..protocol import SubscriptionPolicy, check_headers, encode_body
from .admin import _BusAdmin
from .backend import Backend, StateChange
from .connection import HOLD_BYTES
from .message import check_size
from .streams import Consumer, Subscription
from .unix import UnixSocketBackend

__all__ = ["Bus", "connect"]


class Bus(_BusAdmin):
    """A connection to an aiobus broker. Get one with :func:`connect`.

    Every method may be called concurrently from many tasks; requests are pipelined on
    the one connection.
    """

    # Here: the connection's state, and messages (send, publish, consume, subscribe,
    # request). In the base (admin.py): the constructor, the name checks, and the queue
    # administration (declare_queue, purge_queue, delete_queue, peek), stats and ping.

    @property
    def path(self) -> str:
        """Where the broker listens."""
        return self._backend.path

    @property
    def name(self) -> str | None:
        """This client's name, as given to :func:`connect`."""
        return self._backend.name

    @property
    def server_info(self) -> dict[str, Any]:
        """What the broker said in WELCOME (version, ``max_frame``, ...)."""
        return self._backend.server_info

    @property
    def async_errors(self) -> int:
        """Errors reported for fire-and-forget frames (``send(confirm=False)``,
        ``publish``, ``ack_nowait``); each is logged."""
        return self._backend.async_errors

    # -- connection lifecycle -------------------------------------------------------------

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
        await self._backend.aclose()

    async def __aenter__(self) -> Bus:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        return self._backend.closed

    @property
    def connected(self) -> bool:
        """True while connected to the broker; False while reconnecting and once closed."""
        return self._backend.connected

    @property
    def reconnects(self) -> int:
        """How many times the connection was re-established after a loss."""
        return self._backend.reconnects

    @property
    def dropped(self) -> int:
        """Publishes (and ``send(confirm=False)`` messages) dropped while disconnected
        because ``publish_buffer`` was full."""
        return self._backend.dropped

    async def wait_connected(self) -> None:
        """Return once connected (at once if connected now).

        Raises:
            ConnectionClosed: the bus was closed. ConnectionLost: it gave up reconnecting
            (``max_reconnect_time``), or was refused for good.
        """
        await self._backend.wait_connected()

    def state_changes(self) -> AsyncIterator[StateChange]:
        """Each change of the connection's state from now on: ``StateChange`` objects
        whose ``state`` is ``ConnectionState.DISCONNECTED``, ``RECONNECTED`` or
        ``CLOSED`` (the last; then the iteration ends). Changes are also logged at INFO
        by ``aiobus.client.unix``.

        Example::

            async for change in bus.state_changes():
                print("bus:", change.state.value, change.error or "")
        """
        return self._backend.state_changes()

    # -- checks ---------------------------------------------------------------------------

    def _prepare(self, name: str, what: str, body: Any) -> tuple[bytes, int]:
        """Check ``name`` (cached) and encode ``body`` for SEND/PUBLISH: the per-message
        checks in one call, with the common case (a known name, a bytes body) inline."""
        if name not in self._names:
            self._check_name(name, what)
        if type(body) is bytes:
            data, kind = body, 0
        else:
            data, kind = encode_body(body)
        if len(data) > self._backend.max_body:
            check_size(data, self._backend.max_body)
        return data, kind


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
        timeout: float | None = None,
    ) -> None:
        """Put a message on a queue, for delivery now or, with ``delay``, later.

        While the bus is reconnecting, a confirmed send waits, and a send that was not
        yet confirmed when the connection dropped is sent again with the same message
        id; the broker's deduplication window keeps a resend from making a duplicate.

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
            timeout: seconds to wait for the confirmation (None: as long as it takes,
                reconnects included). On timeout the message is not sent again.

        Raises:
            TypeError: the body is not msgpack-serialisable (nothing was sent).
            InvalidName: bad queue name. FrameTooLarge: body above the broker's max_frame.
            InvalidOption: ``ttl`` or ``delay`` out of range.
            QueueFull: the queue is full and its overflow policy is ``"reject"``.
            NoSuchQueue: the queue was deleted while the send waited for room in it.
            SendTimeout: not confirmed within ``timeout`` (the broker may still have it,
                if it was written before the connection dropped).
            ConnectionLost: the broker went away before confirming and the bus does not
                reconnect (``reconnect=False``, or it gave up).

        Example::

            await bus.send("jobs", {"url": "https://example.org"}, ttl=60)
            await bus.send("reminders", "call back", delay=15 * 60)
        """
        data, kind = self._prepare(queue, "queue name", body)
        hdrs = _headers(headers) if headers else None
        if confirm:
            await self._backend.send(queue, data, kind, hdrs, ttl, delay, timeout)
        else:
            backend = self._backend
            if not backend.writable:
                await backend.wait_writable()
            backend.send_unconfirmed(queue, data, kind, hdrs, ttl, delay)

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
        return self._backend.send_nowait(queue, data, kind,
                                         _headers(headers) if headers else None, ttl, delay)

    async def publish(self, topic: str, body: Any, headers: Mapping[str, str] | None = None
                      ) -> None:
        """Publish to a topic: every subscription matching it at this moment gets a copy;
        with no subscriber the message is dropped (pub/sub is at-most-once).

        Returns once the message is buffered for writing; waits while the connection is
        congested (backpressure). While the bus is reconnecting, messages are held, up
        to ``publish_buffer`` bytes (connect()), and written once it is back; beyond
        that they are dropped and counted in :attr:`dropped`.

        Raises:
            TypeError, InvalidName, FrameTooLarge: as for :meth:`send`.
            Forbidden: topics starting with ``$`` belong to the broker.
        """
        data, kind = self._prepare(topic, "topic", body)
        backend = self._backend
        if not backend.writable and backend.connected:
            await backend.wait_writable()
        backend.publish(topic, data, kind, _headers(headers) if headers else None)

    def subscribe(self, pattern: str, *, max_pending: int = 1024,
                  policy: SubscriptionPolicy = "drop-oldest") -> Subscription:
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
        return Subscription(self._backend, pattern, max_pending, policy)

    def consume(self, queue: str, *, prefetch: int = 16, create: bool = True) -> Consumer:
        """Receive messages from a queue, competing with its other consumers.

        At most ``prefetch`` messages are unacknowledged at a time. Leaving the
        ``async for`` (break, exception, cancellation) stops the consumer and returns its
        unacked messages to the queue at once, without counting an attempt.

        Args:
            prefetch: most messages held unacknowledged at a time.
            create: create the queue (with the broker's defaults) if it does not exist.
                False: the queue must exist when the consumer starts, else starting it
                (the first ``async for`` step, or ``async with``) raises
                ``NoSuchQueue`` (a reader of a mistyped name learns so, and leaves no
                queue behind). Once started, the consumer keeps its queue as any does:
                after a broker restart or a DELETE it exists again.

        Raises:
            NoSuchQueue: on start, with ``create=False``, the queue does not exist.

        Example::

            async for msg in bus.consume("jobs", prefetch=16):
                async with msg.process():
                    await handle(msg.body)
        """
        self._check_name(queue, "queue name")
        return Consumer(self._backend, queue, prefetch, create)

    async def request(self, queue: str, body: Any, *, timeout: float = 5.0,
                      headers: Mapping[str, str] | None = None) -> Any:
        """Send ``body`` to ``queue`` and wait for a consumer's ``msg.reply(...)``.

        On the local broker the request waits in the queue like a message and expires
        from it after ``timeout`` seconds, so nobody works on a request whose caller gave
        up. On NATS it goes to the queue's consumers over core NATS and is not stored
        (docs/nats.md).

        Returns:
            The reply's body.

        Raises:
            RequestTimeout: no reply within ``timeout`` seconds.

        Example::

            total = await bus.request("rpc.add", [2, 5], timeout=5.0)
        """
        data, kind = self._prepare(queue, "queue name", body)
        return await self._backend.request(queue, data, kind,
                                           _headers(headers) if headers else None, timeout)



def _headers(headers: Mapping[str, str] | None) -> dict[str, str] | None:
    if not headers:
        return None
    result = dict(headers)
    try:
        check_headers(result)
    except RemoteProtocolError as exc:
        raise TypeError(str(exc)) from None
    return result


class connect:
    """Connect to a broker: ``async with aiobus.connect(path) as bus: ...``.

    Args:
        path: the broker's socket; default as the broker's (``$AIOBUS_SOCKET``, else
            ``$XDG_RUNTIME_DIR/aiobus.sock``, else ``/tmp/aiobus-<uid>/aiobus.sock``). A
            broker found at a default path must run as this user or root. A
            ``nats://host:port[/namespace]`` URL connects to NATS instead (the NATS
            backend: ``pip install 'aiobus-ipc[nats]'``, docs/nats.md).
        name: a name for this client, shown in stats and presence events.
        reconnect: when the connection is lost (broker restart, crash, socket replaced),
            connect again, declare the queues declared so far, restart consumers and
            subscriptions, and resend unconfirmed sends, so ``async for`` loops go on
            (README, "When the broker restarts"). False: every stream and pending call
            raises ``ConnectionLost`` instead.
        reconnect_delay: the first wait between attempts, in seconds; it doubles up to
            ``max_reconnect_delay``, each wait drawn at random from its upper half.
        max_reconnect_time: give up after this many seconds without a connection (then
            everything raises ``ConnectionLost``); None: never.
        publish_buffer: bytes of publishes held while reconnecting; beyond, dropped and
            counted in ``bus.dropped``.

    The first connection is not retried: ``connect`` raises if no broker answers.

    Raises:
        BrokerUnavailable: nothing listens on the socket, or the handshake failed; the
            socket's permissions keep this user out (the message names its owner and
            mode); or the broker at a default path runs as another user (not root).
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *,
                 name: str | None = None, reconnect: bool = True,
                 reconnect_delay: float = 0.05, max_reconnect_delay: float = 2.0,
                 max_reconnect_time: float | None = None,
                 publish_buffer: int = HOLD_BYTES) -> None:
        if not 0 < reconnect_delay <= max_reconnect_delay:
            raise ValueError("need 0 < reconnect_delay <= max_reconnect_delay")
        self._path = resolve_socket_path(path)
        self._nats = self._path.startswith("nats://")  # the NATS backend (docs/nats.md)
        self._explicit = is_explicit(path)
        self._name = name
        self._options: dict[str, Any] = {
            "reconnect": reconnect, "reconnect_delay": reconnect_delay,
            "max_reconnect_delay": max_reconnect_delay,
            "max_reconnect_time": max_reconnect_time, "publish_buffer": publish_buffer}
        self._bus: Bus | None = None

    async def __aenter__(self) -> Bus:
        backend: Backend
        if self._nats:
            backend = await _open_nats(self._path, self._name, self._options)
        else:
            backend = unix = UnixSocketBackend(self._path, self._name, **self._options)
            await unix.open(explicit=self._explicit)
        self._bus = bus = Bus(backend)
        return bus

    async def __aexit__(self, *exc_info: object) -> None:
        if self._bus is not None:
            await self._bus.aclose()

    def __await__(self) -> Any:
        """``bus = await aiobus.connect()`` also works; then ``await bus.aclose()``."""
        return self.__aenter__().__await__()


async def _open_nats(url: str, name: str | None, options: dict[str, Any]) -> Backend:
    """The NATS backend, or BrokerUnavailable naming the extra it needs."""
    try:
        from .nats import NatsBackend
    except ImportError as exc:
        raise BrokerUnavailable(
            f"{url}: the NATS backend needs nats-py: pip install 'aiobus-ipc[nats]'") from exc
    backend = NatsBackend(url, name, **options)
    await backend.open()
    return backend
