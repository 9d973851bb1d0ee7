"""Faults that lost, corrupted or stalled work in the landed broker (issue 9), each
reproduced against a real ``aiobus-broker`` process: a worker killed with several
consumers, a peer closing while output is due to it, consumer churn, memory held for
acked messages, a declared dead-letter queue, and ``aclose`` with sends in flight."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import PROTOCOL_VERSION, Op

from .conftest import BrokerProcess, backend_of, crash_settings, queue_stats, rss, wait_until


class RawClient:
    """A blocking socket speaking frames, for faults the client library would hide."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(raw=False)
        self.confirmed: set[int] = set()
        self.write([Op.HELLO, PROTOCOL_VERSION, {}])
        assert self.frame()[0] == Op.WELCOME

    def write(self, *frames: Any) -> None:
        self.sock.sendall(b"".join(msgpack.packb(f) for f in frames))

    def frame(self) -> Any:
        """The next frame; socket.timeout (TimeoutError) if none comes in time."""
        for frame in self.unpacker:
            return frame
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError("the broker closed the connection")
            self.unpacker.feed(data)
            for frame in self.unpacker:
                return frame

    def reply(self, rid: int) -> Any:
        """The OK or ERROR for ``rid``, skipping other frames (an OK_RANGE answers
        every rid it names)."""
        while rid not in self.confirmed:
            frame = self.frame()
            if frame[0] in (Op.OK, Op.ERROR) and frame[1] == rid:
                return frame
            if frame[0] == Op.OK_RANGE:
                self.confirmed.update(range(frame[1], frame[2] + 1))
        self.confirmed.discard(rid)
        return [Op.OK, rid, None]

    def close(self) -> None:
        self.sock.close()


# -- 1. a crash counts one attempt per held lease --------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("declare", [{}, {"max_deliveries": 3, "dead_letter": None}],
                         ids=["defaults", "max3-no-dlq"])
async def test_worker_killed_with_five_consumers_counts_one_attempt(
        bus: aiobus.Bus, spawn_client: Any, declare: dict[str, Any]) -> None:
    await bus.declare_queue("jobs", **declare, **crash_settings(bus))
    worker = await spawn_client("""
        async def one(consumer):
            async for msg in consumer:
                emit(got=msg.body, attempt=msg.attempt)
                await asyncio.sleep(3600)
        consumers = [bus.consume("jobs", prefetch=1) for _ in range(5)]
        for c in consumers:
            await c.__aenter__()
        emit(ready=True)
        await asyncio.gather(*(one(c) for c in consumers))
    """, name="worker")
    assert await worker.line() == {"ready": True}
    await bus.send("jobs", "job")
    assert await worker.line() == {"got": "job", "attempt": 1}
    os.kill(worker.pid, signal.SIGKILL)
    await worker.wait()
    if backend_of(bus) == "nats":
        # JetStream keeps the message ack-pending ('unacked') until it is delivered again,
        # and keeps no lifetime counters (docs/nats.md, "What stats() cannot say").
        stats = (await bus.stats())["queues"]
        assert stats["jobs"]["ready"] + stats["jobs"]["unacked"] == 1
        assert "jobs.dlq" not in stats
    else:
        await wait_until(lambda: _ready(bus, "jobs", 1), timeout=10)
        stats = (await bus.stats())["queues"]
        assert stats["jobs"]["discarded"] == 0 and stats["jobs"]["dead_lettered"] == 0
    async with bus.consume("jobs") as consumer:
        msg = await asyncio.wait_for(consumer.__anext__(), 10)
        assert (msg.body, msg.attempt) == ("job", 2)
        await msg.ack()


async def _ready(bus: aiobus.Bus, queue: str, n: int) -> bool:
    return (await queue_stats(bus, queue)).get("ready") == n


