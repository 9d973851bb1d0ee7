"""Memory bounds of issue 12, against the real broker process: what one misbehaving
client (one that never reads, parks huge sends, sends huge options) costs the broker is
bounded, measured as the growth of the broker's RSS."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import PROTOCOL_VERSION, Op

from .conftest import BrokerProcess, rss

pytestmark = pytest.mark.asyncio

HELLO = msgpack.packb([Op.HELLO, PROTOCOL_VERSION, {}])
MiB = 1024 * 1024


class RawClient:
    """A raw connection that says HELLO and reads only when asked to."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False, max_buffer_size=64 * MiB)

    @classmethod
    async def open(cls, path: str, *, limit: int = 64 * 1024) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=limit)
        writer.write(HELLO)
        client = cls(reader, writer)
        assert (await client.frame())[0] == Op.WELCOME
        return client

    async def frame(self, timeout: float = 10.0) -> Any:
        for frame in self.unpacker:
            return frame
        while True:
            data = await asyncio.wait_for(self.reader.read(1 << 16), timeout)
            if not data:
                raise EOFError("the broker closed the connection")
            self.unpacker.feed(data)
            for frame in self.unpacker:
                return frame

    async def confirmed(self, last_rid: int, timeout: float = 10.0) -> list[Any]:
        """Read until request ``last_rid`` is answered; the answers (OK, OK_RANGE, ERROR)."""
        answers = []
        while True:
            frame = await self.frame(timeout)
            if frame[0] in (Op.OK, Op.ERROR):
                answers.append(frame)
                if frame[1] == last_rid:
                    return answers
            elif frame[0] == Op.OK_RANGE:
                answers.append(frame)
                if frame[2] == last_rid:
                    return answers

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def frames_of(data: bytes) -> list[Any]:
    return list(msgpack.Unpacker(io.BytesIO(data), raw=False))


async def test_unread_output_is_bounded_over_all_subscriptions(broker: BrokerProcess) -> None:
    # 100 subscriptions matching one topic on a connection that never reads: one 3.1 MB
    # publish cost +314 MB of broker RSS (one copy per subscription in the transport).
    sink = await RawClient.open(broker.path)
    try:
        sink.writer.write(b"".join(
            msgpack.packb([Op.SUBSCRIBE, sid, sid, "big.>", 1024, "drop-oldest"])
            for sid in range(1, 101)))
        await sink.confirmed(100)
        async with aiobus.connect(broker.path) as bus:
            before = rss(broker.pid)
            await bus.publish("big.one", b"x" * 3_100_000)
            stats = await bus.stats()  # after the publish: the fan-out is done
            grown = rss(broker.pid) - before
        subs = [s for s in stats["topics"]["subscriptions"] if s["pattern"] == "big.>"]
        assert grown < 40 * MiB, f"broker RSS grew {grown / MiB:.0f} MiB"
        assert len(subs) == 100
        assert sum(s["delivered"] for s in subs) <= 3  # the bound is 4 MiB: two fit
        # The rest wait as if out of credit: references to the one event, not copies.
        assert sum(s["pending"] for s in subs) >= 97
    finally:
        await sink.close()


