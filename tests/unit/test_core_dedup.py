"""Resendable SENDs and each queue's deduplication window (PROTOCOL.md §8 "Resends and
deduplication", broker/dedup.py), in the sans-IO core with a fake clock; and, through the
journal, across restarts (a new core replaying the same in-memory files)."""

from __future__ import annotations

import random
from typing import Any

import pytest

import aiobus.broker.core
from aiobus.broker.journal import Journal
from aiobus.broker.journal.files import segment_names
from aiobus.protocol import Op

from .helpers import Client, Driver
from .test_core_durable import WALL, Durable


@pytest.fixture
def d() -> Driver:
    return Driver(wall_offset=WALL, dedup_window=120.0, dedup_size=1000)


def ok(reply: list[Any] | None) -> None:
    assert reply is not None and reply[0] == Op.OK, reply


def bodies(consumer: Client) -> list[bytes]:
    return [m.body for m in consumer.deliveries()]


# -- the window ---------------------------------------------------------------------


def test_a_resend_is_confirmed_and_not_enqueued_again(d: Driver) -> None:
    p = d.client("p", client_id="app-1")
    ok(p.send_once("jobs", 7, b"x"))
    ok(p.send_once("jobs", 7, b"x"))  # the same message again: OK, as if accepted
    s = d.queue_stats("jobs")
    assert (s["ready"], s["sent"], s["duplicates"]) == (1, 1, 1)
    c = d.client("c")
    c.consume("jobs", prefetch=10)
    (got,) = c.deliveries()
    assert (got.id, got.body) == ("app-1-7", b"x")  # the id is <client_id>-<seq>


def test_a_resend_after_a_reconnect_is_a_duplicate(d: Driver) -> None:
    """The case it is for: the connection drops before the OK; the client connects again
    with the same client_id and resends with the same seq."""
    p = d.client("p", client_id="app-1")
    p.receive(Op.SEND, 1, "jobs", b"x", 0, None, None, None, None, 1)
    d.core.disconnect(p.conn, d.now)  # the OK never reached the client
    again = d.client("p", client_id="app-1")
    ok(again.send_once("jobs", 1, b"x"))
    ok(again.send_once("jobs", 2, b"y"))  # the next one is new
    c = d.client("c")
    c.consume("jobs", prefetch=10)
    assert bodies(c) == [b"x", b"y"]
    assert d.queue_stats("jobs")["duplicates"] == 1


def test_queues_and_clients_have_windows_of_their_own(d: Driver) -> None:
    a, b = d.client(client_id="a"), d.client(client_id="b")
    for client, queue in ((a, "q1"), (a, "q2"), (b, "q1")):
        ok(client.send_once(queue, 1))
    assert [d.queue_stats(q)["ready"] for q in ("q1", "q2")] == [2, 1]
    assert [d.queue_stats(q)["duplicates"] for q in ("q1", "q2")] == [0, 0]


def test_the_window_ends_after_dedup_window_seconds(d: Driver) -> None:
    p = d.client(client_id="app")
    ok(p.send_once("jobs", 1))
    d.advance(119.5)
    ok(p.send_once("jobs", 1))  # 119.5 s later: still in the window
    assert d.queue_stats("jobs")["ready"] == 1
    d.advance(0.5)
    ok(p.send_once("jobs", 1))  # 120 s: out of it, a new message
    s = d.queue_stats("jobs")
    assert (s["ready"], s["duplicates"]) == (2, 1)


def test_the_window_keeps_at_most_dedup_size_ids() -> None:
    d = Driver(dedup_size=3)
    p = d.client(client_id="app")
    for seq in (1, 2, 3, 4):
        ok(p.send_once("jobs", seq))
    ok(p.send_once("jobs", 4))  # among the 3 newest: a duplicate
    ok(p.send_once("jobs", 2))
    assert d.queue_stats("jobs")["ready"] == 4
    ok(p.send_once("jobs", 1))  # pushed out by 4: a new message
    s = d.queue_stats("jobs")
    assert (s["ready"], s["duplicates"]) == (5, 2)
    assert len(d.core.queues.queues["jobs"].dedup or ()) == 3


