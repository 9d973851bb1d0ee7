"""Queue administration and scheduled delivery in the sans-IO core (issue 10): PURGE and
DELETE, and SEND with a ``delay``, with and without a journal, on a fake clock. A durable
queue stays purged or deleted, and a scheduled message stays scheduled, across a restart
(the ``Durable`` helper replays the same journal into a new core)."""

from __future__ import annotations

from typing import Any

import pytest

from aiobus.protocol import Op

from .helpers import Client, Driver
from .test_core_durable import Durable


@pytest.fixture
def d() -> Driver:
    return Driver(wall_offset=1_000_000.0)


@pytest.fixture
def b() -> Durable:
    return Durable()


def send_later(c: Client, queue: str, body: bytes, delay: float | None,
               ttl: float | None = None) -> list[Any] | None:
    """A SEND with its 9th field, ``delay``."""
    return c.call(Op.SEND, queue, body, 0, None, ttl, None, delay)


def purge(c: Client, queue: str) -> int:
    count: int = c.ok(Op.PURGE, queue)
    return count


def delete(c: Client, queue: str, if_empty: bool = False) -> int:
    count: int = c.ok(Op.DELETE, queue, if_empty)
    return count


def waiting(d: Driver, queue: str) -> tuple[int, int, int]:
    s = d.queue_stats(queue)
    return s["ready"], s["delayed"], s["unacked"]


# -- purge ----------------------------------------------------------------------------


