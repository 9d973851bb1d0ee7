"""Replay: fold journal records, segment by segment, into the live state. No I/O, no clock.

Theory of operation
-------------------
Rules (docs/journal.md, "Recovery rules"): a Sent for a (qid, seq) already live
replaces it (compaction copies a message forward with its state folded in); records
about messages or queues that are not live are ignored (their Sent was compacted away,
or they follow a removal); a queue redeclared after deletion gets a new qid.
:meth:`Replay.finish` counts each unanswered delivery as one failed attempt, with the
reason text ``broker-restart`` and no consumer of its own: the message keeps the consumer
of its previous failure, as the core's ``last_consumer`` does across failures.

Two ways in, one set of rules. :meth:`Replay.apply` folds one decoded record (tests,
and records of the rare kinds). :meth:`Replay.read_segment` is what recovery runs: one
flat loop over a segment's bytes that checks each frame and reads Sent (without failure
details: those are compaction copies of failed messages, and rare), Delivered and
Removed straight into the state, with no record object and no call per record, as
msgpack and redis keep their hot loops flat. It hands every other kind to
:func:`~.records.decode_body` and :meth:`apply`, and stops at the first record that
:func:`~.records.decode_body` would refuse (a short body, an unknown reason), so it
accepts exactly what :func:`~.records.decode_segment` does; the torn-or-corrupt verdict
on what follows is :func:`~.records.classify_damage`'s, as before.

Deduplication windows (version 3): a queue's window is rebuilt from the DedupIds records
(a segment starts with each queue's whole window, so deleting older segments loses
nothing) and from the Sent records with an ``accepted`` time (flag 8), keyed by the id
inside the packed message. Acks do not remove ids from it, a purge does not, a queue
deletion does; which ids are still within ``dedup_window`` the core decides on restore,
by wall time. The flat loop reads flag 8 too: the Python client gives every confirmed
SEND a seq, so those are the common Sent.

Messages arrive in sequence order unless compaction copied old ones forward past newer
ones; a queue notes when that happened (``ordered``), and :meth:`finish` sorts only
those queues.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

from . import records as r

__all__ = ["RESTART_REASON", "LiveMessage", "LiveQueue", "Replay"]


@dataclass(slots=True)
class LiveMessage:
    """A message replay found live. ``segment`` is the segment holding its Sent record and
    ``size`` that record's bytes (the store's compaction needs both; 0: not known);
    ``in_flight``: a delivery was recorded and not answered yet; ``last_reason`` and
    ``last_consumer``: its last failure's reason text and consumer (pid, uid)."""

    seq: int
    message: bytes
    failures: int
    expires: float | None
    due: float | None
    segment: int
    size: int = 0
    in_flight: bool = False
    last_reason: str | None = None
    last_consumer: tuple[int, int] | None = None


@dataclass(slots=True)
class LiveQueue:
    qid: int
    name: str
    settings: dict[str, Any]
    next_seq: int
    messages: dict[int, LiveMessage]
    ordered: bool = True  # ``messages`` was filled in sequence order
    dedup: dict[str, float] = field(default_factory=dict)  # id -> accepted-at (epoch)


_SENT = r.RecordType.SENT
_DELIVERED = r.RecordType.DELIVERED
_REMOVED = r.RecordType.REMOVED
_REASONS = frozenset(r.RemovalReason)
# The reason text of the failed attempt a crash is counted as (PROTOCOL.md §8 Attempts).
RESTART_REASON = "broker-restart"


