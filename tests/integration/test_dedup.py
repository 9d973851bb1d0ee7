"""Resendable SENDs against the real broker process, in raw frames (PROTOCOL.md §8
"Resends and deduplication"): a resend with the same client_id and seq is confirmed and
not queued again, also after kill -9 and a restart on the same data directory."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import msgpack
import pytest

from aiobus.protocol import PROTOCOL_VERSION, Op

from .conftest import BrokerProcess
from .test_durable import restart

pytestmark = pytest.mark.asyncio

TIMEOUT = 10.0


class Raw:
    """One connection speaking frames, with a deadline on every read."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.unpacker = msgpack.Unpacker(raw=False)
        self.rid = 0

    @classmethod
    async def open(cls, path: str, **options: Any) -> Raw:
        reader, writer = await asyncio.open_unix_connection(path)
        raw = cls(reader, writer)
        writer.write(msgpack.packb([Op.HELLO, PROTOCOL_VERSION, options]))
        assert (await raw.frame())[0] == Op.WELCOME
        return raw

    async def frame(self) -> list[Any]:
        async with asyncio.timeout(TIMEOUT):
            while True:
                for frame in self.unpacker:
                    return frame  # type: ignore[no-any-return]
                data = await self.reader.read(65536)
                assert data, "the broker closed the connection"
                self.unpacker.feed(data)

    async def request(self, op: int, *fields: Any) -> list[Any]:
        """Send a request; return its OK or ERROR (OK_RANGE of one rid as an OK)."""
        self.rid += 1
        self.writer.write(msgpack.packb([op, self.rid, *fields]))
        while True:
            frame = await self.frame()
            if frame[0] in (Op.OK, Op.ERROR) and frame[1] == self.rid:
                return frame
            if frame[0] == Op.OK_RANGE and frame[1] <= self.rid <= frame[2]:
                return [Op.OK, self.rid, None]

    async def send_once(self, queue: str, body: bytes, seq: int) -> list[Any]:
        return await self.request(Op.SEND, queue, body, 0, None, None, None, None, seq)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


async def ready(path: str, queue: str) -> dict[str, Any]:
    raw = await Raw.open(path)
    try:
        reply = await raw.request(Op.STATS)
        assert reply[0] == Op.OK, reply
        return reply[2]["queues"][queue]  # type: ignore[no-any-return]
    finally:
        await raw.close()


async def test_a_resend_is_not_queued_twice(broker: BrokerProcess) -> None:
    raw = await Raw.open(broker.path, client_id="it-1")
    try:
        assert (await raw.send_once("jobs", b"x", 1))[0] == Op.OK
        assert (await raw.send_once("jobs", b"x", 1))[0] == Op.OK
        no_id = await Raw.open(broker.path)
        try:
            error = await no_id.send_once("jobs", b"x", 1)
            assert error[:3] == [Op.ERROR, 1, "bad-option"] and "client_id" in error[3]
        finally:
            await no_id.close()
    finally:
        await raw.close()
    stats = await ready(broker.path, "jobs")
    assert (stats["ready"], stats["duplicates"]) == (1, 1)


async def test_a_resend_after_kill_9_and_a_restart_is_not_queued_twice(
        broker_factory: Any) -> None:
    broker = broker_factory()
    raw = await Raw.open(broker.path, client_id="it-2")
    try:
        assert (await raw.request(Op.DECLARE, "jobs", {"durable": True}))[0] == Op.OK
        assert (await raw.send_once("jobs", b"x", 41))[0] == Op.OK  # on disk once confirmed
    finally:
        await raw.close()
    broker = restart(broker_factory, broker, signal.SIGKILL)
    raw = await Raw.open(broker.path, client_id="it-2")  # the same client, reconnected
    try:
        assert (await raw.send_once("jobs", b"x", 41))[0] == Op.OK
        assert (await raw.send_once("jobs", b"y", 42))[0] == Op.OK  # a new one
    finally:
        await raw.close()
    stats = await ready(broker.path, "jobs")
    assert (stats["ready"], stats["duplicates"]) == (2, 1)
    consumer = await Raw.open(broker.path)
    try:
        assert (await consumer.request(Op.CONSUME, 1, "jobs", 10))[0] == Op.OK
        got = [await consumer.frame() for _ in range(2)]
        assert [(f[0], f[3][0], f[3][2]) for f in got] == [
            (Op.DELIVER, "it-2-41", b"x"), (Op.DELIVER, "it-2-42", b"y")]
    finally:
        await consumer.close()
