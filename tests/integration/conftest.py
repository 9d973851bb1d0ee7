"""Fixtures that run the real thing: an ``aiobus-broker`` process on a temporary socket,
and client processes started with ``sys.executable``.

Every process started here is reaped in the fixture's teardown; every wait has a
deadline (as nats.py's test server helper does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

import aiobus

from . import nats_cases
from .nats_server import NatsServer, delete_namespace, nats_server  # noqa: F401

# A deadline, not a wait: a broker is up in ~0.3 s, but on a loaded 2-core machine running
# `make test`'s 4 workers its interpreter start alone has taken over 10 s.
READY_TIMEOUT = 30.0
REAP_TIMEOUT = 10.0


@pytest.fixture(autouse=True)
def own_state_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A broker started without --data-dir journals to $XDG_STATE_HOME/aiobus: give each
    test its own, never the user's."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: AF_UNIX paths are capped at 107 bytes."""
    path = Path(tempfile.mkdtemp(prefix="ab-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def rss(pid: int) -> int:
    """Resident set size of process ``pid``, in bytes (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def wait_for_socket(path: str, proc: subprocess.Popen[bytes] | None = None,
                    timeout: float = READY_TIMEOUT) -> None:
    """Poll until something accepts connections on ``path`` (or the process died)."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"broker exited early with {proc.returncode}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
                return
            except (FileNotFoundError, ConnectionRefusedError):
                pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no broker listening on {path} after {timeout} s")
        time.sleep(0.02)


class BrokerProcess:
    """A running ``aiobus-broker`` subprocess."""

    def __init__(self, path: str, log_path: Path, *extra: str) -> None:
        self.path = path
        self.log_path = log_path
        self._log = open(log_path, "wb")  # closed in stop()
        if "--data-dir" not in extra:  # its own journal, beside its socket and log
            extra = ("--data-dir", str(log_path.with_suffix(".data")), *extra)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiobus.cli.broker", "--socket", path, *extra],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_socket(path, self.proc)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self, timeout: float = REAP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(REAP_TIMEOUT)
        self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def broker_factory(short_tmp: Path) -> Iterator[Any]:
    """Start brokers on demand: ``broker_factory(*extra_args, name="b")``."""
    started: list[BrokerProcess] = []

    def start(*extra: str, name: str = "b") -> BrokerProcess:
        proc = BrokerProcess(str(short_tmp / f"{name}.sock"), short_tmp / f"{name}.log", *extra)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def broker(broker_factory: Any) -> BrokerProcess:
    """One ``aiobus-broker`` process on a fresh temporary socket."""
    proc: BrokerProcess = broker_factory()
    return proc


# The client's behaviour suite (every test taking ``bus``) runs once per backend here: the
# same tests, written against ``aiobus.Bus``, for each transport below it. Cases the NATS
# backend cannot support are listed, with the reason, in nats_cases.py (README table).
BACKENDS = ["unix", "nats"]


@pytest_asyncio.fixture(params=BACKENDS)
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[aiobus.Bus]:
    """A client connection (in the test's process): to the ``broker`` fixture's
    aiobus-broker, or to the session's nats-server under a namespace of its own, so that
    no test sees another's queues."""
    if request.param == "unix":
        broker: BrokerProcess = request.getfixturevalue("broker")
        async with aiobus.connect(broker.path, name="test") as bus:
            yield bus
        return
    if request.param != "nats":
        raise AssertionError(f"no fixture for backend {request.param!r}")
    server: NatsServer = request.getfixturevalue("nats_server")
    url = server.namespace_url()
    try:
        async with aiobus.connect(url, name="test") as bus:
            yield bus
    finally:
        await delete_namespace(url)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the ``[nats]`` cases listed in nats_cases.py."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None or callspec.params.get("bus") != "nats":
            continue
        name = getattr(item, "originalname", item.name)
        if name in nats_cases.SKIP:
            item.add_marker(pytest.mark.skip(reason="NATS: " + nats_cases.SKIP[name]))
        elif name in nats_cases.XFAIL:
            item.add_marker(pytest.mark.xfail(strict=True,
                                              reason="NATS: " + nats_cases.XFAIL[name]))


# For a test that takes ``bus`` but speaks the aiobus wire protocol (raw frames) to the
# broker's socket, or depends on the broker process itself: it is not a behaviour of
# ``Bus`` that a NATS backend could have, so its ``[nats]`` case is not collected at all
# (rather than counted as skipped). The parametrisation overrides the fixture's params.
unix_only = pytest.mark.parametrize("bus", ["unix"], indirect=True)


def backend_of(bus: aiobus.Bus) -> str:
    return "nats" if bus.path.startswith("nats://") else "unix"


def crash_settings(bus: aiobus.Bus) -> dict[str, Any]:
    """``declare_queue`` settings for a test that kills a consumer holding leases. The
    local broker gives its messages back as soon as the connection drops; on NATS they
    come back once AckWait, the queue's ``ack_timeout`` (30 s by default), has run out
    (docs/nats.md), so there the test's queue gets a short one."""
    return {"ack_timeout": 2.0} if backend_of(bus) == "nats" else {}


# -- client processes ---------------------------------------------------------------

_PRELUDE = """\
import asyncio, json, os, sys
import aiobus

def emit(**fields):
    print(json.dumps(fields), flush=True)

async def _main(path):
    async with aiobus.connect(path, name=os.environ.get("CLIENT_NAME"),
                              reconnect=os.environ.get("CLIENT_RECONNECT") == "1") as bus:
{body}

asyncio.run(_main(sys.argv[1]))
"""


class ClientProcess:
    """A Python client in a child process; it prints JSON lines via ``emit(...)``."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def line(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next JSON line the client emitted."""
        assert self.proc.stdout is not None
        raw = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not raw:
            err = b""
            if self.proc.stderr is not None:
                with contextlib.suppress(TimeoutError):
                    err = await asyncio.wait_for(self.proc.stderr.read(), 5)
            raise EOFError(f"client exited without output; stderr:\n{err.decode()}")
        result: dict[str, Any] = json.loads(raw)
        return result

    async def wait(self, timeout: float = 10.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


@pytest_asyncio.fixture
async def spawn_client(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """Start client processes: ``await spawn_client(body, name=...)`` where ``body`` is
    the code of an async function with ``bus`` and ``emit`` in scope. ``reconnect``:
    as ``aiobus.connect``'s. They connect where the test's ``bus`` does (the ``broker``
    fixture's socket for a test without one)."""
    clients: list[ClientProcess] = []
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("bus") == "nats":
        default_path = request.getfixturevalue("bus").path
    else:
        default_path = request.getfixturevalue("broker").path

    async def spawn(body: str, name: str = "client", path: str | None = None,
                    reconnect: bool = True) -> ClientProcess:
        code = _PRELUDE.format(body=textwrap.indent(textwrap.dedent(body), " " * 8))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, path or default_path, limit=2**24,  # long JSON lines
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "CLIENT_NAME": name, "CLIENT_RECONNECT": str(int(reconnect))},
        )
        client = ClientProcess(proc)
        clients.append(client)
        return client

    try:
        yield spawn
    finally:
        for client in clients:
            client.kill()
            with contextlib.suppress(TimeoutError, ProcessLookupError):
                await asyncio.wait_for(client.proc.wait(), REAP_TIMEOUT)


async def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.01) -> None:
    """Poll an async predicate until it is true, failing after ``timeout`` seconds (a
    deadline for what is usually there in milliseconds: client processes take seconds to
    start on a loaded 2-core machine running the suite on 4 workers)."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def queue_stats(bus: aiobus.Bus, queue: str) -> dict[str, Any]:
    stats = await bus.stats()
    result: dict[str, Any] = stats["queues"].get(queue, {})
    return result
