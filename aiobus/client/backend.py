"""What :class:`~aiobus.Bus`, :class:`~aiobus.client.message.Message` and the streams need
from a transport: the :class:`Backend` protocol.

``Bus`` checks names, encodes bodies and documents the public API; a backend moves
encoded messages. The Unix-socket backend (``client/unix.py``) speaks aiobus's own
protocol to its broker; another backend (NATS is planned) implements the same methods
over its own transport, and the behaviour suite in ``tests/integration`` runs against
``Bus`` whatever is below it.

Leases are opaque: a backend hands a receiver a lease handle with each queue message
(an int tag for the Unix socket) and takes it back to settle, extend or reply. Stream
handles are opaque too: ``consume`` and ``subscribe`` store one in the receiver's
``_handle`` before they first wait, so that the stream can cancel itself from then on.

Methods that cannot block are plain ``def`` (trio's rule): those on the per-message path
(``send_unconfirmed``, ``publish``, ``ack_nowait``, ``settle_nowait``, ``credit``) buffer
and return, and the
``Bus`` awaits :meth:`Backend.wait_writable` first while the transport is congested.
"""

from __future__ import annotations

import asyncio
import collections
import enum
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from ..errors import BusError

__all__ = ["Backend", "ConnectionState", "Outcome", "StateChange", "StreamTarget",
           "state_change_stream"]

Outcome = Literal["ack", "nack", "reject"]


class ConnectionState(enum.Enum):
    """What happened to a bus's connection (:meth:`aiobus.Bus.state_changes`)."""

    DISCONNECTED = "disconnected"  # the connection was lost; reconnecting
    RECONNECTED = "reconnected"  # connected again; streams restarted, sends resent
    CLOSED = "closed"  # for good: closed by you, refused, or reconnecting gave up


@dataclass(frozen=True, slots=True)
class StateChange:
    """One change of a bus's connection state.

    Attributes:
        state: what happened.
        error: why the connection was lost or closed (None for RECONNECTED, and for a
            CLOSED that ``aclose()`` caused it is ``ConnectionClosed``).
        downtime: for RECONNECTED, seconds from the loss to the new connection.
        attempts: for RECONNECTED, how many dials it took.
    """

    state: ConnectionState
    error: BusError | None = None
    downtime: float | None = None
    attempts: int = 0


STATE_BACKLOG = 64  # state changes kept for a state_changes() reader that lags


def emit_state(listeners: list[collections.deque[StateChange]], changed: asyncio.Event,
               change: StateChange) -> asyncio.Event:
    """A backend's ``_emit``: ``change`` goes to the backlog of every ``state_changes()``
    reader in ``listeners``, and ``changed`` is set for whoever waits on it. Returns the
    event to wait on next, which the backend keeps (its ``_changed``)."""
    for backlog in listeners:
        backlog.append(change)
    changed.set()
    return asyncio.Event()


async def wait_until_connected(connected: Callable[[], bool],
                               changed: Callable[[], asyncio.Event],
                               error: Callable[[], BusError | None]) -> None:
    """A backend's ``wait_connected()``: return once ``connected()``, waking on the
    event ``changed()`` returns (set on every change of state).

    Raises:
        BusError: ``error()``, once the backend is closed.
    """
    while not connected():
        closed = error()
        if closed is not None:
            raise closed
        await changed().wait()


async def state_change_stream(listeners: list[collections.deque[StateChange]],
                              changed: Callable[[], asyncio.Event],
                              error: Callable[[], BusError | None]
                              ) -> AsyncIterator[StateChange]:
    """A backend's ``state_changes()``: each change its ``_emit`` appends to every deque
    in ``listeners`` (then sets the event ``changed()`` returns and replaces it), up to
    and including CLOSED; CLOSED at once if ``error()`` says the backend is closed. A
    reader that lags keeps the last STATE_BACKLOG changes."""
    backlog: collections.deque[StateChange] = collections.deque(maxlen=STATE_BACKLOG)
    closed = error()
    if closed is not None:
        backlog.append(StateChange(ConnectionState.CLOSED, closed))
    listeners.append(backlog)
    try:
        while True:
            while not backlog:
                await changed().wait()
            change = backlog.popleft()
            yield change
            if change.state is ConnectionState.CLOSED:
                return
    finally:
        listeners.remove(backlog)


class StreamTarget(Protocol):
    """A consumer or subscription as a backend feeds it (``client/streams.py``)."""

    _handle: Any  # the backend's handle for this stream, set by consume/subscribe

    def _deliver(self, lease: Any, message: list[Any], attempt: int,
                 reply_to: str | None) -> None:
        """A queue message; ``message`` is ``[id, queue, body, kind, headers,
        timestamp]`` (PROTOCOL.md's message array)."""

    def _event(self, message: list[Any], dropped: int) -> None:
        """A topic message, after ``dropped`` that this subscription missed."""

    def _events(self, messages: list[list[Any]], dropped: int) -> None:
        """Consecutive topic messages; ``dropped`` were missed before the first."""

    def _stop(self, *, tell_broker: bool = True) -> None:
        """Stop receiving (the bus is closing)."""

    def _fail(self, error: BaseException) -> None:
        """The connection is gone: the stream raises ``error`` when it runs dry."""

    def _reset(self) -> None:
        """The connection was lost and is being re-established: forget what the old one
        gave (a consumer's buffered leases died with it), and note a possible gap."""

    def _answer_failed(self, error: BusError) -> None:
        """The broker refused an unconfirmed answer to one of this consumer's leases
        (``lease-expired``, ``lease-unknown``): count it, log the first."""