@pytest.mark.parametrize("options", [{"dedup_window": 0}, {"dedup_size": 0}])
def test_zero_turns_deduplication_off(options: dict[str, Any]) -> None:
    d = Driver(**options)
    p = d.client(client_id="app")
    ok(p.send_once("jobs", 1))
    ok(p.send_once("jobs", 1))
    s = d.queue_stats("jobs")
    assert (s["ready"], s["duplicates"]) == (2, 0)
    c = d.client("c")
    c.consume("jobs", prefetch=2)
    assert [m.id for m in c.deliveries()] == ["app-1", "app-1"]


@pytest.mark.parametrize(("window", "size"), [(-1, 10), (1e9, 10), (1, -1), (1, 10**8),
                                              (1, 1.5), ("1", 1)])
def test_bad_settings_are_refused(window: Any, size: Any) -> None:
    # A compiled core (mypyc, setup.py) checks argument types on entry: a str given for a
    # float, or a float for an int, is a TypeError there before the range check runs.
    wrong_type = type(window) not in (int, float) or type(size) is not int
    if wrong_type and not aiobus.broker.core.__file__.endswith(".py"):
        with pytest.raises(TypeError):
            Driver(dedup_window=window, dedup_size=size)
        return
    with pytest.raises(ValueError, match="dedup_"):
        Driver(dedup_window=window, dedup_size=size)


def test_sends_without_seq_never_enter_the_window(d: Driver) -> None:
    p = d.client(client_id="app")
    ok(p.send("jobs"))
    ok(p.send_once("jobs", None))  # 10 fields, seq nil: a SEND like any other
    assert d.core.queues.queues["jobs"].dedup is None
    c = d.client("c")
    c.consume("jobs", prefetch=2)
    assert all(not m.id.startswith("app-") for m in c.deliveries())


def test_welcome_says_whether_the_broker_deduplicates() -> None:
    """A client gives SENDs a seq and resends them only when WELCOME says so."""
    for options, dedup in (({}, {"window": 120.0, "size": 100_000}),
                           ({"dedup_window": 5, "dedup_size": 7}, {"window": 5.0, "size": 7}),
                           ({"dedup_window": 0}, None), ({"dedup_size": 0}, None)):
        d = Driver(**options)
        conn = d.open()
        d.receive(conn, [Op.HELLO, 1, {"client_id": "app"}])
        (welcome,) = d.sink.take(conn)
        assert welcome[2].get("dedup") == dedup, options


# -- what is refused ----------------------------------------------------------------------


def test_seq_needs_a_client_id(d: Driver) -> None:
    p = d.client("p")  # HELLO without client_id
    code, message = p.error(Op.SEND, "jobs", b"x", 0, None, None, None, None, 1)
    assert code == "bad-option"
    assert "SEND.seq" in message and "client_id" in message
    assert "jobs" not in d.core.stats()["queues"]  # refused before the queue was made


def test_seq_with_a_reply_token_is_refused(d: Driver) -> None:
    p = d.client(client_id="app")
    code, message = p.error(Op.SEND, "jobs", b"x", 0, None, 5.0, 9, None, 1)
    assert code == "bad-option" and "reply_token" in message and "SEND.seq" in message


@pytest.mark.parametrize("seq", [0, 2**63, 2**64 - 1])
def test_seq_out_of_range_is_refused(d: Driver, seq: int) -> None:
    p = d.client(client_id="app")
    code, message = p.error(Op.SEND, "jobs", b"x", 0, None, None, None, None, seq)
    assert code == "bad-option" and "SEND.seq must be a positive int" in message
    ok(p.send_once("jobs", 2**63 - 1))


@pytest.mark.parametrize("seq", [-1, 1.0, "1", True])
def test_a_seq_of_the_wrong_type_closes_the_connection(d: Driver, seq: Any) -> None:
    p = d.client(client_id="app")
    p.receive(Op.SEND, 1, "jobs", b"x", 0, None, None, None, None, seq)
    assert p.closed is not None and p.closed[0] == "bad-field"
    assert "SEND.seq" in p.closed[1]


@pytest.mark.parametrize("client_id", ["", "a" * 65, "a b", "é", "a/b", 5, b"a", ["a"]])
def test_a_bad_client_id_closes_the_connection(d: Driver, client_id: Any) -> None:
    conn = d.open()
    d.receive(conn, [Op.HELLO, 1, {"client_id": client_id}])
    code, message = d.sink.closed[conn]
    assert code == "bad-field" and "HELLO.options.client_id" in message


