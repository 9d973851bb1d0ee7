"""Bad input written raw to the broker's socket: the offender gets a CLOSE frame with a
reason and is disconnected; the broker and every other client carry on, and nothing
queued is lost (nats test/proto_test.go style)."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import PROTOCOL_VERSION, Op

from .conftest import BrokerProcess, queue_stats, rss, unix_only, wait_until

pytestmark = pytest.mark.asyncio

HELLO = msgpack.packb([Op.HELLO, PROTOCOL_VERSION, {}])


async def raw_exchange(path: str, payload: bytes, *, hello: bool = True,
                       timeout: float = 10.0) -> list[Any]:
    """Write ``payload`` (after a HELLO) and read frames until the broker closes."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        if hello:
            writer.write(HELLO)
        writer.write(payload)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout)  # until EOF
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return list(msgpack.Unpacker(io.BytesIO(data), raw=False))


def close_code(frames: list[Any]) -> str:
    closes = [f for f in frames if f[0] == Op.CLOSE]
    assert len(closes) == 1, frames
    assert isinstance(closes[0][2], str) and closes[0][2]
    return str(closes[0][1])


def deep(n: int) -> bytes:
    return b"\x91" * n + b"\x01"


BAD_FRAMES = [
    ("malformed-msgpack", b"\xc1", "protocol"),
    ("not-an-array", msgpack.packb({"op": 10}), "protocol"),
    ("unknown-frame-type", msgpack.packb([99, 1]), "unknown-frame"),
    ("broker-only-frame",
     msgpack.packb([Op.DELIVER, 1, 1, ["i", "q", b"", 0, None, 0.0], 1, None]),
     "unknown-frame"),
    ("wrong-arity", msgpack.packb([Op.SEND, 1, "q"]), "bad-field"),
    ("wrong-field-type", msgpack.packb([Op.SEND, 1, 7, b"x", 0, None, None, None]), "bad-field"),
    ("body-as-str", msgpack.packb([Op.SEND, 1, "q", "x", 0, None, None, None]), "bad-field"),
    ("bad-body-kind", msgpack.packb([Op.SEND, 1, "q", b"x", 9, None, None, None]), "bad-field"),
    ("negative-rid", msgpack.packb([Op.ACK, -1, 1]), "bad-field"),
    ("header-not-str", msgpack.packb([Op.PUBLISH, "t", b"", 0, {"k": 1}]), "bad-field"),
    ("huge-array-header", b"\xdd\xff\xff\xff\xff", "protocol"),
    ("huge-map-header", b"\xdf\xff\xff\xff\xff", "protocol"),
    ("deep-nesting", deep(5000), "protocol"),
    ("ext-type", b"\xd4\x01\x00", "protocol"),
]


@pytest.mark.parametrize("payload,code", [b[1:] for b in BAD_FRAMES],
                         ids=[b[0] for b in BAD_FRAMES])
@unix_only  # raw frames to the broker's socket: the wire protocol, not Bus
async def test_bad_frame_closes_only_the_offender(broker: BrokerProcess, bus: aiobus.Bus,
                                                  payload: bytes, code: str) -> None:
    # Another client is mid-work: one message ready, one leased to its consumer.
    await bus.send("safe", "ready")
    await bus.send("safe", "leased")
    async with bus.consume("safe", prefetch=1) as consumer:
        leased = await asyncio.wait_for(anext(consumer), 5)
        frames = await raw_exchange(broker.path, payload)
        assert close_code(frames) == code
        stats = await queue_stats(bus, "safe")
        assert stats["ready"] == 1 and stats["unacked"] == 1
        await leased.ack()  # the other client did not notice
        nxt = await asyncio.wait_for(anext(consumer), 5)
        await nxt.ack()
    assert broker.proc.poll() is None


