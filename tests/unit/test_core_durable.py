"""Durable queues in the sans-IO core: every change journaled, and a restarted core
(a new BrokerCore replaying the same journal) holds what the old one held: acked
messages gone, unacked ones ready with their attempts, delayed ones with their due time,
dead letters with their headers, ids unchanged (issue 10)."""

from __future__ import annotations

from typing import Any

import pytest

from aiobus.broker.journal import Journal
from aiobus.protocol import Op

from .crashfs import CrashFS
from .helpers import Driver

WALL = 1_000_000.0


class Durable:
    """A core with a journal over in-memory files, restartable like a broker process."""

    def __init__(self) -> None:
        self.files = CrashFS()
        self.driver = self._start(0.0)

    def _start(self, now: float) -> Driver:
        journal, recovered = Journal.open(self.files)
        self.journal = journal
        # A new process: the monotonic clock starts anew, the wall clock goes on.
        d = Driver(wall_offset=WALL + now, journal=journal)
        d.core.restore(recovered, d.now)
        self.recovered = recovered
        return d

    def flush(self) -> None:
        """What the shell does at the end of every loop turn."""
        self.journal.write()
        self.journal.sync()

    def restart(self, after: float = 0.0) -> Driver:
        """Crash (nothing unwritten survives), then start again ``after`` seconds later."""
        self.flush()
        elapsed = self.driver.now + after
        self.journal.close()
        self.driver = self._start(elapsed)
        return self.driver


@pytest.fixture
def b() -> Durable:
    return Durable()


def stats(d: Driver, name: str) -> dict[str, Any]:
    return d.queue_stats(name)


def test_durable_needs_a_journal() -> None:
    d = Driver()
    code, message = d.client("p").error(Op.DECLARE, "jobs", {"durable": True})
    assert code == "bad-option" and "data directory" in message


def test_declared_settings_survive_a_restart(b: Durable) -> None:
    p = b.driver.client("p")
    settings = p.ok(Op.DECLARE, "jobs", {"durable": True, "retry_delays": [1, 5],
                                         "max_deliveries": 3})
    d = b.restart()
    # The queue exists before anyone declares it, with the same settings.
    assert d.core.stats()["queues"]["jobs"]["settings"] == settings
    assert d.client("p").ok(Op.DECLARE, "jobs", {"durable": True, "retry_delays": [1, 5],
                                                 "max_deliveries": 3}) == settings
    # Its dead-letter queue came along, durable too.
    assert d.core.stats()["queues"]["jobs.dlq"]["settings"]["durable"] is True


def test_a_restart_keeps_what_was_not_acked(b: Durable) -> None:
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    for i in range(6):
        p.send("jobs", f"m{i}".encode())
    c.consume("jobs", prefetch=4)
    got = c.deliveries()
    assert [x.body for x in got] == [b"m0", b"m1", b"m2", b"m3"]
    c.ack(got[0].tag)  # gone for good
    c.nack(got[1].tag, delay=100.0)  # delayed until now + 100
    got += c.deliveries()  # the two freed slots take m4 and m5
    assert [x.body for x in got[4:]] == [b"m4", b"m5"]
    p.send("jobs", b"m6")  # ready when the broker dies; m2..m5 are leased
    ids = {x.body: x.id for x in got}

    d = b.restart(after=10.0)
    s = stats(d, "jobs")
    assert (s["ready"], s["delayed"], s["unacked"]) == (5, 1, 0)
    c2 = d.client("c2")
    c2.consume("jobs", prefetch=10)
    again = c2.deliveries()
    # The leased ones count the crash as a failed attempt; ids are unchanged.
    assert [(x.body, x.attempt) for x in again] == [
        (b"m2", 2), (b"m3", 2), (b"m4", 2), (b"m5", 2), (b"m6", 1)]
    assert again[0].id == ids[b"m2"]
    for x in again:
        c2.ack(x.tag)
    d.advance(89.0)  # 10 + 89 < 100 s since the nack: still delayed
    assert c2.deliveries() == []
    d.advance(1.5)
    (late,) = c2.deliveries()
    assert (late.body, late.attempt, late.id) == (b"m1", 2, ids[b"m1"])


def test_dead_letters_and_acks_survive(b: Durable) -> None:
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_deliveries": 1})
    p.send("jobs", b"bad", headers={"k": "v"})
    p.send("jobs", b"good")
    c.consume("jobs", prefetch=2)
    bad, good = c.deliveries()
    c.reject(bad.tag, "nope")
    c.ack(good.tag)
    d = b.restart()
    assert stats(d, "jobs")["ready"] == 0
    c2 = d.client("c2")
    c2.consume("jobs.dlq")
    letter = c2.delivery()
    assert letter.body == b"bad" and letter.id == bad.id
    assert letter.headers is not None
    assert (letter.headers["k"], letter.headers["x-dead-reason"],
            letter.headers["x-reason-text"]) == ("v", "rejected", "nope")


def test_a_crash_on_the_last_attempt_dead_letters_on_restart(b: Durable) -> None:
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_deliveries": 2})
    p.send("jobs", b"x")
    c.consume("jobs")
    c.nack(c.delivery().tag)  # attempt 1 failed
    assert c.delivery().attempt == 2  # leased when the broker dies: attempt 2 fails too
    d = b.restart()
    assert stats(d, "jobs")["ready"] == 0
    c2 = d.client("c2")
    c2.consume("jobs.dlq")
    letter = c2.delivery()
    assert (letter.headers or {})["x-dead-reason"] == "max-deliveries"
    assert (letter.headers or {})["x-attempts"] == "2"


