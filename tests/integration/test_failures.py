"""Failure paths of queues against a real broker: ack timeouts, late answers, lease
extension, nack delays, retry schedules, dead letters, TTL and overflow."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from typing import Any

import pytest

import aiobus

from .conftest import backend_of, queue_stats, wait_until

pytestmark = pytest.mark.asyncio


async def next_msg(consumer: aiobus.Consumer, timeout: float = 5.0) -> aiobus.Message:
    return await asyncio.wait_for(anext(consumer), timeout)


async def test_ack_timeout_redelivers_and_late_ack_fails_but_frees_the_slot(
    bus: aiobus.Bus,
) -> None:
    await bus.declare_queue("slow", ack_timeout=0.3)
    await bus.send("slow", "a")
    await bus.send("slow", "b")
    async with aiobus.connect(bus.path) as other:
        async with bus.consume("slow", prefetch=1) as stalled:
            first = await next_msg(stalled)
            assert (first.body, first.attempt) == ("a", 1)
            async with other.consume("slow", prefetch=1) as healthy:
                # "b" goes to the healthy consumer; after the timeout "a" comes back there too.
                got = [await next_msg(healthy)]
                await got[0].ack()
                again = await next_msg(healthy, timeout=3)
                assert (again.body, again.attempt) == ("a", 2)
                await again.ack()
                # The stalled consumer holds an expired lease: it receives nothing new.
                await bus.send("slow", "c")
                third = await next_msg(healthy)
                assert third.body == "c"
                with pytest.raises(aiobus.LeaseError) as info:
                    await first.ack(confirm=True)
                assert info.value.code == "lease-expired"
                await third.ack()
            # The late ack freed the slot: the stalled consumer gets new work again.
            await bus.send("slow", "d")
            fresh = await next_msg(stalled)
            assert (fresh.body, fresh.attempt) == ("d", 1)
            await fresh.ack()


async def test_extend_keeps_the_lease_past_ack_timeout(bus: aiobus.Bus) -> None:
    await bus.declare_queue("long", ack_timeout=0.3)
    await bus.send("long", "job")
    async with bus.consume("long") as consumer:
        msg = await next_msg(consumer)
        await msg.extend(5.0)
        await asyncio.sleep(0.6)  # twice the ack timeout: without extend it would expire
        await msg.ack()
    stats = await queue_stats(bus, "long")
    assert stats["acked"] == 1 and stats["ready"] == 0 and stats["delivered"] == 1


async def test_nack_with_delay_is_not_redelivered_before_the_delay(bus: aiobus.Bus) -> None:
    await bus.send("delay", "x")
    async with bus.consume("delay") as consumer:
        msg = await next_msg(consumer)
        nacked_at = time.monotonic()
        await msg.nack(delay=0.5)
        stats = await queue_stats(bus, "delay")
        assert stats["delayed"] == 1 and stats["ready"] == 0
        again = await next_msg(consumer, timeout=5)
        waited = time.monotonic() - nacked_at
        assert again.attempt == 2
        assert waited >= 0.45, waited
        await again.ack()


async def test_retry_schedule_spaces_out_failed_attempts(bus: aiobus.Bus) -> None:
    # The delays differ widely so that which one applied shows even on a loaded machine
    # (the exact schedule is unit-tested with a fake clock in tests/unit).
    await bus.declare_queue("sched", retry_delays=[0.2, 1.0], max_deliveries=10)
    await bus.send("sched", "x")
    times = []
    async with bus.consume("sched") as consumer:
        for _ in range(3):
            msg = await next_msg(consumer)
            times.append(time.monotonic())
            await msg.nack()
        final = await next_msg(consumer)
        times.append(time.monotonic())
        assert final.attempt == 4
        await final.ack()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 0.18 <= gaps[0] < 0.9, gaps  # the first retry waits the first delay
    assert gaps[1] >= 0.95 and gaps[2] >= 0.95, gaps  # later ones the last (repeated)


async def test_max_deliveries_dead_letters_with_headers(bus: aiobus.Bus) -> None:
    await bus.declare_queue("poison", max_deliveries=3)
    await bus.send("poison", {"bad": True}, headers={"trace": "t1"})
    async with bus.consume("poison") as consumer:
        for attempt in (1, 2, 3):
            msg = await next_msg(consumer)
            assert msg.attempt == attempt
            original_id = msg.id
            await msg.nack(reason=f"failure {attempt}")
    async with bus.consume("poison.dlq") as dlq:
        dead = await next_msg(dlq)
        await dead.ack()
    assert dead.id == original_id and dead.body == {"bad": True}
    h = dead.headers
    assert h["trace"] == "t1"
    assert h["x-original-queue"] == "poison"
    assert h["x-dead-reason"] == "max-deliveries"
    assert h["x-attempts"] == "3"
    assert h["x-reason-text"] == "failure 3"
    assert h["x-consumer-pid"] == str(os.getpid()) and h["x-consumer-uid"] == str(os.getuid())
    assert abs(float(h["x-dead-time"]) - time.time()) < 60
    stats = await bus.stats()
    # JetStream keeps no lifetime counters (docs/nats.md): None, not a wrong number.
    expected = None if backend_of(bus) == "nats" else 1
    assert stats["queues"]["poison"]["dead_lettered"] == expected


async def test_reject_goes_straight_to_the_dead_letter_queue_and_can_be_sent_back(
    bus: aiobus.Bus,
) -> None:
    await bus.send("orders", b"\x01\x02")
    async with bus.consume("orders") as consumer:
        msg = await next_msg(consumer)
        await msg.reject(reason="invalid input")
    async with bus.consume("orders.dlq") as dlq:
        dead = await next_msg(dlq)
        assert dead.headers["x-dead-reason"] == "rejected"
        assert dead.headers["x-reason-text"] == "invalid input"
        assert dead.headers["x-attempts"] == "1"
        # A dead-letter queue is an ordinary queue: requeue by sending back.
        await bus.send(dead.headers["x-original-queue"], dead.body)
        await dead.ack()
    async with bus.consume("orders") as consumer:
        back = await next_msg(consumer)
        assert back.body == b"\x01\x02" and back.attempt == 1
        await back.ack()


async def test_ttl_expiry_is_eager(bus: aiobus.Bus) -> None:
    await bus.send("ttl", "stale", ttl=0.3)
    await bus.send("ttl", "fresh")

    async def expired() -> bool:
        return bool((await queue_stats(bus, "ttl.dlq")).get("ready") == 1)

    # Nobody consumes "ttl": only a timer can move the message.
    await wait_until(expired, timeout=3)
    assert (await queue_stats(bus, "ttl"))["ready"] == 1
    async with bus.consume("ttl.dlq") as dlq:
        dead = await next_msg(dlq)
    assert dead.body == "stale" and dead.headers["x-dead-reason"] == "expired"
    assert dead.headers["x-attempts"] == "0"


async def test_overflow_block_makes_send_wait_for_room(bus: aiobus.Bus) -> None:
    await bus.declare_queue("bounded", max_length=2)
    await bus.send("bounded", 1)
    await bus.send("bounded", 2)
    blocked = asyncio.create_task(bus.send("bounded", 3))
    await asyncio.sleep(0.2)
    assert not blocked.done()
    assert (await queue_stats(bus, "bounded"))["parked"] == 1
    async with bus.consume("bounded", prefetch=1) as consumer:
        msg = await next_msg(consumer)
        await asyncio.wait_for(blocked, 5)  # room freed when the message was delivered
        got = [msg.body]
        await msg.ack()
        for _ in range(2):
            m = await next_msg(consumer)
            got.append(m.body)
            await m.ack()
    assert got == [1, 2, 3]


async def test_overflow_reject_fails_the_send(bus: aiobus.Bus) -> None:
    await bus.declare_queue("strict", max_length=1, overflow="reject")
    await bus.send("strict", 1)
    with pytest.raises(aiobus.QueueFull, match="full"):
        await bus.send("strict", 2)

    async def one_ready() -> bool:
        return bool((await queue_stats(bus, "strict"))["ready"] == 1)

    if backend_of(bus) == "unix":
        assert await one_ready()
    else:  # JetStream's num_pending follows a confirmed send a moment later (docs/nats.md)
        await wait_until(one_ready, timeout=10)


async def test_overflow_dead_letter_moves_the_oldest(bus: aiobus.Bus) -> None:
    await bus.declare_queue("ring", max_length=2, overflow="dead-letter")
    for i in range(4):
        await bus.send("ring", i)
    assert (await queue_stats(bus, "ring"))["ready"] == 2
    async with bus.consume("ring.dlq", prefetch=2) as dlq:
        dead = [await next_msg(dlq), await next_msg(dlq)]
    assert [d.body for d in dead] == [0, 1]
    assert {d.headers["x-dead-reason"] for d in dead} == {"overflow"}


async def test_redeclare_with_other_settings_is_an_error(bus: aiobus.Bus) -> None:
    settings = await bus.declare_queue("decl", max_length=10)
    assert settings["max_length"] == 10 and settings["dead_letter"] == "decl.dlq"
    assert (await bus.declare_queue("decl", max_length=10)) == settings
    with pytest.raises(aiobus.QueueMismatch, match="max_length"):
        await bus.declare_queue("decl", max_length=11)


async def test_implicit_queue_defaults(bus: aiobus.Bus) -> None:
    await bus.send("implicit", 1)
    settings: dict[str, Any] = (await queue_stats(bus, "implicit"))["settings"]
    assert settings == {
        "max_deliveries": 5, "ack_timeout": 30.0, "retry_delays": [],
        "dead_letter": "implicit.dlq", "ttl": None, "max_length": None, "overflow": "block",
        "durable": False,
    }


async def test_request_reply_and_timeout(bus: aiobus.Bus, spawn_client: Any) -> None:
    server = await spawn_client("""
