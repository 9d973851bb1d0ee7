"""A three-node nats-server cluster (three processes on 127.0.0.1 with routes, JetStream
replicas 3): one node is killed mid-stream while confirmed sends run; no confirmed
message is lost and the consumer carries on (issue 15)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

import aiobus

from .nats_server import NatsServer

pytestmark = pytest.mark.asyncio

MESSAGES = 300
KILL_AFTER = 100  # confirmed sends before the kill


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture
def cluster() -> Iterator[list[NatsServer]]:
    workdir = Path(tempfile.mkdtemp(prefix="natsc-", dir="/tmp"))
    ports = free_ports(3)
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in ports)
    nodes: list[NatsServer] = []
    try:
        for i, port in enumerate(ports):
            nodes.append(NatsServer(workdir, "--cluster_name", "aiobus",
                                    "--cluster", f"nats://127.0.0.1:{port}",
                                    "--routes", routes, name=f"n{i}", wait=False))
        for node in nodes:
            node.wait_ready(timeout=30)
        yield nodes
    finally:
        for node in nodes:
            node.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def stream_leader(url: str, stream: str) -> str:
    nc = await nats.connect(url)
    try:
        reply = await nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=5)
    finally:
        await nc.close()
    info: dict[str, Any] = json.loads(reply.data)
    return str(info["cluster"]["leader"])


@pytest.mark.timeout(120)
async def test_killing_a_node_loses_no_confirmed_message(cluster: list[NatsServer]) -> None:
    names = [node.name for node in cluster]
    async with aiobus.connect(f"{cluster[0].url}/c?replicas=3") as admin:
        await admin.declare_queue("orders", ack_timeout=3)
        stream = admin._backend.ns.stream("orders")  # type: ignore[attr-defined]
    # Kill the stream's leader; the clients talk to another node.
    victim = names.index(await stream_leader(cluster[0].url, stream))
    home = cluster[(victim + 1) % 3]
    url = f"{home.url}/c?replicas=3"
    confirmed: list[int] = []
    seen: set[int] = set()
    after_kill: list[int] = []
    killed = asyncio.Event()

    async def produce(bus: aiobus.Bus) -> None:
        for i in range(MESSAGES):
            while True:  # what an application does: send again until confirmed
                try:
                    await bus.send("orders", i, timeout=10)
                    break
                except aiobus.BusError:
                    await asyncio.sleep(0.1)
            confirmed.append(i)
            if len(confirmed) == KILL_AFTER:
                cluster[victim].kill()
                killed.set()

    async def consume(bus: aiobus.Bus) -> None:
        async for msg in bus.consume("orders", prefetch=32):
            seen.add(msg.body)
            if killed.is_set():
                after_kill.append(msg.body)
            await msg.ack()
            if len(seen) == MESSAGES:
                return

    async with aiobus.connect(url) as producer, aiobus.connect(url) as consumer:
        consuming = asyncio.create_task(consume(consumer))
        await asyncio.wait_for(produce(producer), 60)
        await asyncio.wait_for(consuming, 60)
    assert killed.is_set() and cluster[victim].proc.returncode is not None
    assert set(confirmed) <= seen  # no confirmed message lost
    assert after_kill  # the consumer carried on after the kill