@pytest.mark.parametrize("client_id", ["a", "A-z_0.9", "x" * 64, "0123456789abcdef"])
def test_good_client_ids(d: Driver, client_id: str) -> None:
    ok(d.client(client_id=client_id).send_once("jobs", 1))


# -- 8, 9 and 10 fields ---------------------------------------------------------------


def test_every_length_of_send(d: Driver) -> None:
    p = d.client(client_id="app")
    ok(p.call(Op.SEND, "jobs", b"8", 0, None, None, None))
    ok(p.call(Op.SEND, "jobs", b"9", 0, None, None, None, None))
    ok(p.call(Op.SEND, "jobs", b"10", 0, None, None, None, None, 3))
    ok(p.call(Op.SEND, "jobs", b"10d", 0, None, None, None, 5.0, 4))  # delay and seq
    ok(p.send_once("jobs", 4, b"10d", delay=5.0))  # a duplicate while still delayed
    s = d.queue_stats("jobs")
    assert (s["ready"], s["delayed"], s["duplicates"]) == (3, 1, 1)
    d.advance(5.0)
    c = d.client("c")
    c.consume("jobs", prefetch=10)
    got = c.deliveries()
    assert [m.body for m in got] == [b"8", b"9", b"10", b"10d"]
    assert [m.id for m in got][2:] == ["app-3", "app-4"]


def test_a_ttl_with_seq(d: Driver) -> None:
    p = d.client(client_id="app")
    ok(p.send_once("jobs", 1, ttl=5.0))
    ok(p.send_once("jobs", 1, ttl=5.0))
    d.advance(5.0)  # expired: dead-lettered, still in the window
    ok(p.send_once("jobs", 1, ttl=5.0))
    s = d.queue_stats("jobs")
    assert (s["ready"], s["expired"], s["duplicates"]) == (0, 1, 2)


# -- when an id enters the window: when its message is accepted ------------------------


def test_a_parked_send_enters_the_window_when_it_is_accepted(d: Driver) -> None:
    p, c = d.client("p", client_id="app"), d.client("c")
    p.declare("jobs", max_length=1)  # overflow "block"
    ok(p.send_once("jobs", 1, b"first"))
    assert p.send_once("jobs", 2, b"second") is None  # parked: not accepted yet
    assert p.send_once("jobs", 2, b"second") is None  # parked behind it, same producer
    assert d.queue_stats("jobs")["parked"] == 2
    c.consume("jobs", prefetch=10)
    # Room: the first parked one is accepted; the second is then found in the window.
    assert [f[:2] for f in p.take()] == [[Op.OK, 3], [Op.OK, 4]]
    assert bodies(c) == [b"first", b"second"]
    s = d.queue_stats("jobs")
    assert (s["sent"], s["duplicates"], s["parked"]) == (2, 1, 0)


def test_a_parked_send_dropped_with_its_connection_never_entered(d: Driver) -> None:
    p = d.client("p", client_id="app")
    p.declare("jobs", max_length=1)
    ok(p.send_once("jobs", 1))
    assert p.send_once("jobs", 2, b"parked") is None
    d.core.disconnect(p.conn, d.now)  # never accepted, never confirmed: forgotten
    again = d.client("p", client_id="app")
    assert again.send_once("jobs", 2, b"parked") is None  # parked again: a new message
    c = d.client("c")
    c.consume("jobs", prefetch=10)
    assert bodies(c) == [b"m", b"parked"]
    assert d.queue_stats("jobs")["duplicates"] == 0


def test_a_send_refused_for_a_full_queue_never_entered(d: Driver) -> None:
    p = d.client("p", client_id="app")
    p.declare("jobs", max_length=1, overflow="reject")
    ok(p.send_once("jobs", 1))
    assert p.send_once("jobs", 2)[:3] == [Op.ERROR, 3, "queue-full"]  # type: ignore[index]
    c = d.client("c")
    c.consume("jobs")
    c.ack(c.delivery().tag)
    ok(p.send_once("jobs", 2, b"again"))  # accepted now, as a new message
    assert bodies(c) == [b"again"]


def test_a_send_dead_lettered_at_once_by_overflow_was_accepted(d: Driver) -> None:
    p = d.client("p", client_id="app")
    p.declare("jobs", max_length=1, overflow="dead-letter")
    ok(p.send_once("jobs", 1, b"later", delay=60.0))  # only a delayed one fills it
    ok(p.send_once("jobs", 2, b"new"))  # accepted, then dead-lettered at once
    ok(p.send_once("jobs", 2, b"new"))  # a duplicate: it was confirmed
    s = d.queue_stats("jobs")
    assert (s["sent"], s["dead_lettered"], s["duplicates"]) == (2, 1, 1)
    assert d.queue_stats("jobs.dlq")["ready"] == 1


