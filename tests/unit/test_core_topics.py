"""Topics in the sans-IO broker core: wildcard fan-out, the credit window with its drop
policies, and the broker's own ``$sys`` presence events."""

from __future__ import annotations

import pytest

from aiobus.protocol import BodyKind, Op

from .helpers import Driver


@pytest.fixture
def d() -> Driver:
    return Driver(wall_offset=500.0)


def test_fan_out_to_every_matching_subscription_publisher_included() -> None:
    d = Driver()
    pub, a, b, c = d.client("pub"), d.client("a"), d.client("b"), d.client("c")
    own = pub.subscribe("weather.*")
    sa_star = a.subscribe("weather.*")
    sa_tail = a.subscribe("weather.>")  # two subscriptions on one connection: two events
    sb = b.subscribe("weather.hk")
    c.subscribe("weather.hk.north")
    c.subscribe("news.>")
    before = d.core.stats()["topics"]
    pub.publish("weather.hk", b"sunny", {"unit": "C"})
    (mine,) = pub.events()
    assert (mine.sid, mine.topic, mine.body, mine.headers, mine.dropped) == (
        own, "weather.hk", b"sunny", {"unit": "C"}, 0)
    assert sorted(e.sid for e in a.events()) == sorted([sa_star, sa_tail])
    (eb,) = b.events()
    assert (eb.sid, eb.id) == (sb, mine.id)
    assert c.events() == []
    after = d.core.stats()["topics"]
    assert after["published"] - before["published"] == 1
    assert after["unrouted"] == before["unrouted"]


