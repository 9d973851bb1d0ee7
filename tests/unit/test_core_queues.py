"""Queue semantics of the sans-IO broker core (issue 3, "Queue semantics"), driven with a
recording sink and a fake clock: every timeout, delay and TTL moves by ``tick(now)``."""

from __future__ import annotations

import pytest

from aiobus.broker.queue_state import RUN, SMALL
from aiobus.broker.queues import PARK_LIMIT
from aiobus.protocol import Op

from .helpers import Client, Driver


@pytest.fixture
def d() -> Driver:
    return Driver(wall_offset=1_000_000.0)


def bodies(deliveries: list) -> list[bytes]:
    return [x.body for x in deliveries]


def consume_all(*clients: Client) -> dict[int, list]:
    return {c.conn: c.deliveries() for c in clients}


# -- competing consumers, fairness, prefetch, order ----------------------------------


def test_message_waits_for_a_consumer(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    assert producer.send("jobs", b"one")[0] == Op.OK
    assert d.queue_stats("jobs")["ready"] == 1
    consumer.consume("jobs")
    got = consumer.delivery()
    assert (got.queue, got.body, got.attempt, got.reply_to) == ("jobs", b"one", 1, None)
    assert got.timestamp == pytest.approx(1_000_000.0)
    assert d.queue_stats("jobs")["ready"] == 0


def test_competing_consumers_get_each_message_exactly_once_round_robin(d: Driver) -> None:
    producer = d.client("p")
    a, b, c = d.client("a"), d.client("b"), d.client("c")
    for x in (a, b, c):
        x.consume("jobs", prefetch=100)
    sent = [f"m{i}".encode() for i in range(30)]
    for body in sent:
        producer.send("jobs", body)
    got = consume_all(a, b, c)
    # Round-robin: each consumer gets every third message, in send order.
    assert [bodies(got[x.conn]) for x in (a, b, c)] == [sent[0::3], sent[1::3], sent[2::3]]
    ids = [m.id for x in (a, b, c) for m in got[x.conn]]
    assert len(set(ids)) == 30
    assert all(m.attempt == 1 for x in (a, b, c) for m in got[x.conn])


def test_never_more_than_prefetch_unacked_per_consumer(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    a.consume("jobs", prefetch=2)
    b.consume("jobs", prefetch=3)
    for i in range(20):
        producer.send("jobs", b"%d" % i)
    held = {a.conn: a.deliveries(), b.conn: b.deliveries()}
    assert (len(held[a.conn]), len(held[b.conn])) == (2, 3)
    assert d.queue_stats("jobs")["ready"] == 15
    assert d.queue_stats("jobs")["unacked"] == 5
    seen: list[bytes] = []
    # Ack one at a time: each ack frees exactly one slot for exactly one new message.
    while d.queue_stats("jobs")["ready"] or d.queue_stats("jobs")["unacked"]:
        for x in (a, b):
            if held[x.conn]:
                m = held[x.conn].pop(0)
                seen.append(m.body)
                assert x.ack(m.tag)[0] == Op.OK
                new = x.deliveries()
                assert len(new) <= 1
                held[x.conn].extend(new)
                assert len(held[x.conn]) <= (2 if x is a else 3)
    assert sorted(seen, key=int) == [b"%d" % i for i in range(20)]
    assert len(seen) == 20


def test_first_deliveries_keep_send_order(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    for i in range(50):
        producer.send("jobs", b"%d" % i)
    consumer.consume("jobs", prefetch=7)
    seen = []
    while True:
        got = consumer.deliveries()
        if not got:
            break
        for m in got:
            seen.append(m.body)
            consumer.ack(m.tag)
    assert seen == [b"%d" % i for i in range(50)]


def test_a_long_backlog_keeps_send_order_across_sealed_runs(d: Driver) -> None:
    """Small stateless messages are sealed into runs of RUN (queue_state.Run); TTL'd and
    large ones stay apart, and released messages go back to the front: the order holds."""
    producer, consumer = d.client("p"), d.client("c")
    sent = []
    for i in range(3 * RUN + 50):
        body = b"%d" % i + (b"L" * SMALL if i % 97 == 0 else b"")
        ttl = 60.0 if i % 101 == 0 else None
        producer.send("jobs", body, ttl=ttl)
        sent.append(body)
    first = d.client("first")
    sid = first.consume("jobs", prefetch=10)
    assert bodies(first.deliveries()) == sent[:10]
    first.cancel(sid)  # released: back to the front, ahead of the runs
    consumer.consume("jobs", prefetch=64)
    seen = []
    while got := consumer.deliveries():
        for m in got:
            seen.append(m.body)
            consumer.ack(m.tag)
    assert seen == sent
    assert d.queue_stats("jobs")["ready"] == 0


def test_fairness_with_one_slow_consumer(d: Driver) -> None:
    """A consumer whose window is full is skipped; the others keep taking turns."""
    producer, slow, fast1, fast2 = (d.client(n) for n in ("p", "slow", "f1", "f2"))
    slow.consume("jobs", prefetch=1)
    fast1.consume("jobs", prefetch=50)
    fast2.consume("jobs", prefetch=50)
    for i in range(21):
        producer.send("jobs", b"%d" % i)
    assert bodies(slow.deliveries()) == [b"0"]
    assert len(fast1.deliveries()) == 10
    assert len(fast2.deliveries()) == 10


# -- ack, nack, retry schedule ----------------------------------------------------------


def test_ack_removes_the_message(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs")
    m = consumer.delivery()
    assert consumer.ack(m.tag) == [Op.OK, 1 + 1, None]  # rid 1 was CONSUME
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["unacked"], stats["acked"]) == (0, 0, 1)
    d.advance(3600)
    assert consumer.deliveries() == []
    # A second ack of the same delivery is an error, not a silent success.
    assert consumer.ack(m.tag)[2] == "lease-unknown"
    assert consumer.closed is None


def test_ack_without_rid_sends_no_reply(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs")
    m = consumer.delivery()
    consumer.receive(Op.ACK, 0, m.tag)
    assert consumer.take() == []
    assert d.queue_stats("jobs")["acked"] == 1


def test_nack_without_delay_requeues_at_once_with_attempt_plus_one(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", b"a")
    producer.send("jobs", b"b")
    m = consumer.delivery()
    assert consumer.nack(m.tag)[0] == Op.OK
    again = consumer.delivery()  # no tick needed
    assert (again.id, again.body, again.attempt) == (m.id, b"a", 2)
    assert again.tag != m.tag


def test_nack_with_delay_is_not_deliverable_before_the_delay(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", b"a")
    m = consumer.delivery()
    consumer.nack(m.tag, delay=10.0)
    assert d.queue_stats("jobs")["delayed"] == 1
    d.advance_to(9.99)
    assert consumer.deliveries() == []
    d.advance_to(10.0)
    again = consumer.delivery()
    assert (again.id, again.attempt) == (m.id, 2)
    assert d.queue_stats("jobs")["delayed"] == 0


def test_nack_delay_does_not_block_other_messages(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", b"a")
    producer.send("jobs", b"b")
    m = consumer.delivery()
    consumer.nack(m.tag, delay=10.0)
    assert consumer.delivery().body == b"b"


@pytest.mark.parametrize("delay", [-1.0, float("nan"), float("inf")])
def test_nack_with_a_bad_delay_is_an_error_and_keeps_the_lease(d: Driver, delay: float) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs")
    m = consumer.delivery()
    code, message = consumer.error(Op.NACK, m.tag, delay, None)
    assert code == "bad-option"
    assert "delay" in message
    assert consumer.ack(m.tag)[0] == Op.OK


def test_retry_delays_schedule(d: Driver) -> None:
    """The n-th retry waits retry_delays[min(n, len) - 1] seconds."""
    producer, consumer = d.client("p"), d.client("c")
    assert producer.declare("jobs", retry_delays=[1, 5], max_deliveries=10)[0] == Op.OK
    consumer.consume("jobs")
    producer.send("jobs")
    m = consumer.delivery()
    for attempt, wait in [(2, 1.0), (3, 5.0), (4, 5.0), (5, 5.0)]:
        start = d.now
        consumer.nack(m.tag)
        d.advance_to(start + wait - 0.001)
        assert consumer.deliveries() == [], f"attempt {attempt} came before {wait}s"
        d.advance_to(start + wait)
        m = consumer.delivery()
        assert m.attempt == attempt


def test_retry_delays_apply_to_ack_timeouts_too(d: Driver) -> None:
    producer, stalled, other = d.client("p"), d.client("s"), d.client("o")
    producer.declare("jobs", retry_delays=[3], ack_timeout=10)
    stalled.consume("jobs")
    producer.send("jobs")
    m = stalled.delivery()
    other.consume("jobs")
    d.advance_to(10.0)  # the lease expires; the retry waits 3 s
    assert d.queue_stats("jobs")["delayed"] == 1
    d.advance_to(12.999)
    assert other.deliveries() == []
    d.advance_to(13.0)
    again = other.delivery()
    assert (again.id, again.attempt) == (m.id, 2)


def test_explicit_nack_delay_overrides_the_schedule(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", retry_delays=[100])
    consumer.consume("jobs")
    producer.send("jobs")
    consumer.nack(consumer.delivery().tag, delay=0)
    assert consumer.delivery().attempt == 2


# -- ack timeout, late answers, zombies, extend ------------------------------------------


def test_ack_timeout_redelivers_with_attempt_plus_one(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    producer.declare("jobs", ack_timeout=10)
    a.consume("jobs")
    producer.send("jobs", b"x")
    first = a.delivery()
    b.consume("jobs")
    d.advance_to(9.999)
    assert b.deliveries() == []
    d.advance_to(10.0)
    second = b.delivery()
    assert (second.id, second.body, second.attempt) == (first.id, b"x", 2)
    assert a.deliveries() == []


def test_late_ack_fails_with_lease_expired_and_frees_the_slot(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", ack_timeout=10)
    consumer.consume("jobs", prefetch=1)
    producer.send("jobs", b"x")
    first = consumer.delivery()
    d.advance(10)
    # The expired lease keeps the slot: the stalled consumer gets nothing new.
    producer.send("jobs", b"y")
    d.advance(100)
    assert consumer.deliveries() == []
    assert d.queue_stats("jobs")["ready"] == 2
    code, message = consumer.error(Op.ACK, first.tag)
    assert code == "lease-expired"
    assert "expired" in message
    assert consumer.closed is None
    # The slot is free again: the consumer gets the retried message, attempt 2.
    again = consumer.delivery()
    assert (again.id, again.attempt) == (first.id, 2)
    assert consumer.ack(again.tag)[0] == Op.OK
    assert consumer.delivery().body == b"y"


@pytest.mark.parametrize("verb", ["nack", "reject", "extend"])
def test_late_answers_fail_and_free_the_slot(d: Driver, verb: str) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", ack_timeout=10)
    consumer.consume("jobs", prefetch=1)
    producer.send("jobs", b"x")
    first = consumer.delivery()
    d.advance(10)
    assert consumer.deliveries() == []
    if verb == "nack":
        reply = consumer.nack(first.tag)
    elif verb == "reject":
        reply = consumer.reject(first.tag, "nope")
    else:
        reply = consumer.extend(first.tag, 60.0)
    assert reply[:3] == [Op.ERROR, reply[1], "lease-expired"]
    again = consumer.delivery()
    assert (again.id, again.attempt) == (first.id, 2)
    # The late reject did not dead-letter the message.
    assert "jobs.dlq" not in d.core.stats()["queues"] or d.queue_stats("jobs.dlq")["ready"] == 0


def test_answer_for_a_lease_that_moved_to_another_consumer(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    producer.declare("jobs", ack_timeout=10)
    a.consume("jobs")
    producer.send("jobs")
    first = a.delivery()
    b.consume("jobs")
    d.advance(10)
    second = b.delivery()
    assert a.ack(first.tag)[2] == "lease-expired"
    # A's tag is not B's: B cannot answer A's tag, and A cannot answer B's.
    assert a.ack(second.tag)[2] == "lease-unknown"
    assert b.ack(second.tag)[0] == Op.OK
    assert d.queue_stats("jobs")["acked"] == 1


def test_stalled_consumer_never_gets_its_message_back_burning_attempts(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", ack_timeout=1, max_deliveries=3)
    consumer.consume("jobs", prefetch=1)
    producer.send("jobs")
    consumer.delivery()
    for _ in range(10):
        d.advance(1)
    assert consumer.deliveries() == []
    stats = d.queue_stats("jobs")
    # One failed attempt (the first timeout), not three: nobody processed it since.
    assert (stats["ready"], stats["dead_lettered"]) == (1, 0)


def test_extend_pushes_the_deadline(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    producer.declare("jobs", ack_timeout=10)
    a.consume("jobs")
    producer.send("jobs")
    m = a.delivery()
    b.consume("jobs")
    d.advance(5)
    assert a.extend(m.tag, 30.0)[0] == Op.OK  # new deadline: 35
    d.advance_to(34.999)
    assert b.deliveries() == []
    d.advance_to(35.0)
    again = b.delivery()
    assert (again.id, again.attempt) == (m.id, 2)
    assert a.ack(m.tag)[2] == "lease-expired"


def test_extend_then_ack_in_time(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", ack_timeout=10)
    consumer.consume("jobs", prefetch=2)
    producer.send("jobs", b"a")
    producer.send("jobs", b"b")
    ma, _ = consumer.deliveries()
    consumer.extend(ma.tag, 100.0)
    consumer.extend(ma.tag, 200.0)  # extended twice: the later deadline wins
    d.advance(10)  # b's lease (not extended) expires on time
    assert d.queue_stats("jobs")["unacked"] == 1
    d.advance(150)
    assert consumer.ack(ma.tag)[0] == Op.OK


@pytest.mark.parametrize("seconds", [0, -1.0, float("inf"), float("nan")])
def test_extend_with_bad_seconds(d: Driver, seconds: float) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs")
    m = consumer.delivery()
    code, message = consumer.error(Op.EXTEND, m.tag, seconds)
    assert code == "bad-option"
    assert "seconds" in message
    assert consumer.closed is None
    assert consumer.ack(m.tag)[0] == Op.OK


# -- dead letters -------------------------------------------------------------------------


def test_max_deliveries_dead_letters_with_headers(d: Driver) -> None:
    producer = d.client("p")
    consumer = d.client("c", pid=4242, uid=1234)
    producer.declare("jobs", max_deliveries=2)
    consumer.consume("jobs")
    producer.send("jobs", b"payload", headers={"trace": "abc"})
    first = consumer.delivery()
    consumer.nack(first.tag, reason="boom 1")
    second = consumer.delivery()
    assert second.attempt == 2
    d.advance(7)
    consumer.nack(second.tag, reason="boom 2")
    assert consumer.deliveries() == []
    assert d.queue_stats("jobs")["dead_lettered"] == 1
    consumer.consume("jobs.dlq")
    dead = consumer.delivery()
    assert (dead.queue, dead.id, dead.body, dead.attempt) == ("jobs.dlq", first.id, b"payload", 1)
    assert dead.headers == {
        "trace": "abc",
        "x-original-queue": "jobs",
        "x-dead-reason": "max-deliveries",
        "x-attempts": "2",
        "x-dead-time": "1000007.000000",
        "x-reason-text": "boom 2",
        "x-consumer-pid": "4242",
        "x-consumer-uid": "1234",
    }


def test_max_deliveries_by_ack_timeouts(d: Driver) -> None:
    producer, first, last = d.client("p"), d.client("f"), d.client("l", pid=77, uid=88)
    producer.declare("jobs", max_deliveries=2, ack_timeout=5)
    first.consume("jobs")
    producer.send("jobs")
    first.delivery()
    last.consume("jobs")
    d.advance(5)
    assert last.delivery().attempt == 2
    d.advance(5)
    assert first.deliveries() == last.deliveries() == []
    other = d.client("o")
    other.consume("jobs.dlq")
    dead = other.delivery()
    assert dead.headers["x-dead-reason"] == "max-deliveries"
    assert dead.headers["x-attempts"] == "2"
    assert dead.headers["x-reason-text"] == "ack-timeout"
    assert (dead.headers["x-consumer-pid"], dead.headers["x-consumer-uid"]) == ("77", "88")


def test_reject_dead_letters_at_once(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c", pid=99, uid=5)
    consumer.consume("jobs")
    producer.send("jobs", b"bad")
    m = consumer.delivery()
    d.advance(2)
    assert consumer.reject(m.tag, "cannot parse")[0] == Op.OK
    consumer.consume("jobs.dlq")
    dead = consumer.delivery()
    assert (dead.id, dead.body) == (m.id, b"bad")
    assert dead.headers == {
        "x-original-queue": "jobs",
        "x-dead-reason": "rejected",
        "x-attempts": "1",
        "x-dead-time": "1000002.000000",
        "x-reason-text": "cannot parse",
        "x-consumer-pid": "99",
        "x-consumer-uid": "5",
    }


def test_dead_letter_queue_is_an_ordinary_queue(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", b"x")
    consumer.reject(consumer.delivery().tag)
    # Its defaults: no dead-letter queue of its own, unlimited deliveries.
    settings = d.queue_stats("jobs.dlq")["settings"]
    assert (settings["dead_letter"], settings["max_deliveries"]) == (None, None)
    consumer.consume("jobs.dlq")
    dead = consumer.delivery()
    for _ in range(10):
        consumer.nack(dead.tag)
        dead = consumer.delivery()
    assert dead.attempt == 11
    # Sent back to its queue by hand.
    assert producer.send("jobs", dead.body, headers=dead.headers)[0] == Op.OK
    consumer.ack(dead.tag)
    back = consumer.delivery()
    assert (back.queue, back.body) == ("jobs", b"x")


def test_queue_without_dead_letter_discards_and_counts(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", dead_letter=None)
    consumer.consume("jobs")
    producer.send("jobs")
    consumer.reject(consumer.delivery().tag)
    assert d.queue_stats("jobs")["discarded"] == 1
    assert "jobs.dlq" not in d.core.stats()["queues"]


def test_custom_dead_letter_queue(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", dead_letter="graveyard")
    consumer.consume("jobs")
    producer.send("jobs")
    consumer.reject(consumer.delivery().tag)
    assert d.queue_stats("graveyard")["ready"] == 1


# -- TTL ---------------------------------------------------------------------------------


def test_ttl_expiry_is_eager(d: Driver) -> None:
    producer = d.client("p")
    producer.send("jobs", b"old", ttl=5.0)
    producer.send("jobs", b"fresh")
    d.advance_to(4.999)
    assert d.queue_stats("jobs")["ready"] == 2
    d.advance_to(5.0)  # no consumer, not at the head: a timer expires it
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["expired"], stats["dead_lettered"]) == (1, 1, 1)
    consumer = d.client("c")
    consumer.consume("jobs.dlq")
    dead = consumer.delivery()
    assert dead.body == b"old"
    assert dead.headers["x-dead-reason"] == "expired"
    assert dead.headers["x-original-queue"] == "jobs"
    assert dead.headers["x-dead-time"] == "1000005.000000"


def test_queue_ttl_from_declare(d: Driver) -> None:
    producer = d.client("p")
    producer.declare("jobs", ttl=2)
    producer.send("jobs")
    d.advance(2)
    assert d.queue_stats("jobs")["expired"] == 1


def test_ttl_does_not_expire_a_leased_message_that_gets_acked(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", ttl=1.0)
    m = consumer.delivery()
    d.advance(5)
    assert consumer.ack(m.tag)[0] == Op.OK
    assert d.queue_stats("jobs")["expired"] == 0


def test_ttl_expires_a_nacked_message_past_its_ttl(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", ttl=1.0)
    m = consumer.delivery()
    d.advance(5)
    consumer.nack(m.tag)
    assert consumer.deliveries() == []
    assert d.queue_stats("jobs")["expired"] == 1


def test_ttl_expires_a_message_released_by_cancel(d: Driver) -> None:
    """A leased message whose TTL passed and that a CANCEL puts back into the queue is
    expired by then, not left in the ready queue until some consumer pulls it."""
    producer, consumer = d.client("p"), d.client("c")
    sid = consumer.consume("jobs")
    producer.send("jobs", ttl=1.0)
    consumer.delivery()
    d.advance(5)
    consumer.cancel(sid)
    d.advance(1)
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["expired"]) == (0, 1)


def test_ttl_expires_a_delayed_message_at_its_ttl(d: Driver) -> None:
    """Eager expiry: a message waiting out a long nack delay expires at its TTL."""
    producer, consumer = d.client("p"), d.client("c")
    consumer.consume("jobs")
    producer.send("jobs", ttl=5.0)
    consumer.nack(consumer.delivery().tag, delay=1000.0)
    d.advance(5)
    stats = d.queue_stats("jobs")
    assert (stats["delayed"], stats["expired"]) == (0, 1)
    # Its delay timer was cancelled with it: nothing holds the message until 1000 s.
    entries, cancelled = d.core.timers.statistics()
    assert entries - cancelled <= 3  # the lease timer and two handshake deadlines
    d.advance(1000)
    assert d.queue_stats("jobs")["delayed"] == 0


@pytest.mark.parametrize("ttl", [0, -1, -1.0, 0.0, float("inf"), float("nan"), 1e10])
def test_bad_ttl_is_an_error(d: Driver, ttl: float) -> None:
    producer = d.client("p")
    reply = producer.send("jobs", ttl=ttl)
    assert reply[:3] == [Op.ERROR, reply[1], "bad-option"]
    assert "ttl" in reply[3]
    assert "jobs" not in d.core.stats()["queues"] or d.queue_stats("jobs")["sent"] == 0
    assert producer.closed is None


# -- overflow ----------------------------------------------------------------------------


def test_overflow_block_parks_the_send_until_there_is_room(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", max_length=2)  # overflow="block" is the default
    assert producer.send("jobs", b"1")[0] == Op.OK
    assert producer.send("jobs", b"2")[0] == Op.OK
    assert producer.send("jobs", b"3") is None  # parked: no OK yet
    assert producer.send("jobs", b"4") is None
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["parked"]) == (2, 2)
    d.advance(3600)
    assert producer.take() == []
    consumer.consume("jobs", prefetch=1)
    # The consumer took one: room for one parked send, whose OK now arrives.
    assert producer.take() == [[Op.OK, 4, None]]
    assert d.queue_stats("jobs")["parked"] == 1
    m = consumer.delivery()
    consumer.ack(m.tag)
    assert producer.take() == [[Op.OK, 5, None]]
    seen = [m.body]
    while got := consumer.deliveries():
        seen.append(got[0].body)
        consumer.ack(got[0].tag)
    assert seen == [b"1", b"2", b"3", b"4"]


def test_overflow_block_keeps_a_producers_order(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", max_length=1)
    for i in range(5):
        producer.send("jobs", b"%d" % i)
    consumer.consume("jobs", prefetch=100)
    assert bodies(consumer.deliveries()) == [b"%d" % i for i in range(5)]
    assert len(producer.take(Op.OK)) == 4


def test_overflow_reject(d: Driver) -> None:
    producer = d.client("p")
    producer.declare("jobs", max_length=1, overflow="reject")
    assert producer.send("jobs")[0] == Op.OK
    reply = producer.send("jobs")
    assert reply[0] == Op.ERROR
    assert reply[2] == "queue-full"
    assert "max_length=1" in reply[3]
    assert d.queue_stats("jobs")["ready"] == 1
    assert producer.closed is None


def test_overflow_dead_letter_moves_the_oldest(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", max_length=2, overflow="dead-letter")
    for body in (b"1", b"2", b"3"):
        assert producer.send("jobs", body)[0] == Op.OK
    consumer.consume("jobs", prefetch=10)
    assert bodies(consumer.deliveries()) == [b"2", b"3"]
    consumer.consume("jobs.dlq")
    dead = consumer.delivery()
    assert dead.body == b"1"
    assert dead.headers["x-dead-reason"] == "overflow"
    assert dead.headers["x-attempts"] == "0"


def test_overflow_dead_letter_never_exceeds_max_length(d: Driver) -> None:
    """With overflow="dead-letter", max_length holds even when the oldest messages are
    delayed retries rather than ready ones."""
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", max_length=1, overflow="dead-letter")
    sid = consumer.consume("jobs")
    producer.send("jobs", b"1")
    consumer.nack(consumer.delivery().tag, delay=60.0)  # delayed: counts against max_length
    consumer.cancel(sid)
    assert d.queue_stats("jobs")["delayed"] == 1
    assert producer.send("jobs", b"2")[0] == Op.OK
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["delayed"]) in [(1, 0), (0, 1)], stats
    assert stats["dead_lettered"] == 1


def test_many_parked_sends_stop_reading_the_producer(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", max_length=1)
    producer.send("jobs")
    for _ in range(PARK_LIMIT - 1):
        producer.send("jobs")
    assert d.sink.reading == []
    producer.send("jobs")
    assert d.sink.reading == [(producer.conn, False)]
    consumer.consume("jobs", prefetch=1)
    # Resume once half of the parked sends are admitted, not before.
    for _ in range(PARK_LIMIT // 2 - 2):
        consumer.ack(consumer.delivery().tag)
    assert d.sink.reading == [(producer.conn, False)]
    consumer.ack(consumer.delivery().tag)
    assert d.sink.reading == [(producer.conn, False), (producer.conn, True)]
    assert d.core.stats()["connections"][0]["parked"] == PARK_LIMIT // 2


def test_many_parked_sends_admitted_at_once_by_a_large_window(d: Driver) -> None:
    """A consumer with a large prefetch appearing when many sends are parked takes them
    all: admitting parked sends must not recurse once per message."""
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", max_length=1)
    n = 2000
    for i in range(n):
        producer.send("jobs", b"%d" % i)
    consumer.consume("jobs", prefetch=n)
    assert bodies(consumer.deliveries()) == [b"%d" % i for i in range(n)]


def test_parked_sends_of_a_gone_producer(d: Driver) -> None:
    """Its confirmed send stays queued; its unconfirmed, parked ones are forgotten (the
    producer never heard they were accepted, so its retry must not duplicate them)."""
    producer, other, consumer = d.client("p"), d.client("o"), d.client("c")
    producer.declare("jobs", max_length=1)
    assert producer.send("jobs", b"1")[0] == Op.OK
    assert producer.send("jobs", b"2") is None
    assert other.send("jobs", b"3") is None
    d.core.disconnect(producer.conn, d.now)
    assert d.queue_stats("jobs")["parked"] == 1
    consumer.consume("jobs", prefetch=5)
    assert bodies(consumer.deliveries()) == [b"1", b"3"]
    assert d.sink.inbox[producer.conn] == []
    assert [f[0] for f in other.take()] == [Op.OK]


# -- consumers leaving -------------------------------------------------------------------


def test_disconnect_redelivers_unacked_to_another_consumer_with_attempt_plus_one(
    d: Driver,
) -> None:
    producer, a, b = d.client("p"), d.client("a", pid=11, uid=22), d.client("b")
    a.consume("jobs", prefetch=3)
    for i in range(3):
        producer.send("jobs", b"%d" % i)
    held = a.deliveries()
    b.consume("jobs", prefetch=10)
    assert b.deliveries() == []
    d.core.disconnect(a.conn, d.now)
    again = b.deliveries()
    assert sorted((m.id, m.attempt) for m in again) == sorted((m.id, 2) for m in held)
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["unacked"], stats["consumers"]) == (0, 3, 1)


def test_disconnect_redelivery_keeps_delivery_order(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    a.consume("jobs", prefetch=3)
    for i in range(3):
        producer.send("jobs", b"%d" % i)
    a.deliveries()
    d.core.disconnect(a.conn, d.now)
    b.consume("jobs", prefetch=10)
    assert bodies(b.deliveries()) == [b"0", b"1", b"2"]


def test_disconnect_dead_letters_in_delivery_order(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    producer.declare("jobs", max_deliveries=1)
    a.consume("jobs", prefetch=3)
    for i in range(3):
        producer.send("jobs", b"%d" % i)
    a.deliveries()
    d.core.disconnect(a.conn, d.now)
    b.consume("jobs.dlq", prefetch=10)
    assert bodies(b.deliveries()) == [b"0", b"1", b"2"]


def test_disconnect_with_retry_delay_keeps_delivery_order(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    producer.declare("jobs", retry_delays=[5])
    a.consume("jobs", prefetch=3)
    for i in range(3):
        producer.send("jobs", b"%d" % i)
    a.deliveries()
    d.core.disconnect(a.conn, d.now)
    b.consume("jobs", prefetch=10)
    assert b.deliveries() == []
    d.advance(5)
    assert bodies(b.deliveries()) == [b"0", b"1", b"2"]


def test_ack_timeout_redelivery_keeps_delivery_order(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    producer.declare("jobs", ack_timeout=10)
    a.consume("jobs", prefetch=3)
    for i in range(3):
        producer.send("jobs", b"%d" % i)
    assert bodies(a.deliveries()) == [b"0", b"1", b"2"]
    d.advance(10)  # all three leases expire in the same tick
    b.consume("jobs", prefetch=10)
    again = b.deliveries()
    assert [(m.body, m.attempt) for m in again] == [(b"0", 2), (b"1", 2), (b"2", 2)]


def test_disconnect_counts_towards_max_deliveries(d: Driver) -> None:
    producer = d.client("p")
    producer.declare("jobs", max_deliveries=1)
    a = d.client("a", pid=321, uid=654)
    a.consume("jobs")
    producer.send("jobs")
    a.delivery()
    d.core.disconnect(a.conn, d.now)
    stats = d.queue_stats("jobs")
    assert (stats["ready"], stats["dead_lettered"]) == (0, 1)
    b = d.client("b")
    b.consume("jobs.dlq")
    dead = b.delivery()
    assert dead.headers["x-dead-reason"] == "max-deliveries"
    assert dead.headers["x-consumer-pid"] == "321"
    assert dead.headers["x-consumer-uid"] == "654"


def test_cancel_releases_leases_with_the_same_attempt_in_order(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    sid = a.consume("jobs", prefetch=3)
    for i in range(4):
        producer.send("jobs", b"%d" % i)
    held = a.deliveries()
    assert bodies(held) == [b"0", b"1", b"2"]
    a.cancel(sid)
    b.consume("jobs", prefetch=10)
    again = b.deliveries()
    assert [(m.id, m.body, m.attempt) for m in again] == [
        *((m.id, m.body, 1) for m in held),
        (again[3].id, b"3", 1),
    ]
    # The released leases are gone: answering them is an error, not a success.
    assert a.ack(held[0].tag)[2] == "lease-unknown"
    assert a.take() == []
    assert d.queue_stats("jobs")["consumers"] == 1


def test_cancel_with_a_nacked_message_keeps_its_attempt(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    sid = a.consume("jobs")
    producer.send("jobs")
    a.nack(a.delivery().tag)
    second = a.delivery()
    assert second.attempt == 2
    a.cancel(sid)
    b.consume("jobs")
    assert b.delivery().attempt == 2


def test_cancel_unknown_sid_is_an_error(d: Driver) -> None:
    consumer = d.client("c")
    assert consumer.error(Op.CANCEL, 99)[0] == "unknown-subscription"
    assert consumer.closed is None


def test_duplicate_sid_is_an_error(d: Driver) -> None:
    consumer = d.client("c")
    consumer.ok(Op.CONSUME, 1, "jobs", 1)
    assert consumer.error(Op.CONSUME, 1, "other", 1)[0] == "duplicate-subscription"
    assert consumer.error(Op.SUBSCRIBE, 1, "t", 10, "drop-oldest")[0] == "duplicate-subscription"


@pytest.mark.parametrize("prefetch", [0, 65536])
def test_bad_prefetch(d: Driver, prefetch: int) -> None:
    assert d.client("c").error(Op.CONSUME, 1, "jobs", prefetch)[0] == "bad-option"


# -- declare -----------------------------------------------------------------------------


def test_default_settings_of_an_implicit_queue(d: Driver) -> None:
    d.client("p").send("jobs")
    assert d.queue_stats("jobs")["settings"] == {
        "max_deliveries": 5,
        "ack_timeout": 30.0,
        "retry_delays": [],
        "dead_letter": "jobs.dlq",
        "ttl": None,
        "max_length": None,
        "overflow": "block",
        "durable": False,
    }


def test_implicit_queue_adopts_its_first_declaration(d: Driver) -> None:
    producer = d.client("p")
    producer.send("jobs")
    result = producer.declare("jobs", max_deliveries=2, ack_timeout=3)
    assert result[0] == Op.OK
    assert (result[2]["max_deliveries"], result[2]["ack_timeout"]) == (2, 3.0)
    assert d.queue_stats("jobs")["ready"] == 1  # the queue kept its message


def test_adopted_ack_timeout_applies_to_new_leases_old_ones_keep_theirs(d: Driver) -> None:
    producer, a, b = d.client("p"), d.client("a"), d.client("b")
    a.consume("jobs", prefetch=2)
    producer.send("jobs", b"old")
    old = a.delivery()  # leased under the default ack_timeout: deadline 30
    d.advance_to(1.0)
    assert producer.declare("jobs", ack_timeout=5)[0] == Op.OK
    producer.send("jobs", b"new")
    new = a.delivery()  # leased under ack_timeout=5: deadline 6
    b.consume("jobs", prefetch=2)
    d.advance_to(6.0)
    assert [(m.id, m.attempt) for m in b.deliveries()] == [(new.id, 2)]
    d.advance_to(29.0)
    assert b.deliveries() == []
    assert a.ack(old.tag)[0] == Op.OK


def test_redeclare_same_settings_is_ok_different_is_a_mismatch(d: Driver) -> None:
    producer = d.client("p")
    first = producer.declare("jobs", max_deliveries=3, retry_delays=[1, 2])
    assert first[0] == Op.OK
    again = producer.declare("jobs", retry_delays=(1.0, 2.0), max_deliveries=3)
    assert again[0] == Op.OK
    assert again[2] == first[2]
    reply = producer.declare("jobs", max_deliveries=4)
    assert reply[:3] == [Op.ERROR, reply[1], "queue-mismatch"]
    assert "max_deliveries" in reply[3]
    # Declaring with no options is also "different settings" (the defaults).
    assert producer.declare("jobs")[2] == "queue-mismatch"
    assert d.queue_stats("jobs")["settings"]["max_deliveries"] == 3
    assert producer.closed is None


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"max_deliveries": 0}, "max_deliveries"),
        ({"max_deliveries": -1}, "max_deliveries"),
        ({"max_deliveries": 1.5}, "max_deliveries"),
        ({"max_deliveries": True}, "max_deliveries"),
        ({"ack_timeout": 0}, "ack_timeout"),
        ({"ack_timeout": None}, "ack_timeout"),
        ({"ack_timeout": "30"}, "ack_timeout"),
        ({"ack_timeout": float("inf")}, "ack_timeout"),
        ({"retry_delays": "1,2"}, "retry_delays"),
        ({"retry_delays": [1, -2]}, "retry_delays"),
        ({"retry_delays": [float("nan")]}, "retry_delays"),
        ({"dead_letter": "bad name"}, "dead_letter"),
        ({"dead_letter": "jobs"}, "dead-letter"),
        ({"ttl": 0}, "ttl"),
        ({"ttl": "1"}, "ttl"),
        ({"max_length": 0}, "max_length"),
        ({"overflow": "drop"}, "overflow"),
    ],
)
def test_declare_bad_options(d: Driver, options: dict, field: str) -> None:
    producer = d.client("p")
    code, message = producer.error(Op.DECLARE, "jobs", options)
    assert code == "bad-option"
    assert field in message
    assert "jobs" not in d.core.stats()["queues"]
    assert producer.closed is None


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("$sys.q", "forbidden"),
        ("a..b", "invalid-name"),
        ("a.*", "invalid-name"),
        ("", "invalid-name"),
    ],
)
@pytest.mark.parametrize("op", ["send", "consume", "declare"])
def test_bad_queue_names(d: Driver, name: str, code: str, op: str) -> None:
    c = d.client("c")
    if op == "send":
        reply = c.send(name)
    elif op == "consume":
        reply = c.call(Op.CONSUME, 1, name, 1)
    else:
        reply = c.declare(name)
    assert reply[:3] == [Op.ERROR, reply[1], code]
    assert name not in d.core.stats()["queues"]
    assert c.closed is None


# -- request / reply ---------------------------------------------------------------------


def test_request_reply(d: Driver) -> None:
    requester, server = d.client("req"), d.client("srv")
    server.consume("rpc.add")
    assert requester.send("rpc.add", b"[2,5]", token=7)[0] == Op.OK
    m = server.delivery()
    assert m.reply_to == f"{requester.conn}.7"
    assert server.ok(Op.REPLY, m.tag, b"\x07", 1, {"h": "v"}) is None
    assert requester.take() == [[Op.RESPONSE, 7, b"\x07", 1, {"h": "v"}]]
    stats = d.queue_stats("rpc.add")
    assert (stats["unacked"], stats["acked"]) == (0, 1)
    assert server.ack(m.tag)[2] == "lease-unknown"


def test_an_unconfirmed_request_is_answered_only_by_its_response_or_error(d: Driver) -> None:
    """rid 0 (what the Python client sends): no OK to wake the requester; a refusal is an
    ERROR with rid 0 that names the request's token (PROTOCOL.md, ERROR)."""
    requester, server = d.client("req"), d.client("srv")
    d.client("admin").declare("rpc.full", max_length=1, overflow="reject")
    server.consume("rpc")
    requester.receive(Op.SEND, 0, "rpc", b"?", 0, None, 5.0, 3)
    assert requester.take() == []
    server.ok(Op.REPLY, server.delivery().tag, b"!", 0, None)
    assert requester.take() == [[Op.RESPONSE, 3, b"!", 0, None]]
    requester.receive(Op.SEND, 0, "rpc.full", b"1", 0, None, 5.0, 4)
    requester.receive(Op.SEND, 0, "rpc.full", b"2", 0, None, 5.0, 5)
    [error] = requester.take()
    assert error[:3] == [Op.ERROR, 0, "queue-full"] and error[4] == 5
    requester.receive(Op.SEND, 0, "rpc.full", b"3", 0, None, None, None)  # not a request
    [error] = requester.take()
    assert len(error) == 4 and error[:3] == [Op.ERROR, 0, "queue-full"]


def test_reply_to_a_requester_that_left_is_dropped(d: Driver) -> None:
    requester, server = d.client("req"), d.client("srv")
    server.consume("rpc")
    requester.send("rpc", token=1)
    m = server.delivery()
    d.core.disconnect(requester.conn, d.now)
    server.ok(Op.REPLY, m.tag, b"", 0, None)
    assert d.sink.inbox[requester.conn] == []


def test_reply_to_a_non_request(d: Driver) -> None:
    producer, server = d.client("p"), d.client("srv")
    server.consume("jobs")
    producer.send("jobs")
    m = server.delivery()
    assert m.reply_to is None
    code, _ = server.error(Op.REPLY, m.tag, b"", 0, None)
    assert code == "not-a-request"
    assert server.ack(m.tag)[0] == Op.OK  # the lease survived the bad reply


def test_ack_many_refills_the_window_after_the_whole_frame(d: Driver) -> None:
    """Freed slots are refilled once the frame is processed: its ERRORs first, then one
    batch of DELIVERs in queue order; and two consumers' slots are refilled fairly."""
    producer, consumer, other = d.client("p"), d.client("c"), d.client("o")
    consumer.consume("jobs", prefetch=3)
    for i in range(8):
        producer.send("jobs", b"%d" % i)
    tags = [m.tag for m in consumer.deliveries()]
    consumer.receive(Op.ACK_MANY, [tags[0], 999_999, tags[1]])
    frames = d.sink.take(consumer.conn)
    assert [f[0] for f in frames] == [Op.ERROR, Op.DELIVER, Op.DELIVER]
    assert [f[3][2] for f in frames[1:]] == [b"3", b"4"]  # message body, in order
    other.consume("jobs", prefetch=1)
    assert [m.body for m in other.deliveries()] == [b"5"]
    consumer.receive(Op.ACK_MANY, [tags[2]])
    assert [m.body for m in consumer.deliveries()] == [b"6"]


def test_reply_to_an_unknown_tag(d: Driver) -> None:
    server = d.client("srv")
    assert server.error(Op.REPLY, 12345, b"", 0, None)[0] == "lease-unknown"


def test_ack_many_acks_every_tag_and_reports_each_bad_one(d: Driver) -> None:
    producer, consumer = d.client("p"), d.client("c")
    producer.declare("jobs", ack_timeout=10)
    consumer.consume("jobs", prefetch=4)
    for i in range(4):
        producer.send("jobs", b"%d" % i)
    tags = [m.tag for m in consumer.deliveries()]
    d.advance(10)  # every lease expires: these are zombies now
    consumer.deliveries()
    producer.send("jobs", b"4")
    consumer.receive(Op.ACK_MANY, [tags[0], 999_999])
    errors = consumer.take(Op.ERROR)
    assert [(e[1], e[2]) for e in errors] == [(0, "lease-expired"), (0, "lease-unknown")]
    assert consumer.take(Op.OK) == []  # ACK_MANY is never answered on success
    # The late ack freed a slot in the window, but the consumer still has zombies.
    consumer.receive(Op.ACK_MANY, tags[1:])
    assert len(consumer.take(Op.ERROR)) == 3
    again = consumer.deliveries()  # no zombie left: the window refills, in order
    assert [(m.body, m.attempt) for m in again] == [(b"%d" % i, 2) for i in range(4)]
    consumer.receive(Op.ACK_MANY, [m.tag for m in again])
    assert consumer.take(Op.ERROR) == []
    assert d.core.stats()["queues"]["jobs"]["acked"] == 4
    assert [m.body for m in consumer.deliveries()] == [b"4"]
