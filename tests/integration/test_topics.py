"""Topics against a real broker: wildcard fan-out, slow subscribers, presence."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import Op

from .conftest import backend_of, unix_only, wait_until
from .test_bad_input import HELLO

pytestmark = pytest.mark.asyncio


async def collect(sub: aiobus.Subscription, n: int, timeout: float = 5.0) -> list[aiobus.Message]:
    return [await asyncio.wait_for(anext(sub), timeout) for _ in range(n)]


async def test_wildcard_fan_out_including_the_publisher(bus: aiobus.Bus,
                                                        spawn_client: Any) -> None:
    listener = await spawn_client("""
async with bus.subscribe("weather.>") as sub:
    emit(ready=True)
    async for msg in sub:
        emit(topic=msg.topic, body=msg.body)
""")
    assert await listener.line() == {"ready": True}
    async with (
        bus.subscribe("weather.*") as one_token,
        bus.subscribe("weather.hk") as exact,
        bus.subscribe("*.hk") as first_wild,
    ):
        await bus.publish("weather.hk", 30)
        await bus.publish("weather.hk.kowloon", 31)
        await bus.publish("weather", 0)  # matches none: '>' needs one more token
        await bus.publish("news.hk", "n")
        await bus.publish("weather.sg", 32)
        assert [(m.topic, m.body) for m in await collect(one_token, 2)] == [
            ("weather.hk", 30), ("weather.sg", 32)]
        assert [m.body for m in await collect(exact, 1)] == [30]
        assert [(m.topic, m.body) for m in await collect(first_wild, 2)] == [
            ("weather.hk", 30), ("news.hk", "n")]
        remote = [await listener.line() for _ in range(3)]
        assert remote == [
            {"topic": "weather.hk", "body": 30},
            {"topic": "weather.hk.kowloon", "body": 31},
            {"topic": "weather.sg", "body": 32},
        ]
    stats = await bus.stats()
    if backend_of(bus) == "nats":  # a NATS publisher cannot know (docs/nats.md)
        assert stats["topics"]["unrouted"] is None
    else:
        assert stats["topics"]["unrouted"] >= 1


@pytest.mark.parametrize("bad", ["a..b", "", "a.*b", "a.>.b", "a b", ">x"])
async def test_invalid_patterns_are_rejected(bus: aiobus.Bus, bad: str) -> None:
    with pytest.raises(aiobus.InvalidName):
        bus.subscribe(bad)


@pytest.mark.parametrize("bad", ["a..b", "", "a.*", "a.>", ".a", "a."])
async def test_invalid_names_are_rejected(bus: aiobus.Bus, bad: str) -> None:
    with pytest.raises(aiobus.InvalidName):
        await bus.publish(bad, 1)
    with pytest.raises(aiobus.InvalidName):
        await bus.send(bad, 1)


async def test_slow_subscriber_drop_oldest_is_bounded_and_visible(bus: aiobus.Bus) -> None:
    async with bus.subscribe("ticks", max_pending=5, policy="drop-oldest") as sub:
        for i in range(100):
            await bus.publish("ticks", i)
        await bus.ping()
        stats = await bus.stats()
        (entry,) = stats["topics"]["subscriptions"]
        assert entry["pending"] == 5 and entry["in_flight"] == 5 and entry["dropped"] == 90
        got = await collect(sub, 10)
    # The first window was in flight; of the rest, the newest 5 survived.
    assert [m.body for m in got] == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]
    assert got[5].dropped == 90 and sum(m.dropped for m in got) == 90


async def test_slow_subscriber_drop_newest(bus: aiobus.Bus) -> None:
    async with bus.subscribe("ticks", max_pending=3, policy="drop-newest") as sub:
        for i in range(20):
            await bus.publish("ticks", i)
        await bus.ping()
        got = await collect(sub, 6)
        assert [m.body for m in got] == [0, 1, 2, 3, 4, 5]
        assert [m.dropped for m in got] == [0] * 6
        await bus.publish("ticks", 20)
        (after_gap,) = await collect(sub, 1)
    # The 14 newest were dropped after 5: the next message says so.
    assert (after_gap.body, after_gap.dropped) == (20, 14)


async def test_slow_subscriber_disconnect_policy_closes_only_that_connection(
    bus: aiobus.Bus,
) -> None:
    async with aiobus.connect(bus.path) as slow:
        async with slow.subscribe("flood", max_pending=2, policy="disconnect") as sub:
            for i in range(10):
                await bus.publish("flood", i)
            with pytest.raises(aiobus.ConnectionLost) as info:
                for _ in range(10):
                    await asyncio.wait_for(anext(sub), 5)
            assert info.value.code == "slow-consumer"
    await bus.ping()  # the publisher carries on


async def test_break_unsubscribes(bus: aiobus.Bus) -> None:
    async def first() -> Any:
        async for msg in bus.subscribe("once"):
            return msg.body
        return None

    task = asyncio.create_task(first())

    async def subscribed() -> bool:
        return len((await bus.stats())["topics"]["subscriptions"]) == 1

    await wait_until(subscribed)
    await bus.publish("once", "hello")
    assert await asyncio.wait_for(task, 5) == "hello"

    async def unsubscribed() -> bool:
        return len((await bus.stats())["topics"]["subscriptions"]) == 0

    await wait_until(unsubscribed, timeout=2)


async def test_presence_events_with_peer_credentials(bus: aiobus.Bus, spawn_client: Any) -> None:
    async with bus.subscribe("$sys.client.>") as sub:
        peer = await spawn_client("""
