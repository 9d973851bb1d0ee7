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
msgpack and redis keep their hot loops flat (the run records of version 4 stand for many
Delivered or Removed each: one decode and one call per run). It hands every other kind to
:func:`~.decode.decode_body` and :meth:`apply`, and stops at the first record that
:func:`~.decode.decode_body` would refuse (a short body, an unknown reason), so it
accepts exactly what :func:`~.decode.decode_segment` does; the torn-or-corrupt verdict
on what follows is :func:`~.decode.classify_damage`'s, as before.

Deduplication windows (version 3): a queue's window is rebuilt from the DedupIds records
(a segment starts with each queue's whole window, so deleting older segments loses
nothing) and from the Sent records with an ``accepted`` time (flag 8), keyed by the id
inside the packed message. Acks do not remove ids from it, a purge does not, a queue
deletion does; which ids are still within ``dedup_window`` the core decides on restore,
by wall time. The flat loop reads flag 8 too: the Python client gives every confirmed
SEND a seq, so those are the common Sent.

Two kinds of live message. Most are *stateless*: sent, never failed, no expiry or due
time, not out for delivery. A queue keeps those as their packed bytes alone
(``LiveQueue.plain``, seq -> bytes), the rest as a :class:`LiveMessage`
(``LiveQueue.messages``); a stateless message moves to ``messages`` when a Failed names
it, and one out for delivery is only noted (``LiveQueue.in_flight``): most Delivered
records are followed by their Removed. ``LiveQueue.owner`` holds, for every live message,
``segment << 32 | size`` of its Sent record, the store's owner index as is (appending.py). So
replaying a queued message costs two dict entries, not an object. :meth:`LiveQueue.live`
gives the whole state as LiveMessages (tests, and the rare reader).

Messages arrive in sequence order unless compaction copied old ones forward past newer
ones; a queue notes when that happened (``ordered``), and :meth:`finish` sorts only
those queues (``messages`` it sorts whenever it holds more than one).
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from . import decode as d
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
    messages: dict[int, LiveMessage]  # live messages with state (module docstring)
    plain: dict[int, bytes] = field(default_factory=dict)  # stateless: seq -> packed
    # Every live message (both kinds): seq -> segment << 32 | its Sent record's bytes.
    owner: dict[int, int] = field(default_factory=dict)
    in_flight: set[int] = field(default_factory=set)  # of ``plain``: delivered, unanswered
    ordered: bool = True  # ``plain`` was filled in sequence order
    dedup: dict[str, float] = field(default_factory=dict)  # id -> accepted-at (epoch)

    def stateful(self, seq: int) -> LiveMessage | None:
        """The live message ``seq`` as a LiveMessage (moved out of ``plain`` if it was
        stateless), or None if it is not live."""
        msg = self.messages.get(seq)
        if msg is None:
            message = self.plain.pop(seq, None)
            if message is None:
                return None
            entry = self.owner[seq]
            in_flight = seq in self.in_flight
            if in_flight:
                self.in_flight.discard(seq)
            msg = self.messages[seq] = LiveMessage(seq, message, 0, None, None, entry >> 32,
                                                   entry & 0xFFFFFFFF, in_flight)
        return msg

    def live(self) -> dict[int, LiveMessage]:
        """Every live message as a LiveMessage, in sequence order (a copy)."""
        every = dict(self.messages)
        for seq, message in self.plain.items():
            entry = self.owner[seq]
            every[seq] = LiveMessage(seq, message, 0, None, None, entry >> 32,
                                     entry & 0xFFFFFFFF, seq in self.in_flight)
        return dict(sorted(every.items()))


