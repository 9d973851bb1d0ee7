"""Group commit (aiobus/broker/commit.py): output held until a sync covering it returns,
syncs in worker threads, and a failed sync handing over what it held. A real journal on
real files, whose fdatasync a test can hold up or fail."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable
from pathlib import Path

import msgpack
import pytest

from aiobus.broker.commit import MAX_RUNNING, GroupCommit
from aiobus.broker.journal import Journal, JournalError, OsFiles
from aiobus.broker.snapshot import QueueSnapshot, SnapshotMessage

pytestmark = pytest.mark.asyncio


class SlowFiles(OsFiles):
    """OsFiles whose sync waits for ``gate`` (set: no wait) and may fail."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.started = 0

    def sync(self, handle: int) -> None:
        self.started += 1
        if not self.gate.wait(10):
            raise TimeoutError("the test never opened the gate")
        if self.fail:
            raise OSError(errno.EIO, "Input/output error")
        super().sync(handle)


class Shell:
    """What the broker gives GroupCommit: a record of releases and failures."""

    def __init__(self) -> None:
        self.released: list[str] = []
        self.failures: list[tuple[str | None, set[int], list[str]]] = []
        self.done = asyncio.Event()

    def release(self, batch: str) -> None:
        self.released.append(batch)

    def failed(self, error: JournalError, confirmed: set[int], batches: list[str]) -> None:
        self.failures.append((error.cause, confirmed, batches))

    def after(self) -> None:
        self.done.set()


def make(tmp_path: Path) -> tuple[SlowFiles, Journal, Shell, GroupCommit[str]]:
    files = SlowFiles(str(tmp_path))
    journal, _ = Journal.open(files)
    journal.declare("jobs", {})
    files.started = 0  # (opening synced the new segment's header)
    shell = Shell()
    commit = GroupCommit(journal, asyncio.get_running_loop(), shell.release, shell.failed,
                         shell.after)
    return files, journal, shell, commit


def send(journal: Journal, seq: int) -> None:
    journal.sent("jobs", seq, msgpack.packb([f"id-{seq}", "jobs", b"x", 0, None, 1.0]))
    journal.write()


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    """Until ``condition()`` holds; fails naming ``what`` after 10 s."""
    try:
        async with asyncio.timeout(10):
            while not condition():
                await asyncio.sleep(0.001)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_output_waits_for_the_sync_that_covers_it(tmp_path: Path) -> None:
    files, journal, shell, commit = make(tmp_path)
    files.gate.clear()
    send(journal, 0)
    commit.hold("turn 1", {7})
    assert commit.waiting and files.started <= 1
    await wait_for(lambda: files.started == 1, "the first sync to start")
    send(journal, 1)  # the loop goes on while the disk works
    commit.hold("turn 2", set())
    await wait_for(lambda: files.started == 2, "a second sync, for turn 2")
    send(journal, 2)
    commit.hold("turn 3", set())  # MAX_RUNNING syncs run: turn 3 waits for a slot
    await asyncio.sleep(0.05)
    assert MAX_RUNNING == 2 and files.started == 2
    assert shell.released == [] and journal.unsynced  # nothing leaves before its sync
    files.gate.set()
    await wait_for(lambda: shell.released == ["turn 1", "turn 2", "turn 3"], "releases")
    await wait_for(lambda: not commit.waiting, "the last sync")
    assert files.started == 3 and not journal.unsynced and shell.failures == []
    commit.close()
    journal.close()


async def test_a_failed_sync_hands_over_what_it_held(tmp_path: Path) -> None:
    files, journal, shell, commit = make(tmp_path)
    files.gate.clear()
    files.fail = True
    send(journal, 0)
    commit.hold("turn 1", {1})
    send(journal, 1)
    commit.hold("turn 2", {2})
    await wait_for(lambda: files.started == 2, "both syncs to start")
    files.gate.set()
    await wait_for(lambda: not commit.running, "the syncs to end")
    assert shell.released == []
    assert shell.failures == [("EIO", {1, 2}, ["turn 1", "turn 2"])]
    assert journal.unsynced  # nothing counted as on disk
    files.fail = False
    with pytest.raises(JournalError, match="not trusted"):  # a later sync proves nothing
        commit.settle(set())
    assert commit.broken and journal.damaged
    # Written afresh from memory (the core's snapshot; here what it would hold):
    commit.rebuild([QueueSnapshot("jobs", {}, 2, [], [
        SnapshotMessage(seq, msgpack.packb([f"id-{seq}", "jobs", b"x", 0, None, 1.0]), 0,
                        None, None, None, None, False) for seq in (0, 1)])])
    assert not journal.unsynced and not commit.broken and not journal.damaged
    send(journal, 2)
    commit.hold("turn 3", {3})  # syncs start by themselves again
    await wait_for(lambda: shell.released == ["turn 3"], "turn 3's release")
    commit.close()
    journal.close()


async def test_settle_syncs_in_this_thread_and_releases_everything(tmp_path: Path) -> None:
    files, journal, shell, commit = make(tmp_path)
    files.gate.clear()
    send(journal, 0)
    commit.hold("turn 1", set())
    await wait_for(lambda: files.started == 1, "the sync to start")
    send(journal, 1)
    commit.hold("turn 2", set())
    files.gate.set()  # (the settle's own sync must not wait either)
    commit.settle(set())
    assert shell.released == ["turn 1", "turn 2"] and not journal.unsynced
    await wait_for(lambda: not commit.running, "the worker's syncs to end")
    assert shell.released == ["turn 1", "turn 2"]  # released once
    commit.close()
    journal.close()


async def test_the_periodic_sync_holds_nothing_and_calls_back(tmp_path: Path) -> None:
    files, journal, shell, commit = make(tmp_path)
    send(journal, 0)
    ended = asyncio.Event()
    commit.sync_soon(ended.set)
    async with asyncio.timeout(10):
        await ended.wait()
    assert not journal.unsynced and shell.released == [] and files.started == 1
    commit.close()
    journal.close()
