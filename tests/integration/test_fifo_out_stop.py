"""``aiobus fifo-out`` stopped by SIGTERM in the middle of a record, against a real broker,
a real FIFO and a real ``aiobus fifo-out`` process.

The reader is this test: it opens the FIFO non-blocking and reads only a little, so the
writer is stuck mid-record (a 300,000-byte record; the pipe holds 64 KiB) when the signal
arrives. Every wait has a deadline; every process is reaped.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import sys
import termios
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

import aiobus

from .conftest import backend_of, queue_stats, wait_until

pytestmark = pytest.mark.asyncio

TIMEOUT = 20.0  # per wait; a slow CI box, not the code, sets this
RECORD = 300_000


@asynccontextmanager
async def fifo_out(bus: aiobus.Bus, fifo: Path, *extra: str
                   ) -> AsyncIterator[asyncio.subprocess.Process]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiobus.cli.main", "--socket", bus.path,
        "fifo-out", str(fifo), "--queue", "out", *extra,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.communicate(), TIMEOUT)


def read_nowait(fd: int, limit: int = 1 << 20) -> bytes | None:
    """What the pipe holds now, at most ``limit`` bytes: None if it is empty, b"" at end
    of file (no writer has the FIFO open)."""
    try:
        return os.read(fd, limit)
    except BlockingIOError:
        return None


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in the pipe (FIONREAD)."""
    result: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return result


async def read_exactly(fd: int, n: int) -> bytes:
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while len(data) < n:
            data += read_nowait(fd, n - len(data)) or b""
            if len(data) < n:
                await asyncio.sleep(0.01)
    return data


async def read_line(fd: int, writer: asyncio.subprocess.Process) -> bytes:
    """Read up to and including the first newline, or until ``writer`` has exited and the
    pipe is drained (end of file)."""
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while not data.endswith(b"\n"):
            chunk = read_nowait(fd, 64 * 1024)
            if chunk == b"" and writer.returncode is not None:
                break
            if not chunk:  # empty pipe, or the writer has not opened the FIFO yet
                await asyncio.sleep(0.01)
                continue
            data += chunk
            assert data.count(b"\n") <= 1, "read past the end of one record"
    return data


async def exit_status(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    """Wait for ``proc`` to exit: its status and stderr."""
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def settled(bus: aiobus.Bus, **expected: int) -> None:
    async def match() -> bool:
        stats = await queue_stats(bus, "out")
        return all(stats.get(key) == value for key, value in expected.items())

    await wait_until(match, timeout=TIMEOUT)


async def test_sigterm_mid_record_finishes_it_and_acks(
        bus: aiobus.Bus, short_tmp: Path) -> None:
    fifo = short_tmp / "out.fifo"
    os.mkfifo(fifo, 0o600)
    body = "x" * RECORD
    await bus.send("out", body)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with fifo_out(bus, fifo) as proc:
            head = await read_exactly(fd, 1000)  # it has begun the record; the pipe is full
            proc.send_signal(signal.SIGTERM)  # the reader is slow: reads on after the signal
            rest = await read_line(fd, proc)
            code, err = await exit_status(proc)
        assert (code, err) == (0, "")
        assert len(head + rest) == RECORD + 1
        assert head + rest == body.encode() + b"\n"
        await settled(bus, ready=0, unacked=0, acked=1, consumers=0)

        # The next bridge on the same FIFO: its record is a line of its own.
        await bus.send("out", "second")
        async with fifo_out(bus, fifo) as proc:
            assert await read_line(fd, proc) == b"second\n"
            proc.send_signal(signal.SIGTERM)
            assert await exit_status(proc) == (0, "")
        await settled(bus, ready=0, unacked=0, acked=2)
    finally:
        os.close(fd)


async def test_sigterm_with_a_stuck_reader_gives_up_and_does_not_ack(
        bus: aiobus.Bus, short_tmp: Path) -> None:
    fifo = short_tmp / "out.fifo"
    os.mkfifo(fifo, 0o600)
    body = "y" * RECORD
    await bus.send("out", body)
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with fifo_out(bus, fifo, "--drain-timeout", "1") as proc:
            head = await read_exactly(fd, 1000)  # and then reads no more
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code, err = await exit_status(proc)
            elapsed = time.monotonic() - started
        assert code == 0
        assert 0.9 < elapsed < 5.0, elapsed  # the 1 s drain timeout, not the default 5 s
        unwritten = RECORD + 1 - len(head) - pipe_bytes(fd)
        assert 0 < unwritten < RECORD
        assert str(fifo) in err
        assert f"{unwritten} bytes" in err, err
        # Not acked: back in the queue, and releasing it counted no attempt. (On NATS a
        # release ends the original once its copy is stored: `acked` counts it.)
        await settled(bus, ready=1, unacked=0, consumers=0,
                      **({} if backend_of(bus) == "nats" else {"acked": 0}))
        async with asyncio.timeout(TIMEOUT), bus.consume("out") as consumer:
            message = await anext(consumer)
            assert (message.body, message.attempt) == (body, 1)
            await message.ack()
    finally:
        os.close(fd)
