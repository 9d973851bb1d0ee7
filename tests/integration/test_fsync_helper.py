"""The fsync helper (aiobus/broker/fsync_helper.py, syncers.py): the child process that
runs the journal's fdatasyncs for a journal on real files. It syncs the broker's own
file and reports the errno; a helper that dies fails the syncs it had (their outcome is
unknown) and the broker goes on syncing in threads, losing no confirmed send; it
outlives neither a broker killed with -9 nor one stopped with Ctrl-C or SIGTERM to its
process group, which it ignores so that the broker's drain can still sync."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import aiobus
from aiobus.broker.journal import SyncTicket
from aiobus.broker.syncers import ProcessSyncer, ThreadSyncer

from .conftest import REAP_TIMEOUT, wait_for_socket

pytestmark = pytest.mark.asyncio


class Ended:
    """The ``ended`` callback: what came back, and an event per ticket."""

    def __init__(self) -> None:
        self.results: dict[int, BaseException | None] = {}
        self.changed = asyncio.Event()

    def __call__(self, ticket: SyncTicket, error: BaseException | None) -> None:
        self.results[ticket.written] = error
        self.changed.set()

    async def wait(self, written: int) -> BaseException | None:
        async with asyncio.timeout(10):
            while written not in self.results:
                self.changed.clear()
                await self.changed.wait()
        return self.results[written]


def ticket(handle: int, written: int) -> SyncTicket:
    return SyncTicket(handle, written, 0, f"test-{written}")


def gone(pid: int) -> bool:
    """Process ``pid`` has exited (no entry, or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = REAP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.01)


def helper_of(broker_pid: int, timeout: float = 10.0) -> int:
    """The broker's fsync helper: its child running fsync_helper.py."""
    deadline = time.monotonic() + timeout
    while True:
        for task in os.listdir(f"/proc/{broker_pid}/task"):
            with open(f"/proc/{broker_pid}/task/{task}/children") as f:
                for child in f.read().split():
                    with open(f"/proc/{child}/cmdline", "rb") as cmd:
                        if b"fsync_helper.py" in cmd.read():
                            return int(child)
        assert time.monotonic() < deadline, "the broker started no fsync helper"
        time.sleep(0.02)


