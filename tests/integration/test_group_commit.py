"""``--fsync always`` (aiobus/broker/commit.py), in an embedded broker, most with journal
files that can hold up or fail their fdatasync (a test double: its syncs run in worker
threads, not in the fsync helper, which test_fsync_helper.py tests): a confirmation
leaves only after a sync covering its record has returned, the loop goes on handling
frames (and writing their records) while one is running, a consumer gets its deliveries
without waiting for it, and a long read is confirmed in parts."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

import aiobus
from aiobus.broker import connection, durable
from aiobus.broker.journal import OsFiles
from aiobus.protocol import Op

from .test_confirms import answers

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
    monkeypatch.setattr(durable, "OsFiles", GatedFiles)
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


class LosingFiles(OsFiles):
    """OsFiles whose next fdatasync, once ``fail`` is set, fails with EIO and loses what
    it covered for good: the bytes written to the segment since its last good sync turn
    to zeros on disk (as when Linux marks the failed pages clean and then evicts them:
    PostgreSQL's fsyncgate); the syncs after it succeed."""

    fail = False
    failed = 0
    fail_rebuilds = 0  # how many rebuilds' syncs (of the new base's .tmp) fail with EIO
    _synced: dict[int, tuple[str, int]] = {}  # handle -> (file name, size last synced)

    def create(self, name: str) -> int:
        handle = super().create(name)
        LosingFiles._synced[handle] = (name, 0)
        return handle

    def open_append(self, name: str) -> int:
        handle = super().open_append(name)
        LosingFiles._synced[handle] = (name, self.size(handle))
        return handle

    def sync(self, handle: int) -> None:
        name, synced = LosingFiles._synced[handle]
        size = self.size(handle)
        if LosingFiles.fail_rebuilds and name.endswith(".tmp"):
            LosingFiles.fail_rebuilds -= 1
            raise OSError(errno.EIO, "Input/output error")
        if LosingFiles.fail and name.endswith(".seg") and size > synced:
            LosingFiles.fail = False
            LosingFiles.failed += 1
            fd = os.open(self._path(name), os.O_WRONLY)
            try:
                os.pwrite(fd, bytes(size - synced), synced)
                os.fsync(fd)
            finally:
                os.close(fd)
            raise OSError(errno.EIO, "Input/output error")
        super().sync(handle)
        LosingFiles._synced[handle] = (name, size)


async def test_a_failed_sync_is_rebuilt_from_memory_and_a_restart_keeps_every_confirmed_send(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch, broker_factory: Any) -> None:
    """docs/journal.md "After a failed sync", through the real shell (fsync always): the
    send whose sync failed is not confirmed (its connection is closed), durable sends
    are refused until the journal is rebuilt from memory (here the first rebuild, at
    once, fails too, and the retry a second later succeeds), and a copy of the data
    directory taken then, as a kill -9 would leave it, starts a real broker that holds
    every confirmed message, with its attempt."""
    monkeypatch.setattr(durable, "OsFiles", LosingFiles)
    LosingFiles.fail, LosingFiles.failed, LosingFiles.fail_rebuilds = False, 0, 0
    path = str(short_tmp / "l.sock")
    data = short_tmp / "data"
    loop = asyncio.get_running_loop()
    async with contextlib.AsyncExitStack() as stack:
        broker = await stack.enter_async_context(
            aiobus.Broker(path=path, data_dir=data, fsync="always"))
        bus = await stack.enter_async_context(aiobus.connect(path))
        await bus.declare_queue("jobs", durable=True)
        confirmed = [f"m{i}" for i in range(20)]
        for body in confirmed:
            await bus.send("jobs", body)
        consumer = await stack.enter_async_context(bus.consume("jobs", prefetch=5))
        async with asyncio.timeout(10):
            leased = [await consumer.__anext__() for _ in range(5)]
        for msg in leased[:2]:
            await msg.ack()
        journal = broker.journal
        assert journal is not None
        # The acks, and the deliveries they make room for, are written and synced (a
        # reply after them waits for a sync covering them): the next sync is the send's.
        await bus.stats()
        await until(lambda: not journal.unsynced)
        LosingFiles.fail, LosingFiles.fail_rebuilds = True, 1
        async with aiobus.connect(path) as doomed:
            # Its connection is closed with "journal" (the client may resend it on a new
            # one: refused, the journal being broken): either way not confirmed.
            with pytest.raises((aiobus.ConnectionLost, aiobus.JournalError)) as lost:
                await doomed.send("jobs", "unconfirmed")
        assert lost.value.code == "journal" and LosingFiles.failed == 1
        await until(lambda: LosingFiles.fail_rebuilds == 0)  # the rebuild at once failed
        async with aiobus.connect(path) as producer:
            with pytest.raises(aiobus.JournalError):  # refused until rebuilt
                await producer.send("jobs", "refused")
            deadline = loop.time() + 10
            while True:
                try:
                    await producer.send("jobs", "after")
                    break
                except aiobus.JournalError:
                    assert loop.time() < deadline, "the journal was never rebuilt"
                    await asyncio.sleep(0.05)
        assert not journal.damaged and len(list((data / "journal").glob("*.seg"))) == 1
        shutil.copytree(data, short_tmp / "copy")  # the disk as a kill -9 now leaves it
    restarted = broker_factory("--data-dir", str(short_tmp / "copy"), name="again")
    async with aiobus.connect(restarted.path) as bus:
        stats = (await bus.stats())["queues"]["jobs"]
        async with bus.consume("jobs", prefetch=100) as consumer, asyncio.timeout(10):
            got = {m.body: m.attempt for m in
                   [await consumer.__anext__() for _ in range(stats["ready"])]}
    acked = {msg.body for msg in leased[:2]}
    assert acked == {"m0", "m1"}
    held = set(confirmed[2:7])  # leased when the copy was taken (prefetch 5)
    kept = (set(confirmed) - acked) | {"after"}
    assert kept <= set(got) <= kept | {"unconfirmed"}  # (the core held it: kept or not)
    assert {body for body, attempt in got.items() if attempt == 2} == held


async def test_after_a_failed_sync_the_journal_is_rebuilt_at_once(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rebuild after a failed sync runs in the loop iteration after it (until it has,
    a crash would meet the damaged range at the restart, and durable sends are
    refused), not a second later as the retries of a failed write: the first send on a
    connection opened after the failure is accepted. The send whose sync failed is not
    confirmed on its connection, which is closed; the client resends it on the next
    one, and once the journal is rebuilt (the message with it: the core held it) that
    resend may be confirmed: then the message is there."""
    monkeypatch.setattr(durable, "OsFiles", LosingFiles)
    LosingFiles.fail, LosingFiles.failed, LosingFiles.fail_rebuilds = False, 0, 0
    path = str(short_tmp / "n.sock")
    async with aiobus.Broker(path=path, data_dir=short_tmp / "data",
                             fsync="always") as broker, aiobus.connect(path) as bus:
        await bus.declare_queue("jobs", durable=True)
        await bus.send("jobs", "before")
        journal = broker.journal
        assert journal is not None
        await until(lambda: not journal.unsynced)
        LosingFiles.fail = True
        confirmed = False
        async with aiobus.connect(path) as doomed:
            with contextlib.suppress(aiobus.ConnectionLost, aiobus.JournalError):
                await doomed.send("jobs", "maybe")
                confirmed = True
        assert LosingFiles.failed == 1
        async with aiobus.connect(path) as producer:
            await producer.send("jobs", "after")  # not refused: already rebuilt
        assert not journal.damaged
        ready = (await bus.stats())["queues"]["jobs"]["ready"]
        async with bus.consume("jobs", prefetch=10) as consumer, asyncio.timeout(10):
            got = [(await consumer.__anext__()).body for _ in range(ready)]
        assert got in (["before", "after"], ["before", "maybe", "after"])
        assert "maybe" in got or not confirmed


async def test_a_long_read_is_confirmed_in_parts_each_after_its_sync(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A producer's window of pipelined durable sends, read at once, is handled in parts
    (connection.py ``_PART`` frames): the first parts' records are written and their
    sync begins before the read is done (else a producer would wait for the whole
    window to be handled before any confirmation could leave). Every answer still comes
    once, in request order, mixed with in-memory sends, an error and PINGs; and every
    confirmed durable send is in the journal, synced."""
    syncs_in_reads: list[int] = []
    real = connection._Connection.data_received

    def data_received(self: Any, data: bytes) -> None:
        commit = self.broker._commit
        before = commit.syncs if commit is not None else 0
        real(self, data)
        if commit is not None:
            syncs_in_reads.append(commit.syncs - before)

    monkeypatch.setattr(connection._Connection, "data_received", data_received)
    path = str(short_tmp / "p.sock")
    async with aiobus.Broker(path=path, data_dir=short_tmp / "data", fsync="always") as broker:
        async with aiobus.connect(path) as bus:
            await bus.declare_queue("durable", durable=True)
            await bus.declare_queue("memory")
        frames: list[list[Any]] = []
        expected: list[tuple[int, Any]] = []
        for rid in range(1, 401):
            if rid == 150:
                frames.append([Op.SEND, rid, "bad name!", b"x", 0, None, None, None])
                expected.append((rid, "invalid-name"))
                continue
            if rid % 50 == 0:
                frames.append([Op.PING, rid])
            else:
                queue = "memory" if rid % 7 == 0 else "durable"
                frames.append([Op.SEND, rid, queue, f"{rid}".encode(), 0, None, None, None])
            expected.append((rid, "ok"))
        syncs_in_reads.clear()
        got = await answers(path, frames, until=400)
        assert got == expected
        assert any(syncs_in_reads), "no sync began within a read"
        assert broker.journal is not None and not broker.journal.unsynced
        async with aiobus.connect(path) as bus:
            stats = (await bus.stats())["queues"]
        assert stats["durable"]["ready"] == sum(
            1 for f in frames if f[0] == Op.SEND and f[2] == "durable")