def test_event_fields(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("a.b")
    d.advance_to(12.5)
    pub.receive(Op.PUBLISH, "a.b", b"\x93\x01\x02\x03", BodyKind.PACKED, None)
    (event,) = sub.events()
    assert event.sid == sid
    assert event.topic == "a.b"
    assert event.value() == [1, 2, 3]
    assert event.headers is None
    assert event.timestamp == pytest.approx(512.5)
    assert event.dropped == 0


def test_each_publish_gets_a_new_id(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sub.subscribe(">")
    for _ in range(5):
        pub.publish("x")
    assert len({e.id for e in sub.events()}) == 5


def test_publish_that_matches_nobody_is_dropped_and_counted(d: Driver) -> None:
    pub, other = d.client("pub"), d.client("other")
    other.subscribe("b.>")
    before = d.core.stats()["topics"]
    pub.publish("a.b")
    pub.publish("b")  # '>' needs at least one more token
    assert other.events() == []
    assert pub.take() == []  # fire-and-forget: no reply either way
    after = d.core.stats()["topics"]
    assert after["published"] - before["published"] == 2
    assert after["unrouted"] - before["unrouted"] == 2


@pytest.mark.parametrize("pattern", ["", "a..b", "a.>.b", "a*", "a b", ">.x"])
def test_subscribe_with_an_invalid_pattern(d: Driver, pattern: str) -> None:
    c = d.client("c")
    code, message = c.error(Op.SUBSCRIBE, 1, pattern, 10, "drop-oldest")
    assert code == "invalid-name"
    assert "pattern" in message
    assert c.closed is None


@pytest.mark.parametrize("topic", ["a..b", "a.*", "a.>", "a b", "."])
def test_publish_to_an_invalid_topic(d: Driver, topic: str) -> None:
    c = d.client("c")
    c.publish(topic)
    ((_, rid, code, message),) = c.take()
    assert (rid, code) == (0, "invalid-name")
    assert "topic" in message
    assert c.closed is None


@pytest.mark.parametrize(
    ("max_pending", "policy", "field"),
    [(0, "drop-oldest", "max_pending"), (1_000_001, "drop-oldest", "max_pending"),
     (10, "drop-all", "policy"), (10, "", "policy")],
)
def test_subscribe_with_bad_options(d: Driver, max_pending: int, policy: str,
                                    field: str) -> None:
    code, message = d.client("c").error(Op.SUBSCRIBE, 1, "a", max_pending, policy)
    assert code == "bad-option"
    assert field in message


# -- the credit window -----------------------------------------------------------------


def test_credit_window_sends_max_pending_then_holds_max_pending(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t", max_pending=3, policy="drop-newest")
    for i in range(6):
        pub.publish("t", b"%d" % i)
    assert [e.body for e in sub.events()] == [b"0", b"1", b"2"]
    (stats,) = d.core.stats()["topics"]["subscriptions"]
    assert (stats["in_flight"], stats["pending"], stats["dropped"]) == (3, 3, 0)
    sub.credit(sid, 2)
    assert [(e.body, e.dropped) for e in sub.events()] == [(b"3", 0), (b"4", 0)]
    sub.credit(sid, 100)  # credit is capped at max_pending
    assert [e.body for e in sub.events()] == [b"5"]
    for i in range(6, 12):
        pub.publish("t", b"%d" % i)
    assert [e.body for e in sub.events()] == [b"6", b"7"]  # 5 is still in flight


def test_drop_oldest(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t", max_pending=3, policy="drop-oldest")
    for i in range(10):
        pub.publish("t", b"%d" % i)
    assert [e.body for e in sub.events()] == [b"0", b"1", b"2"]
    (stats,) = d.core.stats()["topics"]["subscriptions"]
    assert (stats["pending"], stats["dropped"]) == (3, 4)
    sub.credit(sid, 3)
    # 3..6 were dropped; 7 is the first event after the gap and says so.
    assert [(e.body, e.dropped) for e in sub.events()] == [(b"7", 4), (b"8", 0), (b"9", 0)]
    sub.credit(sid, 3)
    pub.publish("t", b"10")
    assert [(e.body, e.dropped) for e in sub.events()] == [(b"10", 0)]


def test_drop_newest(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t", max_pending=3, policy="drop-newest")
    for i in range(10):
        pub.publish("t", b"%d" % i)
    assert [e.body for e in sub.events()] == [b"0", b"1", b"2"]
    (stats,) = d.core.stats()["topics"]["subscriptions"]
    assert (stats["pending"], stats["dropped"]) == (3, 4)
    sub.credit(sid, 3)
    pub.publish("t", b"10")
    sub.credit(sid, 3)
    got = [(e.body, e.dropped) for e in sub.events()]
    assert [body for body, _ in got] == [b"3", b"4", b"5", b"10"]
    # Every drop is reported once, on the first event delivered after the gap: 6..9
    # were dropped between 5 and 10, so 10 carries the count, not 3.
    assert got == [(b"3", 0), (b"4", 0), (b"5", 0), (b"10", 4)]


@pytest.mark.parametrize("policy", ["drop-oldest", "drop-newest"])
def test_reported_drops_add_up(d: Driver, policy: str) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t", max_pending=4, policy=policy)
    received = []

    def drain() -> None:
        while events := sub.events():
            received.extend(events)
            sub.credit(sid, len(events))

    for burst in (3, 9, 1, 12, 5, 1):  # the last publish comes after every gap
        for _ in range(burst):
            pub.publish("t")
        drain()
    (stats,) = d.core.stats()["topics"]["subscriptions"]
    assert stats["dropped"] > 0
    assert sum(e.dropped for e in received) == stats["dropped"]
    assert len(received) + stats["dropped"] == 31
    assert stats["pending"] == 0


def test_disconnect_policy_closes_with_slow_consumer(d: Driver) -> None:
    pub, sub, bystander = d.client("pub"), d.client("sub"), d.client("by")
    sub.subscribe("t", max_pending=2, policy="disconnect")
    bystander.subscribe("t", max_pending=100)
    for _ in range(4):
        pub.publish("t")
    assert sub.closed is None
    pub.publish("t")
    assert sub.closed is not None
    assert sub.closed[0] == "slow-consumer"
    assert "disconnect" in sub.closed[1]
    assert len(bystander.events()) == 5
    assert bystander.closed is None and pub.closed is None
    subs = d.core.stats()["topics"]["subscriptions"]
    assert [s["conn"] for s in subs] == [bystander.conn]
    assert d.sink.close_calls.count(sub.conn) == 1


def test_credit_for_an_unknown_subscription_is_harmless(d: Driver) -> None:
    c = d.client("c")
    c.credit(42, 5)
    assert c.take() == []
    assert c.closed is None


def test_cancel_stops_events(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sid = sub.subscribe("t.*", max_pending=1)
    pub.publish("t.a")
    pub.publish("t.b")  # pending
    sub.cancel(sid)
    sub.credit(sid, 1)
    pub.publish("t.c")
    assert [e.topic for e in sub.events()] == ["t.a"]
    assert d.core.stats()["topics"]["subscriptions"] == []
    assert sub.error(Op.CANCEL, sid)[0] == "unknown-subscription"


def test_subscription_ids_can_be_reused_after_cancel(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sub.ok(Op.SUBSCRIBE, 7, "a", 10, "drop-oldest")
    sub.ok(Op.CANCEL, 7)
    sub.ok(Op.SUBSCRIBE, 7, "b", 10, "drop-oldest")
    pub.publish("a")
    pub.publish("b")
    assert [(e.sid, e.topic) for e in sub.events()] == [(7, "b")]


def test_disconnect_removes_subscriptions(d: Driver) -> None:
    pub, sub = d.client("pub"), d.client("sub")
    sub.subscribe("t")
    d.core.disconnect(sub.conn, d.now)
    before = d.core.stats()["topics"]["unrouted"]
    pub.publish("t")
    assert d.sink.inbox[sub.conn] == []
    assert d.core.stats()["topics"]["unrouted"] == before + 1


# -- $sys ------------------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["$sys.x", "$sys.client.connected", "$other"])
def test_clients_cannot_publish_reserved_topics(d: Driver, topic: str) -> None:
    watcher, c = d.client("w"), d.client("c")
    watcher.subscribe("$sys.>")
    watcher.subscribe("$other")
    watcher.take()
    c.publish(topic)
    ((op, rid, code, message),) = c.take()
    assert (op, rid, code) == (Op.ERROR, 0, "forbidden")
    assert topic in message
    assert watcher.events() == []
    assert c.closed is None


def test_clients_cannot_forge_presence_events(d: Driver) -> None:
    """Even once the broker itself has published on a ``$sys`` topic (so the topic is
    known to the index's match cache), a client's PUBLISH to it is forbidden."""
    watcher = d.client("w")
    watcher.subscribe("$sys.>")
    d.client("somebody")  # the broker publishes $sys.client.connected
    assert [e.topic for e in watcher.events()] == ["$sys.client.connected"]
    forger = d.client("forger")
    watcher.events()
    forger.publish("$sys.client.connected", b"\x80")
    assert [f[:3] for f in forger.take()] == [[Op.ERROR, 0, "forbidden"]]
    assert watcher.events() == []


def test_presence_events(d: Driver) -> None:
    watcher, everything = d.client("w"), d.client("all")
    sid = watcher.subscribe("$sys.>")
    everything.subscribe(">")  # a leading wildcard does not match $ topics
    d.advance_to(3.0)
    c = d.client("svc", pid=777, uid=1001)
    (joined,) = watcher.events()
    assert (joined.sid, joined.topic) == (sid, "$sys.client.connected")
    info = joined.value()
    assert (info["name"], info["pid"], info["uid"], info["conn"]) == ("svc", 777, 1001, c.conn)
    assert joined.timestamp == pytest.approx(503.0)
    d.core.disconnect(c.conn, d.now)
    (left,) = watcher.events()
    assert left.topic == "$sys.client.disconnected"
    assert (left.value()["name"], left.value()["pid"], left.value()["uid"]) == ("svc", 777, 1001)
    assert everything.events() == []


def test_no_presence_event_for_a_connection_that_never_said_hello(d: Driver) -> None:
    watcher = d.client("w")
    watcher.subscribe("$sys.client.*")
    conn = d.open()
    d.core.disconnect(conn, d.now)
    assert watcher.events() == []


def test_subscribing_to_sys_is_allowed_publishing_reserved_queue_is_not(d: Driver) -> None:
    c = d.client("c")
    c.subscribe("$sys.client.connected")
    assert c.send("$sys.q")[2] == "forbidden"
