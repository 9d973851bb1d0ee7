"""Per-connection bounds in the core: a congested connection (its unread output above
``max_pending_output``, as the shell reports) gets its events dropped and counted, and
its consumers get nothing new until it has read."""

from __future__ import annotations

from .helpers import Driver


def test_congested_connection_drops_events_and_counts_them() -> None:
    d = Driver()
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t.>")
    d.core.set_congested(sub.conn, True, d.now)
    pub.publish("t.a")
    pub.publish("t.b")
    assert sub.events() == []
    (stats,) = d.core.stats()["topics"]["subscriptions"]
    assert stats["dropped"] == 2
    d.core.set_congested(sub.conn, False, d.now)
    pub.publish("t.c")
    (event,) = sub.events()
    assert (event.sid, event.topic, event.dropped) == (sid, "t.c", 2)


def test_congested_disconnect_policy_closes_as_slow_consumer() -> None:
    d = Driver()
    pub, sub = d.client("pub"), d.client("sub")
    sub.subscribe("t.>", policy="disconnect")
    d.core.set_congested(sub.conn, True, d.now)
    pub.publish("t.a")
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
