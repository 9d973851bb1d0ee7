"""Durable queues against the real broker process: kill -9 and SIGTERM, then a restart on
the same data directory (issue 10)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest

import aiobus

from .conftest import BrokerProcess, queue_stats

pytestmark = pytest.mark.asyncio


async def take(consumer: Any, n: int, timeout: float = 10.0) -> list[aiobus.Message]:
    got = []
    for _ in range(n):
        got.append(await asyncio.wait_for(consumer.__anext__(), timeout))
    return got


def restart(broker_factory: Any, old: BrokerProcess, how: signal.Signals,
            *extra: str) -> BrokerProcess:
    os.kill(old.pid, how)
    old.proc.wait(10)
    return broker_factory(*extra)  # same name: same socket, same data directory


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "sigterm"])
async def test_a_durable_queue_survives_the_broker(broker_factory: Any,
                                                   how: signal.Signals) -> None:
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        await bus.send("memory", "lost with the broker")
        for i in range(100):
            await bus.send("jobs", i, headers={"n": str(i)})
        async with bus.consume("jobs", prefetch=10) as consumer:
            first = await take(consumer, 10)
            for msg in first[:5]:
                await msg.ack()
            for msg in first[5:8]:
                await msg.nack(delay=3600)
            refill = await take(consumer, 8)  # the freed slots take 8 more
            held = first[8:] + refill
            ids = {msg.body: msg.id for msg in first + refill}
            broker = restart(broker_factory, broker, how)

    async with aiobus.connect(broker.path) as bus:
        stats = (await bus.stats())["queues"]
        assert "memory" not in stats  # an in-memory queue is gone with the broker
        assert stats["jobs"]["settings"]["durable"] is True
        assert (stats["jobs"]["ready"], stats["jobs"]["delayed"]) == (92, 3)
        async with bus.consume("jobs", prefetch=100) as consumer:
            again = await take(consumer, 92)
            for msg in again:
                msg.ack_nowait()
        bodies = [msg.body for msg in again]
        assert sorted(bodies) == sorted(set(range(100)) - set(range(8)))
        attempts = {msg.body: msg.attempt for msg in again}
        # A SIGTERM ends the held leases by closing their connection, a kill -9 by the
        # journal's own inference: either way one failed attempt each.
        assert {attempts[m.body] for m in held} == {2}
        assert {attempts[b] for b in bodies if b >= 18} == {1}
        assert all(ids[m.body] == m.id for m in again if m.body in ids)
        assert all(m.headers["n"] == str(m.body) for m in again)
        await bus.ping()
        assert (await queue_stats(bus, "jobs"))["ready"] == 0


async def test_a_second_broker_on_the_same_data_directory_is_refused(
        broker: BrokerProcess, short_tmp: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "aiobus.cli.broker", "--socket", str(short_tmp / "other.sock"),
        "--data-dir", str(broker.log_path.with_suffix(".data")),
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 1
    assert b"in use by another broker" in err and str(broker.pid).encode() in err