def test_purge_keeps_the_window_and_delete_forgets_it(d: Driver) -> None:
    p = d.client("p", client_id="app")
    ok(p.send_once("jobs", 1))
    assert p.ok(Op.PURGE, "jobs") == 1
    ok(p.send_once("jobs", 1))  # accepted before the purge: still a duplicate
    assert d.queue_stats("jobs")["ready"] == 0
    assert p.ok(Op.DELETE, "jobs", False) == 0
    ok(p.send_once("jobs", 1))  # a new queue, with a new window
    assert d.queue_stats("jobs")["ready"] == 1


def test_a_direct_delivery_enters_the_window(d: Driver) -> None:
    """The fast path (a consumer waiting, nothing queued) accepts too."""
    p, c = d.client("p", client_id="app"), d.client("c")
    c.consume("jobs", prefetch=10)
    ok(p.send_once("jobs", 1, b"x"))
    ok(p.send_once("jobs", 1, b"x"))
    assert bodies(c) == [b"x"]
    assert d.queue_stats("jobs")["duplicates"] == 1


# -- durable queues: the window survives a restart --------------------------------------


class SmallSegments(Durable):
    """:class:`Durable` with segments small enough to roll, get emptied and deleted."""

    def _start(self, now: float) -> Driver:
        journal, recovered = Journal.open(self.files, segment_size=600)
        self.journal = journal
        d = Driver(wall_offset=WALL + now, journal=journal, dedup_window=120.0)
        d.core.restore(recovered, d.now)
        self.recovered = recovered
        return d


def churn(b: Durable, p: Client, c: Client, n: int) -> None:
    """Send and ack ``n`` plain messages, a turn each, so that segments roll and those
    holding only acked messages are deleted."""
    for i in range(n):
        ok(p.send("other", b"filler %d" % i))
        c.ack(c.delivery().tag)
        b.flush()


def test_a_durable_window_survives_a_restart() -> None:
    b = Durable()
    p = b.driver.client("p", client_id="app")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    ok(p.send_once("jobs", 1, b"x"))
    c = b.driver.client("c")
    c.consume("jobs")
    c.ack(c.delivery().tag)  # consumed and acked: only the window remembers it
    d = b.restart(after=60.0)
    p = d.client("p", client_id="app")
    ok(p.send_once("jobs", 1, b"x"))
    assert d.queue_stats("jobs")["ready"] == 0
    assert d.queue_stats("jobs")["duplicates"] == 1


