"""Queue administration and scheduled delivery against the real broker process (issue
10): ``purge_queue``, ``delete_queue``, ``send(..., delay=...)``, and for durable queues
their staying so across a kill -9 and a restart on the same data directory."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

import pytest

import aiobus

from .conftest import BrokerProcess, queue_stats, unix_only

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


async def take(consumer: Any, n: int, timeout: float = TIMEOUT) -> list[aiobus.Message]:
    return [await asyncio.wait_for(consumer.__anext__(), timeout) for _ in range(n)]


async def nothing_for(consumer: Any, seconds: float) -> bool:
    try:
        await asyncio.wait_for(consumer.__anext__(), seconds)
    except TimeoutError:
        return True
    return False


def kill_and_restart(broker_factory: Any, old: BrokerProcess) -> BrokerProcess:
    os.kill(old.pid, signal.SIGKILL)
    old.proc.wait(TIMEOUT)
    return broker_factory()  # same name: same socket, same data directory


async def test_purge_removes_waiting_messages_and_keeps_leased_ones(bus: aiobus.Bus) -> None:
    for i in range(5):
        await bus.send("jobs", i)
    await bus.send("jobs", "later", delay=3600)
    async with bus.consume("jobs", prefetch=2) as consumer:
        leased = await take(consumer, 2)
        assert await bus.purge_queue("jobs") == 4  # 3 ready, 1 delayed
        stats = await queue_stats(bus, "jobs")
        assert (stats["ready"], stats["delayed"], stats["unacked"]) == (0, 0, 2)
        for msg in leased:
            await msg.ack()  # leases carry on
        await bus.send("jobs", "after")
        (after,) = await take(consumer, 1)
        assert after.body == "after"
        await after.ack()
    assert await bus.purge_queue("jobs") == 0


async def test_unknown_and_reserved_queues_are_typed_errors(bus: aiobus.Bus) -> None:
    with pytest.raises(aiobus.NoSuchQueue) as info:
        await bus.purge_queue("never.used")
    assert info.value.code == "no-such-queue"
    with pytest.raises(aiobus.NoSuchQueue):
        await bus.delete_queue("never.used")
    with pytest.raises(aiobus.Forbidden):
        await bus.delete_queue("$sys.queue")
    assert "never.used" not in (await bus.stats())["queues"]


async def test_delete_if_empty_and_delete(bus: aiobus.Bus) -> None:
    await bus.declare_queue("jobs", max_deliveries=2)
    await bus.send("jobs", "x")
    with pytest.raises(aiobus.QueueNotEmpty) as info:
        await bus.delete_queue("jobs", if_empty=True)
    assert info.value.code == "queue-not-empty" and "1 ready" in str(info.value)
    assert (await queue_stats(bus, "jobs"))["ready"] == 1  # nothing changed
    assert await bus.delete_queue("jobs") == 1
    assert "jobs" not in (await bus.stats())["queues"]
    # Its settings went with it.
    settings = await bus.declare_queue("jobs", max_deliveries=7)
    assert settings["max_deliveries"] == 7
    assert await bus.delete_queue("jobs", if_empty=True) == 0


async def test_delete_ends_leases_and_the_consumer_carries_on(bus: aiobus.Bus) -> None:
    await bus.send("jobs", "old")
    async with bus.consume("jobs", prefetch=1) as consumer:
        (old,) = await take(consumer, 1)
        assert await bus.delete_queue("jobs") == 1
        with pytest.raises(aiobus.LeaseError) as info:
            await old.ack(confirm=True)
        assert info.value.code == "lease-unknown"
        stats = await queue_stats(bus, "jobs")  # in use: there again, empty, defaults
        assert (stats["consumers"], stats["unacked"], stats["sent"]) == (1, 0, 0)
        await bus.send("jobs", "new")
        (new,) = await take(consumer, 1)
        assert (new.body, new.attempt) == ("new", 1)
        await new.ack()


@unix_only  # the broker's parked senders (overflow 'block'; NATS refuses it)
async def test_a_send_parked_on_a_deleted_queue_fails(broker: BrokerProcess,
                                                      bus: aiobus.Bus) -> None:
    await bus.declare_queue("jobs", max_length=1)
    await bus.send("jobs", 1)
    async with aiobus.connect(broker.path) as producer:
        parked = producer.send_nowait("jobs", 2)
        await producer.ping()
        assert (await queue_stats(bus, "jobs"))["parked"] == 1
        assert await bus.delete_queue("jobs") == 1
        with pytest.raises(aiobus.NoSuchQueue, match="not accepted"):
            await asyncio.wait_for(parked, TIMEOUT)


async def test_a_delayed_send_arrives_after_its_delay(bus: aiobus.Bus) -> None:
    async with bus.consume("jobs") as consumer:
        sent = time.monotonic()
        await bus.send("jobs", "later", delay=0.5)
        fut = bus.send_nowait("jobs", "also later", delay=0.5)
        await fut
        stats = await queue_stats(bus, "jobs")
        assert (stats["ready"], stats["delayed"]) == (0, 2)
        got = await take(consumer, 2)
        assert time.monotonic() - sent >= 0.5
        assert [m.body for m in got] == ["later", "also later"]
        for msg in got:
            await msg.ack()
    with pytest.raises(aiobus.InvalidOption, match="delay"):
        await bus.send("jobs", "x", delay=-1)
    with pytest.raises(aiobus.InvalidOption, match="delay"):
        await bus.send("jobs", "x", delay=1e9)


async def test_ttl_of_a_delayed_send_counts_from_its_due_time(bus: aiobus.Bus) -> None:
    sent = time.monotonic()
    await bus.send("jobs", "x", delay=1.0, ttl=2.0)  # expires 3 s after the send, not 2
    deadline = sent + 10
    while (await queue_stats(bus, "jobs"))["ready"] != 1:  # due
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert time.monotonic() - sent >= 1.0
    async with bus.consume("jobs.dlq") as dead:
        (letter,) = await take(dead, 1)
        assert letter.headers["x-dead-reason"] == "expired"
        assert time.monotonic() - sent >= 3.0 - 0.05  # TTL counted from the due time
        await letter.ack()


# -- durable queues across a kill -9 ------------------------------------------------


async def test_a_purged_durable_queue_stays_purged(broker_factory: Any) -> None:
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        for i in range(10):
            await bus.send("jobs", i)
        await bus.send("jobs", "later", delay=3600)
        async with bus.consume("jobs", prefetch=1) as consumer:
            (held,) = await take(consumer, 1)
            assert await bus.purge_queue("jobs") == 10
            await bus.send("jobs", "after the purge")
            await bus.ping()
            broker = kill_and_restart(broker_factory, broker)
    async with aiobus.connect(broker.path) as bus:
        stats = await queue_stats(bus, "jobs")
        assert (stats["ready"], stats["delayed"]) == (2, 0)
        async with bus.consume("jobs", prefetch=10) as consumer:
            got = await take(consumer, 2)
            # The lease held at the purge stays (the crash counts one attempt).
            assert [(m.body, m.attempt) for m in got] == [(0, 2), ("after the purge", 1)]
            assert got[0].id == held.id
            for msg in got:
                await msg.ack()


async def test_a_deleted_durable_queue_does_not_come_back(broker_factory: Any) -> None:
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True, max_deliveries=3)
        await bus.declare_queue("kept", durable=True)
        for i in range(10):
            await bus.send("jobs", i)
        await bus.send("kept", "k")
        assert await bus.delete_queue("jobs") == 10
        await bus.ping()
        broker = kill_and_restart(broker_factory, broker)
    async with aiobus.connect(broker.path) as bus:
        queues = (await bus.stats())["queues"]
        assert "jobs" not in queues
        assert queues["kept"]["ready"] == 1
        # A new queue of that name starts from nothing, with the settings it is given.
        settings = await bus.declare_queue("jobs", durable=True, max_deliveries=9)
        assert settings["max_deliveries"] == 9
        assert (await queue_stats(bus, "jobs"))["ready"] == 0


async def test_a_durable_delayed_send_survives_a_kill(broker_factory: Any) -> None:
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        await bus.send("jobs", "later", delay=1.5)
        await bus.send("jobs", "much later", delay=3600)
        broker = kill_and_restart(broker_factory, broker)
    async with aiobus.connect(broker.path) as bus:
        assert (await queue_stats(bus, "jobs"))["delayed"] in (1, 2)  # 1.5 s may be over
        async with bus.consume("jobs") as consumer:
            (msg,) = await take(consumer, 1)
            assert (msg.body, msg.attempt) == ("later", 1)
            await msg.ack()
            assert await nothing_for(consumer, 0.3)
        assert (await queue_stats(bus, "jobs"))["delayed"] == 1


async def test_consume_with_create_false_reads_only_an_existing_queue(
        broker_factory: Any) -> None:
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus:
        with pytest.raises(aiobus.NoSuchQueue, match="there is no queue 'nosuch'"):
            async with bus.consume("nosuch", create=False):
                pass
        assert "nosuch" not in (await bus.stats())["queues"]
        await bus.send("jobs", "one")
        async with bus.consume("jobs", create=False) as consumer:
            (msg,) = await take(consumer, 1)
            await msg.ack()
            # Started, the consumer keeps its queue as any does: across a restart of the
            # broker (in memory: "jobs" is gone) it is resumed, and the queue is there.
            broker = kill_and_restart(broker_factory, broker)
            await bus.send("jobs", "two")
            (msg,) = await take(consumer, 1)
            assert msg.body == "two"
            await msg.ack()


async def test_peek_reads_ready_messages_and_changes_nothing(bus: aiobus.Bus) -> None:
    with pytest.raises(aiobus.NoSuchQueue):
        await bus.peek("never-used")
    assert "never-used" not in (await bus.stats())["queues"]  # peeking created nothing
    for i in range(5):
        await bus.send("browse", {"i": i} if i != 3 else b"x" * 100, headers={"n": str(i)})
    async with bus.consume("browse", prefetch=1) as consumer:
        (held,) = await take(consumer, 1)  # leased: not ready, so not shown
        page = await bus.peek("browse", offset=1, limit=2, max_body=10)
        assert page.ready == 4 and page.offset == 1
        assert [(m.headers, m.queue) for m in page.messages] == [
            ({"n": "2"}, "browse"), ({"n": "3"}, "browse")]
        assert page.messages[0].body == {"i": 2} and not page.messages[0].truncated
        cut = page.messages[1]
        assert (cut.raw_body, cut.size, cut.truncated) == (b"x" * 10, 100, True)
        whole = await bus.peek("browse")
        assert [m.headers["n"] for m in whole.messages] == ["1", "2", "3", "4"]
        wanted = whole.messages[2].id
        assert [m.id for m in (await bus.peek("browse", id=wanted)).messages] == [wanted]
        assert (await bus.peek("browse", id="no-such-id")).messages == []
        stats = await queue_stats(bus, "browse")
        assert (stats["ready"], stats["unacked"], stats["delivered"]) == (4, 1, 1)
        await held.ack()
        for n in range(1, 5):  # each still comes, on its first attempt
            (msg,) = await take(consumer, 1)
            assert (msg.headers["n"], msg.attempt) == (str(n), 1)
            await msg.ack()
    with pytest.raises(aiobus.InvalidOption, match="limit"):
        await bus.peek("browse", limit=0)
