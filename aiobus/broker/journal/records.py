"""Journal records: their encoding, the segment header, and a decoder. No I/O, no clock.

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

The decoder (:func:`decode_segment`) returns every good record with its offset, and
classifies the first bad one:

* *torn*: it is in the last segment and no good record starts anywhere after it. A
  crash mid-write leaves exactly this (a prefix of the last write, or garbage where the
  file system had not written yet); the store truncates it and reports file and offset.
* *corrupt*: anything else, i.e. good data follows the damage, or the segment is not the
  last. A torn write cannot be followed by a record that was synced, so this is damage
  to confirmed data: the store raises :class:`~.store.JournalCorrupt` and never skips it.

The scan for a later good record costs a CRC per candidate offset, paid only on a bad
record: a real torn tail is short, and real damage is usually followed by a good record
within one record's length.

Records are encoded by plain functions returning ``bytes`` (no object per record on the
send path, the benchmarks decide that) and decoded into frozen dataclasses. Recovery does
not build those: :mod:`.replay` reads the hot records (Sent, Delivered, Removed) straight
into its state in one flat loop, and must accept and refuse exactly what
:func:`decode_body` does (tests/unit/test_journal_records.py checks both paths agree).
"""

from __future__ import annotations

import struct
import sys
import zlib
from array import array
from dataclasses import dataclass
from enum import IntEnum
from itertools import accumulate
from typing import Any, Final

import msgpack

