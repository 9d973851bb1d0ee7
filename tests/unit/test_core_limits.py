"""Per-connection bounds in the core: a congested connection (its unread output above
``max_pending_output``, as the shell reports) gets its events dropped and counted, and
its consumers get nothing new until it has read."""

from __future__ import annotations

from typing import Any

from aiobus.broker.settings import SWEEP_INTERVAL
from aiobus.names import matches
from aiobus.protocol import Op

from .helpers import Driver


def test_congested_connection_holds_events_as_if_out_of_credit() -> None:
    d = Driver()
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t.>", max_pending=2, policy="drop-oldest")
    d.core.set_congested(sub.conn, True, d.now)
    for topic in ("t.a", "t.b", "t.c"):
        pub.publish(topic)
    sub.credit(sid, 1)  # credit while congested: nothing goes out yet
    assert sub.events() == []
    (stats,) = d.core.stats()["topics"]["subscriptions"]
    assert (stats["pending"], stats["dropped"]) == (2, 1)  # the policy decides, as always
    d.core.set_congested(sub.conn, False, d.now)
    events = sub.events()
    assert [(e.topic, e.dropped) for e in events] == [("t.b", 1), ("t.c", 0)]


def test_congested_disconnect_policy_closes_once_pending_is_full() -> None:
    d = Driver()
    pub, sub = d.client("pub"), d.client("sub")
    sub.subscribe("t.>", max_pending=1, policy="disconnect")
    d.core.set_congested(sub.conn, True, d.now)
    pub.publish("t.a")
    assert sub.closed is None
    pub.publish("t.b")
    assert sub.closed is not None and sub.closed[0] == "slow-consumer"


def test_congested_consumer_gets_nothing_new_until_it_has_read() -> None:
    d = Driver()
    prod, cons = d.client("prod"), d.client("cons")
    cons.consume("jobs", prefetch=10)
    d.core.set_congested(cons.conn, True, d.now)
    late = cons.consume("jobs.late", prefetch=10)  # added while congested: held too
    prod.send("jobs")
    prod.send("jobs.late")
    assert cons.deliveries() == []
    assert d.queue_stats("jobs")["ready"] == 1
    d.core.set_congested(cons.conn, False, d.now)
    got = cons.deliveries()
    assert len(got) == 2 and late in {g.sid for g in got}


def test_empty_queues_created_by_use_are_swept() -> None:
    # Queues were never deleted otherwise: 1.05M DECLAREs had left 3 GB for good.
    d = Driver()
    c = d.client("c", client_id="cid")

    def use(queue: str) -> None:  # one message through the queue, and no consumer left
        sid = c.consume(queue)
        c.ack(c.delivery().tag)
        c.cancel(sid)

    c.send("used")
    use("used")
    c.send("full")  # holds a message: stays
    c.declare("declared")  # declared: stays
    c.consume("consumed")  # has a consumer: stays
    c.send_once("dedup", 1)  # its deduplication window holds an id for 120 s
    use("dedup")
    d.advance(SWEEP_INTERVAL)  # marks the idle ones
    assert "used" in d.core.stats()["queues"]
    c.send("used")  # used again in between: not removed at the next sweep
    use("used")
    d.advance(SWEEP_INTERVAL)  # "dedup" idle since the first, but its id was young then
    assert {"used", "dedup"} <= set(d.core.stats()["queues"])
    d.advance(SWEEP_INTERVAL)
    queues = d.core.stats()["queues"]
    assert set(queues) == {"full", "declared", "consumed"}
    assert d.core.queues.owned == {1000: 3}


def test_queue_quota_counts_what_a_uid_created_and_frees_on_removal() -> None:
    d = Driver(max_queues_per_uid=2)
    a, b = d.client("a"), d.client("b", uid=2000)
    a.send("a.1")
    a.consume("a.2")
    assert a.send("a.3")[2] == "quota-exceeded"
    code, message = a.error(Op.DECLARE, "a.3", {})
    assert code == "quota-exceeded" and "max_queues_per_uid=2" in message
    a.send("a.1")  # an existing queue is no new one
    b.send("b.1")  # another uid has its own quota
    assert a.ok(Op.DELETE, "a.1", False) == 2
    a.send("a.3")
    assert d.core.queues.owned == {1000: 2, 2000: 1}


