"""Frames refused by their header, not after buffering (issue 12), against the real
broker process: raw sockets announce more than fits, or write garbage, and each is closed
within a second with the right CLOSE code, while a well-behaved client carries on and the
broker's memory barely moves (docs/PROTOCOL.md §2, "Limits on client frames")."""

from __future__ import annotations

import asyncio
import contextlib
import io
import random
import socket
import time
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import DEFAULT_MAX_FRAME, MAX_HELLO_FRAME, PROTOCOL_VERSION, Op

from .conftest import BrokerProcess, rss

pytestmark = pytest.mark.asyncio

HELLO = msgpack.packb([Op.HELLO, PROTOCOL_VERSION, {}])
SEND_HEAD = b"\x98\x0a\x01\xa1q"  # [SEND, rid 1, "q", ...: the body comes next
CLOSE_WITHIN = 1.0  # seconds, from connecting to the broker's EOF
RSS_GROWTH = 10 * 2**20
# Codes a broker may close with for bytes it cannot take as frames: decoding (protocol,
# frame-too-large) or, when garbage happens to decode, checking the first frame.
DECODING_CODES = {"protocol", "frame-too-large", "unknown-frame", "bad-field",
                  "unsupported-version"}


def be(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


async def offend(path: str, payload: bytes, *, hello: bool) -> tuple[list[Any], float]:
    """Connect, write ``payload`` (after a HELLO if asked), read until the broker closes.

    Returns the frames the broker wrote and the seconds from connecting to its EOF. Plain
    non-blocking socket calls, not streams: a broker closing with our bytes unread makes
    our next recv fail with ECONNRESET, after the frames it wrote, which StreamReader
    would drop."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    received = bytearray()
    try:
        await asyncio.wait_for(loop.sock_connect(sock, path), 5)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):  # closed before it read everything
            await asyncio.wait_for(loop.sock_sendall(sock, (HELLO if hello else b"") + payload),
                                   10)
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
    finally:
        sock.close()
    return list(msgpack.Unpacker(io.BytesIO(received), raw=False)), elapsed


def close_of(frames: list[Any]) -> tuple[str, str]:
    closes = [f for f in frames if f[0] == Op.CLOSE]
    assert len(closes) == 1, frames
    assert frames[-1] == closes[0]
    return closes[0][1], closes[0][2]


async def well_behaved(bus: aiobus.Bus, stop: asyncio.Event) -> tuple[int, float]:
    """Send and consume on ``bus`` until ``stop``; return (round trips, slowest one)."""
    count, slowest = 0, 0.0
    async with bus.consume("steady", prefetch=8) as consumer:
        while not stop.is_set() or count < 3:
            started = time.monotonic()
            await bus.send("steady", count)
            message = await asyncio.wait_for(anext(consumer), 5)
            assert message.body == count
            await message.ack()
            slowest = max(slowest, time.monotonic() - started)
            count += 1
            await asyncio.sleep(0.005)
    return count, slowest


async def alongside(broker: BrokerProcess, *offences: Any, big: int = 2**20) -> list[Any]:
    """Run the offences concurrently with a well-behaved client; check it noticed nothing
    and the broker's RSS grew by less than RSS_GROWTH."""
    async with aiobus.connect(broker.path, name="steady") as bus:
        await bus.ping()
        before = rss(broker.pid)
        stop = asyncio.Event()
        steady = asyncio.create_task(well_behaved(bus, stop))
        try:
            results = await asyncio.wait_for(asyncio.gather(*offences), 30)
        finally:
            stop.set()
            count, slowest = await asyncio.wait_for(steady, 10)
        grown = rss(broker.pid) - before
        assert grown < RSS_GROWTH, f"broker RSS grew by {grown} bytes"
        assert count >= 3 and slowest < CLOSE_WITHIN, (count, slowest)
        body = b"z" * big  # a legal body of many reads still arrives
        await bus.send("big", body)
        async with bus.consume("big") as consumer:
            message = await asyncio.wait_for(anext(consumer), 5)
            assert message.body == body
            await message.ack()
    assert broker.proc.poll() is None
    return results


# (id, payload, code): 64 KiB at most of a frame whose header announces more than fits
# in the default max_frame (16 MiB); each is sent before and after the HELLO.
ANNOUNCED = [
    ("bin32-max-frame-plus-1", SEND_HEAD + b"\xc6" + be(DEFAULT_MAX_FRAME + 1, 4),
     "frame-too-large"),
    ("bin32-4GiB", SEND_HEAD + b"\xc6\xff\xff\xff\xff", "frame-too-large"),
    ("str32-queue-name", b"\x98\x0a\x01\xdb" + be(DEFAULT_MAX_FRAME, 4), "frame-too-large"),
    ("array32-of-4G", b"\x98\x0a\x01\xdd\xff\xff\xff\xff", "protocol"),
    ("map32-headers", SEND_HEAD + b"\xc4\x00\x00\xdf" + be(2**20, 4), "protocol"),
]


@pytest.mark.parametrize("hello", [False, True], ids=["before-hello", "after-hello"])
@pytest.mark.parametrize(("payload", "code"), [a[1:] for a in ANNOUNCED],
                         ids=[a[0] for a in ANNOUNCED])
async def test_a_header_announcing_too_much_closes_at_once(
    broker: BrokerProcess, payload: bytes, code: str, hello: bool
) -> None:
    body = random.Random(12).randbytes(65536 - len(payload))
    ((frames, elapsed),) = await alongside(broker, offend(broker.path, payload + body,
                                                          hello=hello))
    got, message = close_of(frames)
    assert got == code, message
    if code == "frame-too-large":  # before the HELLO, the first frame's own limit
        assert ("first frame" in message) == (not hello), message
    assert elapsed < CLOSE_WITHIN, elapsed
    if hello:
        assert frames[0][0] == Op.WELCOME


@pytest.mark.parametrize("payload", [
    b"\x98\x0a\x01\xda" + be(5000, 2),
    b"\x98\x0a\x01\xdc" + be(5000, 2),
    SEND_HEAD + b"\xc4\x00\x00\xde" + be(4000, 2),
], ids=["str16-5000-bytes", "array16-5000-values", "map16-4000-entries"])
async def test_a_str_array_or_map_over_max_frame(broker_factory: Any, payload: bytes) -> None:
    """Within msgpack's own limits (65,536 values, 4,096 entries) but over this broker's
    max_frame of 4 KiB: each value takes a byte at least, so they cannot fit."""
    broker = broker_factory("--max-frame", "4096")
    ((frames, elapsed),) = await alongside(broker, offend(broker.path, payload, hello=True),
                                           big=4000)
    code, message = close_of(frames)
    assert code == "frame-too-large", message
    assert "max_frame (4096 bytes)" in message
    assert elapsed < CLOSE_WITHIN


async def test_twenty_connections_of_garbage(broker: BrokerProcess) -> None:
    """64 KiB of random bytes each; every other one begins a valid but incomplete value
    (what issue 12 saw keep a connection open for the whole handshake timeout)."""
    leads = [b"\xc6\x00\x01\x00\x00", b"\xdb\x00\x02\x00\x00", b"\xc5\xff\xff",
             b"\xdc\xff\xff", b"\xc9\x00\x00\xff\xff\x01"]
    payloads = []
    for seed in range(20):
        data = random.Random(seed).randbytes(65536)
        if seed % 2:
            lead = leads[seed // 2 % len(leads)]
            data = lead + data[len(lead):]
        payloads.append(data)
    results = await alongside(broker, *(offend(broker.path, p, hello=False)
                                        for p in payloads))
    for seed, (frames, elapsed) in enumerate(results):
        code, message = close_of(frames)
        assert code in DECODING_CODES, (seed, code, message)
        assert elapsed < CLOSE_WITHIN, (seed, elapsed)


async def test_more_than_the_hello_budget_before_hello(broker: BrokerProcess) -> None:
    # A first frame that is not yet over the budget by its headers, only by its bytes:
    # 4,000 values declared (at least 4,000 bytes) and sent as uint16s (3 bytes each).
    by_bytes = b"\x93\x01\x81\xa3pad\xdc" + be(4000, 2) + b"\xcd\x00\x01" * 4000
    # A whole HELLO one byte over the budget, in one write.
    pad = MAX_HELLO_FRAME - (len(msgpack.packb([Op.HELLO, 1, {"pad": "p" * 1000}])) - 1000)
    whole = msgpack.packb([Op.HELLO, 1, {"pad": "p" * (pad + 1)}])
    assert len(whole) == MAX_HELLO_FRAME + 1
    results = await alongside(broker, offend(broker.path, by_bytes, hello=False),
                              offend(broker.path, whole, hello=False))
    for frames, elapsed in results:
        code, message = close_of(frames)
        assert code == "frame-too-large" and "first frame" in message, message
        assert elapsed < CLOSE_WITHIN
    # One byte less is a HELLO like any other.
    fits = msgpack.packb([Op.HELLO, 1, {"pad": "p" * pad}])
    assert len(fits) == MAX_HELLO_FRAME
    frames, _ = await offend(broker.path, fits + msgpack.packb([Op.CLOSE, "x", "y"]),
                             hello=False)
    assert frames[0][0] == Op.WELCOME
    assert close_of(frames)[0] == "unknown-frame"  # and it goes on to read the next frame


async def test_frames_still_arriving_are_bounded_per_uid(broker_factory: Any) -> None:
    """Connections of one uid that each send most of a large frame and wait: the one
    whose bytes take the uid past --max-buffered-bytes-per-uid is closed with
    quota-exceeded, and the others finish their frames."""
    broker = broker_factory("--max-buffered-bytes-per-uid", str(4 * 2**20))
    loop = asyncio.get_running_loop()
    body = 2**20 * 3 // 2  # 1.5 MiB bodies: two fit in 4 MiB, three do not
    frame = SEND_HEAD + b"\xc6" + be(body, 4) + b"x" * body + msgpack.packb(0) + b"\xc0" * 3
    socks = []
    try:
        for _ in range(3):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, broker.path), 5)
            socks.append(sock)
            await asyncio.wait_for(loop.sock_sendall(sock, HELLO), 5)
            welcome = await asyncio.wait_for(loop.sock_recv(sock, 65536), 5)
            assert msgpack.unpackb(welcome)[0] == Op.WELCOME
        for sock in socks[:2]:  # all but the last 10 bytes of each frame
            await asyncio.wait_for(loop.sock_sendall(sock, frame[:-10]), 10)
        with contextlib.suppress(ConnectionError):  # closed before it read everything
            await asyncio.wait_for(loop.sock_sendall(socks[2], frame[:-10]), 10)
        received = bytearray()
        async with asyncio.timeout(10):
            with contextlib.suppress(ConnectionResetError):
                while chunk := await loop.sock_recv(socks[2], 65536):
                    received += chunk
        code, message = close_of(list(msgpack.Unpacker(io.BytesIO(received), raw=False)))
        assert code == "quota-exceeded" and "max_buffered_bytes_per_uid=4194304" in message
        for sock in socks[:2]:  # the others were not touched: their frames complete
            await asyncio.wait_for(loop.sock_sendall(sock, frame[-10:]), 5)
            reply = msgpack.unpackb(await asyncio.wait_for(loop.sock_recv(sock, 65536), 5))
            assert reply[:2] == [Op.OK, 1], reply
    finally:
        for sock in socks:
            sock.close()
