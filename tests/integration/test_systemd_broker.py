"""``aiobus-broker`` under systemd, with the test playing systemd's part: a datagram socket
for ``Type=notify`` and a pre-bound listening socket passed as fd 3 (``LISTEN_FDS``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import aiobus

pytestmark = pytest.mark.asyncio

BROKER = [sys.executable, "-m", "aiobus.cli.broker"]


def recv_notify(sock: socket.socket, timeout: float = 10.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


async def test_type_notify_ready_and_stopping(short_tmp: Path) -> None:
    notify_path = short_tmp / "notify"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(notify_path))
    path = short_tmp / "b.sock"
    proc = subprocess.Popen([*BROKER, "--socket", str(path)],
                            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ready = await asyncio.to_thread(recv_notify, listener)
        assert "READY=1" in ready.splitlines() and f"MAINPID={proc.pid}" in ready
        # READY means accepting: connect at once, no polling.
        async with aiobus.connect(path) as bus:
            await bus.ping()
        proc.send_signal(signal.SIGTERM)
        stopping = await asyncio.to_thread(recv_notify, listener)
        assert "STOPPING=1" in stopping.splitlines()
        assert await asyncio.to_thread(proc.wait, 10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        listener.close()


async def test_socket_activation_serves_the_passed_socket(short_tmp: Path) -> None:
    path = short_tmp / "activated.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    fd = listening.fileno()

    def as_fd_3() -> None:  # runs in the child between fork and exec
        os.dup2(fd, 3)

    # LISTEN_PID must be the broker's own pid: sh exports its $$, then execs the broker.
    proc = subprocess.Popen(
        ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *BROKER,
         "--socket", str(short_tmp / "ignored.sock")],
        env={**os.environ, "LISTEN_FDS": "1"},
        preexec_fn=as_fd_3, pass_fds=(3,) if fd == 3 else (),
        close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    listening.close()  # the broker holds its copy now
    try:
        async with aiobus.connect(path) as bus:  # queued in the backlog until it accepts
            await bus.send("jobs", "activated")
            assert (await bus.stats())["queues"]["jobs"]["ready"] == 1
        assert not (short_tmp / "ignored.sock").exists()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        assert path.exists()  # the socket file is systemd's to remove, not the broker's
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