_SENT = r.RecordType.SENT
_DELIVERED = r.RecordType.DELIVERED
_REMOVED = r.RecordType.REMOVED
_SENT_RUN = r.RecordType.SENT_RUN
_REASONS = frozenset(r.RemovalReason)
_FRAMED_HEAD = struct.Struct("<IIBIQIB")  # crc, length, then SENT_HEAD's fields
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
                        mid = d.message_id(message)
                        if mid is not None and accepted >= queue.dedup.get(mid, -1.0):
                            # The latest acceptance counts, in its place in the order
                            # (which decides what leaves first by count): a later record
                            # of the same time is a later acceptance in the same turn
                            # (compaction's copies carry no accepted time).
                            queue.dedup.pop(mid, None)
                            queue.dedup[mid] = accepted
                    if not size:  # (a record applied by hand, without its size)
                        size = len(r.encode_sent(qid, seq, message, failures, expires, due,
                                                 reason, consumer, accepted))
                    stateless = (not failures and expires is None and due is None
                                 and reason is None and consumer is None)
                    self._sent(queue, seq, message, size, None if stateless else
                               LiveMessage(seq, message, failures, expires, due,
                                           self.segment, size, False, reason, consumer))
            case r.SentRun(qid, first, run, accepted):  # as many stateless Sent
                queue = self.queues.get(qid)
                if queue is not None:
                    self._sent_run(queue, first, run, accepted)
            case r.Delivered(qid, seq):
                queue = self.queues.get(qid)
                if queue is not None:
                    msg = queue.messages.get(seq)
                    if msg is not None:
                        msg.in_flight = True
                    elif seq in queue.plain:
                        queue.in_flight.add(seq)
            case r.Failed(qid, seq, failures, due, reason, consumer):
                queue = self.queues.get(qid)
                msg = None if queue is None else queue.stateful(seq)
                if msg is not None:
                    msg.failures, msg.due, msg.in_flight = failures, due, False
                    msg.last_reason, msg.last_consumer = reason, consumer
            case r.Removed(qid, seq, _):
                queue = self.queues.get(qid)
                if queue is not None:
                    self._removed(queue, seq)
            case r.DeliveredRun(qid, seqs):  # as many Delivered in a row
                queue = self.queues.get(qid)
                if queue is not None:
                    plain, flying, messages = queue.plain, queue.in_flight, queue.messages
                    for seq in seqs:
                        if seq in plain:
                            flying.add(seq)
                        else:
                            msg = messages.get(seq)
                            if msg is not None:
                                msg.in_flight = True
            case r.RemovedRun(qid, _, seqs):  # as many Removed in a row
                queue = self.queues.get(qid)
                if queue is not None:
                    for seq in seqs:
                        self._removed(queue, seq)
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
                    flying = queue.in_flight
                    queue.messages = {s: m for s, m in queue.messages.items() if m.in_flight}
                    queue.plain = {s: m for s, m in queue.plain.items() if s in flying}
                    queue.owner = {s: e for s, e in queue.owner.items()
                                   if s in flying or s in queue.messages}
            case r.QueueDeleted(qid):
                self.queues.pop(qid, None)
            case r.DedupRuns(qid, runs):  # (version 4: a segment head's window)
                queue = self.queues.get(qid)
                if queue is not None:
                    dedup = queue.dedup
                    for prefix, first, last, at in runs:
                        for seq in range(first, last + 1):
                            mid = prefix + str(seq)
                            if at >= dedup.get(mid, -1.0):
                                dedup.pop(mid, None)
                                dedup[mid] = at
            case r.DedupIds(qid, entries):
                queue = self.queues.get(qid)
                if queue is not None:
                    dedup = queue.dedup
                    for mid, at in entries:
                        if at >= dedup.get(mid, -1.0):
                            dedup.pop(mid, None)
                            dedup[mid] = at

    def _sent(self, queue: LiveQueue, seq: int, message: bytes, size: int,
              msg: LiveMessage | None) -> None:
        """A Sent for ``seq`` of ``size`` bytes: a new live message, or the copy that
        replaces it; ``msg`` its state, None if it is stateless. (The flat loop does the
        same inline for a stateless one.)"""
        owner = queue.owner
        if seq >= queue.next_seq:
            queue.next_seq = seq + 1
        elif seq not in owner:
            queue.ordered = False
        owner[seq] = self.segment << 32 | size
        if msg is None:
            if seq in queue.messages:
                del queue.messages[seq]
                queue.ordered = False  # it joins ``plain`` at the end
            queue.in_flight.discard(seq)
            queue.plain[seq] = message
        else:
            if queue.plain.pop(seq, None) is not None:
                queue.in_flight.discard(seq)
            queue.messages[seq] = msg

    def _sent_run(self, queue: LiveQueue, first: int, messages: list[bytes],
                  accepted: float | None) -> None:
        """A SentRun: each message as a stateless Sent of its bytes and 4 (its length:
        what the store's owner index counts for it)."""
        dedup = queue.dedup
        owner, plain = queue.owner, queue.plain
        base = self.segment << 32
        for seq, message in enumerate(messages, first):
            if accepted is not None:
                mid = d.message_id(message)
                if mid is not None and accepted >= dedup.get(mid, -1.0):
                    dedup.pop(mid, None)
                    dedup[mid] = accepted
            if seq in owner or seq < queue.next_seq:
                self._sent(queue, seq, message, len(message) + 4, None)
            else:  # a new stateless message (the common case): _sent, inline
                queue.next_seq = seq + 1
                owner[seq] = base | len(message) + 4
                plain[seq] = message

    @staticmethod
    def _removed(queue: LiveQueue, seq: int) -> None:
        if queue.owner.pop(seq, None) is not None:
            if queue.plain.pop(seq, None) is None:
                del queue.messages[seq]
            elif queue.in_flight:
                queue.in_flight.discard(seq)

    def read_segment(self, data: bytes, *, last: bool) -> d.Decoded:
        """Apply every good record of one segment's bytes, in one flat loop.

        Returns what :func:`~.decode.decode_segment` would, except that ``records`` is
        empty: they were applied. On damage the records before it are applied too; the
        caller refuses the whole replay if the verdict is corrupt.
        """
        number = d.read_header(data)
        if number is None:
            return d.Decoded(None, [], 0, 0, False, None)
        self.segment = number
        self.version = d.header_version(data)
        self.bytes += len(data)
        queues = self.queues
        view = memoryview(data)
        size = len(data)
        at = r.HEADER_SIZE
        count = 0
        frame = r.FRAME.unpack_from
        f64 = r.F64.unpack_from
        message_id = d.message_id
        crc32 = zlib.crc32
        reasons = _REASONS
        max_record = r.MAX_RECORD
        # One unpack reads a record's frame and the fixed head the three common kinds
        # share (type, qid, seq: a Delivered is just that), and the u32 and u8 after it:
        # a Sent's failures and flags, a Removed's reason in the u32's low byte (for a
        # Delivered they are the next record's bytes, unused). Within 26 bytes of the end
        # of the data a record goes the general way (kind -1).
        head = _FRAMED_HEAD.unpack_from
        last_qid, queue = -1, None
        while at + 8 <= size:
            if at + 26 <= size:
                crc, length, kind, qid, seq, failures, flags = head(data, at)
            else:
                crc, length = frame(data, at)
                kind = qid = seq = failures = flags = -1
            end = at + 8 + length
            # (crc32 of a bytes slice beats one of a memoryview slice: 0.41 vs 0.57 µs)
            if not 0 < length <= max_record or end > size or crc32(data[at + 4:end]) != crc:
                break
            if qid != last_qid:  # records come in runs of one queue
                last_qid, queue = qid, queues.get(qid)
            # (flags: details (4) and unknown ones go the general way, see above)
            if kind == _SENT and length >= 18 and not flags & 0xF4:
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
                if queue is not None:
                    message = data[start:end]
                    if accepted is not None:
                        mid = message_id(message)
                        if mid is not None and accepted >= queue.dedup.get(mid, -1.0):
                            queue.dedup.pop(mid, None)
                            queue.dedup[mid] = accepted
                    owner = queue.owner
                    if failures or expires is not None or due is not None or seq in owner:
                        self._sent(queue, seq, message, end - at, None if not (
                            failures or expires is not None or due is not None)
                            else LiveMessage(seq, message, failures, expires, due, number,
                                             end - at))
                    else:  # a new stateless message (the common case): _sent, inline
                        if seq >= queue.next_seq:
                            queue.next_seq = seq + 1
                        else:
                            queue.ordered = False
                        owner[seq] = number << 32 | end - at
                        queue.plain[seq] = message
            elif kind == _SENT_RUN:
                try:
                    run = d.decode_body(view[at + 8:end])
                except d.DECODE_ERRORS:
                    break
                if queue is not None:
                    assert type(run) is r.SentRun
                    self._sent_run(queue, run.first, run.messages, run.accepted)
            elif kind == _DELIVERED and length >= 13:
                if queue is not None:
                    if seq in queue.plain:
                        queue.in_flight.add(seq)
                    else:
                        msg = queue.messages.get(seq)
                        if msg is not None:
                            msg.in_flight = True
            elif kind == _REMOVED and length >= 14:
                if failures & 0xFF not in reasons:
                    break  # decode_body refuses it (RemovalReason raises ValueError)
                if queue is not None and queue.owner.pop(seq, None) is not None:
                    if queue.plain.pop(seq, None) is None:  # _removed, inline
                        del queue.messages[seq]
                    elif queue.in_flight:
                        queue.in_flight.discard(seq)
            else:
                try:
                    record = d.decode_body(view[at + 8:end])
                except d.DECODE_ERRORS:
                    break
                self.apply(record, end - at)
                last_qid = -1  # it may have declared or deleted a queue
                count -= 1  # apply counted it
            count += 1
            at = end
        self.records += count
        return d.classify_damage(data, number, [], at, last=last)

    def finish(self) -> list[tuple[int, LiveMessage]]:
        """End of the journal: a delivery nobody answered was an attempt that failed,
        for the reason ``broker-restart`` (its consumer stays the previous failure's).
        Returns those messages, so the store can journal the failure it inferred."""
        failed = []
        for queue in self.queues.values():
            for seq in list(queue.in_flight):  # stateless ones: now they failed once
                msg = queue.stateful(seq)
                assert msg is not None and msg.in_flight
            if not queue.ordered:
                queue.plain = dict(sorted(queue.plain.items()))
                queue.ordered = True
            if len(queue.messages) > 1:
                queue.messages = dict(sorted(queue.messages.items()))
            for msg in queue.messages.values():
                if msg.in_flight:
                    msg.failures += 1
                    msg.in_flight = False
                    msg.last_reason = RESTART_REASON
                    failed.append((queue.qid, msg))
        return failed