class Backend(Protocol):
    """One connection to a broker, as ``Bus``, ``Message`` and the streams use it.

    Bodies arrive encoded (``data``, ``kind``: protocol.encode_body) and names checked.
    Errors are the ``aiobus.errors`` classes, whatever the transport reports.
    """

    path: str
    name: str | None  # this client's name, shown in the broker's stats
    server_info: dict[str, Any]

    @property
    def closed(self) -> bool: ...

    @property
    def async_errors(self) -> int:
        """Errors reported for fire-and-forget operations (logged, not raised)."""

    max_body: int  # the largest body the broker may accept (its max_frame)

    writable: bool  # False while congested or disconnected: await wait_writable()
    connected: bool  # a connection is up (False while reconnecting, and once closed)
    reconnects: int  # how many times the connection was re-established

    @property
    def dropped(self) -> int:
        """Publishes and unconfirmed sends dropped while disconnected (buffer full)."""

    async def wait_writable(self) -> None: ...

    async def wait_connected(self) -> None:
        """Return once connected; raise the bus's error if it is closed for good."""

    def state_changes(self) -> AsyncIterator[StateChange]:
        """Each change of the connection's state from now on, ending after CLOSED."""

    async def aclose(self) -> None: ...

    # -- producing ------------------------------------------------------------------------

    async def send(self, queue: str, data: bytes, kind: int, headers: dict[str, str] | None,
                   ttl: float | None, delay: float | None,
                   timeout: float | None = None) -> None:
        """Put a message on a queue; return once the broker accepted it.

        Raises:
            SendTimeout: not confirmed within ``timeout`` seconds (None: no limit).
        """

    def send_nowait(self, queue: str, data: bytes, kind: int,
                    headers: dict[str, str] | None, ttl: float | None,
                    delay: float | None) -> asyncio.Future[None]:
        """As :meth:`send`, with a future of the confirmation."""

    def send_unconfirmed(self, queue: str, data: bytes, kind: int,
                         headers: dict[str, str] | None, ttl: float | None,
                         delay: float | None) -> None:
        """Buffer a send nobody waits for (a failure counts in ``async_errors``)."""

    def publish(self, topic: str, data: bytes, kind: int,
                headers: dict[str, str] | None) -> None:
        """Buffer a topic message."""

    async def request(self, queue: str, data: bytes, kind: int,
                      headers: dict[str, str] | None, timeout: float) -> Any:
        """Send a request and return the decoded body of its reply.

        Raises:
            RequestTimeout: no reply within ``timeout`` seconds.
        """

    # -- receiving ------------------------------------------------------------------------

    async def consume(self, queue: str, prefetch: int, target: StreamTarget,
                      create: bool = True) -> None:
        """Start delivering ``queue``'s messages to ``target``; on failure nothing is
        registered (and nothing is to be cancelled). With ``create`` False, a queue that
        does not exist is not created: ``NoSuchQueue``."""

    async def subscribe(self, pattern: str, max_pending: int, policy: str,
                        target: StreamTarget) -> None:
        """Start delivering topic messages matching ``pattern`` to ``target``."""

    def cancel(self, handle: Any) -> None:
        """Stop a stream (never blocks; runs from ``__del__`` too). A consumer's leases
        are released without counting an attempt."""

    def credit(self, handle: Any, n: int) -> None:
        """A subscription's application consumed ``n`` more messages."""

    # -- leases ---------------------------------------------------------------------------

    async def settle(self, lease: Any, outcome: Outcome, delay: float | None = None,
                     reason: str | None = None) -> None:
        """Ack, nack (``delay``, ``reason``) or reject (``reason``) a queue message."""

    def ack_nowait(self, lease: Any) -> None:
        """Ack without waiting for the confirmation; acks travel in batches."""

    def settle_nowait(self, lease: Any, outcome: Outcome, delay: float | None = None,
                      reason: str | None = None) -> None:
        """As :meth:`settle`, without waiting: a refusal is reported to the consumer
        (``StreamTarget._answer_failed``), an answer to a lease lost with its connection
        is dropped (its message is redelivered)."""

    async def extend(self, lease: Any, seconds: float) -> None: ...

    async def reply(self, lease: Any, data: bytes, kind: int,
                    headers: dict[str, str] | None) -> None:
        """Answer a request (acks its lease)."""

    def reply_nowait(self, lease: Any, data: bytes, kind: int,
                     headers: dict[str, str] | None) -> None:
        """As :meth:`reply`, without waiting; a refusal is reported as for
        :meth:`settle_nowait`."""

    # -- administration -------------------------------------------------------------------

    async def declare(self, queue: str, options: dict[str, Any]) -> dict[str, Any]: ...

    async def purge(self, queue: str) -> int: ...

    async def delete(self, queue: str, if_empty: bool) -> int: ...

    async def stats(self, options: dict[str, Any] | None = None) -> dict[str, Any]: ...

    async def peek(self, queue: str, options: dict[str, Any]) -> dict[str, Any]:
        """PEEK: the queue's ready messages, unchanged (the wire result)."""

    async def ping(self) -> None: ...
