"""Journal records read back: record bodies into the dataclasses of :mod:`.records`, a
segment into its good records and a verdict on its damage, and a damaged segment's
salvage. No I/O, no clock.

Theory of operation
-------------------
The decoder (:func:`decode_segment`) returns every good record with its offset, and
classifies the first bad one:

* *torn*: it is in the last segment and no good record starts anywhere after it. A
  crash mid-write leaves exactly this (a prefix of the last write, or garbage where the
  file system had not written yet); the store truncates it and reports file and offset.
* *corrupt*: anything else, i.e. good data follows the damage, or the segment is not the
  last. A torn write cannot be followed by a record that was synced, so this is damage
  to confirmed data: the store raises :class:`~.errors.JournalCorrupt` and never skips it.

The scan for a later good record costs a CRC per candidate offset, paid only on a bad
record: a real torn tail is short, and real damage is usually followed by a good record
within one record's length.

Records are decoded into frozen dataclasses. Recovery does not build those:
:mod:`.replay` reads the hot records (Sent, Delivered, Removed) straight into its state in
one flat loop, and must accept and refuse exactly what :func:`decode_body` does
(tests/unit/test_journal_records.py checks both paths agree).
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import accumulate

import msgpack

from .records import (
    _COUNT,
    _DETAILS_SIZE,
    _QID,
    _SEGMENT_HEADER,
    _SENT_FLAGS,
    BASE,
    F64,
    F_U64,
    FAILED_HEAD,
    FRAME,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD,
    QSEQ,
    READABLE_VERSIONS,
    REMOVED_HEAD,
    RUN_DELTAS,
    RUN_SEQS,
    SENT_ACCEPTED,
    SENT_DETAILS,
    SENT_DUE,
    SENT_EXPIRES,
    SENT_HEAD,
    SENT_RUN_HEAD,
    DedupIds,
    DedupRuns,
    Delivered,
    DeliveredRun,
    Failed,
    QueueDeclared,
    QueueDeleted,
    QueuePurged,
    Record,
    RecordType,
    RemovalReason,
    Removed,
    RemovedRun,
    Sent,
    SentRun,
    _crc,
)

__all__ = [
    "DECODE_ERRORS",
    "BadRecord",
    "Decoded",
    "classify_damage",
    "decode_body",
    "decode_segment",
    "header_version",
    "is_base",
    "message_id",
    "read_header",
    "salvage",
]


class BadRecord(ValueError):
    """A record body that passed its checksum but does not decode (a bug or a foreign
    file): treated as damage."""


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


def is_base(head: bytes) -> bool:
    """Whether ``head`` (a segment's first ``HEADER_SIZE`` bytes) is a good header that
    marks a base segment (:data:`BASE`)."""
    return read_header(head) is not None and bool(_SEGMENT_HEADER.unpack_from(head)[2] & BASE)


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
