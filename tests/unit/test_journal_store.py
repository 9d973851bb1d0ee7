"""The journal store through the crash-simulating file double (tests/unit/crashfs.py),
and once over real files: recovery, torn tails, damage and repair, ENOSPC, compaction."""

from __future__ import annotations

import random
from pathlib import Path

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus.broker.journal import (
    Journal,
    JournalCorrupt,
    JournalError,
    OsFiles,
    RemovalReason,
    repair,
)
from aiobus.broker.journal import decode as d
from aiobus.broker.journal import records as r
from aiobus.broker.journal.files import segment_name
from aiobus.broker.snapshot import QueueSnapshot, SnapshotMessage

from .crashfs import CrashFS

ACKED = RemovalReason.ACKED


def packed(queue: str, seq: int, size: int = 20) -> bytes:
    return msgpack.packb([f"id-{queue}-{seq}", queue, b"x" * size, 0, None, 1.0])


def live(fs: CrashFS, **kw: int) -> dict[str, list[tuple[int, int, float | None]]]:
    journal, recovered = Journal.open(fs, **kw)
    journal.close()
    return {name: [(m.seq, m.failures, m.due) for m in q.messages]
            for name, q in recovered.queues.items()}


def test_what_was_synced_comes_back_in_order_with_its_state() -> None:
    fs = CrashFS()
    journal, recovered = Journal.open(fs)
    assert recovered.queues == {} and recovered.report.messages == 0
    journal.declare("jobs", {"ttl": 60.0})
    journal.declare("jobs.dlq", {})
    for seq in range(5):
        journal.sent("jobs", seq, packed("jobs", seq), expires=1000.0 + seq)
    journal.delivered("jobs", 0)
    journal.removed("jobs", 0, ACKED)
    journal.delivered("jobs", 1)
    journal.failed("jobs", 1, 1, 500.0)
    journal.delivered("jobs", 2)  # never answered
    journal.delivered("jobs", 3)
    journal.removed("jobs", 3, RemovalReason.DEAD_LETTERED)
    journal.sent("jobs.dlq", 0, packed("jobs", 3), failures=5)
    journal.write()
    journal.sync()
    journal.close()
    again, recovered = Journal.open(fs.crash(random.Random(0)))
    jobs = recovered.queues["jobs"]
    assert jobs.settings == {"ttl": 60.0} and jobs.next_seq == 5
    assert [(m.seq, m.failures, m.due, m.expires) for m in jobs.messages] == [
        (1, 1, 500.0, 1001.0), (2, 1, None, 1002.0), (4, 0, None, 1004.0)]
    assert jobs.messages[0].message == packed("jobs", 1)
    assert [m.message for m in recovered.queues["jobs.dlq"].messages] == [packed("jobs", 3)]
    report = recovered.report
    assert (report.queues, report.messages, report.torn) == (2, 4, None)
    assert report.bytes > 0 and report.seconds >= 0
    # the inferred failure of message 2 is journaled, so it is not counted twice
    again.write()
    again.sync()
    again.delivered("jobs", 2)
    again.write()
    again.sync()
    assert live(fs.crash(random.Random(0)))["jobs"][1] == (2, 1, None)
    assert live(again.files)["jobs"][1] == (2, 2, None)  # type: ignore[arg-type]


def test_purge_and_delete_are_journaled() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    for name in ("a", "b"):
        journal.declare(name, {})
        for seq in range(3):
            journal.sent(name, seq, packed(name, seq))
    journal.delivered("a", 1)
    journal.purged("a")
    journal.deleted("b")
    journal.declare("b", {"max_length": 3})
    journal.sent("b", 0, packed("b", 0))
    journal.write()
    journal.sync()
    assert live(fs) == {"a": [(1, 1, None)], "b": [(0, 0, None)]}


