"""Confirmations of pipelined requests: OK_RANGE on the wire, and ``send_nowait``.

The broker merges the OKs (without a result) of consecutive rids into one OK_RANGE frame;
these tests read the raw answers to check that every rid is answered exactly once, in
request order, and that a SEND still parked on a full queue is never covered by a range.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import msgpack
import pytest

import aiobus
from aiobus.protocol import Op

from .conftest import BrokerProcess, queue_stats, unix_only, wait_until
from .test_bad_input import HELLO

pytestmark = pytest.mark.asyncio


def send(rid: int, queue: str = "confirms") -> list[Any]:
    return [Op.SEND, rid, queue, b"x", 0, None, None, None]


async def answers(path: str, frames: list[list[Any]], until: int) -> list[tuple[int, Any]]:
    """Write ``frames`` after HELLO (in one write) and read answers until ``until`` is
    answered; returns them expanded, one ``(rid, "ok" | result | error code)`` per rid,
    in the order they arrived (an OK_RANGE counts for each rid it covers)."""
    reader, writer = await asyncio.open_unix_connection(path)
    unpacker = msgpack.Unpacker(raw=False)
    got: list[tuple[int, Any]] = []
    try:
        writer.write(HELLO + b"".join(msgpack.packb(f) for f in frames))
        await writer.drain()
        while until not in (rid for rid, _ in got):
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, f"connection closed; got {got}"
            unpacker.feed(data)
            for frame in unpacker:
                if frame[0] == Op.OK_RANGE:
                    assert frame[1] < frame[2], frame  # a range of one is a plain OK
                    got.extend((rid, "ok") for rid in range(frame[1], frame[2] + 1))
                elif frame[0] == Op.OK:
                    got.append((frame[1], "ok" if frame[2] is None else frame[2]))
                elif frame[0] == Op.ERROR:
                    got.append((frame[1], frame[2]))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return got


async def test_pipelined_sends_are_confirmed_once_each_in_order(broker: BrokerProcess) -> None:
    frames = [send(rid) for rid in range(1, 201)]
    reader, writer = await asyncio.open_unix_connection(broker.path)
    try:  # the same exchange as answers(), looking at the frames themselves
        writer.write(HELLO + b"".join(msgpack.packb(f) for f in frames))
        await writer.drain()
        unpacker, raw = msgpack.Unpacker(raw=False), []
        while not raw or raw[-1][0] != Op.OK_RANGE or raw[-1][2] != 200:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data
            unpacker.feed(data)
            raw.extend(f for f in unpacker if f[0] != Op.WELCOME)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    # 200 sends in one write: a handful of OK_RANGE frames, not 200 OKs.
    assert all(f[0] == Op.OK_RANGE for f in raw) and len(raw) < 20, raw
    covered = [rid for f in raw for rid in range(f[1], f[2] + 1)]
    assert covered == list(range(1, 201))


async def test_an_error_between_confirmations_keeps_its_place(broker: BrokerProcess) -> None:
    frames = [*(send(rid) for rid in range(1, 11)), send(11, "bad name!"),
              *(send(rid) for rid in range(12, 21))]
    got = await answers(broker.path, frames, until=20)
    assert got == [*((rid, "ok") for rid in range(1, 11)), (11, "invalid-name"),
                   *((rid, "ok") for rid in range(12, 21))]


@unix_only  # raw frames: OK_RANGE is the wire protocol's, not Bus's
async def test_a_parked_send_is_not_covered_by_a_range(broker: BrokerProcess,
                                                       bus: aiobus.Bus) -> None:
    await bus.declare_queue("tight", max_length=1)  # overflow "block" by default
    frames = [send(1, "tight"), send(2, "tight"), send(3), send(4), [Op.PING, 5]]
    got = await answers(broker.path, frames, until=5)
    # 2 waits for room: the answers skip it, and 3..5 are not merged across it with 1.
    assert got == [(1, "ok"), (3, "ok"), (4, "ok"), (5, "ok")]


async def test_send_nowait_window(bus: aiobus.Bus) -> None:
    window: list[asyncio.Future[None]] = []
    for i in range(3_000):
        window.append(bus.send_nowait("window", i, headers={"n": str(i)}))
        if len(window) >= 500:
            assert await asyncio.wait_for(window.pop(0), 5) is None
    assert await asyncio.wait_for(asyncio.gather(*window), 5) == [None] * len(window)
    assert (await queue_stats(bus, "window"))["ready"] == 3_000
    async with bus.consume("window", prefetch=100) as consumer:
        for i in range(3):
            msg = await asyncio.wait_for(anext(consumer), 5)
            assert (msg.body, msg.headers["n"]) == (i, str(i))
            await msg.ack()


async def test_send_nowait_failures_land_on_their_own_futures(bus: aiobus.Bus) -> None:
    await bus.declare_queue("one-slot", max_length=1, overflow="reject")
    first = bus.send_nowait("one-slot", "kept")
    second = bus.send_nowait("one-slot", "refused")
    third = bus.send_nowait("elsewhere", "fine")
    assert await asyncio.wait_for(first, 5) is None
    with pytest.raises(aiobus.QueueFull):
        await asyncio.wait_for(second, 5)
    assert await asyncio.wait_for(third, 5) is None
    with pytest.raises(aiobus.InvalidName):
        bus.send_nowait("bad name!", "x")  # checked before anything is written
    with pytest.raises(TypeError):
        bus.send_nowait("one-slot", object())


async def test_send_nowait_fails_with_connection_lost_when_the_broker_dies(
        broker: BrokerProcess) -> None:
    async with aiobus.connect(broker.path, reconnect=False) as bus:
        await bus.declare_queue("blocked", max_length=1)
        await bus.send("blocked", "fills it")
        parked = bus.send_nowait("blocked", "waits for room")
        await wait_until(lambda: _parked(bus))
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(10)
        with pytest.raises(aiobus.ConnectionLost):
            await asyncio.wait_for(parked, 5)
        with pytest.raises(aiobus.ConnectionLost):
            bus.send_nowait("blocked", "after")


async def test_a_parked_send_is_resent_to_the_restarted_broker(broker_factory: Any) -> None:
    broker = broker_factory(name="r")
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("blocked", max_length=1)
        await bus.send("blocked", "fills it")
        parked = bus.send_nowait("blocked", "waits for room")
        await wait_until(lambda: _parked(bus))
        broker.proc.send_signal(signal.SIGKILL)
        broker.proc.wait(10)
        broker_factory(name="r")  # in memory: the queue comes back empty...
        await asyncio.wait_for(parked, 10)  # ...declared again (max_length=1), then resent
        stats = await queue_stats(bus, "blocked")
        assert (stats["ready"], stats["parked"]) == (1, 0)
        settings = await bus.declare_queue("blocked", max_length=1)  # the same settings
        assert settings["max_length"] == 1


async def _parked(bus: aiobus.Bus) -> bool:
    return bool((await queue_stats(bus, "blocked"))["parked"] == 1)