# -- 3. a peer that closes while output is due to it stalls nobody --------------------


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_peer_closing_with_output_due_does_not_stall_other_clients(
        broker_factory: Any, loop: str) -> None:
    broker: BrokerProcess = broker_factory("--loop", loop)
    other = RawClient(broker.path)
    try:
        for round_ in range(1, 6):
            peer = RawClient(broker.path)
            peer.write([Op.SUBSCRIBE, 1, 1, "news", 100, "drop-oldest"])
            assert peer.reply(1)[0] == Op.OK
            # Stopped, the broker finds the peer's EOF, then a PUBLISH that makes output
            # for the peer and a PING that makes output for the other client, and
            # handles them in one loop turn: the peer's transport is closed by the time
            # its output is flushed, and the other client's comes after it.
            os.kill(broker.pid, signal.SIGSTOP)
            try:
                peer.close()
                other.write([Op.PUBLISH, "news", b"x", 0, None], [Op.PING, round_])
            finally:
                os.kill(broker.pid, signal.SIGCONT)
            assert other.reply(round_) == [Op.OK, round_, None], round_
        fresh = RawClient(broker.path)  # and new connections are served too
        fresh.write([Op.PING, 9])
        assert fresh.reply(9) == [Op.OK, 9, None]
        fresh.close()
    finally:
        other.close()
    assert "Traceback" not in broker.log()


# -- 4. removing consumers is not quadratic --------------------------------------------


def test_cancelling_40k_consumers_newest_first_keeps_the_broker_responsive(
        broker: BrokerProcess) -> None:
    """40,000 consumers of one queue (10 connections of 4,000), cancelled newest first:
    another client's PING is answered while that goes on (it took 32 s before)."""
    owners = [RawClient(broker.path, timeout=60) for _ in range(10)]
    other = RawClient(broker.path)
    try:
        for owner in owners:
            owner.write(*([Op.CONSUME, 0, sid, "churn", 1] for sid in range(1, 4001)))
        for owner in owners:
            owner.write([Op.PING, 1])
            assert owner.reply(1)[0] == Op.OK
        for owner in reversed(owners):
            owner.write(*([Op.CANCEL, 0, sid] for sid in range(4000, 0, -1)))
        started = time.monotonic()
        other.sock.settimeout(10)
        other.write([Op.PING, 1])
        assert other.reply(1) == [Op.OK, 1, None]
        for owner in owners:  # every CANCEL was handled, in front of these PINGs
            owner.write([Op.PING, 2])
            assert owner.reply(2)[0] == Op.OK
        elapsed = time.monotonic() - started
        other.write([Op.STATS, 2])
        stats = other.reply(2)[2]
        assert stats["queues"]["churn"]["consumers"] == 0
        assert elapsed < 10, elapsed
    finally:
        for client in [*owners, other]:
            client.close()


def test_one_consumer_more_than_max_consumers_is_refused(broker_factory: Any) -> None:
    broker = broker_factory("--max-consumers", "3")
    client = RawClient(broker.path)
    try:
        client.write(*([Op.CONSUME, sid, sid, "q", 1] for sid in range(1, 5)))
        assert [client.reply(sid)[0] for sid in range(1, 4)] == [Op.OK] * 3
        error = client.reply(4)
        assert error[:3] == [Op.ERROR, 4, "quota-exceeded"]
        assert "max_consumers=3" in error[3]
        client.write([Op.PING, 5])  # the connection carries on
        assert client.reply(5) == [Op.OK, 5, None]
    finally:
        client.close()


# -- 5. acked messages do not stay in memory -------------------------------------------


@pytest.mark.parametrize("how", ["queue-ttl", "message-ttl"])
def test_acked_messages_with_a_ttl_are_freed(broker: BrokerProcess, how: str) -> None:
    client = RawClient(broker.path, timeout=30)
    body = b"x" * 10_000
    ttl = 86400.0 if how == "message-ttl" else None
    try:
        if how == "queue-ttl":
            client.write([Op.DECLARE, 1, "kept", {"ttl": 86400}])
            assert client.reply(1)[0] == Op.OK
        client.write([Op.CONSUME, 2, 1, "kept", 1000])
        assert client.reply(2)[0] == Op.OK
        sizes = []
        for _ in range(4):
            # 8,000 messages a round, in batches small enough that the deliveries coming
            # back fit the socket buffers while this thread is busy writing.
            for _ in range(500):
                client.write(*([Op.SEND, 0, "kept", body, 0, None, ttl, None]
                               for _ in range(16)))
                tags: list[int] = []
                while len(tags) < 16:
                    frame = client.frame()
                    if frame[0] == Op.DELIVER:
                        tags.append(frame[2])
                client.write([Op.ACK_MANY, tags])
            client.write([Op.PING, 3])
            assert client.reply(3)[0] == Op.OK
            sizes.append(rss(broker.pid))
        client.write([Op.STATS, 4])
        stats = client.reply(4)[2]["queues"]["kept"]
        assert (stats["ready"], stats["unacked"], stats["acked"]) == (0, 0, 32_000)
        # Each round held 80 MB of acked bodies before (+245 MB RSS per round).
        assert sizes[-1] - sizes[0] < 40 * 2**20, sizes
    finally:
        client.close()


