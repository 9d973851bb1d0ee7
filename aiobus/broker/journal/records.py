"""Journal records: their types, their encoding and the segment header (:mod:`.decode`
reads them back). No I/O, no clock.

Theory of operation
-------------------
A segment file is a header followed by records, each framed as::

    crc: u32 LE | length: u32 LE | body: `length` bytes      (body[0] is the record type)

``crc`` is zlib's CRC-32 of the four length bytes and the body (one call over one
contiguous slice), so a flipped bit in the
length is caught like one in the body (docs/journal.md says why CRC-32 and not CRC32C
or xxhash). Queues are named by a small integer ``qid`` that a :class:`QueueDeclared`
record binds to the queue's name; every segment starts by re-declaring each live queue,
so any segment can be read, compacted or dropped without the ones before it.

Format versions. The header's version says which records a segment may hold, so that an
older broker refuses a segment it would misread rather than misread it. Version 2 added a
message's last failure (reason text, consumer) to Failed, as a msgpack tail after the
fixed part, and to Sent, behind flag bit 4 (docs/journal.md). Version 3 added the
deduplication window of resendable SENDs: Sent flag bit 8 (the time the message's id
entered its queue's window) and the DedupIds record (ids with those times; a segment
starts with each queue's whole window). Version 4 added the run records: DeliveredRun
and RemovedRun say what as many Delivered (Removed, of one reason) records in a row of
one queue would, where those are 21 (22) bytes each: about one byte a seq when each is
1-255 above the one before (the store merges what the core journals in a row;
docs/journal.md "Runs"). Version 5 added SentRun: stateless messages of one queue with
consecutive seqs (and one accepted time, or none), as one record with one checksum; 4
bytes a message besides its own, where a Sent adds 26 (34 with an accepted time). A
segment of an older version is a version 5 segment that happens to hold none of what
came later, so all are read; records are only ever appended to a segment of the current version
(:meth:`~.store.Journal.open` rotates off an older one).

Records are encoded by plain functions returning ``bytes`` (no object per record on the
send path, the benchmarks decide that), and the hot ones (Sent, Delivered, Removed) are
appended to the store's write buffer by the ``append_*`` functions, which write the same
bytes without the intermediate objects. :mod:`.decode` reads records back into the frozen
dataclasses below and says which damage is torn and which corrupt.
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from enum import IntEnum
from operator import sub
from typing import Any, Final

import msgpack

__all__ = [
    "BASE",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAX_RECORD",
    "READABLE_VERSIONS",
    "DedupIds",
    "DedupRuns",
    "Delivered",
    "DeliveredRun",
    "Failed",
    "QueueDeclared",
    "QueueDeleted",
    "QueuePurged",
    "Record",
    "RecordType",
    "RemovalReason",
    "Removed",
    "RemovedRun",
    "Sent",
    "SentRun",
    "append_delivered",
    "append_removed",
    "append_sent",
    "append_sent_run",
    "encode_declared",
    "encode_dedup",
    "encode_dedup_runs",
    "encode_deleted",
    "encode_delivered",
    "encode_delivered_run",
    "encode_failed",
    "encode_purged",
    "encode_removed",
    "encode_removed_run",
    "encode_sent",
    "segment_header",
]

MAGIC: Final = b"AIOBUSJ\x00"
FORMAT_VERSION: Final = 5
READABLE_VERSIONS: Final = frozenset({1, 2, 3, 4, 5})  # see "Format versions" above
# magic | version u16 | reserved u16 | segment number u64 | crc32 of the 20 bytes before
_SEGMENT_HEADER = struct.Struct("<8sHHQ")
HEADER_SIZE: Final = _SEGMENT_HEADER.size + 4
# A record holds at most one message; the protocol's frames are at most 16 MiB by
# default (protocol.DEFAULT_MAX_FRAME). A larger length is damage, not a record.
MAX_RECORD: Final = 256 * 1024 * 1024

FRAME = struct.Struct("<II")
_crc = zlib.crc32


class RecordType(IntEnum):
    DECLARED = 1
    SENT = 2
    DELIVERED = 3
    FAILED = 4
    REMOVED = 5
    PURGED = 6
    DELETED = 7
    DEDUP = 8
    DELIVERED_RUN = 9  # version 4: consecutive Delivered records of one queue, as one
    REMOVED_RUN = 10  # version 4: consecutive Removed records of one queue and reason
    DEDUP_RUNS = 11  # version 4: DedupIds as runs of seqs of one client
    SENT_RUN = 12  # version 5: stateless Sent records of one queue, consecutive seqs


class RemovalReason(IntEnum):
    ACKED = 1  # ack, or a reply to a request
    REJECTED = 2  # reject with no dead-letter queue: discarded
    DEAD_LETTERED = 3  # moved to the dead-letter queue, which gets its own Sent record
    EXPIRED = 4  # TTL
    DROPPED = 5  # overflow dropped it


@dataclass(frozen=True, slots=True)
class QueueDeclared:
    qid: int
    name: str
    settings: dict[str, Any]
    next_seq: int  # the queue's next sequence number when this record was written


@dataclass(frozen=True, slots=True)
class Sent:
    qid: int
    seq: int
    message: bytes  # the packed message, id inside, exactly as the core stores it
    failures: int
    expires: float | None  # epoch seconds
    due: float | None  # epoch seconds; a delayed or scheduled message
    # The last failure's reason text and consumer (pid, uid): a compaction copy carries
    # them, as it carries ``failures``. The core's own Sent records never do.
    last_reason: str | None = None
    last_consumer: tuple[int, int] | None = None
    # When the message's id entered its queue's deduplication window (epoch seconds): a
    # SEND with a seq (PROTOCOL.md §8 "Resends and deduplication"); else None.
    accepted: float | None = None


@dataclass(frozen=True, slots=True)
class Delivered:
    qid: int
    seq: int


@dataclass(frozen=True, slots=True)
class Failed:
    qid: int
    seq: int
    failures: int
    due: float | None
    # Why it failed (the NACK's reason, "ack-timeout", ...) and the consumer (pid, uid)
    # that failed it. A failure with no consumer (a broker restart) keeps the previous
    # one, as the core does; a release (no attempt counted) repeats both unchanged.
    reason: str | None = None
    consumer: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class Removed:
    qid: int
    seq: int
    reason: RemovalReason


@dataclass(frozen=True, slots=True)
class QueuePurged:
    qid: int


@dataclass(frozen=True, slots=True)
class QueueDeleted:
    qid: int


@dataclass(frozen=True, slots=True)
class DedupIds:
    """Ids that entered the queue's deduplication window, with when (epoch seconds),
    oldest first: a queue's whole window at the head of a segment, or one id accepted
    without a Sent of its own in the queue."""

    qid: int
    entries: list[tuple[str, float]]


@dataclass(frozen=True, slots=True)
class DeliveredRun:
    """Deliveries of ``seqs`` of one queue, in this order: what as many Delivered records
    in a row would say (version 4)."""

    qid: int
    seqs: list[int]


@dataclass(frozen=True, slots=True)
class RemovedRun:
    """Removals of ``seqs`` of one queue for one reason, in this order (version 4)."""

    qid: int
    reason: RemovalReason
    seqs: list[int]


@dataclass(frozen=True, slots=True)
class SentRun:
    """Stateless messages (no failures, expiry or due time) of one queue with the seqs
    ``first``, ``first + 1``, ... in this order, each accepted into the deduplication
    window at ``accepted`` or none of them: what as many Sent records would say
    (version 5). In the owner index each counts its bytes and 4 (its length)."""

    qid: int
    first: int
    messages: list[bytes]
    accepted: float | None = None


@dataclass(frozen=True, slots=True)
class DedupRuns:
    """DedupIds as runs (version 4): each ``(prefix, first, last, at)`` stands for the
    ids ``prefix + str(seq)``, seq from first to last, accepted at ``at``; oldest first."""

    qid: int
    runs: list[tuple[str, int, int, float]]


Record = (QueueDeclared | Sent | Delivered | Failed | Removed | QueuePurged | QueueDeleted
          | DedupIds | DeliveredRun | RemovedRun | DedupRuns | SentRun)


def _frame(body: bytes) -> bytes:
    length = len(body).to_bytes(4, "little")
    return _crc(body, _crc(length)).to_bytes(4, "little") + length + body


# --- encoding ------------------------------------------------------------------------

QSEQ = struct.Struct("<BIQ")
SENT_HEAD = struct.Struct("<BIQIB")
FAILED_HEAD = struct.Struct("<BIQId")
_DETAILS_SIZE = struct.Struct("<I")
REMOVED_HEAD = struct.Struct("<BIQB")
_QID = struct.Struct("<BI")
_RUN_REMOVED_HEAD = struct.Struct("<BIB")
F_U64 = struct.Struct("<Q")
F64 = struct.Struct("<d")
_NONE = float("nan")  # "no due time" in a Failed record
# Sent flags: which optional fields follow the fixed part, in this order: expires, due,
# accepted (f64 each), details. (The flag values are in the order they were added.)
SENT_EXPIRES, SENT_DUE, SENT_DETAILS, SENT_ACCEPTED = 1, 2, 4, 8
_SENT_FLAGS = SENT_EXPIRES | SENT_DUE | SENT_DETAILS | SENT_ACCEPTED


def _pack_details(reason: str | None, consumer: tuple[int, int] | None) -> bytes:
    """A failure's details as msgpack ``[reason, [pid, uid] or nil]``."""
    packed: bytes = msgpack.packb([reason, None if consumer is None else list(consumer)])
    return packed


