"""After a failed fdatasync the journal is written afresh from the core's memory
(docs/journal.md, "After a failed sync"): the crash double loses the writes the failed
sync covered for good (zeros or garbage, as Linux may after marking the pages clean:
PostgreSQL's fsyncgate), later syncs succeed and prove nothing, and only
``Journal.rebuild`` with the core's ``durable_snapshot`` makes the journal trustworthy
again. A restart then recovers every message the core held, with its state."""

from __future__ import annotations

import errno
import random
from typing import Any

import pytest

from aiobus.broker.journal import Journal, JournalCorrupt, JournalError
from aiobus.broker.journal import records as r
from aiobus.broker.journal.decode import is_base
from aiobus.broker.snapshot import QueueSnapshot, SnapshotMessage, durable_snapshot

from .crashfs import CrashFS
from .test_core_durable import Durable


def busy(b: Durable) -> None:
    """Messages in every place the core keeps them: sealed in a Run and in the tail,
    stateful and ready, delayed by a nack and by a scheduled send, leased as bytes and
    as a QMsg, expiring, dead-lettered, and ids in a deduplication window."""
    d = b.driver
    p, c = d.client("p", client_id="producer"), d.client("c", pid=4321)
    p.declare("jobs", durable=True, max_deliveries=3)
    p.declare("timed", durable=True, ttl=600.0)
    for i in range(300):  # 256 sealed into a Run, the rest in the tail
        p.send("jobs", f"m{i}".encode())
    p.send_once("timed", 1, b"later", delay=50.0)  # scheduled; its id in the window
    p.send("timed", b"short", ttl=5.0)
    b.flush()
    c.consume("jobs", prefetch=4)
    got = c.deliveries()
    c.ack(got[0].tag)
    c.nack(got[1].tag, delay=100.0, reason="busy")  # delayed, with its failure
    c.nack(got[2].tag, reason="again")  # back at the front, a QMsg with state
    c.reject(got[3].tag, "bad")  # into jobs.dlq
    b.flush()


def expected(snapshot: list[QueueSnapshot]) -> dict[str, Any]:
    """What a restart must recover from ``snapshot``: a message out for delivery counts
    one more failed attempt, ``broker-restart``, its consumer kept."""
    return {q.name: (q.settings, q.next_seq, [
        (m.seq, m.message, m.failures + m.delivered, m.expires, m.due,
         "broker-restart" if m.delivered else m.last_reason, m.last_consumer)
        for m in q.messages], [(prefix + str(seq), at) for prefix, first, last, at in q.dedup
                               for seq in range(first, last + 1)]) for q in snapshot}


def recovered(fs: CrashFS) -> dict[str, Any]:
    journal, got = Journal.open(fs)
    journal.close()
    return {q.name: (q.settings, q.next_seq, [
        (m.seq, m.message, m.failures, m.expires, m.due, m.last_reason, m.last_consumer)
        for m in q.messages], q.dedup) for q in got.queues.values()}


def lose_a_sync(b: Durable, seed: int = 1) -> None:
    """The writes of the next sync are lost for good and the sync raises EIO."""
    fs = b.files
    b.journal.write()
    assert b.journal.unsynced  # (else there is nothing to sync, nor to lose)
    fs.fail_sync, fs.lose_on_failed_sync = True, random.Random(seed)
    with pytest.raises(JournalError) as failed:
        b.journal.sync()
    assert failed.value.cause == "EIO" and b.journal.damaged
    fs.fail_sync = False


def test_a_later_sync_proves_nothing_and_a_restart_would_meet_the_hole() -> None:
    """Without the rebuild: the double really loses the writes (the test below is not
    passing for want of damage)."""
    b = Durable()
    busy(b)
    d = b.driver
    p = d.client("p2")
    p.send("jobs", b"lost")  # confirmed once synced: the failed sync loses its record
    lose_a_sync(b)
    p.send("jobs", b"after")
    b.journal.write()
    with pytest.raises(JournalError, match="not trusted"):
        b.journal.sync()  # the fdatasync succeeds (fsyncgate) and proves nothing
    assert b.journal.unsynced
    b.files.sync(b.journal._handle)  # as a sync the store did not refuse would have
    with pytest.raises(JournalCorrupt):
        Journal.open(b.files.crash(random.Random(0)))