class Replay:
    """Folds records, segment by segment in order, into the live state (module docstring).
    Set ``segment`` before applying a segment's records by hand."""

    __slots__ = ("bytes", "queues", "records", "segment", "version")

    def __init__(self) -> None:
        self.queues: dict[int, LiveQueue] = {}
        self.segment = 0
        self.version = r.FORMAT_VERSION  # of the last segment read
        self.records = 0
        self.bytes = 0

    def apply(self, record: r.Record, size: int = 0) -> None:
        """Fold one record; ``size`` is its encoded length (for a Sent, the owner index)."""
        self.records += 1
        match record:
            case r.Sent(qid, seq, message, failures, expires, due, reason, consumer, accepted):
                queue = self.queues.get(qid)
                if queue is not None:
                    if accepted is not None:
                        mid = r.message_id(message)
                        if mid is not None and accepted >= queue.dedup.get(mid, -1.0):
                            # The latest acceptance counts, in its place in the order
                            # (which decides what leaves first by count): a later record
                            # of the same time is a later acceptance in the same turn
                            # (compaction's copies carry no accepted time).
                            queue.dedup.pop(mid, None)
                            queue.dedup[mid] = accepted
                    if seq >= queue.next_seq:
                        queue.next_seq = seq + 1
                    elif seq not in queue.messages:
                        queue.ordered = False
                    queue.messages[seq] = LiveMessage(seq, message, failures, expires, due,
                                                      self.segment, size, False, reason,
                                                      consumer)
            case r.Delivered(qid, seq):
                msg = self._message(qid, seq)
                if msg is not None:
                    msg.in_flight = True
            case r.Failed(qid, seq, failures, due, reason, consumer):
                msg = self._message(qid, seq)
                if msg is not None:
                    msg.failures, msg.due, msg.in_flight = failures, due, False
                    msg.last_reason, msg.last_consumer = reason, consumer
            case r.Removed(qid, seq, _):
                queue = self.queues.get(qid)
                if queue is not None:
                    queue.messages.pop(seq, None)
            case r.QueueDeclared(qid, name, settings, next_seq):
                queue = self.queues.get(qid)
                if queue is None:
                    self.queues[qid] = LiveQueue(qid, name, settings, next_seq, {})
                else:
                    queue.settings = settings
                    queue.next_seq = max(queue.next_seq, next_seq)
            case r.QueuePurged(qid):
                queue = self.queues.get(qid)
                if queue is not None:  # as RabbitMQ: messages out for delivery stay
                    queue.messages = {s: m for s, m in queue.messages.items() if m.in_flight}
            case r.QueueDeleted(qid):
                self.queues.pop(qid, None)
            case r.DedupIds(qid, entries):
                queue = self.queues.get(qid)
                if queue is not None:
                    dedup = queue.dedup
                    for mid, at in entries:
                        if at >= dedup.get(mid, -1.0):
                            dedup.pop(mid, None)
                            dedup[mid] = at

    def _message(self, qid: int, seq: int) -> LiveMessage | None:
        queue = self.queues.get(qid)
        return None if queue is None else queue.messages.get(seq)

    def read_segment(self, data: bytes, *, last: bool) -> r.Decoded:
        """Apply every good record of one segment's bytes, in one flat loop.

        Returns what :func:`~.records.decode_segment` would, except that ``records`` is
        empty: they were applied. On damage the records before it are applied too; the
        caller refuses the whole replay if the verdict is corrupt.
        """
        number = r.read_header(data)
        if number is None:
            return r.Decoded(None, [], 0, 0, False, None)
        self.segment = number
        self.version = r.header_version(data)
        self.bytes += len(data)
        queues = self.queues
        view = memoryview(data)
        size = len(data)
        at = r.HEADER_SIZE
        count = 0
        frame = r.FRAME.unpack_from
        sent_head = r.SENT_HEAD.unpack_from
        qseq = r.QSEQ.unpack_from
        removed_head = r.REMOVED_HEAD.unpack_from
        f64 = r.F64.unpack_from
        message_id = r.message_id
        crc32 = zlib.crc32
        reasons = _REASONS
        max_record = r.MAX_RECORD
        while at + 8 <= size:
            crc, length = frame(data, at)
            end = at + 8 + length
            # (crc32 of a bytes slice beats one of a memoryview slice: 0.41 vs 0.57 µs)
            if not 0 < length <= max_record or end > size or crc32(data[at + 4:end]) != crc:
                break
            kind = data[at + 8]
            # (data[at + 25]: the Sent's flags; details (4) and unknown ones go the general
            # way, see above)
            if kind == _SENT and length >= 18 and not data[at + 25] & 0xF4:
                _, qid, seq, failures, flags = sent_head(data, at + 8)
                start = at + 26
                expires = due = accepted = None
                if flags:
                    if start + 8 * ((flags & 1) + (flags >> 1 & 1) + (flags >> 3)) > end:
                        break  # decode_body refuses it (struct.error)
                    if flags & 1:
                        (expires,) = f64(data, start)
                        start += 8
                    if flags & 2:
                        (due,) = f64(data, start)
                        start += 8
                    if flags & 8:
                        (accepted,) = f64(data, start)
                        start += 8
                queue = queues.get(qid)
                if queue is not None:
                    message = data[start:end]
                    if accepted is not None:
                        mid = message_id(message)
                        if mid is not None and accepted >= queue.dedup.get(mid, -1.0):
                            queue.dedup.pop(mid, None)
                            queue.dedup[mid] = accepted
                    messages = queue.messages
                    if seq >= queue.next_seq:
                        queue.next_seq = seq + 1
                    elif seq not in messages:
                        queue.ordered = False
                    messages[seq] = LiveMessage(seq, message, failures, expires, due,
                                                number, end - at)
            elif kind == _DELIVERED and length >= 13:
                _, qid, seq = qseq(data, at + 8)
                queue = queues.get(qid)
                if queue is not None:
                    msg = queue.messages.get(seq)
                    if msg is not None:
                        msg.in_flight = True
            elif kind == _REMOVED and length >= 14:
                _, qid, seq, reason = removed_head(data, at + 8)
                if reason not in reasons:
                    break  # decode_body refuses it (RemovalReason raises ValueError)
                queue = queues.get(qid)
                if queue is not None:
                    queue.messages.pop(seq, None)
            else:
                try:
                    record = r.decode_body(view[at + 8:end])
                except r.DECODE_ERRORS:
                    break
                self.apply(record, end - at)
                count -= 1  # apply counted it
            count += 1
            at = end
        self.records += count
        return r.classify_damage(data, number, [], at, last=last)

    def finish(self) -> list[tuple[int, LiveMessage]]:
        """End of the journal: a delivery nobody answered was an attempt that failed,
        for the reason ``broker-restart`` (its consumer stays the previous failure's).
        Returns those messages, so the store can journal the failure it inferred."""
        failed = []
        for queue in self.queues.values():
            if not queue.ordered:
                queue.messages = dict(sorted(queue.messages.items()))
                queue.ordered = True
            for msg in queue.messages.values():
                if msg.in_flight:
                    msg.failures += 1
                    msg.in_flight = False
                    msg.last_reason = RESTART_REASON
                    failed.append((queue.qid, msg))
        return failed