def build(fs: CrashFS, messages: int, segment_size: int = 1 << 20) -> None:
    """Send ``messages`` and ack every third (seq 1, 4, 7...); write+sync after each."""
    journal, _ = Journal.open(fs, segment_size=segment_size)
    journal.declare("q", {})
    journal.write()
    for seq in range(messages):
        journal.sent("q", seq, packed("q", seq))
        if seq % 3 == 2:
            journal.removed("q", seq - 1, ACKED)
        journal.write()
        journal.sync()
    journal.close()


def test_truncating_the_last_segment_anywhere_loses_no_whole_record() -> None:
    fs = CrashFS()
    build(fs, 30)
    (name,) = fs.list()
    data = fs.read(name)
    records = d.decode_segment(data, last=True).records
    ends = [o for o, _ in records[1:]] + [len(data)]
    for cut in range(len(data) + 1):
        cut_fs = CrashFS()
        cut_fs.dir[name] = type(fs.dir[name])(bytearray(data[:cut]), bytearray(data[:cut]))
        cut_fs.durable_dir = dict(cut_fs.dir)
        if cut < r.HEADER_SIZE:
            with pytest.raises(JournalCorrupt):
                Journal.open(cut_fs)
            continue
        whole = [rec for (_, rec), end in zip(records, ends, strict=True) if end <= cut]
        sent = {rec.seq for rec in whole if isinstance(rec, r.Sent)}
        removed = {rec.seq for rec in whole if isinstance(rec, r.Removed)}
        journal, recovered = Journal.open(cut_fs)
        got = [m.seq for q in recovered.queues.values() for m in q.messages]
        assert got == sorted(sent - removed), cut
        torn = recovered.report.torn
        assert (torn is None) == (cut in ends or cut == r.HEADER_SIZE), cut
        if torn is not None:
            assert torn.file == name and cut - torn.dropped == torn.offset
        assert len(cut_fs.read(name)) <= cut  # the torn tail was cut off
        journal.close()