__all__ = [
    "BASE",
    "DECODE_ERRORS",
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "MAX_RECORD",
    "READABLE_VERSIONS",
    "BadRecord",
    "Decoded",
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
    "classify_damage",
    "decode_body",
    "decode_segment",
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
    "header_version",
    "is_base",
    "message_id",
    "read_header",
    "salvage",
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


def _unpack_details(raw: bytes | memoryview) -> tuple[str | None, tuple[int, int] | None]:
    details = msgpack.unpackb(raw, raw=False)
    if type(details) is list and len(details) == 2:
        reason, consumer = details
        if reason is None or type(reason) is str:
            if consumer is None:
                return reason, None
            if (type(consumer) is list and len(consumer) == 2
                    and type(consumer[0]) is int and type(consumer[1]) is int):
                return reason, (consumer[0], consumer[1])
    raise BadRecord("failure details must be [reason: str or nil, [pid, uid] or nil]")


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
    steps = [b - a for a, b in zip(seqs, seqs[1:], strict=False)]  # noqa: RUF007
    if 0 < min(steps) and max(steps) < 256:
        return bytes([RUN_DELTAS]) + seqs[0].to_bytes(8, "little") + bytes(steps)
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


def _decode_sent_run(body: bytes | memoryview) -> SentRun:
    _, qid, first, flags = SENT_RUN_HEAD.unpack_from(body)
    if flags & ~SENT_ACCEPTED:
        raise BadRecord(f"SentRun: unknown flags {flags:#x}")
    at = SENT_RUN_HEAD.size
    accepted = None
    if flags:
        (accepted,) = F64.unpack_from(body, at)
        at += 8
    (count,) = _COUNT.unpack_from(body, at)
    at += 4
    if not count or at + 4 * count > len(body):
        raise BadRecord("SentRun: no messages, or more lengths than the record holds")
    lengths = array("I")
    lengths.frombytes(body[at:at + 4 * count])
    if sys.byteorder != "little":
        lengths.byteswap()
    at += 4 * count
    if at + sum(lengths) != len(body):
        raise BadRecord("SentRun: the lengths do not add up to the record")
    messages = []
    for length in lengths:
        messages.append(bytes(body[at:at + length]))
        at += length
    return SentRun(qid, first, messages, accepted)


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


def message_id(message: bytes | memoryview) -> str | None:
    """The id of a packed message (``[id, queue, body, ...]``, queue_state.pack_message),
    read from its first bytes without unpacking the body; None if it has none."""
    if len(message) > 3 and message[0] == 0x96:  # fixarray of 6, as the core packs it
        head = message[1]
        start, end = (2, 2 + head - 0xA0) if 0xA0 <= head <= 0xBF else (  # fixstr
            (3, 3 + message[2]) if head == 0xD9 else (0, 0))  # str 8: up to 255 bytes
        if start and end <= len(message):
            try:
                return bytes(message[start:end]).decode()
            except UnicodeDecodeError:
                return None
    try:
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(message)
        if unpacker.read_array_header() > 0:
            mid = unpacker.unpack()
            return mid if type(mid) is str else None
    except DECODE_ERRORS:
        pass
    return None


# The header's reserved field: bit 0 marks a *base* segment, written whole from the
# broker's memory after a failed fdatasync (store.py ``Journal.rebuild``). It holds every
# live message, so the segments numbered below it are superseded: recovery skips (and
# deletes) them, for their pages may not hold what was written (docs/journal.md, "After
# a failed sync"). Readers before it ignore the field and read the segment as any other.
BASE: Final = 1


def segment_header(number: int, *, base: bool = False) -> bytes:
    head = _SEGMENT_HEADER.pack(MAGIC, FORMAT_VERSION, BASE if base else 0, number)
    return head + _crc(head).to_bytes(4, "little")


def is_base(head: bytes) -> bool:
    """Whether ``head`` (a segment's first ``HEADER_SIZE`` bytes) is a good header that
    marks a base segment (:data:`BASE`)."""
    return read_header(head) is not None and bool(_SEGMENT_HEADER.unpack_from(head)[2] & BASE)


# --- decoding ------------------------------------------------------------------------


class BadRecord(ValueError):
    """A record body that passed its checksum but does not decode (a bug or a foreign
    file): treated as damage."""


def decode_body(body: bytes | memoryview) -> Record:
    kind = body[0]
    if kind == RecordType.SENT:
        _, qid, seq, failures, flags = SENT_HEAD.unpack_from(body)
        if flags & ~_SENT_FLAGS:
            raise BadRecord(f"Sent: unknown flags {flags:#x}")
        at = SENT_HEAD.size
        expires = due = reason = consumer = None
        if flags & SENT_EXPIRES:
            (expires,) = F64.unpack_from(body, at)
            at += 8
        if flags & SENT_DUE:
            (due,) = F64.unpack_from(body, at)
            at += 8
        accepted = None
        if flags & SENT_ACCEPTED:
            (accepted,) = F64.unpack_from(body, at)
            at += 8
        if flags & SENT_DETAILS:
            (size,) = _DETAILS_SIZE.unpack_from(body, at)
            at += 4
            if at + size > len(body):
                raise BadRecord("Sent: failure details longer than the record")
            reason, consumer = _unpack_details(body[at:at + size])
            at += size
        return Sent(qid, seq, bytes(body[at:]), failures, expires, due, reason, consumer,
                    accepted)
    if kind == RecordType.DELIVERED or kind == RecordType.DECLARED:
        _, qid, seq = QSEQ.unpack_from(body)
        if kind == RecordType.DELIVERED:
            return Delivered(qid, seq)
        name, settings = msgpack.unpackb(body[QSEQ.size:], raw=False)
        if type(name) is not str or type(settings) is not dict:
            raise BadRecord("QueueDeclared: name must be str and settings a map")
        return QueueDeclared(qid, name, settings, seq)
    if kind == RecordType.FAILED:
        _, qid, seq, failures, due = FAILED_HEAD.unpack_from(body)
        reason = consumer = None
        if len(body) > FAILED_HEAD.size:  # version 2: the failure's details
            reason, consumer = _unpack_details(body[FAILED_HEAD.size:])
        return Failed(qid, seq, failures, None if due != due else due, reason, consumer)
    if kind == RecordType.REMOVED:
        # (not ``reason``: that is the str or None above, and mypyc gives a variable one
        # type for the whole function)
        _, qid, seq, code = REMOVED_HEAD.unpack_from(body)
        return Removed(qid, seq, RemovalReason(code))
    if kind == RecordType.PURGED:
        return QueuePurged(_QID.unpack_from(body)[1])
    if kind == RecordType.DELETED:
        return QueueDeleted(_QID.unpack_from(body)[1])
    if kind == RecordType.DEDUP:
        qid = _QID.unpack_from(body)[1]
        value = msgpack.unpackb(body[_QID.size:], raw=False)
        ids, times = value if type(value) is list and len(value) == 2 else (None, None)
        if (type(ids) is not list or type(times) is not list or len(ids) != len(times)
                or not all(type(mid) is str for mid in ids)
                or not all(type(at) is float for at in times)):
            raise BadRecord("DedupIds: must be [ids: str array, times: float array] of one"
                            " length")
        return DedupIds(qid, list(zip(ids, times, strict=True)))
    if kind == RecordType.DEDUP_RUNS:
        qid = _QID.unpack_from(body)[1]
        columns = msgpack.unpackb(body[_QID.size:], raw=False)
        if (type(columns) is not list or len(columns) != 4
                or not all(type(column) is list for column in columns)):
            raise BadRecord("DedupRuns: must be four arrays")
        prefixes, firsts, lasts, times = columns
        if (not len(prefixes) == len(firsts) == len(lasts) == len(times)
                or not all(type(prefix) is str for prefix in prefixes)
                or not all(type(at) is float for at in times)
                or not all(type(first) is int and type(last) is int and 0 <= first <= last
                           for first, last in zip(firsts, lasts, strict=True))):
            raise BadRecord("DedupRuns: must be [prefixes: str, firsts: int, lasts: int,"
                            " times: float] of one length, each first <= its last")
        return DedupRuns(qid, list(zip(prefixes, firsts, lasts, times, strict=True)))
    if kind == RecordType.SENT_RUN:
        return _decode_sent_run(body)
    if kind == RecordType.DELIVERED_RUN or kind == RecordType.REMOVED_RUN:
        qid = _QID.unpack_from(body)[1]
        at = _QID.size
        removal = RemovalReason.ACKED
        if kind == RecordType.REMOVED_RUN:
            if len(body) <= at:
                raise BadRecord("RemovedRun: no reason")
            removal = RemovalReason(body[at])
            at += 1
        mode = body[at] if len(body) > at else 0
        at += 1
        if mode == RUN_DELTAS and len(body) >= at + 9 and all(body[at + 8:]):
            run = list(accumulate(body[at + 8:], initial=F_U64.unpack_from(body, at)[0]))
        elif mode == RUN_SEQS and len(body) >= at + 16 and not (len(body) - at) % 8:
            seqs = array("q")
            seqs.frombytes(body[at:])
            if sys.byteorder != "little":
                seqs.byteswap()
            run = seqs.tolist()
        else:
            raise BadRecord("run: seqs must be a u64 and u8 steps (1-255), or u64s, 2 or more")
        if kind == RecordType.DELIVERED_RUN:
            return DeliveredRun(qid, run)
        return RemovedRun(qid, removal, run)
    raise BadRecord(f"unknown record type {kind}")


@dataclass(frozen=True, slots=True)
class Decoded:
    """What one segment holds: its good records with their offsets, and where the first
    bad record starts (``bad_at``), classified as ``torn`` or not (then: corrupt)."""

    number: int | None  # from the header; None when the header itself is bad
    records: list[tuple[int, Record]]
    end: int  # offset just past the last good record
    bad_at: int | None
    torn: bool
    resync_at: int | None  # where the first good record after the damage starts


DECODE_ERRORS = (BadRecord, ValueError, struct.error, msgpack.UnpackException)


def _record_at(data: bytes | memoryview, at: int) -> tuple[Record, int] | None:
    """The good record starting at ``at`` and the offset after it, or None."""
    if at + 8 > len(data):
        return None
    crc, length = FRAME.unpack_from(data, at)
    end = at + 8 + length
    if length == 0 or length > MAX_RECORD or end > len(data):
        return None
    if _crc(data[at + 4:end]) != crc:
        return None
    try:
        return decode_body(data[at + 8:end]), end
    except DECODE_ERRORS:
        return None


def read_header(data: bytes) -> int | None:
    """The segment number from a good header of a version this code reads, else None."""
    if len(data) < HEADER_SIZE:
        return None
    head = data[:_SEGMENT_HEADER.size]
    magic, version, _, number = _SEGMENT_HEADER.unpack(head)
    good = _crc(head) == int.from_bytes(data[_SEGMENT_HEADER.size:HEADER_SIZE], "little")
    return number if good and magic == MAGIC and version in READABLE_VERSIONS else None


def header_version(data: bytes) -> int:
    """The format version in a header that :func:`read_header` accepted."""
    return int(_SEGMENT_HEADER.unpack_from(data)[1])


def classify_damage(data: bytes, number: int, records: list[tuple[int, Record]], at: int,
                    *, last: bool) -> Decoded:
    """The decode of a segment whose records are good up to ``at``: whole if ``at`` is its
    end, else torn or corrupt by whether a good record starts anywhere after ``at``."""
    size = len(data)
    if at == size:
        return Decoded(number, records, at, None, False, None)
    view = memoryview(data)
    resync = next((o for o in range(at + 1, size - 8) if _record_at(view, o)), None)
    return Decoded(number, records, at, at, last and resync is None, resync)


def decode_segment(data: bytes, *, last: bool) -> Decoded:
    """Decode one segment file's bytes. See the module docstring for torn vs corrupt."""
    number = read_header(data)
    if number is None:  # a header is written and synced before the file gets its name
        return Decoded(None, [], 0, 0, False, None)
    records: list[tuple[int, Record]] = []
    at, size = HEADER_SIZE, len(data)
    view = memoryview(data)
    while at < size:
        found = _record_at(view, at)
        if found is None:
            break
        records.append((at, found[0]))
        at = found[1]
    return classify_damage(data, number, records, at, last=last)


def salvage(data: bytes) -> tuple[list[tuple[int, int, Record]], list[tuple[int, int]]]:
    """Every good record of a damaged segment as (start, end, record), and the damaged
    spans as (start, end)."""
    view = memoryview(data)
    records: list[tuple[int, int, Record]] = []
    spans: list[tuple[int, int]] = []
    at, size = HEADER_SIZE, len(data)
    while at < size:
        found = _record_at(view, at)
        if found is not None:
            records.append((at, found[1], found[0]))
            at = found[1]
            continue
        resync = next((o for o in range(at + 1, size - 8) if _record_at(view, o)), size)
        spans.append((at, resync))
        at = resync
    return records, spans