emit(pid=os.getpid())
await asyncio.sleep(3600)
""", name="alice")
        pid = (await peer.line())["pid"]
        up = await asyncio.wait_for(anext(sub), 5)
        assert up.topic == "$sys.client.connected"
        assert up.body["name"] == "alice" and up.body["pid"] == pid
        assert up.body["uid"] == os.getuid()
        peer.kill()
        await peer.wait()
        down = await asyncio.wait_for(anext(sub), 5)
        assert down.topic == "$sys.client.disconnected" and down.body["pid"] == pid


async def test_clients_cannot_publish_on_sys(bus: aiobus.Bus) -> None:
    with pytest.raises(aiobus.Forbidden):
        await bus.publish("$sys.client.connected", {})


async def test_wildcard_at_root_does_not_see_sys_topics(bus: aiobus.Bus) -> None:
    async with bus.subscribe(">") as everything:
        async with aiobus.connect(bus.path):
            pass  # presence events are published now
        await bus.publish("visible", 1)
        msg = await asyncio.wait_for(anext(everything), 5)
    assert msg.topic == "visible"


async def test_receiving_leaves_the_applications_collector_as_it_was(bus: aiobus.Bus) -> None:
    """The client holds the cyclic GC off while it decodes a read, and puts it back as the
    application had it: on, or off."""
    async with bus.subscribe("gc.check", max_pending=10_000) as sub:
        for enabled in (True, False):
            (gc.enable if enabled else gc.disable)()
            try:
                for i in range(2_000):
                    await bus.publish("gc.check", i)
                for i in range(2_000):
                    assert (await asyncio.wait_for(anext(sub), 5)).body == i
                assert gc.isenabled() is enabled
            finally:
                gc.enable()


async def read_frames(reader: asyncio.StreamReader, done: Any) -> list[list[Any]]:
    """Frames from a raw connection (WELCOME left out) until ``done(frames)``."""
    unpacker, frames = msgpack.Unpacker(raw=False), []
    while not done(frames):
        data = await asyncio.wait_for(reader.read(65536), 5)
        assert data, f"connection closed; got {frames}"
        unpacker.feed(data)
        frames.extend(f for f in unpacker if f[0] != Op.WELCOME)
    return frames


def expand(frames: list[list[Any]]) -> list[tuple[int, Any, int]]:
    """EVENT and EVENTS frames as one (sid, body, dropped) per message, in order."""
    out = []
    for f in frames:
        if f[0] == Op.EVENT:
            out.append((f[1], f[2][2], f[3]))
        elif f[0] == Op.EVENTS:
            assert 2 <= len(f[2]) <= 1024, f
            out.append((f[1], f[2][0][2], f[3]))
            out.extend((f[1], m[2], 0) for m in f[2][1:])
    return out


@unix_only  # raw frames: EVENTS batching is the wire protocol's, not Bus's
async def test_a_burst_reaches_a_subscriber_in_events_frames_in_order(bus: aiobus.Bus) -> None:
    reader, writer = await asyncio.open_unix_connection(bus.path)
    try:
        writer.write(HELLO + msgpack.packb([Op.SUBSCRIBE, 1, 5, "burst", 10_000, "drop-oldest"]))
        await read_frames(reader, lambda fs: any(f[0] == Op.OK for f in fs))
        for i in range(3_000):
            await bus.publish("burst", b"%d" % i)
        frames = await read_frames(reader, lambda fs: len(expand(fs)) >= 3_000)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert expand(frames) == [(5, b"%d" % i, 0) for i in range(3_000)]
    # Published in bursts: most of them travelled several to a frame.
    assert len(frames) < 3_000 // 2, len(frames)


@unix_only  # raw frames: EVENTS batching is the wire protocol's, not Bus's
async def test_events_keep_their_place_among_other_frames(bus: aiobus.Bus) -> None:
    """A connection that publishes to its own subscription, with PINGs in between, all in
    one write: the EVENTs of each stretch are merged, and the OKs stay between them."""
    publish = [msgpack.packb([Op.PUBLISH, "own", b"%d" % i, 0, None]) for i in range(10)]
    reader, writer = await asyncio.open_unix_connection(bus.path)
    try:
        writer.write(HELLO + msgpack.packb([Op.SUBSCRIBE, 1, 7, "own", 100, "drop-oldest"])
                     + b"".join(publish[:5]) + msgpack.packb([Op.PING, 2])
                     + b"".join(publish[5:]) + msgpack.packb([Op.PING, 3]))
        frames = await read_frames(reader, lambda fs: any(f[:2] == [Op.OK, 3] for f in fs))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    assert [f[0] for f in frames] == [Op.OK, Op.EVENTS, Op.OK, Op.EVENTS, Op.OK]
    assert [f[1] for f in frames if f[0] == Op.OK] == [1, 2, 3]
    assert expand(frames) == [(7, b"%d" % i, 0) for i in range(10)]
