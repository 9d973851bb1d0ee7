"""Durable queues against the real broker process: kill -9 and SIGTERM, then a restart on
the same data directory (issue 10)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
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


async def test_sigterm_lets_consumers_finish_and_says_what_it_keeps(
        broker_factory: Any, spawn_client: Any) -> None:
    # Not "b": spawn_client comes with a broker of its own under that name.
    broker = broker_factory("--drain-timeout", "10", name="d")
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        for i in range(10):
            await bus.send("jobs", i)
        for name, count in (("mem", 3), ("slow2", 2)):
            for i in range(count):
                await bus.send(name, i)
    worker = await spawn_client("""
        held = []
        try:
            async for msg in bus.consume("jobs", prefetch=4):
                held.append(msg)
                if len(held) == 4:
                    emit(holding=[m.body for m in held])
                    sys.stdin.readline()  # the test sends SIGTERM to the broker, then a line
                    for m in held:
                        await m.ack()
                    emit(acked=len(held))
        except aiobus.ConnectionLost as exc:
            emit(lost=exc.code)
    """, path=broker.path, reconnect=False)
    holding = (await worker.line())["holding"]
    assert holding == [0, 1, 2, 3]
    started = asyncio.get_running_loop().time()
    os.kill(broker.pid, signal.SIGTERM)
    deadline = started + 10
    while "for consumers to answer 4 leases" not in broker.log():  # it is draining
        assert asyncio.get_running_loop().time() < deadline, broker.log()
        await asyncio.sleep(0.01)
    assert worker.proc.stdin is not None
    worker.proc.stdin.write(b"go\n")  # the broker is draining: these acks still count
    await worker.proc.stdin.drain()
    assert await worker.line() == {"acked": 4}
    assert await worker.line() == {"lost": "shutdown"}
    assert await asyncio.to_thread(broker.proc.wait, 15) == 0
    assert asyncio.get_running_loop().time() - started < 8  # not the whole drain timeout
    log = broker.log()
    assert "keeping 6 messages in 1 durable queues: jobs 6" in log
    assert "discarding 5 messages in 2 in-memory queues: mem 3, slow2 2" in log

    broker = broker_factory(name="d")
    async with aiobus.connect(broker.path) as bus:
        async with bus.consume("jobs", prefetch=10) as consumer:
            again = await take(consumer, 6)
        assert [(m.body, m.attempt) for m in again] == [(i, 1) for i in range(4, 10)]


async def test_sigterm_fails_what_is_not_answered_within_the_drain_timeout(
        broker_factory: Any) -> None:
    broker = broker_factory("--drain-timeout", "0.5")
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        await bus.send("jobs", "stuck")
        async with bus.consume("jobs") as consumer:
            await take(consumer, 1)
            os.kill(broker.pid, signal.SIGTERM)
            assert await asyncio.to_thread(broker.proc.wait, 15) == 0
    assert "1 leases still held after 0.5 s" in broker.log()
    broker = broker_factory()
    async with aiobus.connect(broker.path) as bus, bus.consume("jobs") as consumer:
        (msg,) = await take(consumer, 1)
        assert (msg.body, msg.attempt) == ("stuck", 2)


@pytest.fixture
def small_disk(short_tmp: Path) -> Any:
    """A 4 MiB tmpfs: a disk that really fills up (needs mount rights: root here)."""
    mount = short_tmp / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                          capture_output=True, text=True, timeout=20, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=20,
                       check=False)


async def test_a_full_disk_refuses_durable_sends_until_space_returns(
        broker_factory: Any, small_disk: Path) -> None:
    broker = broker_factory("--data-dir", str(small_disk / "data"), name="full")
    filler = small_disk / "filler"
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        await bus.send("memory", "in memory: unaffected")
        confirmed = []
        with filler.open("wb") as f:  # leave ~64 KiB for the journal
            free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
            f.write(b"\0" * max(0, free - 64 * 1024))
        with pytest.raises((aiobus.JournalError, aiobus.ConnectionLost)) as failed:
            for i in range(1000):
                await bus.send("jobs", i.to_bytes(4, "big") * 256)  # 1 KiB each
                confirmed.append(i)
        if isinstance(failed.value, aiobus.ConnectionLost):
            assert failed.value.code == "journal"
    async with aiobus.connect(broker.path) as bus:
        with pytest.raises(aiobus.JournalError) as refused:
            await bus.send("jobs", b"x")
        assert refused.value.code == "journal" and "ENOSPC" in str(refused.value)
        await bus.send("memory", "still fine")  # everything else carries on
        assert (await queue_stats(bus, "memory"))["ready"] == 2
        filler.unlink()  # space returns: the broker notices by itself within a second
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            try:
                await bus.send("jobs", b"after")
                break
            except aiobus.JournalError:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.1)
    assert broker.log().count("refusing sends to durable queues") == 1
    broker.terminate()
    broker = broker_factory("--data-dir", str(small_disk / "data"), name="full")
    async with aiobus.connect(broker.path) as bus:
        stats = await queue_stats(bus, "jobs")
        async with bus.consume("jobs", prefetch=100) as c:
            got = [int.from_bytes(m.raw_body[:4], "big") if m.raw_body != b"after" else -1
                   for m in await take(c, stats["ready"])]
    assert set(confirmed) <= set(got)  # every confirmed send survived
    assert -1 in got


async def test_a_damaged_journal_stops_the_broker_until_repair(broker_factory: Any,
                                                               short_tmp: Path) -> None:
    broker = broker_factory(name="hurt")
    async with aiobus.connect(broker.path) as bus:
        await bus.declare_queue("jobs", durable=True)
        for i in range(200):
            await bus.send("jobs", i.to_bytes(2, "big") * 50)
    broker.terminate()
    (segment,) = sorted((short_tmp / "hurt.data" / "journal").glob("*.seg"))
    data = bytearray(segment.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0x10  # one flipped bit in the middle: not a torn tail
    segment.write_bytes(bytes(data))

    refused = subprocess.run(
        [sys.executable, "-m", "aiobus.cli.broker", "--socket", str(short_tmp / "x.sock"),
         "--data-dir", str(short_tmp / "hurt.data")],
        capture_output=True, text=True, timeout=20, check=False)
    assert refused.returncode == 1
    assert segment.name in refused.stderr and "damaged at offset" in refused.stderr
    assert "--repair" in refused.stderr

    broker = broker_factory("--repair", name="hurt")
    log = broker.log()
    assert "moved aside" in log and "messages lost (queue, seq): [('jobs'," in log
    async with aiobus.connect(broker.path) as bus:
        ready = (await queue_stats(bus, "jobs"))["ready"]
        assert 190 <= ready < 200  # the damaged record's message is lost, the rest kept
