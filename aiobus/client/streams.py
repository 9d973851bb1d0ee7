"""Async iterators over topic subscriptions and queue consumers.

Leaving an ``async for`` early must stop the subscription at the broker, and for a
consumer release its unacked messages to other consumers at once, without counting an
attempt. Python gives an async iterator no hook for ``break``, so:

* the backend keeps only weak references to streams; when the loop drops its iterator
  (``break``, or an exception unwinding through the loop body), CPython frees it at once
  and ``__del__`` writes the CANCEL frame synchronously (a buffer append, no await);
* an exception raised inside ``__anext__`` itself (cancellation while waiting) stops the
  stream explicitly before propagating, since the traceback keeps the iterator alive;
* ``async with bus.consume(...) as stream:`` stops it deterministically on exit, on any
  Python implementation. Inside such a block the block owns the stream, so a cancelled
  ``anext(stream)`` (say, under ``asyncio.wait_for``) leaves it running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self, TypeVar

from ..errors import BusError, BusyError, RemoteProtocolError
from .message import GapMessage, Message

if TYPE_CHECKING:
    from ..protocol import SubscriptionPolicy
    from .backend import Backend

_T = TypeVar("_T")

try:
    from mypy_extensions import mypyc_attr
except ImportError:  # installed with mypy; neither build needs it to run
    def mypyc_attr(*attrs: str, **kwattrs: object) -> Callable[[_T], _T]:
        return lambda cls: cls

__all__ = ["Consumer", "Subscription"]

log = logging.getLogger(__name__)


# Regular Python classes even in the compiled build (their methods are still compiled):
# a connection holds its streams by weakref (so a stream dropped unclosed cancels
# itself), and mypyc's native classes take no weak references.
@mypyc_attr(native_class=False)
class _Stream:
    """Shared machinery: a local buffer filled by the backend's protocol callbacks."""

    _kind = "stream"

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._handle: Any = None  # the backend's, once start() asked for the stream
        self._buffer: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self._stopped = False
        self._managed = False  # inside `async with`: the block decides when it stops
        self._error: BaseException | None = None

    async def _start_with(self, backend: Backend) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        """Register with the broker (``async for`` and ``async with`` call this)."""
        if self._started:
            return
        self._started = True
        try:
            await self._start_with(self._backend)
        except BaseException:
            # Refused (or never answered): there is nothing to CANCEL at the broker.
            self._stop(tell_broker=False)
            raise

    def _stop(self, *, tell_broker: bool = True) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._buffer.clear()
        if tell_broker and self._handle is not None:
            self._backend.cancel(self._handle)
        self._wake()

    def close(self) -> None:
        """Stop receiving; an iteration in progress ends. Idempotent, never blocks."""
        self._stop()

    def __del__(self) -> None:
        if self._started and not self._stopped:
            try:
                self._stop()
            except Exception:  # interpreter or loop shutting down: nothing left to tell
                pass

    async def __aenter__(self) -> Self:
        await self.start()
        self._managed = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        if self._buffer:
            return self._take()
        return await self._wait_next()

    async def _wait_next(self) -> Message:
        """The slow path of ``__anext__``: start, or wait for a message."""
        if not self._started:
            await self.start()
        if self._waiter is not None:
            raise BusyError(f"another task is already iterating this {self._kind}")
        while not self._buffer:
            if self._error is not None:
                raise self._error
            if self._stopped:
                raise StopAsyncIteration
            loop = self._loop
            if loop is None:  # once: get_running_loop() is a getpid(2) call each time
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            except BaseException:
                # Cancelled while waiting: a bare `async for` ends here, so stop now.
                if not self._managed:
                    self._stop()
                raise
            finally:
                self._waiter = None
        return self._take()

    def _take(self) -> Message:
        return self._buffer.popleft()

    def _deliver(self, lease: Any, message: list[Any], attempt: int,
                 reply_to: str | None) -> None:
        """A queue message for this stream (called by the backend's protocol callback)."""
        self._buffer.append(Message(self._backend, lease, message, attempt, reply_to))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _event(self, message: list[Any], dropped: int) -> None:
        """A topic message for this stream."""
        self._buffer.append(Message(self._backend, None, message, dropped))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _events(self, messages: list[list[Any]], dropped: int) -> None:
        """Several topic messages at once: only subscriptions get them."""
        raise RemoteProtocolError(f"EVENTS frame for {self._kind} {self._handle}")

    def _wake(self) -> None:
        """Let a waiting ``__anext__`` look again (messages arrived, stopped, failed)."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        """The connection is gone: the next ``__anext__`` raises ``error``."""
        self._error = error
        self._wake()

    def _reset(self) -> None:
        """The bus lost its connection and is reconnecting; the stream goes on after."""

    def _answer_failed(self, error: BusError) -> None:
        """Only a consumer's leases are answered: see Consumer."""