def scenario(b: Durable, *, lose: int | None) -> list[QueueSnapshot]:
    """:func:`busy`, more work, and (``lose``: a seed) a lost sync in the middle and the
    rebuild after it; returns the snapshot the rebuild wrote (or would have)."""
    busy(b)
    d = b.driver
    p, c = d.client("p2"), d.client("c2", pid=99)
    p.send("jobs", b"in the lost write")
    c.consume("jobs", prefetch=2)
    leased = c.deliveries()  # (the first consumer holds "again", retried, and more)
    assert len(leased) == 2
    if lose is None:
        b.flush()
    else:
        lose_a_sync(b, lose)
    c.ack(leased[1].tag)  # after the failure: its Removed only in the buffer
    d.advance(6.0)  # "short" expires into timed.dlq; the leases still run
    snapshot = durable_snapshot(d.core.queues)
    if lose is None:
        b.flush()
    else:
        size = b.journal.rebuild(snapshot)
        assert not b.journal.damaged and not b.journal.unsynced and b.journal.pending == 0
        (only,) = b.files.list()  # every older segment removed
        assert is_base(b.files.read_head(only, r.HEADER_SIZE))
        assert b.journal.statistics()["bytes"] == size
    return snapshot


@pytest.mark.parametrize("seed", range(4))
def test_the_rebuild_keeps_every_message_with_its_state(seed: int) -> None:
    """The oracle: the same work on a twin whose syncs never failed."""
    twin = Durable()
    scenario(twin, lose=None)
    want = recovered(twin.files.crash(random.Random(seed)))
    b = Durable()
    snapshot = scenario(b, lose=seed)
    assert recovered(b.files.crash(random.Random(seed))) == want == expected(snapshot)
    assert sum(len(q[2]) for q in want.values()) == 301
    assert [mid for mid, _ in want["timed"][3]] == ["producer-1"]
    assert any(m[5] == "broker-restart" and m[2] == 2 for m in want["jobs"][2])
    # and the journal goes on as before: the next records append to the new segment
    b.driver.client("p3").send("jobs", b"next")
    b.flush()
    after = recovered(b.files.crash(random.Random(seed)))
    assert len(after["jobs"][2]) == len(want["jobs"][2]) + 1
    assert b"next" in after["jobs"][2][-1][1]


def damaged() -> Durable:
    """:func:`busy`, then a send whose record a lost sync takes with it."""
    b = Durable()
    busy(b)
    b.driver.client("p2").send("jobs", b"in the lost write")
    lose_a_sync(b)
    return b


def test_a_crash_before_the_old_segments_are_removed_skips_them() -> None:
    b = damaged()
    fs = b.files
    remove = fs.remove

    def refuse(name: str) -> None:
        raise OSError(errno.EIO, "the crash came first")

    fs.remove = refuse  # type: ignore[method-assign]
    snapshot = durable_snapshot(b.driver.core.queues)
    b.journal.rebuild(snapshot)
    fs.remove = remove  # type: ignore[method-assign]
    after = fs.crash(random.Random(0))
    assert len(after.list()) == 2  # the damaged segment and the base after it
    assert recovered(after) == expected(snapshot)
    assert len(after.list()) == 1  # recovery removed what the base superseded


def test_a_failed_rebuild_leaves_everything_as_it_was_and_can_be_retried() -> None:
    b = damaged()
    fs = b.files
    before = fs.list()
    fs.fail_sync = True  # the new segment's own sync fails
    with pytest.raises(JournalError):
        b.journal.rebuild(durable_snapshot(b.driver.core.queues))
    assert b.journal.damaged and fs.list() == before  # (its tmp file removed)
    fs.fail_sync = False
    snapshot = durable_snapshot(b.driver.core.queues)
    b.journal.rebuild(snapshot)
    assert recovered(fs.crash(random.Random(0))) == expected(snapshot)


def test_a_failed_sync_in_a_rotation_damages_the_journal_too() -> None:
    """The old segment's fdatasync before a new one starts is a sync like any other:
    when it fails, write() stays on the segment, and the journal needs its rebuild."""
    fs = CrashFS()
    journal, _ = Journal.open(fs, segment_size=2048)
    journal.declare("jobs", {})
    message = b"\x96\xa4id-0\xa4jobs\xc4\x40" + bytes(64) + b"\x00\xc0\xcb" + bytes(8)
    journal.write()
    journal.sync()
    fs.fail_sync, fs.lose_on_failed_sync = True, random.Random(0)
    seq = 0
    while not journal.damaged:  # until a write fills the segment and rotates
        journal.sent("jobs", seq, message)
        journal.write()
        seq += 1
        assert seq < 100, "never rotated"
    fs.fail_sync = False
    assert len(fs.list()) == 1  # it stayed on the segment
    with pytest.raises(JournalError, match="not trusted"):
        journal.sync()
    journal.rebuild([QueueSnapshot("jobs", {}, seq, [], [
        SnapshotMessage(s, message, 0, None, None, None, None, False) for s in range(seq)])])
    journal.close()
    got = recovered(fs.crash(random.Random(0)))
    assert [m[0] for m in got["jobs"][2]] == list(range(seq))