emit(ready=True)
async for msg in bus.consume("rpc.add"):
    await msg.reply(sum(msg.body))
""")
    assert await server.line() == {"ready": True}
    results = await asyncio.gather(*(bus.request("rpc.add", [i, i], timeout=5) for i in range(20)))
    assert results == [2 * i for i in range(20)]
    with pytest.raises(aiobus.RequestTimeout):
        await bus.request("rpc.nobody", 1, timeout=0.2)


async def test_each_request_times_out_at_its_own_deadline(broker: Any) -> None:
    """The Unix client keeps request timeouts on one loop timer (client/deadlines.py
    _Deadlines): requests with different timeouts, in any order, each raise
    RequestTimeout once their own timeout has passed, and one answered in between
    is not disturbed."""
    async with aiobus.connect(broker.path) as bus:
        loop = asyncio.get_running_loop()

        async def timed(timeout: float) -> float:
            start = loop.time()
            with pytest.raises(aiobus.RequestTimeout, match=f"within {timeout} s"):
                await bus.request("rpc.nobody", 1, timeout=timeout)
            return loop.time() - start

        async def answered() -> Any:
            async with bus.consume("rpc.echo") as consumer:
                msg = await next_msg(consumer)
                await msg.reply(msg.body)
            return None

        server = asyncio.ensure_future(answered())
        results = await asyncio.gather(timed(0.6), timed(0.2), bus.request("rpc.echo", 7),
                                       timed(0.4), timed(0.2))
        await server
        elapsed, reply = results[:2] + results[3:], results[2]
        assert reply == 7
        for took, timeout in zip(elapsed, (0.6, 0.2, 0.4, 0.2), strict=True):
            assert timeout <= took < timeout + 10, (took, timeout)  # a deadline, not a wait


async def test_a_refused_request_fails_at_once_with_the_reason(bus: aiobus.Bus) -> None:
    """The request's SEND is refused (full queue, overflow "reject"): the caller gets
    QueueFull straight away, not a RequestTimeout after the whole timeout."""
    await bus.declare_queue("rpc.full", max_length=1, overflow="reject")
    await bus.send("rpc.full", "filler")
    with pytest.raises(aiobus.QueueFull):  # a wait for the timeout would be RequestTimeout
        await bus.request("rpc.full", 1, timeout=5)


async def test_reply_to_a_plain_message_is_an_error(bus: aiobus.Bus) -> None:
    await bus.send("plain", 1)
    async with bus.consume("plain") as consumer:
        msg = await next_msg(consumer)
        with pytest.raises(aiobus.NotARequest):
            await msg.reply(2)
        await msg.ack()  # the lease is still there to answer
    assert (await queue_stats(bus, "plain"))["acked"] == 1


async def test_answering_twice_is_an_error(bus: aiobus.Bus) -> None:
    await bus.send("twice", 1)
    async with bus.consume("twice") as consumer:
        msg = await next_msg(consumer)
        await msg.ack()
        with pytest.raises(aiobus.LeaseError):
            await msg.ack()


async def test_expired_lease_stalls_a_consumer_even_with_free_prefetch_slots(
    bus: aiobus.Bus,
) -> None:
    await bus.declare_queue("stall", ack_timeout=0.3)
    await bus.send("stall", "job")
    async with bus.consume("stall", prefetch=4) as stalled:
        held = await next_msg(stalled)

        async def back_in_queue() -> bool:
            stats = await queue_stats(bus, "stall")
            return bool(stats["ready"] == 1 and stats["unacked"] == 0)

        await wait_until(back_in_queue, timeout=3)
        await bus.send("stall", "new")
        await bus.ping()
        # Neither the expired message nor new work goes back to the stalled consumer.
        with pytest.raises(TimeoutError):
            await next_msg(stalled, timeout=0.5)
        async with aiobus.connect(bus.path) as other:
            async with other.consume("stall", prefetch=4) as healthy:
                again = await next_msg(healthy)
                assert (again.body, again.attempt) == ("job", 2)
                new = await next_msg(healthy)
                assert (new.body, new.attempt) == ("new", 1)
                await again.ack()
                await new.ack()
        with pytest.raises(aiobus.LeaseError):
            await held.ack(confirm=True)  # the late answer frees the consumer
        await bus.send("stall", "after")
        fresh = await next_msg(stalled)
        assert fresh.body == "after"
        await fresh.ack()


async def test_ttl_still_expires_a_message_released_after_its_deadline(bus: aiobus.Bus) -> None:
    await bus.send("rel", "short-lived", ttl=0.3)
    async with bus.consume("rel") as consumer:
        await next_msg(consumer)
        await asyncio.sleep(0.5)  # hold it past its TTL, then release it by stopping

    async def expired() -> bool:
        return bool((await queue_stats(bus, "rel.dlq")).get("ready") == 1)

    await wait_until(expired, timeout=3)
    assert (await queue_stats(bus, "rel"))["ready"] == 0


async def test_ttl_that_runs_out_after_release(bus: aiobus.Bus) -> None:
    await bus.send("rel2", "x", ttl=2.0)
    async with bus.consume("rel2") as consumer:
        await next_msg(consumer)
    # Released well before its TTL: ready again, and its expiry is still eager.
    assert (await queue_stats(bus, "rel2"))["ready"] == 1

    async def expired() -> bool:
        return bool((await queue_stats(bus, "rel2.dlq")).get("ready") == 1)

    await wait_until(expired, timeout=6)


async def test_bad_numbers_are_request_errors(bus: aiobus.Bus) -> None:
    with pytest.raises(aiobus.InvalidOption):
        await bus.send("nums", 1, ttl=-1)
    with pytest.raises(aiobus.InvalidOption):
        await bus.send("nums", 1, ttl=0)
    with pytest.raises(aiobus.InvalidOption):
        await bus.declare_queue("nums2", ack_timeout=-5)
    with pytest.raises(aiobus.InvalidOption):
        await bus.declare_queue("nums3", dead_letter="$sys.dead")
    assert "nums" not in (await bus.stats())["queues"]
    await bus.send("nums", 1)
    async with bus.consume("nums") as consumer:
        msg = await next_msg(consumer)
        with pytest.raises(aiobus.InvalidOption):
            await msg.extend(-1)
        await msg.ack()


async def test_expired_requests_are_discarded_not_dead_lettered(bus: aiobus.Bus) -> None:
    with pytest.raises(aiobus.RequestTimeout):
        await bus.request("rpc.idle", 1, timeout=0.2)

    async def expired() -> bool:
        return bool((await queue_stats(bus, "rpc.idle")).get("expired") == 1)

    await wait_until(expired, timeout=3)
    stats = await bus.stats()
    assert stats["queues"]["rpc.idle"]["discarded"] == 1
    assert "rpc.idle.dlq" not in stats["queues"]


async def test_late_answers_are_logged_once_per_consumer_counted_and_the_loop_goes_on(
    bus: aiobus.Bus, caplog: pytest.LogCaptureFixture,
) -> None:
    await bus.declare_queue("late", ack_timeout=0.3)
    for body in ("a", "b", "c"):
        await bus.send("late", body)
    caplog.set_level(logging.WARNING, logger="aiobus.client.streams")
    async with bus.consume("late", prefetch=3) as consumer:
        held = [await next_msg(consumer) for _ in range(3)]

        async def all_expired() -> bool:
            stats = await queue_stats(bus, "late")
            return bool(stats["ready"] == 3 and stats["unacked"] == 0)

        await wait_until(all_expired, timeout=3)
        errors_before = bus.async_errors
        # The README's worker loop, with every lease expired: no exception reaches it.
        async with held[0].process():
            pass
        await held[1].ack()
        with pytest.raises(ZeroDivisionError):
            async with held[2].process():
                1 / 0  # noqa: B018
        async def all_refused() -> bool:
            return consumer.failed_answers == 3

        await wait_until(all_refused, timeout=5)
        assert bus.async_errors == errors_before + 3
        warnings = [r for r in caplog.records if r.name == "aiobus.client.streams"]
        assert len(warnings) == 1 and "'late'" in warnings[0].getMessage()
        # The late answers freed the consumer: it gets the three again, and acks them.
        again = [await next_msg(consumer) for _ in range(3)]
        assert sorted(m.body for m in again) == ["a", "b", "c"]
        for msg in again:
            async with msg.process():
                pass
    await bus.ping()
    stats = await queue_stats(bus, "late")
    assert (stats["ready"], stats["unacked"], stats["acked"]) == (0, 0, 3)


async def test_a_late_reply_is_counted_and_a_confirmed_one_raises(
    broker: Any, spawn_client: Any,
) -> None:
    """``msg.reply()`` returns without waiting, as ``ack()`` does: a reply to an expired
    lease is refused by the broker and counted on the consumer, not raised into the
    loop; ``reply(confirm=True)`` raises what the broker says. The requester gets the
    reply of the attempt that answered in time. (Unix socket only: on NATS an expired
    lease stays 'unacked', nats_cases.UNACKED.)"""
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("rpc.late", ack_timeout=0.3)
        requester = await spawn_client("""
        emit(reply=await bus.request("rpc.late", "x", timeout=20))
        """, name="requester")
        async with bus.consume("rpc.late", prefetch=1) as consumer:
            first = await next_msg(consumer)

            async def expired() -> bool:
                return bool((await queue_stats(bus, "rpc.late"))["ready"] == 1)

            await wait_until(expired, timeout=5)
            await first.reply("too late")  # returns; the broker refuses it
            second = await next_msg(consumer)  # the refusal freed the slot
            assert second.attempt == 2

            async def refused() -> bool:
                return consumer.failed_answers == 1

            await wait_until(refused, timeout=5)
            with pytest.raises(aiobus.LeaseError):
                await first.reply("again")  # answered already on this client: at once
            await second.reply("in time", confirm=True)
        assert await requester.line(timeout=20) == {"reply": "in time"}
        assert await requester.wait(timeout=20) == 0


async def test_strict_answers_raise_what_the_broker_says(bus: aiobus.Bus) -> None:
    await bus.declare_queue("strict", ack_timeout=0.3)
    await bus.send("strict", "a")
    await bus.send("strict", "b")
    async with bus.consume("strict", prefetch=2) as consumer:
        a, b = await next_msg(consumer), await next_msg(consumer)

        async def expired() -> bool:
            return bool((await queue_stats(bus, "strict"))["ready"] == 2)

        await wait_until(expired, timeout=3)
        with pytest.raises(aiobus.LeaseError) as info:
            await a.nack(confirm=True)
        assert info.value.code == "lease-expired"
        with pytest.raises(aiobus.LeaseError) as info:
            await b.reject(confirm=True)
        assert info.value.code == "lease-expired"
        assert consumer.failed_answers == 0  # raised, so not counted as well
    with pytest.raises(aiobus.InvalidOption):
        await a.nack(delay=-1)  # checked before anything is sent


async def test_answers_batched_by_process_reach_the_broker(bus: aiobus.Bus) -> None:
    n = 500
    await bus.declare_queue("batched", retry_delays=[0])
    for i in range(n):
        await bus.send("batched", i, confirm=False)
    await bus.ping()
    seen: list[tuple[int, int]] = []
    async with bus.consume("batched", prefetch=100) as consumer:
        while len(seen) < n + 10:
            msg = await next_msg(consumer)
            seen.append((msg.body, msg.attempt))
            with contextlib.suppress(ValueError):
                async with msg.process():
                    if msg.body < 10 and msg.attempt == 1:
                        raise ValueError("fails once")  # nacked: redelivered, attempt 2
    await bus.ping()  # after the consumer's last ACK_MANY
    stats = await queue_stats(bus, "batched")
    assert (stats["ready"], stats["unacked"], stats["acked"]) == (0, 0, n)
    assert sorted(b for b, attempt in seen if attempt == 2) == list(range(10))
