"""Bridges between FIFOs and the bus: ``fifo_to_bus`` and ``bus_to_fifo``.

They are written against the client's public API only, typed by :class:`FifoBus`, a
protocol of just the calls they make, so this module does not import the client.

Delivery: ``fifo_to_bus`` keeps at most ``window`` records sent but not yet confirmed by
the broker, and reads no more until the oldest is confirmed; while the broker is away it
reads nothing. A record read but unconfirmed when the connection drops is sent again by
the client after it reconnects, under the same message id, which the broker
deduplicates: every record read is queued once. (A broker that does not deduplicate gets
the record again from the bridge: at least once.) The FIFO stays open meanwhile, so shell
writers are never told "no reader" (``EPIPE``): their records wait in the pipe (64 KiB on
Linux), and once it is full ``echo >> fifo`` blocks until the bridge reads again. A pipe
cannot be acked, so a record is lost only if the bridge process itself dies holding it:
in the pipe (the kernel frees a pipe with no reader), read, or unconfirmed. Stopped, the
bridge gives its unconfirmed records ``drain_timeout`` to be confirmed, and logs how
many were not.

``bus_to_fifo`` takes queue messages only while a reader has the FIFO open: it starts
its consumer when a reader opens the FIFO, and stops it (the broker hands the unacked
messages back without counting an attempt) when the last reader closes it, so a message
never waits for a reader while its lease runs out. It acks a message only after its
whole record is in the pipe (see :mod:`aiobus.bridges.fifo` for what the pipe
guarantees). An ack that finds the lease gone (it expired under a stalled reader, or the
connection dropped and the broker redelivered it) is logged, not fatal: the record was
written and the message will be written again, so delivery is at least once. Cancelled
in the middle of a record, it first finishes the record, shielded and within
``drain_timeout``, because the reader already holds part of it: a finished record is
acked (it was written, so it must not be delivered again); an unfinished one is not, so
the message is redelivered, and the reader is left holding a partial record (logged).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import msgpack

from ..errors import ConnectionLost, LeaseError
from .fifo import FifoClosedError, FifoReader, FifoWriter
from .framing import (
    DEFAULT_MAX_RECORD,
    Framing,
    Oversize,
    RecordTooLargeError,
    UnencodableRecordError,
)

__all__ = [
    "DEFAULT_DRAIN_TIMEOUT",
    "DEFAULT_WINDOW",
    "BridgeStatistics",
    "FifoBus",
    "bus_to_fifo",
    "fifo_to_bus",
]

logger = logging.getLogger(__name__)

# How long a stopping bridge waits to finish what it holds: bus_to_fifo for its reader to
# take the rest of a record, fifo_to_bus for the broker to confirm what it read. Well
# under the grace a supervisor gives before SIGKILL (docker stop: 10 s, systemd's
# TimeoutStopSec: 90 s), so the bridge, not SIGKILL, decides what happens to them.
DEFAULT_DRAIN_TIMEOUT: Final = 5.0

# Records fifo_to_bus keeps sent but unconfirmed. Enough to keep the socket busy (a
# confirmation comes back within a loop turn or two, and consecutive ones share a frame),
# small enough that a reconnect resends little: 256 short lines are about one pipe buffer.
DEFAULT_WINDOW: Final = 256

_DLQ_HEAD: Final = 256  # bytes of an oversize record kept as its dead letter's body


class _Message(Protocol):
    @property
    def body(self) -> Any: ...


class _QueueMessage(_Message, Protocol):
    @property
    def id(self) -> str: ...
    async def ack(self) -> object: ...
    async def reject(self, *, reason: str) -> object: ...


class _Consumer(Protocol):
    async def __aenter__(self) -> AsyncIterable[_QueueMessage]: ...
    async def __aexit__(self, *exc_info: object) -> object: ...


class FifoBus(Protocol):
    """The part of the aiobus client API the FIFO bridges use."""

    @property
    def connected(self) -> bool: ...
    async def wait_connected(self) -> None: ...
    def send_nowait(
        self, queue: str, body: Any, /, headers: dict[str, str] | None = ...
    ) -> asyncio.Future[None]: ...
    async def publish(self, topic: str, body: Any, /) -> object: ...
    def consume(self, queue: str, /, *, prefetch: int = ...) -> _Consumer: ...
    def subscribe(self, pattern: str, /) -> AsyncIterable[_Message]: ...


@dataclass(slots=True)
class BridgeStatistics:
    """Counters of a running bridge; pass one in to watch it live."""

    records: int = 0  # records forwarded (FIFO→queue: confirmed by the broker)
    oversize: int = 0  # records over max_record: dead-lettered (queue) or dropped (topic)
    unencodable: int = 0  # bus→FIFO: bodies the framing cannot carry (rejected or dropped)
    leases_lost: int = 0  # bus→FIFO: written, but the ack found the lease gone (redelivered)
    unconfirmed: int = 0  # FIFO→queue: sent, not yet confirmed (at most the window)
    resent: int = 0  # FIFO→queue: sent again by the bridge after a reconnect (see fifo_to_bus)


@dataclass(slots=True)
class _Send:
    """A send of fifo_to_bus not yet confirmed, with what it takes to send it again."""

    future: asyncio.Future[None]
    queue: str
    body: Any
    headers: dict[str, str] | None
    record: bool  # a record (counted in stats.records once confirmed), else a dead letter


def _check_target(queue: str | None, topic: str | None) -> str:
    if (queue is None) == (topic is None):
        raise ValueError("give exactly one of queue= and topic=")
    return f"queue {queue}" if queue is not None else f"topic {topic}"


def _every_power_of_two(count: int) -> bool:
    return count & (count - 1) == 0  # rate-limits a repeated log line: 1st, 2nd, 4th, ...


async def fifo_to_bus(
    bus: FifoBus,
    path: str | os.PathLike[str],
    *,
    queue: str | None = None,
    topic: str | None = None,
    framing: Framing = "lines",
    max_record: int = DEFAULT_MAX_RECORD,
    dead_letter: str | None = None,
    window: int = DEFAULT_WINDOW,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    stats: BridgeStatistics | None = None,
    allow_foreign: bool = False,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Send each record written to the FIFO at ``path`` to a queue, or publish it on a topic.

    Runs until cancelled; reports readiness (FIFO open) through ``task_status``. A record
    that is valid UTF-8 is sent as a ``str`` body, as ``aiobus send`` does with text; any
    other record passes through as ``bytes``. With the ``msgpack`` framing the decoded
    object is sent. A record over ``max_record`` sent to a queue is dead-lettered to
    ``dead_letter`` (default ``<queue>.dlq``, the queue's default) with reason
    ``too-large`` (headers ``x-dead-reason``, ``x-original-queue``, ``x-record-length``,
    ``x-dead-time``; body: its first 256 bytes); for a topic it is logged and counted in
    ``stats.oversize``.

    Sends to a queue are confirmed, at most ``window`` at a time: the bridge reads the
    next record only while fewer are unconfirmed, and reads nothing while the bus is
    disconnected (the module docstring says what writers see then). Across a broker
    restart a client connected with ``reconnect=True`` sends the unconfirmed records
    again, so none is lost; it does so under the same message id only to a broker that
    deduplicates, and gives the send back otherwise: then the bridge sends the record
    again itself (logged, counted in ``stats.resent``), which may queue it twice.
    Cancelled, the bridge waits up to ``drain_timeout`` seconds,
    shielded, for the records it sent to be confirmed, and logs an error counting those
    that were not. Topic records are published (at most once, like any publish).

    Args:
        bus: a connected client (``aiobus.connect``).
        path: the FIFO; created (mode 0600) if missing.
        queue: the queue to send to; exclusive with ``topic``.
        topic: the topic to publish on.
        framing: how records are delimited (see :data:`~aiobus.bridges.framing.FRAMINGS`).
        max_record: largest record in bytes (default 1 MiB).
        dead_letter: where oversize records of a queue go; pass the queue's
            ``dead_letter`` if it was declared with another one.
        window: most records sent to a queue and not yet confirmed (default 256).
        drain_timeout: seconds to wait for confirmations when cancelled (default 5).
        stats: counters to update; a fresh :class:`BridgeStatistics` if omitted.
        allow_foreign: use an existing FIFO at ``path`` even if it belongs to another
            user or others may read or write it (refused by default: ForeignFifoError).
        task_status: for ``TaskGroup.start``.

    Raises:
        ValueError: not exactly one of ``queue`` and ``topic``, an unknown framing, or a
            window below 1.
        FramingError: the stream broke the framing beyond repair (bad netstring; any
            oversize or invalid msgpack object, after dead-lettering it).
        FifoError: the path is not a FIFO.
        ConnectionClosed, ConnectionLost: the bus was closed, or gave up reconnecting.
        BusError: the broker refused a record (``QueueFull`` for an ``overflow="reject"``
            queue, ``JournalError``, ...).

    Example:
        >>> async with aiobus.connect() as bus, anyio.create_task_group() as tg:  # doctest: +SKIP
        ...     await tg.start(fifo_to_bus, bus, "/run/user/1000/jobs", queue="jobs")
    """
    target = _check_target(queue, topic)
    if window < 1:
        raise ValueError(f"window must be at least 1, not {window}")
    stats = BridgeStatistics() if stats is None else stats
    # Futures of the sends not yet confirmed, oldest first; True for a record (counted in
    # stats.records once confirmed), False for a dead letter.
    in_flight: deque[_Send] = deque()

    async def settle(sent: _Send) -> None:
        try:
            sent.future.result()  # raises what the broker said (QueueFull, ...)
        except ConnectionLost:
            # The client resends what a lost connection left unconfirmed only to a broker
            # that deduplicates (its WELCOME says so); from another it gives the send
            # back. Send it again ourselves: at least once rather than lost.
            await bus.wait_connected()  # raises if the client gave up, or was closed
            stats.resent += 1
            if _every_power_of_two(stats.resent):
                logger.warning(
                    "the broker does not deduplicate: %d records from FIFO %s sent again"
                    " after a reconnect, which may queue them twice", stats.resent, path,
                )  # fmt: skip
            sent.future = bus.send_nowait(sent.queue, sent.body, sent.headers)
            in_flight.append(sent)
            return
        stats.records += sent.record
        stats.unconfirmed -= 1

    async def send(queue: str, body: Any, headers: dict[str, str] | None, record: bool) -> None:
        while in_flight and in_flight[0].future.done():
            await settle(in_flight.popleft())
        while len(in_flight) >= window:
            # asyncio.wait: a cancellation here must not cancel the client's future,
            # which still tells the drain below whether the broker confirmed it.
            await asyncio.wait((in_flight[0].future,))
            await settle(in_flight.popleft())
        if not bus.connected:  # the connection dropped while we waited for the record
            await bus.wait_connected()
        in_flight.append(_Send(bus.send_nowait(queue, body, headers), queue, body, headers, record))
        stats.unconfirmed += 1

    async def forward(body: Any) -> None:
        if queue is not None:
            await send(queue, body, None, True)
        else:
            assert topic is not None
            await bus.publish(topic, body)
            stats.records += 1

    async def too_large(length: int, head: bytes) -> None:
        stats.oversize += 1
        if queue is not None:
            headers = {
                "x-dead-reason": "too-large",
                "x-original-queue": queue,
                "x-record-length": str(length),
                "x-dead-time": f"{time.time():.6f}",  # as the broker stamps its dead letters
            }
            await send(dead_letter or f"{queue}.dlq", head[:_DLQ_HEAD], headers, False)
        if _every_power_of_two(stats.oversize):
            logger.warning(
                "record of %d bytes from FIFO %s exceeds max_record (%d) and was %s (%d so far)",
                length, path, max_record,
                "dead-lettered" if queue is not None else "dropped", stats.oversize,
            )  # fmt: skip

    reader = FifoReader(path, framing=framing, max_record=max_record,
                        allow_foreign=allow_foreign)
    async with reader:
        logger.info("forwarding FIFO %s to %s", path, target)
        task_status.started()
        try:
            while True:
                if not bus.connected:  # read nothing while the broker is away
                    await bus.wait_connected()
                try:
                    record = await reader.receive()
                except FifoClosedError:
                    return
                except RecordTooLargeError as exc:
                    await too_large(exc.length, exc.head)
                    raise
                if isinstance(record, Oversize):
                    await too_large(record.length, record.head)
                    continue
                await forward(_unpack(record) if framing == "msgpack" else _text_or_bytes(record))
        finally:
            await _drain_sends(in_flight, drain_timeout, path, stats)