async def test_oversized_frame(broker_factory: Any) -> None:
    broker = broker_factory("--max-frame", "4096")
    big = msgpack.packb([Op.SEND, 1, "q", b"x" * 100_000, 0, None, None, None])
    frames = await raw_exchange(broker.path, big)
    assert close_code(frames) == "frame-too-large"
    async with aiobus.connect(broker.path) as bus:
        with pytest.raises(aiobus.FrameTooLarge):  # the client checks before sending
            await bus.send("q", b"x" * 100_000)
        with pytest.raises(aiobus.FrameTooLarge):  # the whole frame counts, not the body
            await bus.send("q", b"x" * 4096)
        await bus.ping()
        await bus.send("q", b"x" * 100)
        assert (await queue_stats(bus, "q"))["ready"] == 1


async def test_first_frame_must_be_hello(broker: BrokerProcess) -> None:
    frames = await raw_exchange(broker.path, msgpack.packb([Op.PING, 1]), hello=False)
    assert close_code(frames) == "protocol"


async def test_unsupported_version(broker: BrokerProcess) -> None:
    frames = await raw_exchange(broker.path, msgpack.packb([Op.HELLO, 99, {}]), hello=False)
    assert close_code(frames) == "unsupported-version"


async def test_handshake_timeout(broker_factory: Any) -> None:
    broker = broker_factory("--handshake-timeout", "0.3")
    frames = await raw_exchange(broker.path, b"", hello=False, timeout=5)
    assert close_code(frames) == "handshake-timeout"