def encode_declared(qid: int, name: str, settings: dict[str, Any], next_seq: int) -> bytes:
    tail = msgpack.packb([name, settings], use_bin_type=True)
    return _frame(QSEQ.pack(RecordType.DECLARED, qid, next_seq) + tail)


def encode_sent(qid: int, seq: int, message: bytes, failures: int = 0,
                expires: float | None = None, due: float | None = None,
                last_reason: str | None = None,
                last_consumer: tuple[int, int] | None = None,
                accepted: float | None = None) -> bytes:
    details = last_reason is not None or last_consumer is not None
    flags = ((expires is not None) | (due is not None) << 1 | details << 2
             | (accepted is not None) << 3)
    parts = [SENT_HEAD.pack(RecordType.SENT, qid, seq, failures, flags)]
    if expires is not None:
        parts.append(F64.pack(expires))
    if due is not None:
        parts.append(F64.pack(due))
    if accepted is not None:
        parts.append(F64.pack(accepted))
    if details:
        packed = _pack_details(last_reason, last_consumer)
        parts.append(_DETAILS_SIZE.pack(len(packed)))
        parts.append(packed)
    parts.append(message)
    return _frame(b"".join(parts))


def encode_delivered(qid: int, seq: int) -> bytes:
    return _frame(QSEQ.pack(RecordType.DELIVERED, qid, seq))