def test_a_million_extends_of_one_lease_do_not_grow_the_broker(broker: BrokerProcess) -> None:
    client = RawClient(broker.path, timeout=60)
    try:
        client.write([Op.SEND, 1, "long", b"job", 0, None, None, None],
                     [Op.CONSUME, 2, 1, "long", 1])
        deliver = client.frame()
        while deliver[0] != Op.DELIVER:
            deliver = client.frame()
        tag = deliver[2]
        before = rss(broker.pid)
        frame = msgpack.packb([Op.EXTEND, 0, tag, 3600.0])
        for _ in range(10):
            client.sock.sendall(frame * 100_000)
        client.write([Op.PING, 3])
        assert client.reply(3) == [Op.OK, 3, None]
        grown = rss(broker.pid) - before
        assert grown < 30 * 2**20, grown  # it was +210 MB
        client.write([Op.ACK, 4, tag])
        assert client.reply(4) == [Op.OK, 4, None]
    finally:
        client.close()


# -- queue defaults live in the broker -------------------------------------------------


@pytest.mark.asyncio
async def test_declaring_a_dead_letter_queue_gets_the_dead_letter_defaults(
        bus: aiobus.Bus) -> None:
    settings = await bus.declare_queue("jobs.dlq")
    assert (settings["max_deliveries"], settings["dead_letter"]) == (None, None)
    settings = await bus.declare_queue("jobs")
    assert (settings["max_deliveries"], settings["dead_letter"]) == (5, "jobs.dlq")
    # Declaring again with no options matches what the broker holds.
    assert await bus.declare_queue("jobs.dlq") == await bus.declare_queue("jobs.dlq")


# -- aclose flushes, then fails only what the broker did not confirm -------------------


@pytest.mark.asyncio
async def test_aclose_confirms_the_sends_it_wrote(broker: BrokerProcess) -> None:
    bus = await aiobus.connect(broker.path)
    futures = [bus.send_nowait("flushed", i) for i in range(1000)]
    await bus.aclose()
    assert all(f.done() for f in futures)
    failed = [f for f in futures if f.exception() is not None]
    assert failed == []
    async with aiobus.connect(broker.path) as check:
        assert (await queue_stats(check, "flushed"))["ready"] == 1000


@pytest.mark.asyncio
async def test_aclose_fails_exactly_the_sends_the_broker_did_not_accept(
        broker: BrokerProcess) -> None:
    async with aiobus.connect(broker.path) as admin:
        await admin.declare_queue("small", max_length=5, overflow="block")
        bus = await aiobus.connect(broker.path)
        futures = [bus.send_nowait("small", i) for i in range(10)]
        await bus.aclose()
        outcome = ["ok" if f.exception() is None else type(f.exception()).__name__
                   for f in futures]
        assert outcome == ["ok"] * 5 + ["ConnectionClosed"] * 5

        async def parked_dropped() -> bool:  # once the broker has read the EOF
            return bool((await queue_stats(admin, "small"))["parked"] == 0)

        await wait_until(parked_dropped)
        assert (await queue_stats(admin, "small"))["ready"] == 5
        got = []
        async with admin.consume("small") as consumer:
            for _ in range(5):
                msg = await asyncio.wait_for(consumer.__anext__(), 10)
                got.append(msg.body)
                msg.ack_nowait()
        assert got == [0, 1, 2, 3, 4]