async def _drain_sends(
    in_flight: deque[_Send],
    drain_timeout: float,
    path: str | os.PathLike[str],
    stats: BridgeStatistics,
) -> None:
    """On the way out of fifo_to_bus: wait (shielded, bounded) for the sends in flight."""
    if not in_flight:
        return
    futures = [sent.future for sent in in_flight]
    with anyio.CancelScope(shield=True):
        # asyncio.wait, not awaiting each: a timeout must not cancel the client's futures.
        await asyncio.wait(futures, timeout=drain_timeout)
    lost = 0
    for sent in in_flight:
        future = sent.future
        if not future.done() or future.cancelled() or future.exception() is not None:
            lost += 1  # exception() also marks a failed future's error as seen
        else:
            stats.records += sent.record
        stats.unconfirmed -= 1
    if lost:
        logger.error(
            "stopping: %d records read from FIFO %s were not confirmed by the broker within"
            " %g s and may be lost", lost, path, drain_timeout,
        )  # fmt: skip


def _text_or_bytes(record: bytes) -> str | bytes:
    try:
        return record.decode("utf-8")
    except UnicodeDecodeError:
        return record


def _unpack(record: bytes) -> Any:
    # The codec has checked the object with the same options, so this cannot fail.
    return msgpack.unpackb(record, raw=False, strict_map_key=False)