# A run's seqs: RUN_DELTAS, the first as u64 and then each one's step from the one before
# as a u8 (1-255: one consumer's deliveries and acks are in order, or a few apart when
# consumers take turns), or RUN_SEQS, every seq as a u64 (anything else).
RUN_DELTAS, RUN_SEQS = 1, 8


def _seqs(seqs: list[int]) -> bytes:
    first, count = seqs[0], len(seqs)
    if seqs[-1] - first == count - 1 and seqs == list(range(first, first + count)):
        # consecutive, the usual run (a pump's deliveries, one consumer's acks): no
        # per-seq step computed (C-level comparisons only)
        return bytes([RUN_DELTAS]) + first.to_bytes(8, "little") + b"\x01" * (count - 1)
    steps = list(map(sub, seqs[1:], seqs))
    if 0 < min(steps) and max(steps) < 256:
        return bytes([RUN_DELTAS]) + first.to_bytes(8, "little") + bytes(steps)
    packed = array("q", seqs)
    if sys.byteorder != "little":
        packed.byteswap()
    return bytes([RUN_SEQS]) + packed.tobytes()


def encode_delivered_run(qid: int, seqs: list[int]) -> bytes:
    """A DeliveredRun of two or more seqs: 14 bytes and 1 per seq after the first when
    they rise by 1-255, else 6 and 8 per seq (a Delivered is 21 bytes)."""
    return _frame(_QID.pack(RecordType.DELIVERED_RUN, qid) + _seqs(seqs))


def encode_removed_run(qid: int, reason: int, seqs: list[int]) -> bytes:
    """A RemovedRun of two or more seqs: as a DeliveredRun plus the reason byte (a
    Removed is 22 bytes)."""
    return _frame(_RUN_REMOVED_HEAD.pack(RecordType.REMOVED_RUN, qid, reason) + _seqs(seqs))


# --- appending the hot records (Sent, Delivered, Removed) to a write buffer -----------
# The same bytes as the encode_* functions (tests/unit/test_journal_records.py checks),
# without their intermediate objects: the CRC of the fixed length field is computed once
# here, the body is checksummed where it lies, and frame and body go into the buffer
# with one pack. (Measured: a Delivered from 1.0 to 0.6 µs.)
_SENT_PLAIN = int(RecordType.SENT)
_DELIVERED = int(RecordType.DELIVERED)
_REMOVED = int(RecordType.REMOVED)
_FRAMED_QSEQ = struct.Struct("<IIBIQ")
_FRAMED_REMOVED = struct.Struct("<IIBIQB")
_LENGTH_SENT_HEAD = struct.Struct("<IBIQIB")  # the length, then SENT_HEAD
_LENGTH_SENT_ACCEPTED = struct.Struct("<IBIQIBd")  # ... and the accepted time (flag 8)
_CRC_QSEQ_LENGTH: Final = _crc(QSEQ.size.to_bytes(4, "little"))
_CRC_REMOVED_LENGTH: Final = _crc(REMOVED_HEAD.size.to_bytes(4, "little"))