def test_subscription_and_connection_quotas() -> None:
    d = Driver(max_subscriptions_per_uid=2, max_connections_per_uid=2)
    a, b = d.client("a"), d.client("b")
    a.subscribe("x")
    b.subscribe("y")
    code, message = a.error(Op.SUBSCRIBE, 9, "z", 10, "drop-oldest")
    assert code == "quota-exceeded" and "max_subscriptions_per_uid=2" in message
    third = d.open()
    assert d.sink.closed[third][0] == "quota-exceeded"
    other = d.open(uid=2000)  # another uid
    assert other not in d.sink.closed
    d.core.disconnect(b.conn, d.now)  # its subscription and connection are freed
    a.subscribe("z")
    assert d.open() not in d.sink.closed


def test_unacked_quota_is_the_prefetch_a_uids_consumers_hold() -> None:
    d = Driver(max_unacked_per_uid=10)
    a, b = d.client("a"), d.client("b")  # the same uid
    first = a.consume("q", prefetch=6)
    b.consume("q", prefetch=4)
    code, message = a.error(Op.CONSUME, 99, "q", 1)
    assert code == "quota-exceeded" and "max_unacked_per_uid=10" in message
    assert "adds up to 10" in message
    other = d.client("other", uid=2000)
    other.consume("q", prefetch=10)  # another uid has its own quota
    for i in range(30):  # held unacked: never more than the prefetch, so the quota
        other.send("q", f"m{i}".encode())
    held = len(a.deliveries()) + len(b.deliveries()) + len(other.deliveries())
    assert held == 20
    a.cancel(first)  # frees 6
    a.consume("q", prefetch=6)
    assert a.error(Op.CONSUME, 98, "q", 1)[0] == "quota-exceeded"
    d.core.disconnect(b.conn, d.now)  # frees 4
    a.consume("q", prefetch=4)
    assert d.core._uid_prefetch == {1000: 10, 2000: 10}
    d.core.disconnect(a.conn, d.now)
    assert d.core._uid_prefetch == {2000: 10}


def test_names_match_patterns_as_subscriptions_do() -> None:
    assert matches("a.*", "a.b") and not matches("a.*", "a.b.c") and not matches("a.*", "a")
    assert matches("a.>", "a.b.c") and not matches("a.>", "a")
    assert matches("a.b", "a.b") and not matches("a.b", "a.c")
    assert matches("*.b.>", "x.b.y") and not matches("*.b.>", "x.c.y")


def test_stats_pages_filters_and_refuses_bad_options() -> None:
    d = Driver()
    c = d.client("c")
    for name in ("b.1", "a.2", "a.1", "c.1"):
        c.declare(name)
    first = c.ok(Op.STATS, {"limit": 2})
    assert list(first["queues"]) == ["a.1", "a.2"] and first["queues_total"] == 4
    second = c.ok(Op.STATS, {"limit": 2, "after": first["queues_next"]})
    assert list(second["queues"]) == ["b.1", "c.1"] and second["queues_next"] is None
    assert list(c.ok(Op.STATS, {"queues": "a.*"})["queues"]) == ["a.1", "a.2"]
    assert c.ok(Op.STATS)["queues_total"] == 4  # the 2-field frame: no options
    assert c.error(Op.STATS, {"limit": 0})[0] == "bad-option"
    assert c.error(Op.STATS, {"color": 1})[0] == "bad-option"
    assert c.error(Op.STATS, {"queues": "a..b"})[0] == "invalid-name"


def test_resuming_that_congests_again_keeps_consumers_held() -> None:
    d = Driver()
    pub, sub = d.client("pub"), d.client("sub")
    sub.subscribe("t.>")
    sub.consume("jobs")
    d.core.set_congested(sub.conn, True, d.now)
    pub.publish("t.a")
    pub.send("jobs")
    congest_again = d.sink.event

    def event(conn: int, sid: int, message: bytes, dropped: int) -> None:
        congest_again(conn, sid, message, dropped)
        d.core.set_congested(conn, True, d.now)  # as the shell does past the bound

    d.core.topics._send_event = event  # the router calls the sink's event directly
    d.core.set_congested(sub.conn, False, d.now)
    assert len(sub.events()) == 1
    assert sub.deliveries() == []  # still held: the event filled the output again


