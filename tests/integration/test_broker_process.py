"""The ``aiobus-broker`` daemon as an operator runs it: signals, socket file handling,
default paths, command-line entry points; and the embeddable ``aiobus.Broker``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import aiobus

from .conftest import BrokerProcess, wait_for_socket

pytestmark = pytest.mark.asyncio


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_gracefully(broker: BrokerProcess, signo: int) -> None:
    async with aiobus.connect(broker.path, reconnect=False) as bus:
        await bus.send("jobs", 1)
        consumer = bus.consume("jobs")
        msg = await asyncio.wait_for(anext(consumer), 5)
        assert msg.body == 1
        broker.proc.send_signal(signo)
        with pytest.raises(aiobus.ConnectionLost) as info:
            await asyncio.wait_for(anext(consumer), 10)
        assert info.value.code == "shutdown"
        with pytest.raises(aiobus.ConnectionLost):
            await bus.send("jobs", 2)
    assert await asyncio.to_thread(broker.proc.wait, 10) == 0
    assert not os.path.exists(broker.path)
    assert "shutting down" in broker.log()


async def test_socket_is_owner_only_by_default(broker: BrokerProcess) -> None:
    assert stat.S_IMODE(os.stat(broker.path).st_mode) == 0o600


async def test_socket_mode_option(broker_factory: Any) -> None:
    broker = broker_factory("--socket-mode", "0660")
    assert stat.S_IMODE(os.stat(broker.path).st_mode) == 0o660


async def test_stale_socket_is_replaced(short_tmp: Path, broker_factory: Any) -> None:
    path = short_tmp / "b.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))  # a socket file nobody listens on: what a crashed broker leaves
    dead.close()
    assert path.exists()
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus:
        await bus.ping()


async def test_live_broker_is_not_replaced(broker: BrokerProcess) -> None:
    second = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aiobus.cli.broker", "--socket", broker.path],
        capture_output=True, text=True, timeout=20,
    )
    assert second.returncode != 0
    assert "already listening" in second.stderr
    async with aiobus.connect(broker.path) as bus:  # the first one is untouched
        await bus.ping()


async def test_a_regular_file_is_never_replaced(short_tmp: Path) -> None:
    path = short_tmp / "b.sock"
    path.write_text("precious")
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "aiobus.cli.broker", "--socket", str(path)],
        capture_output=True, text=True, timeout=20,
    )
    assert result.returncode == 1 and "not a socket" in result.stderr
    assert path.read_text() == "precious"


async def test_default_path_is_shared_by_broker_and_client(short_tmp: Path) -> None:
    env = {**os.environ, "XDG_RUNTIME_DIR": str(short_tmp)}
    env.pop("AIOBUS_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "aiobus.cli.broker"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        expected = short_tmp / "aiobus.sock"
        await asyncio.to_thread(wait_for_socket, str(expected), proc)
        client = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-c",
             "import asyncio, aiobus\n"
             "async def main():\n"
             "    async with aiobus.connect() as bus:\n"
             "        await bus.ping(); print(bus.path)\n"
             "asyncio.run(main())"],
            env=env, capture_output=True, text=True, timeout=20,
        )
        assert client.returncode == 0, client.stderr
        assert client.stdout.strip() == str(expected)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_connect_without_broker_is_a_clear_error(short_tmp: Path) -> None:
    with pytest.raises(aiobus.BrokerUnavailable, match="no aiobus broker"):
        async with aiobus.connect(short_tmp / "nothing.sock"):
            pass


@pytest.mark.parametrize("script", ["aiobus", "aiobus-broker"])
async def test_console_scripts_report_their_version(script: str) -> None:
    exe = shutil.which(script, path=os.path.dirname(sys.executable))
    assert exe is not None, f"{script} is not installed next to {sys.executable}"
    result = await asyncio.to_thread(subprocess.run, [exe, "--version"], capture_output=True,
                                     text=True, timeout=20)
    assert result.returncode == 0
    assert result.stdout.strip() == f"{script} {aiobus.__version__}"


async def test_embedded_broker(short_tmp: Path) -> None:
    path = short_tmp / "embedded.sock"
    async with aiobus.Broker(path=path) as broker:
        async with aiobus.connect(path) as bus:
            await bus.send("jobs", "in-process")
            async with bus.consume("jobs") as consumer:
                msg = await asyncio.wait_for(anext(consumer), 5)
                await msg.ack()
        assert broker.stats()["queues"]["jobs"]["acked"] == 1
    assert not path.exists()


async def test_embedded_broker_close_tells_clients(short_tmp: Path) -> None:
    path = short_tmp / "e.sock"
    broker = aiobus.Broker(path=path)
    await broker.start()
    bus = await aiobus.connect(path, reconnect=False)
    try:
        await bus.ping()
        await broker.aclose()
        with pytest.raises(aiobus.ConnectionLost) as info:
            await bus.ping()
        assert info.value.code == "shutdown"
    finally:
        await bus.aclose()
        await broker.aclose()


@pytest.mark.parametrize(("fsync", "interval"), [("always", 0.0005), ("batch", 0.005)])
async def test_the_daemon_shortens_the_switch_interval_for_fsync_always(
        short_tmp: Path, fsync: str, interval: float) -> None:
    """``--fsync always`` hands every sync to a worker thread and back (commit.py): the
    daemon lets that thread have the GIL within 0.5 ms instead of CPython's 5 ms. An
    embedded Broker never changes it (its host owns the interpreter)."""
    script = (
        "import sys, aiobus.cli.broker as cli\n"
        "async def serve(args):\n"
        "    print(sys.getswitchinterval())\n"
        "cli.serve = serve\n"  # what main runs once it has tuned the process
        f"cli.main(['--socket', {str(short_tmp / 's')!r}, '--fsync', {fsync!r}])\n")
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", script],
                                   capture_output=True, text=True, timeout=30, check=True)
    assert float(done.stdout) == interval
    assert sys.getswitchinterval() == 0.005  # (this process: the test's own default)