def append_sent(buffer: bytearray, qid: int, seq: int, message: bytes,
                accepted: float | None = None) -> int:
    """Append a Sent with no failures, expiry or due time (what the core sends), with
    the time its id entered the deduplication window if ``accepted`` (a SEND with a seq:
    every confirmed send of the Python client); returns its size in bytes."""
    if accepted is None:
        length = SENT_HEAD.size + len(message)
        head = _LENGTH_SENT_HEAD.pack(length, _SENT_PLAIN, qid, seq, 0, 0)
    else:
        length = SENT_HEAD.size + 8 + len(message)
        head = _LENGTH_SENT_ACCEPTED.pack(length, _SENT_PLAIN, qid, seq, 0, SENT_ACCEPTED,
                                          accepted)
    buffer += _crc(message, _crc(head)).to_bytes(4, "little")
    buffer += head
    buffer += message
    return 8 + length


# A SentRun's body: type u8 | qid u32 | first seq u64 | flags u8 (SENT_ACCEPTED or 0) |
# [accepted f64] | count u32 | count lengths u32 | the messages, back to back.
SENT_RUN_HEAD = struct.Struct("<BIQB")
_COUNT = struct.Struct("<I")
_SENT_RUN = int(RecordType.SENT_RUN)


def append_sent_run(buffer: bytearray, qid: int, first: int, messages: list[bytes],
                    accepted: float | None = None) -> int:
    """Append a SentRun of ``messages`` (seqs from ``first``); returns its size in
    bytes. One checksum and one join for all: the store's sent() only collects them."""
    lengths = array("I", map(len, messages))
    if sys.byteorder != "little":
        lengths.byteswap()
    if accepted is None:
        head = SENT_RUN_HEAD.pack(_SENT_RUN, qid, first, 0) + _COUNT.pack(len(messages))
    else:
        head = (SENT_RUN_HEAD.pack(_SENT_RUN, qid, first, SENT_ACCEPTED) + F64.pack(accepted)
                + _COUNT.pack(len(messages)))
    body = b"".join([head, lengths.tobytes(), *messages])
    length = len(body).to_bytes(4, "little")
    buffer += _crc(body, _crc(length)).to_bytes(4, "little")
    buffer += length
    buffer += body
    return 8 + len(body)


def append_delivered(buffer: bytearray, qid: int, seq: int) -> None:
    crc = _crc(QSEQ.pack(_DELIVERED, qid, seq), _CRC_QSEQ_LENGTH)
    buffer += _FRAMED_QSEQ.pack(crc, QSEQ.size, _DELIVERED, qid, seq)


def append_removed(buffer: bytearray, qid: int, seq: int, reason: int) -> None:
    crc = _crc(REMOVED_HEAD.pack(_REMOVED, qid, seq, reason), _CRC_REMOVED_LENGTH)
    buffer += _FRAMED_REMOVED.pack(crc, REMOVED_HEAD.size, _REMOVED, qid, seq, reason)


def encode_failed(qid: int, seq: int, failures: int, due: float | None,
                  reason: str | None = None, consumer: tuple[int, int] | None = None) -> bytes:
    head = FAILED_HEAD.pack(RecordType.FAILED, qid, seq, failures, _NONE if due is None else due)
    if reason is None and consumer is None:
        return _frame(head)  # byte for byte a version 1 Failed
    return _frame(head + _pack_details(reason, consumer))


def encode_removed(qid: int, seq: int, reason: int) -> bytes:
    return _frame(REMOVED_HEAD.pack(RecordType.REMOVED, qid, seq, reason))


def encode_purged(qid: int) -> bytes:
    return _frame(_QID.pack(RecordType.PURGED, qid))


def encode_deleted(qid: int) -> bytes:
    return _frame(_QID.pack(RecordType.DELETED, qid))


def encode_dedup(qid: int, entries: list[tuple[str, float]]) -> bytes:
    """A DedupIds record: qid u32, then msgpack ``[ids, times]`` (two arrays, so that
    msgpack packs and unpacks them in C, without an object per entry)."""
    ids = [mid for mid, _ in entries]
    times = [at for _, at in entries]
    return _frame(_QID.pack(RecordType.DEDUP, qid) + msgpack.packb([ids, times]))


def encode_dedup_runs(qid: int, runs: list[tuple[str, int, int, float]]) -> bytes:
    """A DedupRuns record: qid u32, then msgpack ``[prefixes, firsts, lasts, times]``
    (four arrays of one length)."""
    columns = [[run[i] for run in runs] for i in range(4)]
    return _frame(_QID.pack(RecordType.DEDUP_RUNS, qid) + msgpack.packb(columns))


# The header's reserved field: bit 0 marks a *base* segment, written whole from the
# broker's memory after a failed fdatasync (compaction.py ``Journal.rebuild``). It holds every
# live message, so the segments numbered below it are superseded: recovery skips (and
# deletes) them, for their pages may not hold what was written (docs/journal.md, "After
# a failed sync"). Readers before it ignore the field and read the segment as any other.
BASE: Final = 1


def segment_header(number: int, *, base: bool = False) -> bytes:
    head = _SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, BASE if base else 0, number)
    return head + _crc(head).to_bytes(4, "little")