def charged(d: Driver) -> dict[int | None, int]:
    """Bytes charged per payer, after checking every queue's count against what it
    holds (the queue model's invariant)."""
    from .test_model_queues import held_bytes

    totals: dict[int, tuple[Any, int]] = {}
    for queue in d.core.queues.queues.values():
        assert queue.bytes == held_bytes(queue), queue.name
        account, total = totals.get(id(queue.account), (queue.account, 0))
        totals[id(account)] = (account, total + queue.bytes)
    for account, total in totals.values():
        assert account.bytes == total, (account.uid, account.bytes, total)
    return {account.uid: account.bytes for account, _ in totals.values() if account.bytes}


def test_queued_bytes_quota_counts_what_a_uids_queues_hold() -> None:
    d = Driver(max_queued_bytes_per_uid=2_000)
    a, b = d.client("a"), d.client("b", uid=2000)
    accepted = 0
    while (reply := a.send("q", b"x" * 100))[0] == Op.OK:
        accepted += 1
    assert reply[2] == "quota-exceeded" and "max_queued_bytes_per_uid=2000" in reply[3]
    assert 10 <= accepted <= 12  # 100 bytes of body + envelope + 64 each
    assert 2_000 - 250 < charged(d)[1000] <= 2_000
    refused = b.send("q", b"y" * 100)  # the queue's payer is its creator, uid 1000
    assert refused is not None and refused[2] == "quota-exceeded" and "uid 1000" in refused[3]
    assert b.send("b.own")[0] == Op.OK  # b's own queue: b's own quota
    worker = d.client("worker")
    sid = worker.consume("q", prefetch=3)
    first, second, third = worker.deliveries()
    assert first.sid == sid
    held = charged(d)[1000]  # leased messages are still held
    worker.ack(first.tag)
    assert charged(d)[1000] < held
    worker.reject(second.tag, "bad")  # into q.dlq, which the broker made for q: same payer
    assert d.core.queues.queues["q.dlq"].account is d.core.queues.queues["q"].account
    assert d.core.queues.queues["q.dlq"].bytes > 0
    assert a.ok(Op.PURGE, "q") > 0  # the ready ones go; the leased one stays charged
    after_purge = charged(d)[1000]
    worker.nack(third.tag)  # back into q, then to the worker again
    assert charged(d)[1000] == after_purge
    assert a.ok(Op.DELETE, "q", False) >= 1
    assert a.ok(Op.DELETE, "q.dlq", False) == 1
    assert charged(d) == {2000: charged(d)[2000]}  # uid 1000 holds nothing now
    assert a.send("q", b"x" * 100)[0] == Op.OK


def test_queued_bytes_of_expired_requests_and_overflow_are_released() -> None:
    d = Driver(max_queued_bytes_per_uid=100_000)
    a = d.client("a")
    a.declare("full", max_length=1, overflow="dead-letter", ttl=5.0)
    for _ in range(3):
        a.send("full", b"z" * 50)  # each new one pushes the oldest out to full.dlq
    a.send("rpc", b"ask", ttl=1.0, token=7)  # a request nobody takes: discarded at expiry
    charged(d)
    d.advance(6)  # the TTLs pass
    assert set(charged(d)) == {1000}
    assert d.queue_stats("full")["ready"] == 0 and d.queue_stats("rpc")["ready"] == 0
    assert d.core.queues.queues["rpc"].bytes == 0


def test_parked_bytes_quota_spans_a_uids_connections() -> None:
    d = Driver(max_parked_bytes_per_uid=1_000)
    a, b, other = d.client("a"), d.client("b"), d.client("other", uid=2000)
    a.declare("full", max_length=1)  # overflow "block": sends past it park
    assert a.send("full", b"x" * 100)[0] == Op.OK
    assert a.send("full", b"p" * 400) is None  # parked: no answer yet
    assert b.send("full", b"q" * 400) is None  # another connection of the same uid
    code, message = b.error(Op.SEND, "full", b"r" * 400, 0, None, None, None)
    assert code == "quota-exceeded" and "max_parked_bytes_per_uid=1000" in message
    assert other.send("full", b"s" * 400) is None  # another uid parks on its own quota
    parked = d.core._uid_parked
    assert set(parked) == {1000, 2000} and 800 < parked[1000] < 1_000 and parked[2000] > 400
    d.core.disconnect(b.conn, d.now)  # its parked send is dropped, and uncounted
    assert 400 < parked[1000] < 500
    worker = d.client("worker", uid=3000)
    worker.consume("full", prefetch=10)  # takes what is there: a's and other's sends in
    assert [x.body[:1] for x in worker.deliveries()] == [b"x", b"p", b"s"]
    assert parked == {}
    assert a.send("full", b"t" * 400)[0] == Op.OK  # room again
