"""Bridges between FIFOs and the bus: ``fifo_to_bus`` and ``bus_to_fifo``.

They are written against the client's public API only, typed by :class:`FifoBus`, a
protocol of just the calls they make, so this module does not import the client.

Delivery: ``fifo_to_bus`` sends each record once it is complete (a pipe cannot be acked,
so a record read but not yet sent when the bridge stops is lost). ``bus_to_fifo`` acks a
queue message only after its whole record is in the pipe (see :mod:`aiobus.bridges.fifo`
for what the pipe guarantees). Cancelled in the middle of a record, it first finishes the
record, shielded and within ``drain_timeout``, because the reader already holds part of
it: a finished record is acked (it was written, so it must not be delivered again); an
unfinished one is not, so the message is redelivered, and the reader is left holding a
partial record (logged).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import anyio
import anyio.abc
import msgpack

from .fifo import FifoReader, FifoWriter
from .framing import DEFAULT_MAX_RECORD, Oversize, RecordTooLargeError, UnencodableRecordError

__all__ = ["DEFAULT_DRAIN_TIMEOUT", "BridgeStatistics", "FifoBus", "bus_to_fifo", "fifo_to_bus"]

logger = logging.getLogger(__name__)

# How long a stopping bus_to_fifo waits for its reader to take the rest of a record. Well
# under the grace a supervisor gives before SIGKILL (docker stop: 10 s, systemd's
# TimeoutStopSec: 90 s), so the bridge, not SIGKILL, decides whether the message is acked.
DEFAULT_DRAIN_TIMEOUT: Final = 5.0

_DLQ_HEAD: Final = 256  # bytes of an oversize record kept as its dead letter's body


class _Message(Protocol):
    @property
    def body(self) -> Any: ...


class _QueueMessage(_Message, Protocol):
    async def ack(self) -> object: ...
    async def reject(self, *, reason: str) -> object: ...


class FifoBus(Protocol):
    """The part of the aiobus client API the FIFO bridges use."""

    async def send(
        self, queue: str, body: Any, /, *, headers: dict[str, str] | None = ...
    ) -> object: ...
    async def publish(self, topic: str, body: Any, /) -> object: ...
    def consume(self, queue: str, /, *, prefetch: int = ...) -> AsyncIterable[_QueueMessage]: ...
    def subscribe(self, pattern: str, /) -> AsyncIterable[_Message]: ...


@dataclass(slots=True)
class BridgeStatistics:
    """Counters of a running bridge; pass one in to watch it live."""

    records: int = 0  # records forwarded
    oversize: int = 0  # records over max_record: dead-lettered (queue) or dropped (topic)
    unencodable: int = 0  # bus→FIFO: bodies the framing cannot carry (rejected or dropped)


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
    framing: str = "lines",
    max_record: int = DEFAULT_MAX_RECORD,
    dead_letter: str | None = None,
    stats: BridgeStatistics | None = None,
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

    Args:
        bus: a connected client (``aiobus.connect``).
        path: the FIFO; created (mode 0600) if missing.
        queue: the queue to send to; exclusive with ``topic``.
        topic: the topic to publish on.
        framing: how records are delimited (see :data:`~aiobus.bridges.framing.FRAMINGS`).
        max_record: largest record in bytes (default 1 MiB).
        dead_letter: where oversize records of a queue go; pass the queue's
            ``dead_letter`` if it was declared with another one.
        stats: counters to update; a fresh :class:`BridgeStatistics` if omitted.
        task_status: for ``TaskGroup.start``.

    Raises:
        ValueError: not exactly one of ``queue`` and ``topic``, or an unknown framing.
        FramingError: the stream broke the framing beyond repair (bad netstring; any
            oversize or invalid msgpack object, after dead-lettering it).
        FifoError: the path is not a FIFO.

    Example:
        >>> async with aiobus.connect() as bus, anyio.create_task_group() as tg:  # doctest: +SKIP
        ...     await tg.start(fifo_to_bus, bus, "/run/user/1000/jobs", queue="jobs")
    """
    target = _check_target(queue, topic)
    stats = BridgeStatistics() if stats is None else stats

    async def forward(body: Any) -> None:
        if queue is not None:
            await bus.send(queue, body)
        else:
            assert topic is not None
            await bus.publish(topic, body)

    async def too_large(length: int, head: bytes) -> None:
        stats.oversize += 1
        if queue is not None:
            headers = {
                "x-dead-reason": "too-large",
                "x-original-queue": queue,
                "x-record-length": str(length),
                "x-dead-time": f"{time.time():.6f}",  # as the broker stamps its dead letters
            }
            await bus.send(dead_letter or f"{queue}.dlq", head[:_DLQ_HEAD], headers=headers)
        if _every_power_of_two(stats.oversize):
            logger.warning(
                "record of %d bytes from FIFO %s exceeds max_record (%d) and was %s (%d so far)",
                length, path, max_record,
                "dead-lettered" if queue is not None else "dropped", stats.oversize,
            )  # fmt: skip

    reader = FifoReader(path, framing=framing, max_record=max_record)
    async with reader:
        logger.info("forwarding FIFO %s to %s", path, target)
        task_status.started()
        try:
            async for record in reader:
                if isinstance(record, Oversize):
                    await too_large(record.length, record.head)
                    continue
                await forward(_unpack(record) if framing == "msgpack" else _text_or_bytes(record))
                stats.records += 1
        except RecordTooLargeError as exc:
            await too_large(exc.length, exc.head)
            raise


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
    framing: str = "lines",
    prefetch: int = 16,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    stats: BridgeStatistics | None = None,
    task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
) -> BridgeStatistics:
    """Write each message from a queue or topic to the FIFO at ``path``, one record each.

    A queue message is acked only after its whole record is in the pipe; a body the
    framing cannot carry (not bytes/str for byte framings, a newline with ``lines``) is
    rejected with reason ``unencodable``. Topic messages that cannot be framed are logged
    and counted. Bodies are written as bytes (``str`` as UTF-8), or packed with the
    ``msgpack`` framing. Waits for a reader without blocking; a reader that goes away
    mid-record gets the record again whole once a new reader arrives.

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
        prefetch: unacked queue messages in flight.
        drain_timeout: seconds to finish a record when cancelled mid-record (default 5).
        stats: counters to update; a fresh :class:`BridgeStatistics` if omitted.
        task_status: for ``TaskGroup.start``; started once the FIFO exists.

    Returns:
        The counters, when the subscription or consumer ends (the bus closed).

    Raises:
        ValueError: not exactly one of ``queue`` and ``topic``, or an unknown framing.
        FifoError: the path is not a FIFO.

    Example:
        >>> async with aiobus.connect() as bus:  # doctest: +SKIP
        ...     await bus_to_fifo(bus, "/run/user/1000/out", queue="results")
    """
    target = _check_target(queue, topic)
    stats = BridgeStatistics() if stats is None else stats
    async with FifoWriter(path, framing=framing) as writer:
        logger.info("forwarding %s to FIFO %s", target, path)
        task_status.started()
        if queue is not None:
            async for message in bus.consume(queue, prefetch=prefetch):
                try:
                    await writer.write_record(_to_record(message.body, framing))
                except UnencodableRecordError as exc:
                    _count_unencodable(stats, exc, target)
                    await message.reject(reason="unencodable")
                    continue
                except anyio.get_cancelled_exc_class():
                    if await _finish_record(writer, drain_timeout, target, queued=True):
                        await _ack_written(message)
                        stats.records += 1
                    raise
                await _ack_written(message)
                stats.records += 1
        else:
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


async def _ack_written(message: _QueueMessage) -> None:
    # The record is in the pipe, so the message must not be delivered again: a
    # cancellation arriving now must not stop the ack.
    with anyio.CancelScope(shield=True):
        await message.ack()


def _count_unencodable(stats: BridgeStatistics, exc: UnencodableRecordError, target: str) -> None:
    stats.unencodable += 1
    if _every_power_of_two(stats.unencodable):
        logger.warning(
            "message from %s cannot be framed (%s); %d so far", target, exc, stats.unencodable
        )