async def test_parked_sends_are_bounded_in_bytes(broker: BrokerProcess) -> None:
    # A full "block" queue parks SENDs; 100 parked 8 MiB sends had cost 832 MB. Now the
    # producer is no longer read once 32 MiB are parked: its writes back up instead.
    body = b"p" * (8 * MiB)
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("parked", max_length=1, overflow="block")
        await bus.send("parked", b"fills it")
        before = rss(broker.pid)
        producer = await RawClient.open(broker.path)
        written = 0
        last_progress = asyncio.get_running_loop().time()

        async def produce() -> None:
            nonlocal written, last_progress
            for rid in range(1, 101):
                producer.writer.write(msgpack.packb(
                    [Op.SEND, rid, "parked", body, 0, None, None, None]))
                await producer.writer.drain()
                written, last_progress = rid, asyncio.get_running_loop().time()

        task = asyncio.create_task(produce())
        try:
            # Until the producer is done (the broker read it all) or is blocked: no
            # progress for a second while the broker holds some of its sends parked.
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                stats = await bus.stats()
                parked = max(c["parked"] for c in stats["connections"])
                now = asyncio.get_running_loop().time()
                if task.done() or (parked and now - last_progress > 1.0):
                    break
                assert now < deadline, "the producer neither finished nor blocked"
                await asyncio.sleep(0.05)
            grown = rss(broker.pid) - before
            assert grown < 100 * MiB, f"broker RSS grew {grown / MiB:.0f} MiB ({parked} parked)"
            assert parked <= 5  # 32 MiB: four 8 MiB sends, then it is not read
            assert not task.done() and written < 100
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await task
            producer.writer.transport.abort()


BIG = "v" * 15_000_000  # one 15 MB value where a short one belongs
BIG_VALUES = [
    ("declare-overflow", [Op.DECLARE, 1, "q", {"overflow": BIG}]),
    ("declare-unknown-option", [Op.DECLARE, 1, "q", {BIG: 1}]),
    ("declare-dead-letter", [Op.DECLARE, 1, "q", {"dead_letter": "$" + BIG}]),
    ("subscribe-policy", [Op.SUBSCRIBE, 1, 1, "t", 10, BIG]),
    ("publish-reserved-topic", [Op.PUBLISH, "$" + BIG, b"", 0, None]),
    ("send-long-name", [Op.SEND, 1, BIG, b"", 0, None, None, None]),
    ("header-not-str", [Op.SEND, 1, "q", b"", 0, {BIG: 1}, None, None]),
    ("unknown-frame-str", [BIG, 1]),
]


@pytest.mark.parametrize("frame", [v[1] for v in BIG_VALUES], ids=[v[0] for v in BIG_VALUES])
async def test_errors_quote_client_values_cut_short(broker: BrokerProcess, frame: Any) -> None:
    # A 15 MB option value had produced a 63 MB ERROR (issue 12): quoted values are cut to
    # about 64 characters, with their length.
    client = await RawClient.open(broker.path)
    try:
        client.writer.write(msgpack.packb(frame))
        answer = await client.frame()
        while answer[0] not in (Op.ERROR, Op.CLOSE):
            answer = await client.frame()
        text = answer[-1]
        assert len(text) < 400, f"{len(text)} chars: {text[:200]}"
        if BIG[:20] in text:
            assert "15000001 chars" in text or "15000000 chars" in text
    finally:
        await client.close()


async def test_dead_letter_cycles_are_refused_at_declare(broker: BrokerProcess) -> None:
    # Two queues with a TTL dead-lettering into each other had passed one message back and
    # forth forever (issue 12). The declaration that closes a cycle is refused.
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("cy.a", ttl=0.05, dead_letter="cy.b")
        with pytest.raises(aiobus.InvalidOption, match="cycle"):
            await bus.declare_queue("cy.b", ttl=0.05, dead_letter="cy.a")
        await bus.declare_queue("cy.b", ttl=0.05, dead_letter="cy.c")  # a chain is fine
        with pytest.raises(aiobus.InvalidOption, match="cycle"):
            await bus.declare_queue("cy.c", dead_letter="cy.a")  # a -> b -> c -> a
        with pytest.raises(aiobus.InvalidOption, match="cycle"):
            await bus.declare_queue("z.dlq", dead_letter="z")  # z's default dead_letter
        await bus.send("cy.a", b"once")
        await bus.declare_queue("cy.c", dead_letter=None)  # where the chain ends
        stats = await bus.stats()
        assert "cy.a" in stats["queues"] and "z.dlq" not in stats["queues"]


