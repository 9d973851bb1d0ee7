"""Faults that lost, corrupted or stalled work in the broker core (issue 9), at the core's
level: a lost connection with several consumers, consumer churn, and what the timer heap
and the ready deque keep alive. The same faults against the real broker process are in
tests/integration/test_faults.py."""

from __future__ import annotations

import pytest

from aiobus.broker.core import DEFAULT_MAX_CONSUMERS
from aiobus.broker.queue_state import QMsg
from aiobus.protocol import Op

from .helpers import Driver


@pytest.fixture
def d() -> Driver:
    return Driver(wall_offset=1_000_000.0)


# -- one attempt per lease, however many consumers the lost connection had -----------


@pytest.mark.parametrize("consumers", [2, 5])
def test_lost_connection_counts_one_attempt_per_lease(d: Driver, consumers: int) -> None:
    producer, worker, other = d.client("p"), d.client("w"), d.client("o")
    for _ in range(consumers):
        worker.consume("jobs", prefetch=1)
    producer.send("jobs", b"job")
    assert len(worker.deliveries()) == 1
    d.core.disconnect(worker.conn, d.now)
    other.consume("jobs")
    got = other.delivery()
    assert (got.body, got.attempt) == (b"job", 2)
    assert d.queue_stats("jobs")["dead_lettered"] == 0


def test_lost_connection_with_max_deliveries_3_keeps_the_message(d: Driver) -> None:
    producer, worker, other = d.client("p"), d.client("w"), d.client("o")
    producer.declare("jobs", max_deliveries=3, dead_letter=None)
    for _ in range(5):
        worker.consume("jobs", prefetch=1)
    producer.send("jobs", b"job")
    d.core.disconnect(worker.conn, d.now)
    assert d.queue_stats("jobs")["discarded"] == 0
    other.consume("jobs")
    assert other.delivery().attempt == 2


def test_lost_connection_does_not_feed_its_own_dead_letter_consumer(d: Driver) -> None:
    """A message dead-lettered by the lost connection's failure must not be leased to
    that connection's consumer of the dead-letter queue (and fail there too)."""
    producer, worker, other = d.client("p"), d.client("w"), d.client("o")
    producer.declare("jobs", max_deliveries=1)
    worker.consume("jobs")
    worker.consume("jobs.dlq")
    producer.send("jobs", b"job")
    d.core.disconnect(worker.conn, d.now)
    assert d.queue_stats("jobs.dlq")["ready"] == 1
    other.consume("jobs.dlq")
    letter = other.delivery()
    assert (letter.attempt, letter.headers["x-attempts"]) == (1, "1")


# -- consumer churn is O(1) per consumer, and capped per connection ------------------


def test_consumer_churn_leaves_no_stale_turns_behind(d: Driver) -> None:
    client = d.client("c")
    sids = [client.consume("jobs", prefetch=1) for _ in range(2000)]
    for sid in reversed(sids):  # newest first: the order that was quadratic
        client.cancel(sid)
    queue = d.core.queues.queues["jobs"]
    assert not queue.consumers
    assert len(queue.available) <= 64  # stale entries are dropped as they pile up
    keep = client.consume("jobs", prefetch=2)
    client.ok(Op.SEND, "jobs", b"a", 0, None, None, None)
    client.ok(Op.SEND, "jobs", b"b", 0, None, None, None)
    assert [(x.sid, x.body) for x in client.deliveries()] == [(keep, b"a"), (keep, b"b")]


def test_round_robin_survives_stale_entries(d: Driver) -> None:
    producer, client = d.client("p"), d.client("c")
    sids = [client.consume("jobs", prefetch=10) for _ in range(4)]
    client.cancel(sids[1])
    client.cancel(sids[2])
    for i in range(6):
        producer.send("jobs", str(i).encode())
    got = [x.sid for x in client.deliveries()]
    assert got == [sids[0], sids[3]] * 3


def test_consumers_per_connection_are_capped() -> None:
    d = Driver(max_consumers=3)
    client = d.client("c")
    for _ in range(3):
        client.consume("jobs")
    code, message = client.error(Op.CONSUME, 99, "jobs", 1)
    assert code == "quota-exceeded"
    assert "max_consumers=3" in message
    assert d.queue_stats("jobs")["consumers"] == 3
    assert client.closed is None
    assert DEFAULT_MAX_CONSUMERS >= 1024


# -- nothing acked or expired stays in memory ----------------------------------------


def live_timers(d: Driver) -> int:
    entries, cancelled = d.core.timers.statistics()
    return entries - cancelled


def test_acked_messages_with_a_ttl_leave_no_timer_behind(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", ttl=86400)
    consumer.consume("jobs", prefetch=1000)
    for _ in range(4):
        for _ in range(1000):
            producer.send("jobs", b"x" * 100)
        for delivery in consumer.deliveries():
            consumer.ack(delivery.tag)
    entries, _ = d.core.timers.statistics()
    assert live_timers(d) <= 4  # the lease timer, handshake deadlines, the queue sweep
    assert entries <= 2 * live_timers(d) + 64 + 1  # shells are dropped as they pile up
    assert all(e[3] is None for e in d.core.timers._heap if e[2] is None)


def test_repeated_extend_keeps_one_timer_per_lease(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs")
    tag = consumer.delivery().tag
    for _ in range(5000):
        d.receive(consumer.conn, [Op.EXTEND, 0, tag, 3600.0])
    entries, _ = d.core.timers.statistics()
    assert entries < 200
    assert consumer.ack(tag)[0] == Op.OK
    assert live_timers(d) <= 4  # the lease timer, two handshake deadlines, the sweep


def test_expired_messages_leave_no_body_in_the_ready_deque(d: Driver) -> None:
    producer = d.client("p")
    producer.declare("jobs", ttl=1, dead_letter=None)
    for round_ in range(3):
        for _ in range(500):
            producer.send("jobs", b"x" * 1000)
        d.advance(2)
        queue = d.core.queues.queues["jobs"]
        assert queue.ready_len == 0
        assert len(queue.ready) <= 64 + 1, round_
        assert all(type(e) is not QMsg or not e.packed for e in queue.ready)
    assert d.queue_stats("jobs")["expired"] == 1500