@pytest.mark.parametrize("which", ["sealed", "last"])
def test_a_flipped_bit_is_refused_then_repaired_with_the_losses_named(which: str) -> None:
    fs = CrashFS()
    build(fs, 60, segment_size=2000)
    names = fs.list()
    assert len(names) >= 3
    name = names[0] if which == "sealed" else names[-1]
    data = bytearray(fs.read(name))
    records = d.decode_segment(bytes(data), last=name == names[-1]).records
    victim_at, victim = next((o, rec) for o, rec in records[len(records) // 2:]
                             if isinstance(rec, r.Sent) and rec.seq % 3 != 1)
    data[victim_at + 12] ^= 0x10
    fs.dir[name].current[:] = data
    with pytest.raises(JournalCorrupt) as caught:
        Journal.open(fs)
    assert (caught.value.file, caught.value.offset) == (name, victim_at)
    assert name in str(caught.value) and str(victim_at) in str(caught.value)
    report = repair(fs, name)
    assert report.lost == [("q", victim.seq)]
    assert report.moved_to in fs.list()
    recovered = live(fs)["q"]
    assert victim.seq not in [seq for seq, _, _ in recovered]
    assert len(recovered) == 60 - 20 - 1  # 20 were acked


def test_enospc_is_typed_leaves_nothing_torn_and_writes_resume() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    journal.declare("q", {})
    journal.sent("q", 0, packed("q", 0))
    journal.write()
    journal.sync()
    fs.space = fs.used() + 30
    journal.sent("q", 1, packed("q", 1, 200))
    with pytest.raises(JournalError) as caught:
        journal.write()
    assert caught.value.cause == "ENOSPC" and caught.value.file is not None
    assert d.decode_segment(fs.read(fs.list()[0]), last=False).bad_at is None
    assert live(fs) == {"q": [(0, 0, None)]}  # reads still work
    fs.space = None
    journal.sent("q", 2, packed("q", 2))
    journal.write()
    journal.sync()
    assert live(fs) == {"q": [(0, 0, None), (1, 0, None), (2, 0, None)]}


def test_a_failed_sync_is_typed() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    journal.declare("q", {})
    journal.write()
    fs.fail_sync = True
    with pytest.raises(JournalError) as caught:
        journal.sync()
    assert caught.value.cause == "EIO"


def test_compaction_bounds_disk_use_under_steady_send_and_ack() -> None:
    fs = CrashFS()
    size = 4096
    journal, _ = Journal.open(fs, segment_size=size)
    journal.declare("q", {})
    journal.declare("slow", {})
    journal.sent("slow", 0, packed("slow", 0))  # never acked: pins the first segment
    peak = 0
    for seq in range(3000):
        journal.sent("q", seq, packed("q", seq))
        journal.delivered("q", seq)
        if seq >= 10:
            journal.removed("q", seq - 10, ACKED)
        journal.write()
        journal.compact()
        journal.write()
        journal.sync()
        stats = journal.statistics()
        assert stats["bytes"] <= 2 * stats["live_bytes"] + 3 * size, (seq, stats)
        assert fs.used() == stats["bytes"]
        peak = max(peak, fs.used())
    assert peak < 4 * size
    journal.close()
    recovered = live(fs, segment_size=size)
    assert recovered["slow"] == [(0, 0, None)]
    assert [seq for seq, _, _ in recovered["q"]] == list(range(2990, 3000))
    assert all(failures == 1 for _, failures, _ in recovered["q"])  # in flight at the end


OPS = st.lists(st.tuples(st.sampled_from("sdfarc"), st.integers(0, 10**6)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(OPS, st.integers(0, 2**32))
def test_what_was_synced_survives_any_crash(ops: list[tuple[str, int]], seed: int) -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs, segment_size=600)
    journal.declare("q", {})
    model: dict[int, tuple[int, float | None]] = {}  # seq -> (failures, due)
    written: dict[int, int] = {}  # seq -> the last failure count journaled
    in_flight: set[int] = set()
    synced: dict[int, tuple[int, float | None]] | None = None
    synced_flight: set[int] = set()
    seq = 0
    for op, n in ops:
        pick = sorted(model)[n % len(model)] if model else None
        if op == "s":
            journal.sent("q", seq, packed("q", seq, n % 50), due=float(n) if n % 2 else None)
            model[seq] = (0, float(n) if n % 2 else None)
            seq += 1
        elif op == "d" and pick is not None and pick not in in_flight:
            journal.delivered("q", pick)
            in_flight.add(pick)
        elif op == "f" and pick is not None and pick in in_flight:
            model[pick] = (model[pick][0] + 1, float(n))
            journal.failed("q", pick, *model[pick])
            written[pick] = model[pick][0]
            in_flight.discard(pick)
        elif op == "a" and pick is not None:
            journal.removed("q", pick, ACKED)
            del model[pick]
            in_flight.discard(pick)
        elif op == "c":
            journal.compact()
        journal.write()
        if op == "r" or n % 3 == 0:
            journal.sync()
            synced, synced_flight = dict(model), set(in_flight)
    after = fs.crash(random.Random(seed))
    try:
        recovered = live(after, segment_size=600)
    except JournalCorrupt as exc:  # garbage in unsynced writes, then a write that landed
        repair(after, exc.file)
        recovered = live(after, segment_size=600)
    got = {s: (f, d) for s, f, d in recovered.get("q", [])}
    sent_ever = set(range(seq))
    assert set(got) <= sent_ever  # nothing unexpected appears
    if synced is None:
        return
    for s, (failures, due) in synced.items():
        if s not in got:  # only an ack written after the sync may have removed it
            assert s not in model
            continue
        # an acked message: its last count (the crash may drop the ack, keep the fail)
        final_failures = model.get(s, (written.get(s, failures), None))[0]
        # synced failures survive; at most one more for a delivery left unanswered
        assert failures <= got[s][0] <= final_failures + 1
        if s not in synced_flight and got[s][0] == failures:
            assert got[s][1] == due


def test_os_files_in_a_temporary_directory(tmp_path: Path) -> None:
    files = OsFiles(str(tmp_path / "journal"))
    journal, _ = Journal.open(files, segment_size=300)
    journal.declare("q", {})
    for seq in range(20):
        journal.sent("q", seq, packed("q", seq))
        journal.write()
        journal.sync()
    for seq in range(15):
        journal.removed("q", seq, ACKED)
    journal.write()
    journal.compact()
    journal.write()
    journal.sync()
    journal.close()
    names = sorted(p.name for p in (tmp_path / "journal").iterdir())
    assert names and all(n.endswith(".seg") for n in names)
    _, recovered = Journal.open(OsFiles(str(tmp_path / "journal")), segment_size=300)
    assert [m.seq for m in recovered.queues["q"].messages] == list(range(15, 20))
    handle = files.create("x.tmp")
    files.append(handle, b"abc")
    files.sync(handle)
    files.truncate(handle, 1)
    assert files.size(handle) == 1
    files.close(handle)
    files.rename("x.tmp", "y")
    files.sync_directory()
    assert files.read("y") == b"a"
    files.remove("y")


def details(fs: CrashFS, **kw: int) -> dict[int, tuple[int, str | None, tuple[int, int] | None]]:
    journal, recovered = Journal.open(fs, **kw)
    journal.close()
    return {m.seq: (m.failures, m.last_reason, m.last_consumer)
            for m in recovered.queues["q"].messages}


def test_a_last_failure_survives_compaction_and_restarts() -> None:
    """A message's last failure (reason text, consumer) comes back after compaction copied
    it forward, before and after a restart; a crash while it is leased makes
    ``broker-restart`` its last failure, keeping the consumer, and is counted once."""
    fs = CrashFS()
    size = 1024
    journal, _ = Journal.open(fs, segment_size=size)
    journal.declare("q", {})
    for seq in range(3):
        journal.sent("q", seq, packed("q", seq))
        journal.delivered("q", seq)
    journal.failed("q", 0, 1, 99.0, reason="why", consumer=(4321, 1000))
    journal.failed("q", 1, 1, None, reason="ack-timeout", consumer=(7, 8))
    journal.delivered("q", 1)  # leased at the crash

    def churn(journal: Journal, first: int) -> None:
        """Traffic that is acked at once, until the first segments are compacted away."""
        for seq in range(first, first + 60):
            journal.sent("q", seq, packed("q", seq))
            journal.removed("q", seq, ACKED)
            journal.write()
            journal.compact()
            journal.write()
            journal.sync()

    churn(journal, 100)
    journal.close()
    assert segment_name(1) not in fs.list()  # messages 0-2 were copied forward
    assert details(fs, segment_size=size) == {
        0: (1, "why", (4321, 1000)), 1: (2, "broker-restart", (7, 8)),
        2: (1, "broker-restart", None)}
    # Once more after the restart: the store's state came from the replay this time.
    journal, _ = Journal.open(fs, segment_size=size)
    before = set(fs.list())
    churn(journal, 200)
    journal.close()
    assert not before & set(fs.list())  # every segment was compacted away
    assert details(fs, segment_size=size) == {
        0: (1, "why", (4321, 1000)), 1: (2, "broker-restart", (7, 8)),
        2: (1, "broker-restart", None)}


def old_segment(version: int, records: bytes) -> CrashFS:
    """A journal of one synced segment in format ``version``: queue "q" (id 1) declared,
    then ``records``."""
    fs = CrashFS()
    head = r._SEGMENT_HEADER.pack(r.MAGIC, version, 0, 1)
    handle = fs.create(segment_name(1))
    fs.append(handle, head + r._crc(head).to_bytes(4, "little")
              + r.encode_declared(1, "q", {}, 0) + records)
    fs.sync(handle)
    fs.close(handle)
    fs.sync_directory()
    return fs


def test_a_version_1_journal_is_read_and_new_records_go_to_a_new_segment() -> None:
    """Version 2 records (failure details) are never appended to a version 1 segment: an
    older broker refuses a version 2 segment rather than misread it (records.py)."""
    fs = old_segment(1, r.encode_sent(1, 0, packed("q", 0)) + r.encode_delivered(1, 0)
                     + r.encode_failed(1, 0, 1, None))
    old = fs.read(segment_name(1))
    journal, recovered = Journal.open(fs)
    assert [(m.seq, m.failures, m.last_reason) for m in recovered.queues["q"].messages] == [
        (0, 1, None)]
    journal.delivered("q", 0)
    journal.failed("q", 0, 2, None, reason="why", consumer=(1, 2))
    journal.write()
    journal.sync()
    journal.close()
    assert fs.read(segment_name(1)) == old
    assert d.header_version(fs.read(segment_name(2))) == r.FORMAT_VERSION
    assert details(fs) == {0: (2, "why", (1, 2))}


def test_a_sync_in_steps_covers_what_was_written_when_it_began() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    journal.declare("jobs", {})
    for seq in range(3):
        journal.sent("jobs", seq, packed("jobs", seq))
    journal.write()
    ticket = journal.begin_sync()
    journal.sent("jobs", 3, packed("jobs", 3))  # written after the ticket began
    journal.write()
    journal.sync_file(ticket)  # (the shell runs this in a worker thread)
    journal.end_sync(ticket)
    assert journal.synced == ticket.written < journal.written and journal.unsynced
    for seed in range(20):  # whatever the crash keeps of seq 3, 0-2 are there
        assert [m[0] for m in live(fs.crash(random.Random(seed)))["jobs"]][:3] == [0, 1, 2]
    journal.sync()
    assert not journal.unsynced
    journal.close()


def test_a_failed_sync_in_steps_raises_and_counts_nothing_as_synced() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    journal.declare("jobs", {})
    journal.sent("jobs", 0, packed("jobs", 0))
    journal.write()
    ticket = journal.begin_sync()
    fs.fail_sync = True
    with pytest.raises(OSError) as failed:
        journal.sync_file(ticket)
    with pytest.raises(JournalError) as error:
        journal.end_sync(ticket, failed.value)
    assert error.value.cause == "EIO" and error.value.file == segment_name(1)
    assert journal.unsynced and journal.synced == 0
    fs.fail_sync = False
    with pytest.raises(JournalError, match="not trusted"):  # it proves nothing now
        journal.sync()
    assert journal.unsynced and journal.damaged
    journal.rebuild([QueueSnapshot("jobs", {}, 1, [], [SnapshotMessage(
        0, packed("jobs", 0), 0, None, None, None, None, False)])])
    assert not journal.unsynced and not journal.damaged
    journal.close()
    assert live(fs.crash(random.Random(0))) == {"jobs": [(0, 0, None)]}


def test_a_segment_rotated_away_under_a_ticket_is_closed_when_the_ticket_ends() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs, segment_size=4096)
    journal.declare("jobs", {})
    journal.sent("jobs", 0, packed("jobs", 0))
    journal.write()
    ticket = journal.begin_sync()  # holds segment 1's handle
    for seq in range(1, 40):
        journal.sent("jobs", seq, packed("jobs", seq, 200))
    journal.write()  # past segment_size: rotates to segment 2
    assert journal.statistics()["segments"] == 2
    assert ticket.handle in fs.handles  # not closed under the worker thread
    assert not journal.unsynced  # rotation synced segment 1 and made segment 2 whole
    journal.sync_file(ticket)
    journal.end_sync(ticket)
    assert ticket.handle not in fs.handles
    journal.close()
    assert fs.handles == {}


def test_a_segment_goes_only_after_a_sync_that_began_after_its_removals() -> None:
    fs = CrashFS()
    journal, _ = Journal.open(fs, segment_size=4096)
    journal.declare("jobs", {})
    for seq in range(30):
        journal.sent("jobs", seq, packed("jobs", seq, 200))
    journal.write()  # rotates: segment 1 owns the 30 messages
    journal.sync()
    early = journal.begin_sync()
    for seq in range(30):
        journal.removed("jobs", seq, ACKED)
    journal.write()
    journal.sync_file(early)
    journal.end_sync(early)  # began before the removals: segment 1 stays
    assert segment_name(1) in fs.list()
    journal.sync()
    assert segment_name(1) not in fs.list()
    journal.close()


def records_of(fs: CrashFS) -> list[r.Record]:
    return [record for name in fs.list() if name.endswith(".seg")
            for _, record in d.decode_segment(fs.read(name), last=True).records]


def test_deliveries_and_removals_in_a_row_are_merged_into_runs_in_order() -> None:
    """Version 4: what the core journals in a row for one queue (a pump's deliveries,
    an ACK_MANY's acks) is one record; any other record ends the run, so the order of
    every change stays as it was made (a Failed between two Delivered of one message
    must stay between them)."""
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    journal.declare("a", {})
    journal.declare("b", {})
    for seq in range(4):
        journal.sent("a", seq, packed("a", seq))
    journal.sent("b", 0, packed("b", 0))
    journal.delivered("a", 0)
    before = journal.pending
    for seq in range(1, 4):
        journal.delivered("a", seq)
    assert journal.pending == before + 3 * 8  # (what pending counts for a run)
    journal.delivered("b", 0)  # another queue: another run
    journal.failed("a", 1, 1, None, reason="why")  # ends the run: stays in its place
    journal.delivered("a", 1)
    for seq in (0, 2):
        journal.removed("a", seq, ACKED)
    journal.removed("a", 3, RemovalReason.REJECTED)  # another reason: another record
    journal.write()
    journal.sync()
    journal.close()
    assert records_of(fs)[-8:] == [
        r.SentRun(1, 0, [packed("a", seq) for seq in range(4)]), r.Sent(2, 0, packed("b", 0),
                                                                        0, None, None),
        r.DeliveredRun(1, [0, 1, 2, 3]), r.Delivered(2, 0),
        r.Failed(1, 1, 1, None, "why"), r.Delivered(1, 1),
        r.RemovedRun(1, ACKED, [0, 2]), r.Removed(1, 3, RemovalReason.REJECTED)]
    assert live(fs) == {"a": [(1, 2, None)], "b": [(0, 1, None)]}  # the crash: +1 each


def test_sends_deliveries_and_acks_of_one_queue_merge_side_by_side() -> None:
    """Version 5: a send that goes straight to a consumer journals Sent, Delivered,
    Sent, Delivered, ... and an ACK_MANY's acks come between: the three runs grow side
    by side and are written Sent run first, then deliveries, then removals (each
    message's own records keep their order). A new seq out of step, another accepted
    time, a message with state or a large one end the Sent run."""
    fs = CrashFS()
    journal, _ = Journal.open(fs)
    journal.declare("a", {})
    journal.sent("a", 0, packed("a", 0), accepted=5.0)
    journal.delivered("a", 0)
    journal.sent("a", 1, packed("a", 1), accepted=5.0)
    journal.delivered("a", 1)
    journal.removed("a", 0, ACKED)
    journal.sent("a", 2, packed("a", 2), accepted=5.0)
    journal.removed("a", 1, ACKED)
    assert journal.statistics()["live_messages"] == 1  # (statistics ends the runs)
    journal.sent("a", 3, packed("a", 3), accepted=5.0)
    journal.sent("a", 4, packed("a", 4), accepted=6.0)  # another time: another run
    journal.sent("a", 5, packed("a", 5), accepted=6.0)
    journal.sent("a", 7, packed("a", 7))  # out of step
    journal.sent("a", 8, packed("a", 8))
    journal.sent("a", 9, packed("a", 9), 0, None, 99.0)  # scheduled: a Sent of its own
    journal.sent("a", 10, packed("a", 10))
    journal.sent("a", 11, b"\x96" + bytes(2000))  # large: a Sent of its own
    journal.write()
    journal.sync()
    journal.close()
    assert records_of(fs)[-9:] == [
        r.SentRun(1, 0, [packed("a", seq) for seq in range(3)], 5.0),
        r.DeliveredRun(1, [0, 1]), r.RemovedRun(1, ACKED, [0, 1]),
        r.Sent(1, 3, packed("a", 3), 0, None, None, accepted=5.0),  # a run of one
        r.SentRun(1, 4, [packed("a", 4), packed("a", 5)], 6.0),
        r.SentRun(1, 7, [packed("a", 7), packed("a", 8)]),
        r.Sent(1, 9, packed("a", 9), 0, None, 99.0),
        r.Sent(1, 10, packed("a", 10), 0, None, None),
        r.Sent(1, 11, b"\x96" + bytes(2000), 0, None, None)]
    journal, recovered = Journal.open(fs)
    assert [m.seq for m in recovered.queues["a"].messages] == [2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert journal.statistics()["live_messages"] == 9
    journal.close()


def test_a_version_3_journal_is_read_and_runs_go_to_a_new_segment() -> None:
    """A version 3 broker's journal (one Delivered and one Removed per message) is read
    as before; runs (version 4) are never appended to it: a version 3 broker would take
    them for damage, and refuses a version 4 header cleanly instead."""
    fs = old_segment(3, b"".join(r.encode_sent(1, seq, packed("q", seq)) for seq in range(4))
                     + r.encode_delivered(1, 0) + r.encode_delivered(1, 1)
                     + r.encode_removed(1, 0, ACKED))
    old = fs.read(segment_name(1))
    journal, recovered = Journal.open(fs)
    assert [(m.seq, m.failures) for m in recovered.queues["q"].messages] == [
        (1, 1), (2, 0), (3, 0)]
    journal.delivered("q", 2)
    journal.delivered("q", 3)
    journal.removed("q", 2, ACKED)
    journal.removed("q", 3, ACKED)
    journal.write()
    journal.sync()
    journal.close()
    assert fs.read(segment_name(1)) == old
    assert d.header_version(fs.read(segment_name(2))) == r.FORMAT_VERSION == 5
    assert r.RemovedRun(1, ACKED, [2, 3]) in records_of(fs)
    assert live(fs) == {"q": [(1, 1, None)]}


def test_a_segment_head_holds_the_window_as_runs_once_the_core_is_attached() -> None:
    """Version 4: the core's window goes into each new segment's head as DedupRuns, a
    run a loop turn (a window of 100,000 ids took 77 ms to write as id strings, at each
    rotation); the window recovery found, before the core is attached, as DedupIds."""
    fs = CrashFS()
    journal, _ = Journal.open(fs, segment_size=600)
    journal.declare("jobs", {})
    runs = [("app-", 1, 200, 1000.0), ("other-", 7, 7, 1001.5)]
    journal.attach_windows(lambda name: runs if name == "jobs" else [])
    seq = 0
    while len(fs.list()) < 2:
        journal.sent("jobs", seq, packed("jobs", seq))
        journal.write()
        seq += 1
    journal.sync()
    journal.close()
    head = d.decode_segment(fs.read(fs.list()[-1]), last=True).records
    assert [record for _, record in head[:2]] == [
        r.QueueDeclared(1, "jobs", {}, seq), r.DedupRuns(1, runs)]
    again, recovered = Journal.open(fs, segment_size=600)
    window = recovered.queues["jobs"].dedup
    assert len(window) == 201 and window[0] == ("app-1", 1000.0)
    assert window[-1] == ("other-7", 1001.5)
    while len(fs.list()) < 3:  # not attached yet: what recovery found, as ids
        again.sent("jobs", seq, packed("jobs", seq))
        again.write()
        seq += 1
    again.close()
    head = d.decode_segment(fs.read(fs.list()[-1]), last=True).records
    assert head[1][1] == r.DedupIds(1, window)