@pytest.mark.timeout(180)  # ~27 s with make test's 4 workers; over 60 s under load
async def test_a_million_subscriptions_stop_at_the_quota(broker: BrokerProcess) -> None:
    # 1,000,000 pattern subscriptions from one client: refused at the per-uid quota
    # (10,000 by default), broker RSS growth under 50 MiB.
    total = 1_000_000
    client = await RawClient.open(broker.path)
    before = rss(broker.pid)
    answers = {"ok": 0, "error": 0}
    first_error: list[Any] = []

    async def read() -> None:
        while True:
            frame = await client.frame(timeout=60)
            if frame[0] == Op.OK:
                answers["ok"] += 1
            elif frame[0] == Op.OK_RANGE:
                answers["ok"] += frame[2] - frame[1] + 1
            elif frame[0] == Op.ERROR:
                answers["error"] += 1
                if not first_error:
                    first_error.append(frame)
            if max(frame[1:3] if frame[0] == Op.OK_RANGE else frame[1:2]) == total:
                return

    reader = asyncio.create_task(read())
    try:
        for start in range(1, total + 1, 10_000):
            client.writer.write(b"".join(
                msgpack.packb([Op.SUBSCRIBE, rid, rid, f"s.{rid}.*", 1, "drop-newest"])
                for rid in range(start, start + 10_000)))
            await client.writer.drain()
        await asyncio.wait_for(reader, 120)
        grown = rss(broker.pid) - before
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, EOFError):
            await reader
        await client.close()
    assert answers == {"ok": 10_000, "error": total - 10_000}
    _, rid, code, message = first_error[0]
    assert (rid, code) == (10_001, "quota-exceeded")
    assert "max_subscriptions_per_uid=10000" in message
    assert grown < 50 * MiB, f"broker RSS grew {grown / MiB:.0f} MiB"


async def test_queues_per_uid_are_a_quota(broker_factory: Any) -> None:
    broker = broker_factory("--max-queues-per-uid", "100")
    async with aiobus.connect(broker.path) as bus:
        for i in range(60):
            await bus.declare_queue(f"d.{i}")
        for i in range(40):
            await bus.send(f"u.{i}", b"m")  # created by use: counted too
        with pytest.raises(aiobus.QuotaExceeded, match="max_queues_per_uid=100"):
            await bus.declare_queue("one.more")
        with pytest.raises(aiobus.QuotaExceeded, match="max_queues_per_uid=100"):
            await bus.send("one.more", b"m")
        await bus.send("d.1", b"m")  # queues that exist still take messages
        await bus.delete_queue("d.0")
        await bus.declare_queue("one.more")  # room again
        stats = await bus.stats()
        assert "one.more" in stats["queues"] and "d.0" not in stats["queues"]


async def test_unacked_messages_per_uid_are_a_quota(broker_factory: Any) -> None:
    broker = broker_factory("--max-unacked-per-uid", "100")
    async with aiobus.connect(broker.path) as bus, aiobus.connect(broker.path) as other:
        for i in range(300):
            await bus.send("jobs", b"%d" % i)
        first = bus.consume("jobs", prefetch=60)
        async with asyncio.timeout(10):
            await first.__anext__()
            with pytest.raises(aiobus.QuotaExceeded, match="max_unacked_per_uid=100"):
                await other.consume("jobs", prefetch=50).__anext__()  # same uid, 60 + 50
            second = other.consume("jobs", prefetch=40)  # 60 + 40 fits
            await second.__anext__()
            while (await bus.stats())["queues"]["jobs"]["unacked"] < 100:
                await asyncio.sleep(0.01)
            assert (await bus.stats())["queues"]["jobs"]["unacked"] == 100  # never more
            second.close()  # its prefetch is free again (CANCEL goes first)
            third = other.consume("jobs", prefetch=40)
            await third.__anext__()
            third.close()
            first.close()