@mypyc_attr(native_class=False)
class Subscription(_Stream):
    """Messages published on topics matching ``pattern``; from ``bus.subscribe``.

    Iterate with ``async for``; use ``async with`` to know when the broker has
    registered the subscription (publishes before that are not seen).
    """

    _kind = "subscription"

    def __init__(self, backend: Backend, pattern: str, max_pending: int,
                 policy: SubscriptionPolicy) -> None:
        super().__init__(backend)
        self.pattern = pattern
        self.max_pending = max_pending
        self.policy = policy
        self._consumed = 0
        self._credit_batch = max(1, max_pending // 2)
        self.dropped = 0  # total messages dropped by the broker for this subscription
        self.gaps = 0  # reconnects of the bus while subscribed: messages may be missing

    async def _start_with(self, backend: Backend) -> None:
        await backend.subscribe(self.pattern, self.max_pending, self.policy, self)

    async def __anext__(self) -> Message:
        # The per-message path, inlined: take a buffered event and count it; credit goes
        # back to the broker in batches of max_pending / 2.
        buffer = self._buffer
        if not buffer:
            return await self._wait_next()
        msg = buffer.popleft()
        consumed = self._consumed + 1
        if consumed >= self._credit_batch:
            self._backend.credit(self._handle, consumed)
            consumed = 0
        self._consumed = consumed
        return msg

    def _take(self) -> Message:  # after a wait (the slow path)
        msg = self._buffer.popleft()
        self._consumed += 1
        if self._consumed >= self._credit_batch:
            self._backend.credit(self._handle, self._consumed)
            self._consumed = 0
        return msg

    def _event(self, message: list[Any], dropped: int) -> None:
        if dropped:
            self.dropped += dropped
        self._buffer.append(Message(self._backend, None, message, dropped))
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _events(self, messages: list[list[Any]], dropped: int) -> None:
        # The gap goes with the first message only.
        backend, buffer = self._backend, self._buffer
        if dropped:
            self.dropped += dropped
        buffer.append(Message(backend, None, messages[0], dropped))
        buffer.extend([Message(backend, None, m, 0) for m in itertools.islice(messages, 1, None)])
        self._wake()

    def _fail(self, error: BaseException) -> None:
        # Topic messages already received stay readable; the error comes after them.
        self._error = error
        self._wake()

    def _reset(self) -> None:
        # Messages already received stay readable. The broker gives a new subscription
        # full credit; the first message after it is marked (Message.gap). The marking
        # shadows the two receive methods until then: nothing on the per-message path.
        self._consumed = 0
        self.gaps += 1
        self._event = self._gap_event  # type: ignore[method-assign]
        self._events = self._gap_events  # type: ignore[method-assign]

    def _gap_event(self, message: list[Any], dropped: int) -> None:
        del self._event, self._events
        self.dropped += dropped
        self._buffer.append(GapMessage(self._backend, None, message, dropped))
        self._wake()

    def _gap_events(self, messages: list[list[Any]], dropped: int) -> None:
        self._gap_event(messages[0], dropped)
        if len(messages) > 1:
            self._events(messages[1:], 0)


@mypyc_attr(native_class=False)
class Consumer(_Stream):
    """Leased messages from a queue; from ``bus.consume``. At most ``prefetch`` are
    unacknowledged at a time. Stopping releases the unacked ones to other consumers.

    Attributes:
        failed_answers: answers made without ``confirm=True`` (``ack()``, ``nack()``,
            ``reject()``, ``ack_nowait()``, ``msg.process()``) that the broker refused
            because the lease had expired (the message was redelivered) or was already
            answered. The first is logged at WARNING, the rest only counted (each also
            counts in ``bus.async_errors``).
    """

    _kind = "consumer"

    def __init__(self, backend: Backend, queue: str, prefetch: int,
                 create: bool = True) -> None:
        super().__init__(backend)
        self.queue = queue
        self.prefetch = prefetch
        self.create = create
        self.failed_answers = 0

    def _answer_failed(self, error: BusError) -> None:
        # Logged once per consumer (nats' RateLimitErrorf in spirit): a loop that is too
        # slow for its ack_timeout would otherwise log every message.
        self.failed_answers += 1
        if self.failed_answers == 1:
            log.warning("a consumer of queue %r answered a lease too late or twice (%s: %s);"
                        " the broker redelivers such a message. Further refusals for this"
                        " consumer are counted in Consumer.failed_answers, not logged",
                        self.queue, error.code, error)

    async def _start_with(self, backend: Backend) -> None:
        await backend.consume(self.queue, self.prefetch, self, self.create)

    def _fail(self, error: BaseException) -> None:
        # Leases died with the connection; their messages will be redelivered.
        self._buffer.clear()
        super()._fail(error)

    def _reset(self) -> None:
        # Messages not yet handed out came under leases of the lost connection: the
        # broker redelivers them, so they must not be processed here.
        self._buffer.clear()