@unix_only  # raw frames to the broker's socket: the wire protocol, not Bus
async def test_peer_vanishing_mid_frame(broker: BrokerProcess, bus: aiobus.Bus) -> None:
    await bus.send("keep", 1)
    frame = msgpack.packb([Op.SEND, 1, "keep", b"y" * 1000, 0, None, None, None])
    for cut in (1, 5, len(frame) // 2, len(frame) - 1):
        _, writer = await asyncio.open_unix_connection(broker.path)
        writer.write(HELLO + frame[:cut])
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    async def only_us_left() -> bool:  # the broker sees each EOF on its own connection
        return len((await bus.stats())["connections"]) == 1

    await wait_until(only_us_left)
    stats = await queue_stats(bus, "keep")
    assert stats["ready"] == 1  # the truncated sends were never accepted; the old one stays


@unix_only  # raw frames to the broker's socket: the wire protocol, not Bus
async def test_request_errors_do_not_close_the_connection(bus: aiobus.Bus) -> None:
    with pytest.raises(aiobus.InvalidName):
        await bus._backend._call([Op.SEND, 0, "bad..name", b"", 0, None, None, None])
    with pytest.raises(aiobus.Forbidden):
        await bus._backend._call([Op.SEND, 0, "$sys.queue", b"", 0, None, None, None])
    with pytest.raises(aiobus.LeaseError):
        await bus._backend._call([Op.ACK, 0, 123456])
    with pytest.raises(aiobus.SubscriptionError):
        await bus._backend._call([Op.CANCEL, 0, 999])
    await bus.ping()


async def raw_until_ok(path: str, frames: list[list[Any]], rid: int) -> list[Any]:
    """Send frames after HELLO; read until the OK for ``rid`` arrives."""
    reader, writer = await asyncio.open_unix_connection(path)
    unpacker = msgpack.Unpacker(raw=False)
    got: list[Any] = []
    try:
        writer.write(HELLO + b"".join(msgpack.packb(f) for f in frames))
        await writer.drain()
        while not any(f[0] == Op.OK and f[1] == rid for f in got):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, f"connection closed; got {got}"
            unpacker.feed(data)
            got.extend(unpacker)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return got


@unix_only  # raw frames to the broker's socket: the wire protocol, not Bus
async def test_sys_topics_cannot_be_forged_even_once_cached(broker: BrokerProcess,
                                                            bus: aiobus.Bus) -> None:
    async with bus.subscribe("$sys.>") as watcher:
        async with aiobus.connect(broker.path):  # publishes (and caches) a presence topic
            pass
        seen = [await asyncio.wait_for(anext(watcher), 5) for _ in range(2)]
        assert [m.topic for m in seen] == ["$sys.client.connected", "$sys.client.disconnected"]
        frames = await raw_until_ok(broker.path, [
            [Op.PUBLISH, "$sys.client.connected", msgpack.packb({"name": "forged"}), 1, None],
            [Op.PING, 7],
        ], rid=7)
        errors = [f for f in frames if f[0] == Op.ERROR]
        assert [(f[1], f[2]) for f in errors] == [(0, "forbidden")]
        await bus.ping()
        # The raw client's own connect/disconnect arrive; no forged event between them.
        names = [(await asyncio.wait_for(anext(watcher), 5)).body.get("name") for _ in range(2)]
        assert "forged" not in names


async def test_good_frames_before_bad_bytes_are_still_processed(broker: BrokerProcess) -> None:
    frames = await raw_exchange(broker.path, msgpack.packb([Op.PING, 5]) + b"\xc1")
    assert frames[1] == [Op.OK, 5, None]
    assert close_code(frames) == "protocol"


async def test_a_second_hello_is_a_protocol_error(broker: BrokerProcess) -> None:
    frames = await raw_exchange(broker.path, HELLO)
    assert close_code(frames) == "protocol"
    assert "already" in frames[-1][2]


async def test_max_frame_bounds_the_whole_frame(broker_factory: Any) -> None:
    broker = broker_factory("--max-frame", "1000")
    headers = {f"h{i}": "v" * 20 for i in range(200)}  # ~5 KB of headers, tiny body
    frame = msgpack.packb([Op.SEND, 1, "q", b"x", 0, headers, None, None])
    assert close_code(await raw_exchange(broker.path, frame)) == "frame-too-large"


@unix_only  # raw frames to the broker's socket: the wire protocol, not Bus
async def test_undecodable_body_raises_on_access_and_the_consumer_carries_on(
    broker: BrokerProcess, bus: aiobus.Bus
) -> None:
    frames = await raw_until_ok(broker.path, [
        [Op.SEND, 0, "fragile", b"\xc1", 1, None, None, None],  # kind 1 but not msgpack
        [Op.PING, 3],
    ], rid=3)
    assert not [f for f in frames if f[0] == Op.ERROR]
    await bus.send("fragile", "fine")
    async with bus.consume("fragile") as consumer:
        bad = await asyncio.wait_for(anext(consumer), 5)
        with pytest.raises(aiobus.BodyDecodeError, match="raw_body"):
            _ = bad.body
        assert bad.raw_body == b"\xc1"
        await bad.reject(reason="undecodable")
        msg = await asyncio.wait_for(anext(consumer), 5)
        assert msg.body == "fine"
        await msg.ack()
    stats = await queue_stats(bus, "fragile.dlq")
    assert stats["ready"] == 1


@unix_only  # raw frames to the broker's socket: the wire protocol, not Bus
async def test_a_client_that_never_reads_its_answers_is_not_buffered_for(
    broker: BrokerProcess, bus: aiobus.Bus
) -> None:
    for i in range(100):  # make each STATS answer a few KiB
        await bus.declare_queue(f"q{i}")
    answer = len(msgpack.packb([Op.OK, 1, await bus.stats()]))
    requests = 20_000
    assert answer * requests > 100 * 2**20  # unbounded, the answers would take >100 MiB
    before = rss(broker.pid)
    reader, writer = await asyncio.open_unix_connection(broker.path)
    try:
        # ~100 KB of requests: one socket read for the broker. The client reads nothing.
        writer.write(HELLO + b"".join(msgpack.packb([Op.STATS, i + 1])
                                      for i in range(requests)))
        await writer.drain()
        # Each ping is a round trip through the broker's loop, which has had the requests
        # ready to read since before the first one: everyone else is still served.
        for _ in range(20):
            await bus.ping()
        grown = rss(broker.pid) - before
        assert grown < 32 * 2**20, f"broker grew by {grown} bytes"
        # Not vacuous: the broker did answer, until the client's socket was full.
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(await asyncio.wait_for(reader.readexactly(4 * answer), 5))
        frames = list(unpacker)
        assert frames[0][0] == Op.WELCOME and frames[1][:2] == [Op.OK, 1]
    finally:
        writer.transport.abort()
    await bus.ping()
