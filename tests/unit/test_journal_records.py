"""Journal records: every record round-trips, the decoder tells a torn tail from damage,
and replay folds records into the live state by the rules of docs/journal.md."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiobus.broker.journal import decode as d
from aiobus.broker.journal import records as r
from aiobus.broker.journal.replay import Replay


def sent_run(qid: int, first: int, messages: list[bytes], accepted: float | None = None
             ) -> bytes:
    buffer = bytearray()
    r.append_sent_run(buffer, qid, first, messages, accepted)
    return bytes(buffer)


RECORDS: list[tuple[bytes, r.Record]] = [
    (r.encode_declared(1, "jobs", {"ttl": 5.0}, 7), r.QueueDeclared(1, "jobs", {"ttl": 5.0}, 7)),
    (r.encode_sent(1, 7, b"\x96abc"), r.Sent(1, 7, b"\x96abc", 0, None, None)),
    (r.encode_sent(1, 8, b"m", 2, 100.5, None), r.Sent(1, 8, b"m", 2, 100.5, None)),
    (r.encode_sent(1, 9, b"m", 0, None, 9.25), r.Sent(1, 9, b"m", 0, None, 9.25)),
    (r.encode_sent(2, 2**40, b"", 1, 1.0, 2.0), r.Sent(2, 2**40, b"", 1, 1.0, 2.0)),
    (r.encode_delivered(1, 7), r.Delivered(1, 7)),
    (r.encode_failed(1, 7, 3, 12.5), r.Failed(1, 7, 3, 12.5)),
    (r.encode_failed(1, 7, 3, None), r.Failed(1, 7, 3, None)),
    # A message's last failure: its reason text and consumer (pid, uid), either or both.
    (r.encode_failed(1, 7, 3, None, "why", (4321, 1000)),
     r.Failed(1, 7, 3, None, "why", (4321, 1000))),
    (r.encode_failed(1, 7, 1, 2.5, "ack-timeout"), r.Failed(1, 7, 1, 2.5, "ack-timeout")),
    (r.encode_failed(1, 7, 1, None, None, (1, 2**40)), r.Failed(1, 7, 1, None, None, (1, 2**40))),
    (r.encode_sent(1, 7, b"m", 2, 1.0, 2.0, "é", (9, 0)),
     r.Sent(1, 7, b"m", 2, 1.0, 2.0, "é", (9, 0))),
    (r.encode_sent(1, 7, b"\x96m", 1, None, None, "broker-restart"),
     r.Sent(1, 7, b"\x96m", 1, None, None, "broker-restart")),
    (r.encode_removed(1, 7, r.RemovalReason.DEAD_LETTERED),
     r.Removed(1, 7, r.RemovalReason.DEAD_LETTERED)),
    (r.encode_purged(3), r.QueuePurged(3)),
    (r.encode_deleted(3), r.QueueDeleted(3)),
    # Version 3: when a resendable SEND's id entered the queue's deduplication window.
    (r.encode_sent(1, 7, b"\x96m", accepted=1e9 + 0.25),
     r.Sent(1, 7, b"\x96m", 0, None, None, accepted=1e9 + 0.25)),
    (r.encode_sent(1, 7, b"m", 2, 1.0, 2.0, "why", (9, 0), 3.0),
     r.Sent(1, 7, b"m", 2, 1.0, 2.0, "why", (9, 0), 3.0)),
    (r.encode_dedup(2, [("c1-1", 5.0), ("c1-2", 6.5)]),
     r.DedupIds(2, [("c1-1", 5.0), ("c1-2", 6.5)])),
    (r.encode_dedup(2, []), r.DedupIds(2, [])),
    # Version 4: Delivered and Removed records of one queue in a row, as one run.
    # (seqs as steps of a byte where they can be, else as u64s)
    (r.encode_delivered_run(1, [7, 8, 2**40]), r.DeliveredRun(1, [7, 8, 2**40])),
    (r.encode_delivered_run(1, [2**40, 2**40 + 1, 2**40 + 256]),
     r.DeliveredRun(1, [2**40, 2**40 + 1, 2**40 + 256])),
    (r.encode_delivered_run(1, [5, 6, 10, 265]), r.DeliveredRun(1, [5, 6, 10, 265])),
    (r.encode_delivered_run(1, [9, 10, 11, 12]), r.DeliveredRun(1, [9, 10, 11, 12])),
    (r.encode_removed_run(2, r.RemovalReason.EXPIRED, [3, 1]),
     r.RemovedRun(2, r.RemovalReason.EXPIRED, [3, 1])),
    (r.encode_removed_run(2, r.RemovalReason.ACKED, [3, 4, 7]),
     r.RemovedRun(2, r.RemovalReason.ACKED, [3, 4, 7])),
    # ... and a deduplication window as runs of ids: "c1-5" to "c1-7", then "c2-1"
    (r.encode_dedup_runs(2, [("c1-", 5, 7, 5.0), ("c2-", 1, 1, 6.5)]),
     r.DedupRuns(2, [("c1-", 5, 7, 5.0), ("c2-", 1, 1, 6.5)])),
    (r.encode_dedup_runs(2, []), r.DedupRuns(2, [])),
    # Version 5: stateless Sent records of one queue with consecutive seqs, as one run
    (sent_run(1, 7, [b"\x96abc", b"", b"m" * 300]), r.SentRun(1, 7, [b"\x96abc", b"", b"m" * 300])),
    (sent_run(2, 2**40, [b"a", b"b"], 1e9 + 0.5), r.SentRun(2, 2**40, [b"a", b"b"], 1e9 + 0.5)),
]


def segment(*encoded: bytes, number: int = 1) -> bytes:
    return r.segment_header(number) + b"".join(encoded)


@pytest.mark.parametrize(("encoded", "record"), RECORDS)
def test_each_record_round_trips(encoded: bytes, record: r.Record) -> None:
    decoded = d.decode_segment(segment(encoded), last=True)
    assert decoded.records == [(r.HEADER_SIZE, record)]
    assert decoded.bad_at is None and decoded.number == 1


def test_records_without_failure_details_keep_the_version_1_layout() -> None:
    """A version 1 segment is read as is: a Failed without details is its fixed part
    only, and a Sent without them has no flag 4, byte for byte as version 1 wrote them."""
    assert r.encode_failed(1, 7, 3, 12.5) == r._frame(r.FAILED_HEAD.pack(4, 1, 7, 3, 12.5))
    assert r.encode_sent(1, 7, b"m", 1, None, 2.0) == r._frame(
        r.SENT_HEAD.pack(2, 1, 7, 1, 2) + r.F64.pack(2.0) + b"m")


def version_1_header(number: int) -> bytes:
    head = r._SEGMENT_HEADER.pack(r.MAGIC, 1, 0, number)
    return head + r._crc(head).to_bytes(4, "little")


def test_version_1_segments_are_read_and_unknown_versions_refused() -> None:
    body = b"".join(e for e, _ in RECORDS[:3])
    old = d.decode_segment(version_1_header(5) + body, last=True)
    assert (old.number, old.bad_at) == (5, None)
    assert old.records == d.decode_segment(segment(body, number=5), last=True).records
    assert d.header_version(version_1_header(5)) == 1
    assert d.header_version(segment(number=5)) == r.FORMAT_VERSION == 5
    head = r._SEGMENT_HEADER.pack(r.MAGIC, 6, 0, 5)
    newer = head + r._crc(head).to_bytes(4, "little")
    assert d.decode_segment(newer + body, last=True).number is None


def test_a_segment_decodes_whole_and_cut_at_every_offset() -> None:
    data = segment(*(e for e, _ in RECORDS))
    starts = [o for o, _ in d.decode_segment(data, last=True).records]
    ends = [*starts[1:], len(data)]
    for cut in range(r.HEADER_SIZE, len(data) + 1):
        decoded = d.decode_segment(data[:cut], last=True)
        whole = sum(1 for end in ends if end <= cut)
        assert [rec for _, rec in decoded.records] == [rec for _, rec in RECORDS[:whole]]
        if cut in ends or cut == r.HEADER_SIZE:
            assert decoded.bad_at is None
        else:
            assert decoded.torn and decoded.bad_at == decoded.end


def test_damage_followed_by_good_records_is_corruption_not_a_torn_tail() -> None:
    data = bytearray(segment(*(e for e, _ in RECORDS)))
    second = d.decode_segment(bytes(data), last=True).records[1][0]
    data[second + 10] ^= 0x04
    decoded = d.decode_segment(bytes(data), last=True)
    assert decoded.bad_at == second and not decoded.torn
    assert decoded.resync_at is not None and decoded.resync_at > second
    good, spans = d.salvage(bytes(data))
    assert spans == [(second, decoded.resync_at)]
    assert len(good) == len(RECORDS) - 1


def test_a_bad_tail_in_a_sealed_segment_is_corruption() -> None:
    data = segment(*(e for e, _ in RECORDS))[:-3]
    assert not d.decode_segment(data, last=False).torn


def test_a_bad_header_is_reported() -> None:
    data = bytearray(segment(RECORDS[0][0]))
    data[9] ^= 1
    assert d.decode_segment(bytes(data), last=True).number is None


@given(st.binary(max_size=300))
def test_the_decoder_never_raises_on_garbage(garbage: bytes) -> None:
    decoded = d.decode_segment(segment(RECORDS[1][0]) + garbage, last=True)
    assert decoded.records[0][1] == RECORDS[1][1]
    d.salvage(segment() + garbage)


def replay(*records: r.Record) -> Replay:
    state = Replay()
    for record in records:
        state.apply(record)
    state.finish()
    return state


def test_replay_folds_the_life_of_messages() -> None:
    A = r.RemovalReason.ACKED
    state = replay(
        r.QueueDeclared(1, "q", {}, 0),
        r.Sent(1, 1, b"b", 0, None, None), r.Sent(1, 0, b"a", 0, 50.0, None),
        r.Sent(1, 2, b"c", 0, None, None),
        r.Delivered(1, 0), r.Failed(1, 0, 1, 30.0),  # a delayed retry
        r.Delivered(1, 1),  # unanswered at the crash
        r.Delivered(1, 2), r.Removed(1, 2, A),
        r.Removed(1, 9, A), r.Delivered(7, 1),  # about nothing live: ignored
    )
    queue = state.queues[1]
    assert list(queue.live()) == [0, 1]
    m0, m1 = queue.live().values()
    assert (m0.failures, m0.due, m0.expires) == (1, 30.0, 50.0)
    assert (m1.failures, m1.in_flight) == (1, False)
    assert queue.next_seq == 3


def test_replay_purge_keeps_deliveries_in_flight_and_delete_forgets() -> None:
    state = replay(
        r.QueueDeclared(1, "q", {}, 0), r.Sent(1, 0, b"a", 0, None, None),
        r.Sent(1, 1, b"b", 0, None, None), r.Delivered(1, 1), r.QueuePurged(1),
        r.QueueDeclared(2, "gone", {}, 0), r.Sent(2, 0, b"x", 0, None, None),
        r.QueueDeleted(2),
    )
    assert list(state.queues) == [1]
    assert list(state.queues[1].live()) == [1]


def test_replay_keeps_the_last_failure_and_counts_the_crash_as_one() -> None:
    """The crash is a failure with reason ``broker-restart`` and no consumer of its own:
    the message keeps the consumer of its previous failure, as the core's
    ``last_consumer`` does; one never failed before has none."""
    state = Replay()
    for record in (r.QueueDeclared(1, "q", {}, 0), r.Sent(1, 0, b"a", 0, None, None),
                   r.Sent(1, 1, b"b", 0, None, None), r.Sent(1, 2, b"c", 0, None, None),
                   r.Delivered(1, 0), r.Failed(1, 0, 1, None, "why", (7, 8)),
                   r.Delivered(1, 0),  # unanswered at the crash
                   r.Delivered(1, 1),  # unanswered at the crash, never failed before
                   r.Delivered(1, 2), r.Failed(1, 2, 1, 9.0, "ack-timeout", (5, 6))):
        state.apply(record)
    inferred = state.finish()
    m0, m1, m2 = state.queues[1].live().values()
    assert [msg for _, msg in inferred] == [m0, m1]
    assert (m0.failures, m0.last_reason, m0.last_consumer) == (2, "broker-restart", (7, 8))
    assert (m1.failures, m1.last_reason, m1.last_consumer) == (1, "broker-restart", None)
    assert (m2.failures, m2.due, m2.last_reason, m2.last_consumer) == (
        1, 9.0, "ack-timeout", (5, 6))


def test_a_later_sent_for_the_same_message_replaces_it() -> None:
    state = replay(r.QueueDeclared(1, "q", {}, 0), r.Sent(1, 0, b"a", 0, None, None),
                   r.Failed(1, 0, 2, 5.0), r.Sent(1, 0, b"a", 2, None, 5.0))
    msg = state.queues[1].live()[0]
    assert (msg.failures, msg.due) == (2, 5.0)
    # with the failure's details, which a copy carries as well
    state = replay(r.QueueDeclared(1, "q", {}, 0), r.Sent(1, 0, b"a", 0, None, None),
                   r.Failed(1, 0, 2, 5.0, "why", (1, 2)),
                   r.Sent(1, 0, b"a", 2, None, 5.0, "why", (1, 2)))
    msg = state.queues[1].live()[0]
    assert (msg.failures, msg.due, msg.last_reason, msg.last_consumer) == (
        2, 5.0, "why", (1, 2))


# --- the flat loop (Replay.read_segment) agrees with decode_segment + apply -----------

# Bodies that pass their checksum but do not decode: each must stop both paths alike.
MALFORMED = [
    bytes([r.RecordType.SENT]) + bytes(10),  # shorter than a Sent's fixed part
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 0, 1) + b"short",  # expires flag, 5 bytes
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 0, 3) + bytes(12),  # both flags, 12 bytes
    bytes([r.RecordType.DELIVERED]) + bytes(11),
    r.REMOVED_HEAD.pack(r.RecordType.REMOVED, 1, 0, 9),  # no such RemovalReason
    bytes([r.RecordType.REMOVED]) + bytes(12),
    bytes([r.RecordType.FAILED]) + bytes(20),
    # failure details that are not [reason: str or nil, [pid, uid] or nil]
    r.FAILED_HEAD.pack(r.RecordType.FAILED, 1, 0, 1, 0.0) + b"\xc1",  # not msgpack
    r.FAILED_HEAD.pack(r.RecordType.FAILED, 1, 0, 1, 0.0) + b"\x92\xa1x\xc0\xc0",  # extra
    r.FAILED_HEAD.pack(r.RecordType.FAILED, 1, 0, 1, 0.0) + b"\x92\x01\xc0",  # int reason
    r.FAILED_HEAD.pack(r.RecordType.FAILED, 1, 0, 1, 0.0) + b"\x92\xc0\x91\x01",  # [pid]
    r.FAILED_HEAD.pack(r.RecordType.FAILED, 1, 0, 1, 0.0) + b"\x92\xc0\x92\x01\xa1x",
    r.FAILED_HEAD.pack(r.RecordType.FAILED, 1, 0, 1, 0.0) + b"\x81\xa1x\xc0",  # a map
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 0, 16) + b"m",  # no such flag
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 0, 8) + bytes(7),  # accepted, 7 bytes
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 0, 11) + bytes(20),  # three times, 20 bytes
    # DedupIds that are not [ids: str array, times: float array] of one length
    bytes([r.RecordType.DEDUP, 1, 0, 0]),  # short qid
    bytes([r.RecordType.DEDUP]) + bytes(4) + b"\x92\x91\xa1x\x90",  # lengths differ
    bytes([r.RecordType.DEDUP]) + bytes(4) + b"\x92\x91\x01\x91\xcb" + bytes(8),  # int id
    bytes([r.RecordType.DEDUP]) + bytes(4) + b"\x92\x91\xa1x\x91\x01",  # int time
    bytes([r.RecordType.DEDUP]) + bytes(4) + b"\x91\x90",  # one array
    bytes([r.RecordType.DEDUP]) + bytes(4) + b"\x01",  # not an array
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 1, 4) + b"\x09\x00\x00\x00\x92\xc0\xc0",
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 1, 4) + b"\x03\x00",  # short length field
    r.SENT_HEAD.pack(r.RecordType.SENT, 1, 3, 1, 5) + bytes(8) + b"\x01\x00\x00\x00\x90m",
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0]),  # no seqs
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0, 8]) + bytes(12),  # 1.5 seqs
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0, 8]) + bytes(8),  # one seq
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0, 1]) + bytes(8),  # no step
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0, 1]) + bytes(9),  # a step of 0
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0, 2]) + bytes(16),  # no such way
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0, 0, 1]) + bytes(7),  # short first seq
    bytes([r.RecordType.DELIVERED_RUN, 1, 0, 0]),  # short qid
    bytes([r.RecordType.REMOVED_RUN, 1, 0, 0, 0, 1]),  # no seqs
    bytes([r.RecordType.REMOVED_RUN, 1, 0, 0, 0, 6, 1]) + bytes(8) + b"\x01",  # reason 6
    bytes([r.RecordType.REMOVED_RUN, 1, 0, 0, 0]),  # no reason
    # DedupRuns that are not [prefixes: str, firsts: int, lasts: int, times: float]
    bytes([r.RecordType.DEDUP_RUNS]) + bytes(4) + b"\x93\x90\x90\x90",  # three arrays
    bytes([r.RecordType.DEDUP_RUNS]) + bytes(4) + b"\x94\x91\xa1x\x91\x03\x91\x02\x91"
    + b"\xcb" + bytes(8),  # first 3 > last 2
    bytes([r.RecordType.DEDUP_RUNS]) + bytes(4) + b"\x94\x91\xa1x\x91\x01\x91\x02\x90",
    bytes([r.RecordType.DEDUP_RUNS]) + bytes(4) + b"\x94\x91\x01\x91\x01\x91\x02\x91"
    + b"\xcb" + bytes(8),  # an int prefix
    bytes([r.RecordType.DEDUP_RUNS]) + bytes(4) + b"\x94\x91\xa1x\x91\xff\x91\x02\x91"
    + b"\xcb" + bytes(8),  # a negative first
    # SentRuns whose lengths do not frame their messages, or with unknown flags
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 0) + bytes(4),  # no messages
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 0) + b"\x02\0\0\0\1\0\0\0ab",  # 1 length
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 0) + b"\x01\0\0\0\3\0\0\0ab",  # short
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 0) + b"\x01\0\0\0\1\0\0\0ab",  # long
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 1) + b"\x01\0\0\0\1\0\0\0a",  # flag 1
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 8) + b"\x01\0\0\0\1\0\0\0a",  # no time
    r.SENT_RUN_HEAD.pack(r.RecordType.SENT_RUN, 1, 3, 0) + b"\x01\0",  # short count
    bytes([r.RecordType.SENT_RUN, 1, 0, 0, 0]),  # short head
    bytes([99, 1, 2, 3]),  # no such record type
]

LIFE = [
    r.encode_declared(1, "q", {}, 0),
    *(r.encode_sent(1, seq, b"m%d" % seq) for seq in (0, 2, 1)),  # 1 out of order
    r.encode_sent(1, 3, b"t", 1, 10.0, 20.0), r.encode_delivered(1, 0),
    r.encode_failed(1, 0, 1, 5.0), r.encode_delivered(1, 2), r.encode_removed(1, 1, 1),
    r.encode_sent(1, 0, b"m0", 1, None, 5.0),  # a compaction copy
    r.encode_delivered(1, 3), r.encode_failed(1, 3, 2, None, "why", (42, 7)),
    r.encode_delivered(1, 3),  # in flight at the end: a crash failure, keeps pid 42
    r.encode_sent(1, 2, b"m2", 1, 3.0, None, "ack-timeout", (41, 7)),  # a copy, details
    r.encode_declared(2, "p", {}, 0), r.encode_sent(2, 0, b"x"), r.encode_delivered(2, 0),
    r.encode_purged(2), r.encode_sent(7, 0, b"unknown queue"),
    # Deduplication windows: a segment head's, and ids with Sent records (a str 8 id too)
    r.encode_dedup(1, [("c-1", 1.0), ("c-2", 2.0)]),
    r.encode_sent(1, 4, b"\x96\xa3c-3\xa1q\xc4\x00\x00\xc0\x01", accepted=3.0),
    r.encode_sent(1, 5, b"\x96\xd9\x22" + b"c" * 32 + b"-4\xa1q", 0, 9.0, None,
                  accepted=4.0),
    r.encode_sent(1, 6, b"\x93\xa3c-5\x01\x02", accepted=5.0),  # another packing
    r.encode_sent(1, 7, b"not msgpack", accepted=6.0),  # no id: no entry
    r.encode_dedup(7, [("x-1", 1.0)]),  # unknown queue: ignored
    r.encode_dedup_runs(1, [("r-", 1, 3, 7.0), ("c-", 1, 1, 8.0)]),  # c-1 again, later
    r.encode_dedup_runs(7, [("x-", 1, 2, 1.0)]),  # unknown queue: ignored
    # Runs (version 4): deliveries of a stateless, a stateful and a gone message, then
    # removals of one of them and of one never sent
    r.encode_sent(1, 8, b"m8"), r.encode_sent(1, 9, b"m9"), r.encode_sent(1, 10, b"m10"),
    r.encode_delivered_run(1, [8, 9, 3, 1]), r.encode_removed_run(1, 1, [9, 99]),
    r.encode_delivered_run(1, [10, 11]), r.encode_removed_run(1, 1, [10, 11]),
    r.encode_delivered_run(7, [0, 1]),  # unknown queue: ignored
    # A Sent run (version 5), one id among its messages, then one of them removed
    sent_run(1, 12, [b"\x96\xa3s-1\xa1q\xc4\x00\x00\xc0\x01", b"m13", b"m14"], 9.0),
    r.encode_removed(1, 13, 1), sent_run(7, 0, [b"a", b"b"]),  # unknown queue: ignored
]


def both_ways(data: bytes, *, last: bool) -> None:
    slow = Replay()
    decoded = d.decode_segment(data, last=last)
    slow.segment = decoded.number or 0
    ends = [o for o, _ in decoded.records[1:]] + [decoded.end][:len(decoded.records)]
    for (at, record), end in zip(decoded.records, ends, strict=True):
        slow.apply(record, end - at)
    fast = Replay()
    verdict = fast.read_segment(data, last=last)
    assert verdict == d.Decoded(decoded.number, [], decoded.end, decoded.bad_at,
                                decoded.torn, decoded.resync_at)
    assert fast.records == slow.records
    assert fast.queues == slow.queues
    assert fast.finish() == slow.finish()
    assert fast.queues == slow.queues


@pytest.mark.parametrize("body", MALFORMED)
def test_the_flat_loop_refuses_what_decode_body_refuses(body: bytes) -> None:
    with pytest.raises(d.DECODE_ERRORS):
        d.decode_body(body)
    for tail in (b"", LIFE[1]):  # torn, and corrupt (a good record follows)
        both_ways(segment(*LIFE[:4], r._frame(body), tail), last=True)


def test_the_flat_loop_folds_a_whole_life_like_apply() -> None:
    both_ways(segment(*LIFE), last=True)
    state = Replay()
    state.read_segment(segment(*LIFE), last=False)
    state.finish()
    assert list(state.queues[1].live()) == [0, 2, 3, 4, 5, 6, 7, 8, 12, 14]  # (1 came late)
    messages = state.queues[1].live().values()
    assert [m.size for m in messages][:3] == [len(LIFE[9]), len(LIFE[13]), len(LIFE[4])]
    assert [(m.failures, m.last_reason, m.last_consumer) for m in messages][:3] == [
        (1, None, None), (1, "ack-timeout", (41, 7)), (3, "broker-restart", (42, 7))]
    assert list(state.queues[1].dedup.items()) == [
        ("c-2", 2.0), ("c-3", 3.0), ("c" * 32 + "-4", 4.0), ("c-5", 5.0),
        ("r-1", 7.0), ("r-2", 7.0), ("r-3", 7.0), ("c-1", 8.0), ("s-1", 9.0)]
    assert state.queues[1].live()[14].size == len(b"m14") + 4  # (what the store counts)


@given(st.binary(max_size=200), st.integers(0, 10_000), st.booleans())
def test_the_flat_loop_agrees_on_damage_and_garbage(garbage: bytes, flip: int,
                                                    last: bool) -> None:
    data = bytearray(segment(*LIFE) + garbage)
    data[r.HEADER_SIZE + flip % (len(data) - r.HEADER_SIZE)] ^= 1 << flip % 8
    both_ways(bytes(data), last=last)


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.binary(max_size=300),
       st.sampled_from(list(r.RemovalReason)),
       st.none() | st.floats(allow_nan=False))
def test_the_append_fast_paths_write_exactly_what_the_encoders_return(
        qid: int, seq: int, message: bytes, reason: r.RemovalReason,
        accepted: float | None) -> None:
    buffer = bytearray(b"before")
    size = r.append_sent(buffer, qid, seq, message, accepted)
    r.append_delivered(buffer, qid, seq)
    r.append_removed(buffer, qid, seq, reason)
    sent = r.encode_sent(qid, seq, message, accepted=accepted)
    assert size == len(sent)
    assert bytes(buffer) == (b"before" + sent + r.encode_delivered(qid, seq)
                             + r.encode_removed(qid, seq, reason))


@given(st.integers(0, 2**32 - 1), st.integers(0, 2**63), st.lists(st.binary(max_size=40),
       min_size=1, max_size=30), st.none() | st.floats(allow_nan=False))
def test_a_sent_run_replays_as_its_sent_records_would(
        qid: int, first: int, messages: list[bytes], accepted: float | None) -> None:
    """Version 5: a SentRun says what as many Sent records in a row say (the messages'
    own bytes in the owner index aside: each counts its bytes and its length's 4)."""
    run = sent_run(qid, first, messages, accepted)
    assert d.decode_segment(segment(run), last=True).records == [
        (r.HEADER_SIZE, r.SentRun(qid, first, messages, accepted))]
    declared = r.encode_declared(qid, "q", {}, first)
    one_by_one = [r.encode_sent(qid, seq, message, accepted=accepted)
                  for seq, message in enumerate(messages, first)]
    as_run, as_records = Replay(), Replay()
    as_run.read_segment(segment(declared, run), last=True)
    as_records.read_segment(segment(declared, *one_by_one), last=True)
    got, want = as_run.queues[qid], as_records.queues[qid]
    assert (got.plain, got.next_seq, got.dedup) == (want.plain, want.next_seq, want.dedup)
    assert {seq: entry & 0xFFFFFFFF for seq, entry in got.owner.items()} == {
        seq: len(message) + 4 for seq, message in enumerate(messages, first)}


def _seqs_stepwise(seqs: list[int]) -> bytes:
    """A run's seqs as the format defines them, step by step (records.py takes a
    shortcut for consecutive ones)."""
    steps = [b - a for a, b in zip(seqs, seqs[1:], strict=False)]  # noqa: RUF007
    if 0 < min(steps) and max(steps) < 256:
        return bytes([r.RUN_DELTAS]) + seqs[0].to_bytes(8, "little") + bytes(steps)
    return bytes([r.RUN_SEQS]) + b"".join(seq.to_bytes(8, "little", signed=True)
                                          for seq in seqs)


@given(st.one_of(
    st.tuples(st.integers(0, 2**62), st.integers(2, 300)).map(
        lambda fc: list(range(fc[0], fc[0] + fc[1]))),  # consecutive: the shortcut
    st.lists(st.integers(0, 2**62), min_size=2, max_size=50),
    st.lists(st.integers(0, 600), min_size=2, max_size=50).map(sorted)))
def test_a_runs_seqs_are_encoded_as_the_format_says(seqs: list[int]) -> None:
    assert r._seqs(seqs) == _seqs_stepwise(seqs)