def _to_record(body: Any, framing: str) -> bytes:
    if framing == "msgpack":
        try:
            return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]
        except (TypeError, ValueError, OverflowError) as exc:
            raise UnencodableRecordError(f"body cannot be packed as msgpack: {exc}") from exc
    if isinstance(body, bytes | bytearray | memoryview):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    raise UnencodableRecordError(
        f"body of type {type(body).__name__} is neither bytes nor str; use framing='msgpack'"
    )


async def bus_to_fifo(
    bus: FifoBus,
    path: str | os.PathLike[str],
    *,
    queue: str | None = None,
    topic: str | None = None,
    framing: Framing = "lines",
    prefetch: int = 16,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    stats: BridgeStatistics | None = None,
    allow_foreign: bool = False,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> BridgeStatistics:
    """Write each message from a queue or topic to the FIFO at ``path``, one record each.

    A queue is consumed only while a reader has the FIFO open: the consumer starts when
    a reader opens it and stops when the last reader closes it, handing its unacked
    messages back to the queue without counting an attempt; then the bridge waits for
    the next reader. So a message is never leased while nobody reads, and cannot expire
    waiting for one. A queue message is acked only after its whole record is in the
    pipe; a body the framing cannot carry (not bytes/str for byte framings, a newline
    with ``lines``) is rejected with reason ``unencodable``. An ack or reject that finds
    the lease gone (``LeaseError``: the reader stalled past the queue's ``ack_timeout``,
    or the connection dropped) is logged at WARNING and counted in
    ``stats.leases_lost``; the message comes again (at least once).

    A topic is subscribed to at once; its messages wait for a reader in the subscription
    (which drops the oldest beyond its limit, as topics do). Messages that cannot be
    framed are logged and counted. Bodies are written as bytes (``str`` as UTF-8), or
    packed with the ``msgpack`` framing. A reader that goes away mid-record gets the
    record again whole once a new reader arrives. Across a broker restart a client
    connected with ``reconnect=True`` resumes the consumer or subscription by itself.

    Cancelled mid-record (the reader holds part of it), the bridge first finishes the
    record, shielded from the cancellation, for at most ``drain_timeout`` seconds; then
    the cancellation goes on. A finished record's queue message is acked. If the timeout
    passes first, the message is not acked: it goes back to the queue when the consumer
    stops, without counting an attempt, and will be written again whole. But the reader
    then holds a partial record, and the next record written to the FIFO joins it into
    one record nobody sent: an error is logged naming the FIFO and the bytes missing. A
    topic message is finished the same way (there is nothing to ack; on timeout it is lost).
    A record of which nothing was written yet is just not written (nor acked).

    Args:
        bus: a connected client (``aiobus.connect``).
        path: the FIFO; created (mode 0600) if missing.
        queue: the queue to consume; exclusive with ``topic``.
        topic: the topic pattern to subscribe to.
        framing: how records are delimited (see :data:`~aiobus.bridges.framing.FRAMINGS`).
        prefetch: unacked queue messages in flight while a reader is there.
        drain_timeout: seconds to finish a record when cancelled mid-record (default 5).
        stats: counters to update; a fresh :class:`BridgeStatistics` if omitted.
        allow_foreign: use an existing FIFO at ``path`` even if it belongs to another
            user or others may read or write it (refused by default: ForeignFifoError).
        task_status: for ``TaskGroup.start``; started once the FIFO exists.

    Returns:
        The counters, when the subscription or consumer ends (the bus closed).

    Raises:
        ValueError: not exactly one of ``queue`` and ``topic``, or an unknown framing.
        FifoError: the path is not a FIFO.
        ConnectionClosed, ConnectionLost: the bus was closed, or gave up reconnecting.

    Example:
        >>> async with aiobus.connect() as bus:  # doctest: +SKIP
        ...     await bus_to_fifo(bus, "/run/user/1000/out", queue="results")
    """
    target = _check_target(queue, topic)
    stats = BridgeStatistics() if stats is None else stats
    async with FifoWriter(path, framing=framing, allow_foreign=allow_foreign) as writer:
        logger.info("forwarding %s to FIFO %s", target, path)
        task_status.started()
        if queue is not None:
            while True:
                await writer.wait_reader()
                if not bus.connected:
                    await bus.wait_connected()
                logger.info("FIFO %s has a reader: consuming %s", path, target)
                with anyio.CancelScope() as while_read:
                    try:
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(_cancel_when_reader_gone, writer, while_read)
                            await _queue_to_fifo(
                                bus.consume(queue, prefetch=prefetch), writer, framing,
                                drain_timeout, stats, target,
                            )  # fmt: skip
                            tg.cancel_scope.cancel()
                    except BaseExceptionGroup as group:
                        # One of the two tasks failed (the other is cancelled): raise what
                        # it raised, as the bridge did before it had a task group.
                        if len(group.exceptions) != 1:
                            raise
                        if not isinstance(group.exceptions[0], ConnectionLost):
                            raise group.exceptions[0] from None
                        # The connection dropped as the consumer started: start it again
                        # once reconnected (wait_connected raises if the client gave up).
                        await bus.wait_connected()
                        continue
                    return stats  # the consumer ended: the bus was closed
                logger.info("reader of FIFO %s went away: stopped consuming %s", path, target)
        assert topic is not None
        async for event in bus.subscribe(topic):
            try:
                await writer.write_record(_to_record(event.body, framing))
            except UnencodableRecordError as exc:
                _count_unencodable(stats, exc, target)
                continue
            except anyio.get_cancelled_exc_class():
                if await _finish_record(writer, drain_timeout, target, queued=False):
                    stats.records += 1
                raise
            stats.records += 1
    return stats


async def _cancel_when_reader_gone(writer: FifoWriter, scope: anyio.CancelScope) -> None:
    await writer.wait_reader_gone()
    scope.cancel()


async def _queue_to_fifo(
    consumer: _Consumer,
    writer: FifoWriter,
    framing: str,
    drain_timeout: float,
    stats: BridgeStatistics,
    target: str,
) -> None:
    """Write a consumer's messages to the FIFO until the consumer ends (or cancelled)."""
    async with consumer as messages:
        async for message in messages:
            try:
                await writer.write_record(_to_record(message.body, framing))
            except UnencodableRecordError as exc:
                _count_unencodable(stats, exc, target)
                await _answer(message, "reject", stats, target)
                continue
            except anyio.get_cancelled_exc_class():
                if await _finish_record(writer, drain_timeout, target, queued=True):
                    await _answer(message, "ack", stats, target)
                    stats.records += 1
                raise
            await _answer(message, "ack", stats, target)
            stats.records += 1


async def _finish_record(
    writer: FifoWriter, drain_timeout: float, target: str, *, queued: bool
) -> bool:
    """After ``write_record`` was cancelled: finish the record if the reader holds part of
    it, shielded from that cancellation and within ``drain_timeout``. True if finished."""
    if not writer.unfinished:
        return False  # nothing of it is in the pipe: nothing to finish, nothing to ack
    finished = False
    with anyio.CancelScope(shield=True), anyio.move_on_after(drain_timeout):
        finished = await writer.finish_record()
    if not finished and writer.unfinished:  # else the reader went away: nothing is torn
        logger.error(
            "stopping: the record from %s to FIFO %s was not finished within the drain"
            " timeout (%g s)%s", target, writer.path, drain_timeout,
            "; its message was not acked and goes back to the queue" if queued else "",
        )  # fmt: skip
    return finished


async def _answer(message: _QueueMessage, verb: str, stats: BridgeStatistics,
                  target: str) -> None:
    """Ack (its record is in the pipe) or reject (unencodable) ``message``; a lease that is
    gone is not fatal: the broker has given the message out again, or will."""
    # A written record must not be delivered again: a cancellation arriving now must not
    # stop the ack.
    with anyio.CancelScope(shield=True):
        try:
            if verb == "ack":
                await message.ack()
            else:
                await message.reject(reason="unencodable")
        except LeaseError as exc:
            stats.leases_lost += 1
            if _every_power_of_two(stats.leases_lost):
                logger.warning(
                    "could not %s message %s from %s (%s): it will be delivered again;"
                    " %d lease(s) lost so far", verb, message.id, target, exc,
                    stats.leases_lost,
                )  # fmt: skip


def _count_unencodable(stats: BridgeStatistics, exc: UnencodableRecordError, target: str) -> None:
    stats.unencodable += 1
    if _every_power_of_two(stats.unencodable):
        logger.warning(
            "message from %s cannot be framed (%s); %d so far", target, exc, stats.unencodable
        )