async def test_the_helper_syncs_the_file_it_is_given_and_reports_the_errno(
        tmp_path: Path) -> None:
    ended = Ended()
    syncer = ProcessSyncer(asyncio.get_running_loop(), ended, 2)
    fd = os.open(tmp_path / "seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    reading, writing = os.pipe()
    try:
        assert syncer.alive and not gone(syncer.pid)
        os.write(fd, b"x" * 4096)
        syncer.start(ticket(fd, 1))
        syncer.start(ticket(-1, 2))  # nothing to sync: handed back in the loop
        syncer.start(ticket(reading, 3))  # fdatasync of a pipe: EINVAL
        assert await ended.wait(1) is None
        assert await ended.wait(2) is None
        error = await ended.wait(3)
        assert isinstance(error, OSError) and error.errno == errno.EINVAL
        os.close(fd)  # the helper has its own copy of the descriptor, closed after use
        fd = -1
        syncer.start(ticket(reading, 4))
        assert isinstance(await ended.wait(4), OSError)
    finally:
        syncer.close()
        for each in (fd, reading, writing):
            if each >= 0:
                os.close(each)
    assert syncer.process.returncode == 0  # closing its socket ends it


async def test_a_helper_that_dies_fails_the_syncs_it_had(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ended = Ended()
    syncer = ProcessSyncer(asyncio.get_running_loop(), ended, 2)
    fd = os.open(tmp_path / "seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"x")
        os.kill(syncer.pid, signal.SIGSTOP)  # it cannot answer: the request waits
        syncer.start(ticket(fd, 1))
        await asyncio.sleep(0.05)
        assert ended.results == {}
        os.kill(syncer.pid, signal.SIGKILL)
        error = await ended.wait(1)
        assert isinstance(error, OSError) and error.errno == errno.EIO
        assert f"fsync helper (pid {syncer.pid}) exited" in str(error)
        assert not syncer.alive
        assert "syncing in threads of the broker from now on" in caplog.text
    finally:
        syncer.close()
        os.close(fd)
    assert syncer.process.returncode == -signal.SIGKILL


async def test_the_helper_ignores_the_signals_its_process_group_gets(tmp_path: Path) -> None:
    ended = Ended()
    syncer = ProcessSyncer(asyncio.get_running_loop(), ended, 2)
    fd = os.open(tmp_path / "seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for i, signum in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
            os.kill(syncer.pid, signum)
            os.write(fd, b"x")
            syncer.start(ticket(fd, i))
            assert await ended.wait(i) is None
        assert syncer.alive and not gone(syncer.pid)
    finally:
        syncer.close()
        os.close(fd)
    assert syncer.process.returncode == 0


def start_broker(short_tmp: Path, name: str, **popen: Any) -> tuple[subprocess.Popen[bytes],
                                                                   str, Path]:
    path, log = str(short_tmp / f"{name}.sock"), short_tmp / f"{name}.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "aiobus.cli.broker", "--socket", path, "--data-dir",
             str(short_tmp / "data"), "--fsync", "always", "--drain-timeout", "1"],
            stdout=out, stderr=subprocess.STDOUT, **popen)
    try:
        wait_for_socket(path, proc)
    except BaseException:
        proc.kill()
        proc.wait(REAP_TIMEOUT)
        raise
    return proc, path, log


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Any:
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(REAP_TIMEOUT)


async def test_the_helper_goes_with_a_broker_killed_with_9(short_tmp: Path) -> None:
    proc, path, _ = start_broker(short_tmp, "k")
    with reaped(proc):
        helper = helper_of(proc.pid)
        async with aiobus.connect(path) as bus:
            await bus.declare_queue("jobs", durable=True)
            await bus.send("jobs", "synced by the helper")
        proc.kill()
        proc.wait(REAP_TIMEOUT)
        wait_gone(helper)  # its socket's other end closed with the broker


async def test_ctrl_c_to_the_process_group_stops_broker_and_helper_cleanly(
        short_tmp: Path) -> None:
    """A terminal's Ctrl-C (SIGINT to the foreground process group) and systemd's stop
    (SIGTERM to the unit's processes) reach the helper too: it ignores them, the broker
    drains (still able to sync) and stops it; nothing durable is lost, no traceback."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc, path, log = start_broker(short_tmp, f"g{signum}", start_new_session=True)
        with reaped(proc):
            helper = helper_of(proc.pid)
            async with aiobus.connect(path) as bus:
                await bus.declare_queue("jobs", durable=True)
                await bus.send("jobs", f"kept over signal {signum}")
            os.killpg(proc.pid, signum)
            assert proc.wait(REAP_TIMEOUT) == 0
            wait_gone(helper)
        text = log.read_text()
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    proc, path, _ = start_broker(short_tmp, "after")
    with reaped(proc):
        async with aiobus.connect(path) as bus, bus.consume("jobs") as consumer:
            async with asyncio.timeout(10):
                got = {(await consumer.__anext__()).body for _ in range(2)}
        assert got == {f"kept over signal {s}" for s in (signal.SIGINT, signal.SIGTERM)}
        proc.terminate()


async def send_window(path: str, bodies: list[str]) -> list[BaseException | None]:
    """Pipeline confirmed sends of ``bodies`` on a connection of their own; each one's
    outcome (None: confirmed)."""
    async with aiobus.connect(path, reconnect=False) as bus:
        futures = [bus.send_nowait("jobs", body) for body in bodies]
        async with asyncio.timeout(20):
            return list(await asyncio.gather(*futures, return_exceptions=True))


def journal_bytes(data: Path) -> int:
    return sum(f.stat().st_size for f in (data / "journal").glob("*.seg"))


async def test_killing_the_helper_fails_its_syncs_and_loses_no_confirmed_send(
        short_tmp: Path) -> None:
    """kill -9 of the helper with syncs outstanding (it is stopped first, so that they
    are): their confirmations are not given (the connection is closed with ``journal``,
    as after any failed sync), the journal is rebuilt from memory, syncs go on in
    threads of the broker, and after a restart every confirmed message is there."""
    proc, path, log = start_broker(short_tmp, "h")
    confirmed: set[str] = set()
    with reaped(proc):
        helper = helper_of(proc.pid)
        async with aiobus.connect(path) as bus:
            await bus.declare_queue("jobs", durable=True)
        bodies = [f"before-{i}" for i in range(1000)]
        assert await send_window(path, bodies) == [None] * 1000
        confirmed.update(bodies)
        os.kill(helper, signal.SIGSTOP)
        written = journal_bytes(short_tmp / "data")
        doomed = asyncio.ensure_future(send_window(path, [f"held-{i}" for i in range(200)]))
        deadline = time.monotonic() + 10
        while journal_bytes(short_tmp / "data") == written:  # written, its sync asked for
            assert time.monotonic() < deadline and not doomed.done()
            await asyncio.sleep(0.005)
        os.kill(helper, signal.SIGKILL)
        outcomes = await doomed
        assert all(isinstance(o, aiobus.ConnectionLost) and o.code == "journal"
                   for o in outcomes), outcomes
        wait_gone(helper)
        deadline = time.monotonic() + 20
        after = [f"after-{i}" for i in range(1000)]
        while after:  # refused (JournalError) until the rebuild, which is at once
            assert time.monotonic() < deadline, f"{len(after)} never confirmed"
            outcomes = await send_window(path, after)
            confirmed.update(b for b, o in zip(after, outcomes, strict=True) if o is None)
            after = [b for b, o in zip(after, outcomes, strict=True) if o is not None]
        text = log.read_text()
        assert f"the fsync helper (pid {helper}) exited" in text
        assert "syncing in threads of the broker from now on" in text
        proc.terminate()
        assert proc.wait(REAP_TIMEOUT) == 0
    proc, path, _ = start_broker(short_tmp, "h2")
    with reaped(proc):
        async with aiobus.connect(path) as bus:
            ready = (await bus.stats())["queues"]["jobs"]["ready"]
            got = set()
            async with bus.consume("jobs", prefetch=500) as consumer, asyncio.timeout(20):
                for _ in range(ready):
                    msg = await consumer.__anext__()
                    got.add(msg.body)
                    msg.ack_nowait()
        proc.terminate()
    assert confirmed <= got, f"lost {len(confirmed - got)} confirmed sends"


async def test_where_the_helper_cannot_start_the_broker_syncs_in_threads(
        short_tmp: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An interpreter that cannot run the helper (here ``sys.executable`` is ``false``,
    as an embedding host's might be no Python at all): the broker says so and syncs in
    worker threads; durable sends are confirmed, and kept over a restart."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    path, data = str(short_tmp / "t.sock"), short_tmp / "data"
    async with aiobus.Broker(path=path, data_dir=data, fsync="always") as broker:
        commit = broker._commit
        assert commit is not None and isinstance(commit._syncer, ThreadSyncer)
        async with aiobus.connect(path) as bus:
            await bus.declare_queue("jobs", durable=True)
            for i in range(100):
                await bus.send("jobs", f"m{i}")
        assert commit.syncs >= 100 and "cannot start the fsync helper" in caplog.text
    monkeypatch.undo()
    async with aiobus.Broker(path=path, data_dir=data, fsync="always"):
        async with aiobus.connect(path) as bus:
            assert (await bus.stats())["queues"]["jobs"]["ready"] == 100
