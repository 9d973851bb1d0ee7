"""Restart a broker on the same socket and data directory, as systemd or a user would.

``restarts`` is a fixture (import it into a test module): ``restarts.stop(kill=True)``
ends the current broker (SIGTERM and a clean exit, or SIGKILL), ``restarts.start()``
starts the next one; every broker started here is reaped in the teardown.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import struct
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import REAP_TIMEOUT, BrokerProcess


class Restarts:
    def __init__(self, first: BrokerProcess) -> None:
        self.current = first
        self.path = first.path
        self._data_dir = str(first.log_path.with_suffix(".data"))
        self._started = [first]

    def stop(self, *, kill: bool = False) -> None:
        """End the current broker: SIGTERM (and check it exited 0), or SIGKILL."""
        proc = self.current.proc
        if kill:
            proc.send_signal(signal.SIGKILL)
            proc.wait(REAP_TIMEOUT)
        else:
            assert self.current.terminate() == 0, self.current.log()

    def start(self) -> BrokerProcess:
        """Start the next broker on the same socket and data directory."""
        log = self.current.log_path.with_name(f"{len(self._started)}-{self.current.log_path.name}")
        self.current = BrokerProcess(self.path, log, "--data-dir", self._data_dir)
        self._started.append(self.current)
        return self.current

    def close(self) -> None:
        for broker in self._started:
            broker.stop()


@pytest.fixture
def restarts(broker: BrokerProcess) -> Iterator[Restarts]:
    """Restarts of the ``broker`` fixture."""
    restarts = Restarts(broker)
    try:
        yield restarts
    finally:
        restarts.close()


def pipe_bytes(fd: int) -> int:
    """Bytes waiting in the pipe (FIONREAD)."""
    result: int = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    return result


async def wait_pipe_full(fifo: Path, timeout: float) -> None:
    """Wait until the FIFO's pipe is (nearly) full: its writers are blocked. Opens it for
    reading without ever reading, so it takes nothing from the pipe."""
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        async with asyncio.timeout(timeout):
            while pipe_bytes(fd) < 60_000:  # 64 KiB less what a page may waste per write
                await asyncio.sleep(0.02)
    finally:
        os.close(fd)


class Lines:
    """The lines of a child's stream, kept, with ``expect`` waiting for one that matches."""

    def __init__(self, stream: asyncio.StreamReader | None) -> None:
        self._stream = stream  # None: not a pipe, expect() fails
        self.lines: list[str] = []
        self._next = 0  # expect() looks at lines from here on: each match is used once

    async def expect(self, needle: str, timeout: float) -> str:
        """The next line (after the last match) containing ``needle``."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    while self._next < len(self.lines):
                        self._next += 1
                        if needle in self.lines[self._next - 1]:
                            return self.lines[self._next - 1]
                    assert self._stream is not None
                    raw = await self._stream.readline()
                    if not raw:
                        raise AssertionError(f"stream ended before {needle!r}:\n{self.text()}")
                    self.lines.append(raw.decode(errors="replace").rstrip("\n"))
        except TimeoutError:
            raise AssertionError(f"no {needle!r} within {timeout} s:\n{self.text()}") from None

    def text(self) -> str:
        return "\n".join(self.lines)