async def test_queued_bytes_per_uid_are_a_quota(broker_factory: Any) -> None:
    """A producer with nobody consuming stops at its uid's byte quota, with the broker's
    memory bounded accordingly, and may send again once its messages are consumed."""
    broker = broker_factory("--max-queued-bytes-per-uid", str(64 * MiB))
    body = b"x" * 64 * 1024
    before = rss(broker.pid)
    async with aiobus.connect(broker.path) as bus:
        sent = 0
        with pytest.raises(aiobus.QuotaExceeded, match="max_queued_bytes_per_uid=67108864"):
            async with asyncio.timeout(30):
                while True:
                    await bus.send("backlog", body)
                    sent += 1
        assert 64 * MiB // (len(body) + 200) <= sent <= 64 * MiB // len(body)
        grown = rss(broker.pid) - before
        assert grown < 100 * MiB, f"broker RSS grew {grown / MiB:.0f} MiB"
        async with asyncio.timeout(10):
            async for msg in bus.consume("backlog", prefetch=10):
                await msg.ack(confirm=True)
                break
        await bus.send("backlog", body)  # room for one again


async def test_connections_per_uid_are_a_quota(broker_factory: Any) -> None:
    broker = broker_factory("--max-connections-per-uid", "3")
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(3):
            await stack.enter_async_context(aiobus.connect(broker.path, reconnect=False))
        with pytest.raises(aiobus.QuotaExceeded, match="max_connections_per_uid=3"):
            async with aiobus.connect(broker.path, reconnect=False):
                pass
    async with aiobus.connect(broker.path, reconnect=False) as bus:  # the others left
        await bus.ping()


@pytest.mark.parametrize("backlog", [None, "8"])
async def test_a_thousand_clients_connecting_at_once(broker_factory: Any,
                                                     backlog: str | None) -> None:
    # The listen backlog is 1,024 by default; a client whose connect finds it full
    # (EAGAIN) retries with a short backoff instead of failing. With --backlog 8, most
    # of the 1,000 connects meet a full backlog at first.
    broker = broker_factory(*(["--backlog", backlog] if backlog else []))
    async with contextlib.AsyncExitStack() as stack:
        buses = await asyncio.wait_for(asyncio.gather(*(
            stack.enter_async_context(aiobus.connect(broker.path, reconnect=False))
            for _ in range(1000))), 60)
        assert len(buses) == 1000
        await asyncio.wait_for(asyncio.gather(*(bus.ping() for bus in buses)), 60)


async def test_stats_is_bounded_paged_and_filtered(broker_factory: Any) -> None:
    # STATS listed every queue: with a million it broke the client's 2^20 map limit
    # and took 8 s. Now it lists at most 10,000, says how many there are, pages with
    # `after` and filters with a pattern; the CLI pages through.
    from .test_cli import run

    broker = broker_factory("--max-queues-per-uid", "30000")
    total = 25_000
    client = await RawClient.open(broker.path)
    client.writer.write(b"".join(msgpack.packb([Op.DECLARE, i, f"q.{i % 5}.{i}", {}])
                                 for i in range(1, total + 1)))
    answers = await client.confirmed(total, timeout=60)
    assert all(a[0] != Op.ERROR for a in answers)
    await client.close()
    async with aiobus.connect(broker.path) as bus:
        stats = await bus.stats()
        assert len(stats["queues"]) == 10_000 and stats["queues_total"] == total
        seen: dict[str, Any] = {}
        page = await bus.stats(limit=7_000)
        while True:
            assert not seen.keys() & page["queues"].keys()
            seen.update(page["queues"])
            if page["queues_next"] is None:
                break
            page = await bus.stats(limit=7_000, after=page["queues_next"])
        assert len(seen) == total and list(seen) == sorted(seen)
        three = await bus.stats(queues="q.3.*")
        assert three["queues_total"] == total // 5
        assert all(name.startswith("q.3.") for name in three["queues"])
        with pytest.raises(aiobus.InvalidOption, match="limit"):
            await bus.stats(limit=10**6)
    listed = await run("queue", "list", "--json", "--socket", broker.path)
    assert listed.code == 0, listed.err
    assert len(listed.lines) == total
    dlq = await run("dlq", "list", "q.1.1", "--socket", broker.path)
    assert dlq.code == 0, dlq.err