def test_purge_removes_ready_and_delayed_and_keeps_leased(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    for body in (b"a", b"b", b"c", b"d"):
        p.send("jobs", body)
    c.consume("jobs", prefetch=2)
    a, bb = c.deliveries()
    c.nack(bb.tag, delay=60.0)  # delayed; the freed slot takes c
    (cc,) = c.deliveries()
    assert waiting(d, "jobs") == (1, 1, 2)  # d ready, b delayed, a and c leased
    assert purge(p, "jobs") == 2
    assert waiting(d, "jobs") == (0, 0, 2)
    # The leases carry on: an ack works, and nothing comes back after the delay.
    assert c.ack(a.tag)[0] == Op.OK
    c.nack(cc.tag)  # back to the queue at once, after the purge: it is delivered again
    assert c.delivery().body == b"c"
    d.advance(120.0)
    assert c.deliveries() == []


def test_purge_cancels_timers_of_the_purged_messages(d: Driver) -> None:
    p = d.client("p")
    p.declare("jobs", ttl=10)
    p.send("jobs", b"x")
    send_later(p, "jobs", b"later", 5.0)
    assert purge(p, "jobs") == 2
    d.advance(60.0)  # neither the TTL nor the delay acts on a purged message
    s = d.queue_stats("jobs")
    assert (s["ready"], s["delayed"], s["expired"], s["dead_lettered"]) == (0, 0, 0, 0)
    assert "jobs.dlq" not in d.core.stats()["queues"]
    assert d.core.timers.statistics()[0] - d.core.timers.statistics()[1] <= 1  # handshakes


def test_purge_of_a_sealed_backlog(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    for i in range(1000):  # small stateless messages: sealed in runs, and a tail
        p.receive(Op.SEND, 0, "jobs", str(i).encode(), 0, None, None, None)
    assert purge(p, "jobs") == 1000
    p.send("jobs", b"after")
    c.consume("jobs")
    assert c.delivery().body == b"after"


def test_purge_admits_parked_sends(d: Driver) -> None:
    p = d.client("p")
    p.declare("jobs", max_length=1)
    p.send("jobs", b"1")
    assert p.send("jobs", b"2") is None  # parked
    assert purge(p, "jobs") == 1
    (ok,) = p.take(Op.OK)  # the parked send (rid 3) was admitted into the room made
    assert ok[1] == 3
    assert waiting(d, "jobs") == (1, 0, 0)


def test_purge_of_an_empty_queue_and_with_rid_0(d: Driver) -> None:
    p = d.client("p")
    p.declare("jobs")
    assert purge(p, "jobs") == 0
    p.send("jobs", b"x")
    p.receive(Op.PURGE, 0, "jobs")
    assert p.take() == []  # no OK for rid 0
    assert waiting(d, "jobs") == (0, 0, 0)


@pytest.mark.parametrize("op", [Op.PURGE, Op.DELETE])
def test_purge_and_delete_refuse_unknown_reserved_and_invalid_names(d: Driver, op: Op) -> None:
    p = d.client("p")
    extra = (False,) if op == Op.DELETE else ()
    code, message = p.error(op, "nothing", *extra)
    assert code == "no-such-queue" and "'nothing'" in message
    assert p.error(op, "$sys.x", *extra)[0] == "forbidden"
    assert p.error(op, "a..b", *extra)[0] == "invalid-name"
    assert "nothing" not in d.core.stats()["queues"]  # no queue created by the attempt


def test_a_passive_consume_needs_the_queue_and_creates_nothing(d: Driver) -> None:
    c = d.client("c")
    code, message = c.error(Op.CONSUME, 1, "nothing", 4, True)
    assert code == "no-such-queue" and "'nothing'" in message
    assert "nothing" not in d.core.stats()["queues"]
    assert c.error(Op.CONSUME, 1, "$sys.x", 4, True)[0] == "forbidden"
    # The sid was not taken by the refused CONSUME; passive nil or false creates.
    assert c.ok(Op.CONSUME, 1, "made", 4, None) is None
    assert c.ok(Op.CONSUME, 2, "also", 4, False) is None
    assert {"made", "also"} <= d.core.stats()["queues"].keys()
    d.client("p").send("jobs", b"x")
    assert c.ok(Op.CONSUME, 3, "jobs", 4, True) is None
    assert c.delivery().body == b"x"


# -- delete ---------------------------------------------------------------------------


def test_delete_removes_the_queue_its_settings_and_every_message(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.declare("jobs", max_deliveries=2, ttl=30)
    for body in (b"a", b"b", b"c"):
        p.send("jobs", body)
    send_later(p, "jobs", b"later", 5.0)
    sid = c.consume("jobs")
    leased = c.delivery()
    assert delete(p, "jobs") == 4  # 1 leased, 2 ready, 1 delayed
    c.cancel(sid)
    s = d.queue_stats("jobs")  # made again by the consumer: new and empty
    assert (s["ready"], s["delayed"], s["sent"], s["delivered"]) == (0, 0, 0, 0)
    # Its settings went with it: a declaration with others is no mismatch.
    assert p.ok(Op.DECLARE, "jobs", {"max_deliveries": 9})["max_deliveries"] == 9
    d.advance(60.0)  # no timer of the old queue acts
    assert waiting(d, "jobs") == (0, 0, 0)
    assert "jobs.dlq" not in d.core.stats()["queues"]
    assert c.ack(leased.tag)[2] == "lease-unknown"


def test_delete_ends_leases_and_keeps_consumers_on_the_name(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.declare("jobs", ack_timeout=5)
    p.send("jobs", b"old")
    c.consume("jobs", prefetch=1)
    old = c.delivery()
    assert delete(p, "jobs") == 1
    # The queue exists again at once, with defaults, because the consumer uses it.
    s = d.queue_stats("jobs")
    assert (s["consumers"], s["unacked"], s["settings"]["ack_timeout"]) == (1, 0, 30.0)
    code, _ = c.error(Op.ACK, old.tag)
    assert code == "lease-unknown"
    # The ended lease freed the consumer's only slot: new messages reach it.
    p.send("jobs", b"new")
    new = c.delivery()
    assert (new.body, new.attempt) == (b"new", 1)
    assert c.ack(new.tag)[0] == Op.OK
    d.advance(10.0)  # the old lease's deadline passes without effect
    assert c.deliveries() == [] and waiting(d, "jobs") == (0, 0, 0)


def test_delete_frees_a_consumer_stalled_on_a_zombie(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.declare("jobs", ack_timeout=1)
    p.send("jobs", b"x")
    c.consume("jobs", prefetch=1)
    zombie = c.delivery()
    d.advance(2.0)  # the lease expired; x is back in the queue, c is stalled
    assert c.deliveries() == []
    assert delete(p, "jobs") == 1  # x, ready again; the zombie is no message
    p.send("jobs", b"y")
    assert c.delivery().body == b"y"
    assert c.ack(zombie.tag)[2] == "lease-unknown"


def test_delete_of_an_extended_lease_cancels_its_timer(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.send("jobs", b"x")
    c.consume("jobs")
    lease = c.delivery()
    assert c.extend(lease.tag, 100.0)[0] == Op.OK
    assert delete(p, "jobs") == 1
    d.advance(200.0)
    assert c.deliveries() == [] and waiting(d, "jobs") == (0, 0, 0)


def test_delete_if_empty_refuses_a_queue_with_messages(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.declare("jobs", max_deliveries=3)
    p.send("jobs", b"x")
    code, message = p.error(Op.DELETE, "jobs", True)
    assert code == "queue-not-empty" and "1 ready" in message
    c.consume("jobs")
    leased = c.delivery()
    assert p.error(Op.DELETE, "jobs", True)[0] == "queue-not-empty"  # 1 unacked
    assert d.queue_stats("jobs")["settings"]["max_deliveries"] == 3  # nothing changed
    c.ack(leased.tag)
    assert delete(p, "jobs", if_empty=True) == 0
    assert waiting(d, "jobs") == (0, 0, 0)  # the consumer keeps the name in use


def test_delete_if_empty_counts_delayed_messages(d: Driver) -> None:
    p = d.client("p")
    send_later(p, "jobs", b"x", 10.0)
    assert p.error(Op.DELETE, "jobs", True)[0] == "queue-not-empty"
    d.advance(11.0)
    purge(p, "jobs")
    assert delete(p, "jobs", if_empty=True) == 0
    assert p.error(Op.DELETE, "jobs", False)[0] == "no-such-queue"  # gone: nobody uses it


def test_delete_refuses_the_sends_parked_on_it(d: Driver) -> None:
    p, q = d.client("p"), d.client("q")
    q.declare("jobs", max_length=1)
    q.send("jobs", b"1")
    assert p.send("jobs", b"2") is None  # parked
    assert q.error(Op.DELETE, "jobs", True)[0] == "queue-not-empty"
    assert delete(q, "jobs") == 1
    (error,) = p.take(Op.ERROR)
    assert error[1] == 1 and error[2] == "no-such-queue" and "not accepted" in error[3]
    assert "jobs" not in d.core.stats()["queues"]
    assert d.core.stats()["connections"][0]["parked"] == 0


# -- scheduled delivery ---------------------------------------------------------------


def test_a_delayed_send_waits_then_is_delivered(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    c.consume("jobs")
    assert send_later(p, "jobs", b"later", 10.0)[0] == Op.OK  # accepted now, as delayed
    assert waiting(d, "jobs") == (0, 1, 0)
    d.advance(9.9)
    assert c.deliveries() == []
    d.advance(0.2)
    got = c.delivery()
    assert (got.body, got.attempt) == (b"later", 1)
    assert got.timestamp == pytest.approx(1_000_000.0)  # when it was sent


def test_a_due_message_joins_the_back_of_the_queue(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    send_later(p, "jobs", b"scheduled", 5.0)
    p.send("jobs", b"first")
    d.advance(6.0)
    p.send("jobs", b"after")
    c.consume("jobs", prefetch=10)
    assert [x.body for x in c.deliveries()] == [b"first", b"scheduled", b"after"]


def test_a_retried_scheduled_message_goes_to_the_front(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    send_later(p, "jobs", b"s", 1.0)
    d.advance(1.0)
    c.consume("jobs", prefetch=1)
    s = c.delivery()
    p.send("jobs", b"other")
    c.nack(s.tag, delay=2.0)
    other = c.delivery()
    d.advance(2.0)
    p.send("jobs", b"third")
    c.ack(other.tag)  # a retry is older than what waits: to the front, attempt 2
    again = c.delivery()
    assert (again.body, again.attempt) == (b"s", 2)


def test_zero_or_nil_delay_is_at_once_and_bad_delays_are_refused(d: Driver) -> None:
    p = d.client("p")
    send_later(p, "jobs", b"a", 0)
    send_later(p, "jobs", b"b", None)
    assert waiting(d, "jobs") == (2, 0, 0)
    for bad in (-1, -0.5, 1e9, float("inf"), float("nan")):
        code, message = p.error(Op.SEND, "fresh", b"x", 0, None, None, None, bad)
        assert code == "bad-option" and "delay" in message
    assert "fresh" not in d.core.stats()["queues"]  # refused before the queue is made


def test_ttl_counts_from_the_due_time(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    send_later(p, "jobs", b"x", 10.0, ttl=5.0)
    d.advance(14.0)  # due at 10: 4 s of its 5 s TTL gone
    assert waiting(d, "jobs") == (1, 0, 0)
    d.advance(1.5)
    assert d.queue_stats("jobs")["expired"] == 1
    c.consume("jobs.dlq")
    assert (c.delivery().headers or {})["x-dead-reason"] == "expired"


def test_the_queue_ttl_counts_from_the_due_time_too(d: Driver) -> None:
    p = d.client("p")
    p.declare("jobs", ttl=5)
    send_later(p, "jobs", b"x", 10.0)
    d.advance(14.0)
    assert waiting(d, "jobs") == (1, 0, 0)
    d.advance(1.5)
    assert waiting(d, "jobs") == (0, 0, 0)
    assert d.queue_stats("jobs")["expired"] == 1


def test_delayed_sends_count_against_max_length(d: Driver) -> None:
    p = d.client("p")
    p.declare("jobs", max_length=1, overflow="reject")
    send_later(p, "jobs", b"x", 10.0)
    code, _ = p.error(Op.SEND, "jobs", b"y", 0, None, None, None)
    assert code == "queue-full"
    d.advance(10.0)
    assert waiting(d, "jobs") == (1, 0, 0)


def test_a_scheduled_send_parked_past_its_due_time_is_ready_when_admitted(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.declare("jobs", max_length=1)
    p.send("jobs", b"1")
    assert send_later(p, "jobs", b"2", 5.0) is None  # parked
    d.advance(10.0)
    assert waiting(d, "jobs") == (1, 0, 0)
    c.consume("jobs", prefetch=2)
    assert [x.body for x in c.deliveries()] == [b"1", b"2"]


def test_a_scheduled_send_parked_before_its_due_time_stays_delayed(d: Driver) -> None:
    p, c = d.client("p"), d.client("c")
    p.declare("jobs", max_length=1)
    p.send("jobs", b"1")
    assert send_later(p, "jobs", b"2", 5.0) is None  # parked
    d.advance(1.0)
    c.consume("jobs")
    c.ack(c.delivery().tag)  # room: admitted, delayed until 5 s after its send
    assert waiting(d, "jobs") == (0, 1, 0)
    d.advance(3.9)
    assert c.deliveries() == []
    d.advance(0.2)
    assert c.delivery().body == b"2"


# -- with a journal -------------------------------------------------------------------


def test_a_purged_durable_queue_stays_purged(b: Durable) -> None:
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    for body in (b"a", b"b", b"c"):
        p.send("jobs", body)
    send_later(p, "jobs", b"later", 100.0)
    c.consume("jobs")
    leased = c.delivery()
    assert purge(p, "jobs") == 3
    p.send("jobs", b"after")
    d = b.restart(after=200.0)
    c2 = d.client("c2")
    c2.consume("jobs", prefetch=10)
    # The lease held at the purge stays (its crash counts an attempt); the rest is gone.
    got = c2.deliveries()
    assert [(x.body, x.attempt) for x in got] == [(b"a", 2), (b"after", 1)]
    assert got[0].id == leased.id
    d.advance(200.0)
    assert c2.deliveries() == []


def test_a_deleted_durable_queue_does_not_come_back(b: Durable) -> None:
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_deliveries": 3})
    p.send("jobs", b"a")
    send_later(p, "jobs", b"later", 100.0)
    c.consume("jobs")
    c.delivery()
    assert delete(p, "jobs") == 2
    d = b.restart()
    assert "jobs" not in d.core.stats()["queues"]
    # The dead-letter queue made durable with it is a queue of its own: it stays.
    assert "jobs.dlq" in d.core.stats()["queues"]


def test_a_deleted_durable_queue_declared_again_keeps_only_the_new(b: Durable) -> None:
    d = b.driver
    p = d.client("p")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_deliveries": 3})
    p.send("jobs", b"old")
    delete(p, "jobs")
    p.ok(Op.DECLARE, "jobs", {"durable": True, "max_deliveries": 7})
    p.send("jobs", b"new")
    d = b.restart()
    s = d.queue_stats("jobs")
    assert (s["ready"], s["settings"]["max_deliveries"]) == (1, 7)
    c = d.client("c")
    c.consume("jobs")
    assert c.delivery().body == b"new"


def test_a_delete_while_consumed_leaves_a_memory_queue(b: Durable) -> None:
    """A consumer keeps the name in use: the queue made again is an in-memory one with
    defaults, and what is sent to it then does not survive a restart."""
    d = b.driver
    p, c = d.client("p"), d.client("c")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    c.consume("jobs")
    delete(p, "jobs")
    assert d.queue_stats("jobs")["settings"]["durable"] is False
    p.send("jobs", b"x")
    d = b.restart()
    assert "jobs" not in d.core.stats()["queues"]


def test_a_scheduled_message_survives_a_restart(b: Durable) -> None:
    d = b.driver
    p = d.client("p")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    send_later(p, "jobs", b"later", 100.0, ttl=5.0)
    p.send("jobs", b"now")
    d = b.restart(after=10.0)
    assert waiting(d, "jobs") == (1, 1, 0)
    c = d.client("c")
    c.consume("jobs", prefetch=10)
    (now,) = c.deliveries()
    assert now.body == b"now"
    c.ack(now.tag)
    d.advance(89.0)  # 99 s since the send
    assert c.deliveries() == []
    p2 = d.client("p2")
    p2.send("jobs", b"before it")
    d.advance(1.5)
    got = c.deliveries()
    assert [(x.body, x.attempt) for x in got] == [(b"before it", 1), (b"later", 1)]
    for x in got:
        c.ack(x.tag)
    assert d.queue_stats("jobs")["expired"] == 0  # its TTL started when it was due


def test_a_scheduled_message_due_during_the_downtime_is_ready(b: Durable) -> None:
    d = b.driver
    p = d.client("p")
    p.ok(Op.DECLARE, "jobs", {"durable": True})
    send_later(p, "jobs", b"later", 5.0, ttl=100.0)
    d = b.restart(after=10.0)
    assert waiting(d, "jobs") == (1, 0, 0)
    d.advance(94.0)  # 99 s after it was due
    assert waiting(d, "jobs") == (1, 0, 0)
    d.advance(2.0)
    assert d.queue_stats("jobs")["expired"] == 1
