"""``--fsync always`` with the sync in worker threads (aiobus/broker/commit.py), in an
embedded broker whose journal files can hold up their fdatasync: a confirmation leaves
only after a sync covering its record has returned, the loop goes on handling frames
(and writing their records) while one is running, and a consumer gets its deliveries
without waiting for it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

import aiobus
from aiobus.broker import server
from aiobus.broker.journal import OsFiles

pytestmark = pytest.mark.asyncio


class GatedFiles(OsFiles):
    """OsFiles whose fdatasync of a segment waits while ``gate`` is clear."""

    gate = threading.Event()
    waiting = 0  # syncs that found the gate closed

    def sync(self, handle: int) -> None:
        if not GatedFiles.gate.is_set():
            GatedFiles.waiting += 1
            if not GatedFiles.gate.wait(20):
                raise TimeoutError("the test never opened the gate")
        super().sync(handle)


async def until(condition: Any) -> None:
    async with asyncio.timeout(10):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_confirmation_waits_for_its_sync_and_the_loop_does_not(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server, "OsFiles", GatedFiles)
    GatedFiles.gate.set()
    GatedFiles.waiting = 0
    path = str(short_tmp / "g.sock")
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(
            aiobus.Broker(path=path, data_dir=short_tmp / "data", fsync="always"))
        first, second, third = [await stack.enter_async_context(aiobus.connect(path))
                                for _ in range(3)]
        journal = broker.journal
        assert journal is not None
        await first.declare_queue("jobs", durable=True)
        consumer = await stack.enter_async_context(third.consume("jobs", prefetch=10))
        GatedFiles.gate.clear()
        written = journal.written
        one = asyncio.ensure_future(first.send("jobs", b"one"))
        await until(lambda: GatedFiles.waiting == 1)  # its sync runs, held at the gate
        assert journal.written > written
        written = journal.written
        two = asyncio.ensure_future(second.send("jobs", b"two"))
        await until(lambda: journal.written > written)  # handled and written meanwhile
        async with asyncio.timeout(10):  # deliveries do not wait for the sync
            got = [(await consumer.__anext__()).raw_body for _ in range(2)]
        assert sorted(got) == [b"one", b"two"]
        await asyncio.sleep(0.05)  # (a confirmation sent early would have come by now)
        assert not one.done() and not two.done()
        GatedFiles.gate.set()
        async with asyncio.timeout(10):
            await asyncio.gather(one, two)
        assert not journal.unsynced
        stats = await first.stats()
        assert stats["queues"]["jobs"]["unacked"] == 2