def test_the_window_survives_when_the_segment_with_the_sent_is_gone() -> None:
    b = SmallSegments()
    d = b.driver
    p, c = d.client("p", client_id="app"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    p.ok(Op.DECLARE, "other", {"durable": True})
    ok(p.send_once("jobs", 1, b"x"))
    b.flush()
    first = segment_names(b.files)[0]
    c.consume("jobs")
    c.ack(c.delivery().tag)
    c.consume("other")
    churn(b, p, c, 30)
    assert first not in segment_names(b.files)  # the Sent of app-1 is gone from disk
    d = b.restart(after=10.0)
    assert [q.dedup for q in b.recovered.queues.values() if q.name == "jobs"] == [
        [("app-1", WALL)]]
    # Twice: the first restart's new segments must carry the window it recovered.
    p, c = d.client("p", client_id="app"), d.client("c")
    c.consume("other")
    churn(b, p, c, 30)
    d = b.restart(after=10.0)
    p = d.client("p", client_id="app")
    ok(p.send_once("jobs", 1, b"x"))
    s = d.queue_stats("jobs")
    assert (s["ready"], s["duplicates"]) == (0, 1)


def test_after_a_restart_the_window_counts_wall_time() -> None:
    b = Durable()
    p = b.driver.client("p", client_id="app")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    ok(p.send_once("jobs", 1))
    ok(p.send_once("jobs", 2))
    b.driver.advance(100.0)
    ok(p.send_once("jobs", 3))
    d = b.restart(after=30.0)  # 130 s after 1 and 2, 30 s after 3
    p = d.client("p", client_id="app")
    for seq in (1, 2, 3):
        ok(p.send_once("jobs", seq))
    s = d.queue_stats("jobs")
    assert (s["ready"], s["duplicates"]) == (3 + 2, 1)


def test_a_parked_durable_send_is_journaled_when_accepted() -> None:
    """Its id's time is when it was accepted, not when it was sent."""
    b = Durable()
    p, c = b.driver.client("p", client_id="app"), b.driver.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_length": 1})
    ok(p.send_once("jobs", 1))
    assert p.send_once("jobs", 2) is None  # parked
    b.driver.advance(50.0)
    c.consume("jobs", prefetch=10)  # room: accepted now, at 50 s
    b.flush()
    journal, recovered = Journal.open(b.files.crash(random.Random(0)))
    journal.close()
    assert recovered.queues["jobs"].dedup == [("app-1", WALL), ("app-2", WALL + 50.0)]


def test_a_duplicate_of_a_durable_send_waits_for_the_journal() -> None:
    """Its OK goes out only with the turn's journal write, as the original's does: the
    original may still be in the same unwritten buffer."""
    b = Durable()
    p = b.driver.client("p", client_id="app")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    router = b.driver.core.queues
    router.journaled_confirms.clear()
    ok(p.send_once("jobs", 1))
    router.journaled_confirms.clear()
    ok(p.send_once("jobs", 1))
    assert p.conn in router.journaled_confirms
    router.journal_error = "ENOSPC"
    code, _ = p.error(Op.SEND, "jobs", b"m", 0, None, None, None, None, 1)
    assert code == "journal"



# -- an id accepted twice (its first acceptance had left the window) ----------------------


def test_a_window_loaded_from_a_journal_keeps_an_ids_latest_acceptance() -> None:
    from aiobus.broker.dedup import DedupWindow

    window = DedupWindow(10.0, 100)
    # The journal's order is not time order (a compaction copy of the first acceptance
    # comes after the second), and the first acceptance alone has expired by now=25.
    window.load([("c-2", 20.0), ("c-1", 18.0), ("c-2", 5.0)], now=25.0)
    assert window.entries() == [("c-1", 18.0), ("c-2", 20.0)]  # oldest first
    assert window.seen("c-2", 29.0) and not window.seen("c-1", 29.0)


def test_replay_keeps_the_latest_acceptance_of_an_id() -> None:
    from aiobus.broker.journal import records as r
    from aiobus.broker.journal.replay import Replay
    from aiobus.broker.queue_state import pack_message

    replay = Replay()
    replay.apply(r.QueueDeclared(1, "q", {}, 0))
    again = pack_message("c-2", "q", b"again", 0, None, 1020.0)
    first = pack_message("c-2", "q", b"first", 0, None, 1005.0)
    replay.apply(r.Sent(1, 7, again, 0, None, None, None, None, 1020.0))
    replay.apply(r.Sent(1, 3, first, 0, None, None, None, None, 1005.0))  # copied forward
    replay.apply(r.DedupIds(1, [("c-2", 1001.0)]))
    assert replay.queues[1].dedup == {"c-2": 1020.0}


def test_an_id_accepted_again_takes_its_later_place_in_the_order() -> None:
    from aiobus.broker.dedup import DedupWindow

    # c-1 went first, expired, and was accepted again after c-2 and c-3, in the same
    # loop turn: by count, c-2 leaves first, as it did in the broker before the restart.
    window = DedupWindow(100.0, 3)
    window.load([("c-1", 5.0), ("c-2", 20.0), ("c-3", 20.0), ("c-1", 20.0), ("c-4", 20.0)],
                now=21.0)
    assert [mid for mid, _ in window.entries()] == ["c-3", "c-1", "c-4"]


def test_an_id_accepted_again_in_the_same_turn_is_newer_than_those_between() -> None:
    from aiobus.broker.dedup import DedupWindow

    # c-3 was accepted, left by count, and was accepted again in the same loop turn
    # (one time for all): its last mention is its place, so c-4 leaves first by count.
    # (The durable model found a restart that had kept c-3 in its first place.)
    window = DedupWindow(100.0, 4)
    window.load([("c-3", 20.0), ("c-4", 20.0), ("c-1", 20.0), ("c-5", 20.0), ("c-6", 20.0),
                 ("c-3", 20.0)], now=21.0)
    assert [mid for mid, _ in window.entries()] == ["c-1", "c-5", "c-6", "c-3"]
