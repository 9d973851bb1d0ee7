"""PEEK (browse a queue without consuming it) and the requeue of dead letters, through
the core."""

from __future__ import annotations

from typing import Any

from aiobus.protocol import Op

from .helpers import Client, Driver


def peek(c: Client, queue: str, **options: Any) -> dict[str, Any]:
    return c.ok(Op.PEEK, queue, options)  # type: ignore[no-any-return]


def ids(result: dict[str, Any]) -> list[str]:
    return [message[0] for message, _ in result["messages"]]


def test_peek_reads_runs_tail_and_stateful_messages_in_order_and_changes_nothing() -> None:
    d = Driver()
    c = d.client()
    for i in range(300):  # sealed into Runs, the rest in the tail
        c.send("jobs", b"%d" % i, ttl=60.0 if i == 3 else None)  # one stateful message
    before = d.queue_stats("jobs")
    everything = peek(c, "jobs", limit=1000)
    sent = ids(everything)
    assert [m[2] for m, _ in everything["messages"]] == [b"%d" % i for i in range(300)]
    page = peek(c, "jobs", offset=250, limit=100)
    assert (page["ready"], page["offset"]) == (300, 250)
    assert ids(page) == sent[250:]
    assert ids(peek(c, "jobs", limit=5)) == sent[:5]
    assert peek(c, "jobs")["messages"][3][0][2] == b"3"  # the one with a TTL
    assert d.queue_stats("jobs") == before
    c.consume("jobs", prefetch=300)
    assert [delivery.id for delivery in c.deliveries()] == sent  # all still there, in order


def test_peek_one_by_id_cuts_bodies_and_skips_what_is_not_ready() -> None:
    d = Driver()
    c = d.client()
    c.send("jobs", b"x" * 100, headers={"h": "v"})
    c.send("jobs", b"second")
    first, second = ids(peek(c, "jobs"))
    message, size = peek(c, "jobs", id=first, max_body=10)["messages"][0]
    assert (message[0], message[1], message[2], message[4], size) == (
        first, "jobs", b"x" * 10, {"h": "v"}, 100)
    assert peek(c, "jobs", id="t-999")["messages"] == []
    c.consume("jobs", prefetch=1)  # the first leased: no longer ready
    assert ids(peek(c, "jobs")) == [second]
    assert peek(c, "jobs", id=first)["messages"] == []


def test_peek_errors_and_no_queue_is_created() -> None:
    d = Driver()
    c = d.client()
    assert c.error(Op.PEEK, "nosuch", None)[0] == "no-such-queue"
    assert "nosuch" not in d.core.stats()["queues"]
    c.send("jobs")
    assert c.error(Op.PEEK, "jobs", {"limit": 0})[0] == "bad-option"
    assert c.error(Op.PEEK, "jobs", {"colour": 1})[0] == "bad-option"
    assert c.error(Op.PEEK, "$sys", None)[0] == "forbidden"
    c.receive(Op.PEEK, 0, "jobs")  # rid 0: no answer, and the 2-field form is valid
    assert c.take() == []


def test_requeue_dead_letters_one_then_all() -> None:
    d = Driver()
    c = d.client()
    for i in range(3):
        c.send("jobs", b"%d" % i, headers={"own": str(i)})
    c.consume("jobs", prefetch=3)
    for delivery in c.deliveries():
        c.reject(delivery.tag, "broken")
    one, two, three = ids(peek(c, "jobs.dlq"))
    assert d.core.requeue_dead_letters("jobs.dlq", [two], d.now) == 1
    (back,) = c.deliveries()
    c.ack(back.tag)
    assert (back.id, back.body, back.headers, back.attempt) == (two, b"1", {"own": "1"}, 1)
    assert ids(peek(c, "jobs.dlq")) == [one, three]
    assert d.core.requeue_dead_letters("jobs.dlq", None, d.now) == 2
    again = c.deliveries()
    assert [delivery.id for delivery in again] == [one, three]
    for delivery in again:
        c.ack(delivery.tag)
    dlq = d.queue_stats("jobs.dlq")
    assert (dlq["ready"], dlq["acked"], dlq["sent"]) == (0, 3, 3)
    assert d.queue_stats("jobs")["sent"] == 6
    # The bytes charged for queued messages went with them (max_queued_bytes_per_uid):
    # all acked now, nothing is charged anywhere.
    queues = d.core.queues.queues
    assert (queues["jobs.dlq"].bytes, queues["jobs"].bytes) == (0, 0)
    assert all(account.bytes == 0 for account in d.core.queues.accounts.values())


def test_requeue_leaves_letters_without_a_valid_origin() -> None:
    d = Driver()
    c = d.client()
    c.send("jobs.dlq", b"a", headers={"x-original-queue": "$sys"})
    c.send("jobs.dlq", b"b", headers={"x-original-queue": "jobs", "x-dead-reason": "too-large"})
    c.send("jobs.dlq", b"c")
    before = ids(peek(c, "jobs.dlq"))
    assert d.core.requeue_dead_letters("jobs.dlq", None, d.now) == 0
    assert ids(peek(c, "jobs.dlq")) == before and len(before) == 3
    assert "jobs" not in d.core.stats()["queues"]