def test_ttl_counts_across_a_restart(b: Durable) -> None:
    d = b.driver
    p = d.client("p")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "ttl": 30})
    p.send("jobs", b"short", ttl=5.0)
    p.send("jobs", b"long")
    d = b.restart(after=10.0)  # the 5 s TTL passed while the broker was down
    d.advance(0)
    s = stats(d, "jobs")
    assert (s["ready"], s["expired"]) == (1, 1)
    d.advance(19.0)  # 29 s after the send: still there
    assert stats(d, "jobs")["ready"] == 1
    d.advance(2.0)
    assert stats(d, "jobs")["ready"] == 0


def test_a_cancel_release_counts_no_attempt_after_a_restart(b: Durable) -> None:
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    p.send("jobs", b"x")
    sid = c.consume("jobs")
    c.delivery()
    c.cancel(sid)  # released: not an attempt
    d = b.restart()
    c2 = d.client("c2")
    c2.consume("jobs")
    assert c2.delivery().attempt == 1


def test_non_durable_queues_are_not_journaled(b: Durable) -> None:
    d = b.driver
    p = d.client("p")
    p.send("memory", b"x")
    p.ok(Op.DECLARE, "kept", {"durable": True})
    b.flush()
    before = b.journal.statistics()["bytes"]
    for _ in range(100):
        p.send("memory", b"x" * 100)
    b.flush()
    assert b.journal.statistics()["bytes"] == before
    d = b.restart()
    assert "memory" not in d.core.stats()["queues"]


def test_durability_cannot_change_once_a_queue_holds_messages(b: Durable) -> None:
    p = b.driver.client("p")
    p.send("jobs", b"in memory")
    code, message = p.error(Op.DECLARE, "jobs", {"durable": True})
    assert code == "bad-option" and "before it is first used" in message


def test_a_release_keeps_the_last_failure_across_a_restart(b: Durable) -> None:
    """A CANCEL releases the lease with no attempt counted: the journaled release repeats
    the last failure's reason and consumer, so a restart does not forget them (§8 "Dead
    letters": ``x-reason-text``, ``x-consumer-pid`` of the last failure)."""
    d = b.driver
    p, c = d.client("p"), d.client("c", pid=4321)
    p.ok(Op.DECLARE, "jobs", {"durable": True, "ttl": 5.0})
    p.send("jobs", b"x")
    sid = c.consume("jobs")
    c.nack(c.delivery().tag, reason="why")  # failed by pid 4321, back at once
    assert c.delivery().attempt == 2
    c.cancel(sid)  # released
    d = b.restart()
    d.advance(5.0)  # expired: dead-lettered without failing again
    c2 = d.client("c2")
    c2.consume("jobs.dlq")
    headers = c2.delivery().headers or {}
    assert {k: headers.get(k) for k in ("x-attempts", "x-reason-text", "x-consumer-pid")} == {
        "x-attempts": "1", "x-reason-text": "why", "x-consumer-pid": "4321"}


def test_queued_stateless_messages_keep_their_numbers_on_every_path(b: Durable) -> None:
    """A durable message that waits in the queue without state is bytes in a Run, its
    sequence number beside it (queue_state.py); each way out of the queue must journal
    it under that number: an ack, a nack, a CANCEL release, a crash while leased, an
    overflow dead-lettering the oldest, a purge. A restart then holds exactly what the
    old core held, in order."""
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_length": 600, "overflow": "dead-letter"})
    for i in range(601):  # m0 overflows into jobs.dlq; m1..m600 wait, 256 to a Run
        p.send("jobs", f"m{i}".encode())
    sid = c.consume("jobs", prefetch=4)
    got = c.deliveries()
    assert [x.body for x in got] == [b"m1", b"m2", b"m3", b"m4"]
    c.ack(got[0].tag)
    c.nack(got[1].tag, delay=50.0)
    got += c.deliveries()  # m5, m6
    c.cancel(sid)  # m3..m6 released to the front, no attempt counted
    c2 = d.client("c2")
    c2.consume("jobs", prefetch=2)
    leased = c2.deliveries()  # held when the broker dies: a failed attempt each
    assert [(x.body, x.attempt) for x in leased] == [(b"m3", 1), (b"m4", 1)]

    d = b.restart(after=1.0)
    assert stats(d, "jobs")["ready"] == 598 and stats(d, "jobs")["delayed"] == 1
    assert [m.seq for m in b.recovered.queues["jobs.dlq"].messages] == [0]
    c3 = d.client("c3")
    c3.consume("jobs", prefetch=1000)
    again = c3.deliveries()
    assert [(x.body, x.attempt) for x in again[:5]] == [
        (b"m3", 2), (b"m4", 2), (b"m5", 1), (b"m6", 1), (b"m7", 1)]
    assert [x.body for x in again[5:]] == [f"m{i}".encode() for i in range(8, 601)]
    for x in again[:300]:
        c3.ack(x.tag)
    assert d.client("admin").ok(Op.PURGE, "jobs") == 1  # m2, delayed; the rest are leased
    d = b.restart()
    assert (stats(d, "jobs")["ready"], stats(d, "jobs")["delayed"]) == (298, 0)
    c4 = d.client("c4")
    c4.consume("jobs", prefetch=1000)
    assert [(x.body, x.attempt) for x in c4.deliveries()] == [
        (f"m{i}".encode(), 2) for i in range(303, 601)]
    c5 = d.client("c5")
    c5.consume("jobs.dlq")
    assert c5.delivery().body == b"m0"
