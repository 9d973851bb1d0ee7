"""W6, memory: what a broker holds per queued message and per idle connection.

Each measurement starts a fresh server (so nothing earlier is in its heap), waits for it,
reads its RSS (VmRSS from /proc/PID/status), then
- queued: a filler process puts N messages of 128 bytes on one queue with no consumer and
  makes sure the broker holds them all; after a 0.5 s settle the RSS is read again, and
  (after - before) / N - 128 is the cost of a queued message beyond its body;
- idle: a client process opens K connections (each completes its handshake: aiobus HELLO,
  a redis PING, a nats CONNECT + PING) and holds them; (after - before) / K is the cost
  of one connection.

Fillers: aiobus `send(confirm=False)` then one confirmed send and a `stats()` check (also
on a durable queue, the broker started with `--fsync always`: its RSS, and from STATS'
"journal" map the journal's bytes per message it holds); aiobus confirmed sends
(`send_nowait`, 4,096 in flight), which carry seqs and so fill the queue's deduplication
window (up to 100,000 ids): its difference from the first row is the window's cost;
redis list RPUSH with 1,000 values per command; redis stream XADD pipelined 256 at a time;
NATS JetStream (memory storage) core publishes to the stream's subject, then polling the
stream until it holds N. RSS includes allocator slack and, for nats-server, Go garbage not
yet collected: it is what the machine pays, which is the point. An aiobus broker's RSS
includes its children's: the fsync helper of a broker with a journal (a few MiB, constant,
so it does not change a per-message figure; it does the "RSS MiB" column).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import redis.asyncio as redis
from harness import Case, Control, Worker, run_case
from nats.js.api import StorageType, StreamConfig
from servers import Servers, rss_bytes

import aiobus
from aiobus.broker.queue_state import pack_message

SIZE = 128


async def fill_aiobus(ctl: Control, path: str, n: int, durable: bool = False) -> dict:
    body = os.urandom(SIZE)
    async with aiobus.connect(path) as bus:
        if durable:
            await bus.declare_queue("bench.mem", durable=True)
        for _ in range(n - 1):
            await bus.send("bench.mem", body, confirm=False)
        await bus.send("bench.mem", body)
        stats = await bus.stats()
        [first] = (await bus.peek("bench.mem", limit=1)).messages
    # The broker's stored form of one (docs/journal.md: what a Sent holds), for "÷ encoded"
    encoded = len(pack_message(first.id, "bench.mem", body, first.kind, first.headers or None,
                               first.timestamp))
    return {"held": stats["queues"]["bench.mem"]["ready"], "journal": stats.get("journal"),
            "encoded": encoded}


async def fill_aiobus_durable(ctl: Control, path: str, n: int) -> dict:
    return await fill_aiobus(ctl, path, n, durable=True)


async def fill_aiobus_confirmed(ctl: Control, path: str, n: int) -> dict:
    """Confirmed sends, 4,096 in flight: each carries a seq, so the queue's deduplication
    window holds the last min(n, 100,000) ids (the broker's default --dedup-size): the
    row's difference from "aiobus" is the window's cost, spread over n messages."""
    body = os.urandom(SIZE)
    async with aiobus.connect(path) as bus:
        in_flight: collections.deque[asyncio.Future[None]] = collections.deque()
        for _ in range(n):
            in_flight.append(bus.send_nowait("bench.mem", body))
            if len(in_flight) >= 4096:
                await in_flight.popleft()
        for fut in in_flight:
            await fut
        stats = await bus.stats()
    return {"held": stats["queues"]["bench.mem"]["ready"]}


async def fill_redis_list(ctl: Control, path: str, n: int) -> dict:
    r = redis.Redis(unix_socket_path=path)
    body = os.urandom(SIZE)
    for start in range(0, n, 1000):
        await r.rpush("bench.list", *([body] * min(1000, n - start)))
    held = await r.llen("bench.list")
    await r.aclose()
    return {"held": held}


async def fill_redis_stream(ctl: Control, path: str, n: int) -> dict:
    r = redis.Redis(unix_socket_path=path)
    body = os.urandom(SIZE)
    for start in range(0, n, 256):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(256, n - start)):
            pipe.xadd("bench.stream", {"b": body})
        await pipe.execute()
    held = await r.xlen("bench.stream")
    await r.aclose()
    return {"held": held}


async def fill_jetstream(ctl: Control, url: str, n: int) -> dict:
    nc = await nats.connect(url, max_reconnect_attempts=0, pending_size=8 * 1024 * 1024)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="MEM", subjects=["bench.mem"],
                                     storage=StorageType.MEMORY))  # fmt: skip
    body = os.urandom(SIZE)
    for _ in range(n):
        await nc.publish("bench.mem", body)
    await nc.flush(timeout=60)
    held, deadline = 0, time.monotonic() + 60
    while held < n and time.monotonic() < deadline:
        held = (await js.stream_info("MEM")).state.messages
        await asyncio.sleep(0.05)
    await nc.close()
    return {"held": held}


async def hold_connections(ctl: Control, kind: str, address: str, k: int) -> dict:
    async with contextlib.AsyncExitStack() as stack:
        for start in range(0, k, 50):
            batch = range(start, min(k, start + 50))
            if kind == "aiobus":
                for _ in batch:
                    await stack.enter_async_context(aiobus.connect(address))
            elif kind == "redis":
                for _ in batch:
                    conn = redis.UnixDomainSocketConnection(path=address)
                    await conn.connect()
                    await conn.send_command("PING")
                    await conn.read_response()
                    stack.push_async_callback(conn.disconnect)
            else:
                clients = await asyncio.gather(*(nats.connect(address, max_reconnect_attempts=0)
                                                  for _ in batch))  # fmt: skip
                for nc in clients:
                    stack.push_async_callback(nc.close)
        await ctl.ready()
        await ctl.wait_stop()
    return {}


def _settled_rss(pid: int, settle: float, *, children: bool = False) -> int:
    """``pid``'s RSS after ``settle`` seconds; with ``children``, plus its children's
    (the aiobus broker's fsync helper, a process of its own since session 11)."""
    time.sleep(settle)
    total = rss_bytes(pid)
    if children:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += rss_bytes(int(child))
    return total


def _start(servers: Servers, system: str) -> tuple[str, str]:
    """Start the one server a measurement needs: (process name, address)."""
    if system == "aiobus" or system.startswith("aiobus,"):
        return "aiobus", servers.start_aiobus()
    if system.startswith("aiobus durable"):
        return "aiobus-always", servers.start_aiobus("aiobus-always", fsync="always")
    if system.lower().startswith("redis"):
        return "redis", servers.start_redis()
    return "nats", servers.start_nats()


FILLERS: dict[str, Callable[..., Any]] = {
    "aiobus": fill_aiobus,
    "aiobus, confirmed sends (dedup window)": fill_aiobus_confirmed,
    "aiobus durable (fsync always)": fill_aiobus_durable,
    "Redis list": fill_redis_list,
    "Redis stream": fill_redis_stream,
    "NATS JetStream (memory)": fill_jetstream,
}
CONNECTORS = {"aiobus": "aiobus", "Redis": "redis", "NATS": "nats"}
JOURNAL_METRICS = ("journal B/msg", "÷ encoded", "Sent record B", "encoded B", "÷ body")


def queued_bytes(system: str, n: int) -> dict[str, float]:
    """Bytes per queued 128-byte message beyond the body, on a fresh server."""
    with Servers() as servers:
        name, address = _start(servers, system)
        pid = servers.pid(name)
        aiobus = name.startswith("aiobus")
        before = _settled_rss(pid, 0.3, children=aiobus)
        key = "url" if name == "nats" else "path"
        [result] = run_case(Case([Worker(FILLERS[system], {key: address, "n": n}, "step")],
                                 timeout=300.0))  # fmt: skip
        after = _settled_rss(pid, 0.5, children=aiobus)
    held = result["held"]
    if held <= 0:
        raise RuntimeError(f"{system}: the broker holds no messages")
    values = {"B/msg": (after - before) / held - SIZE, "held": held, "RSS MiB": after / 2**20}
    journal = result.get("journal")
    if system.startswith("aiobus durable") and journal and journal["live_messages"]:
        live = journal["live_messages"]
        record = journal["live_bytes"] / live
        encoded = result["encoded"]
        values.update({"journal B/msg": journal["bytes"] / live, "Sent record B": record,
                       "encoded B": encoded, "÷ encoded": journal["bytes"] / live / encoded,
                       "÷ body": journal["bytes"] / live / SIZE})  # fmt: skip
    return values


def connection_bytes(system: str, k: int) -> dict[str, float]:
    """Bytes per idle connection, on a fresh server."""
    kind = CONNECTORS[system]
    with Servers() as servers:
        name, address = _start(servers, kind)
        pid = servers.pid(name)
        before = _settled_rss(pid, 0.3)
        seen: list[int] = []
        case = Case([Worker(hold_connections, {"kind": kind, "address": address, "k": k},
                            "server")], timeout=120.0)  # fmt: skip
        case.on_ready = lambda: seen.append(_settled_rss(pid, 0.5))
        run_case(case)
    return {"B/conn": (seen[0] - before) / k, "RSS MiB": seen[0] / 2**20}
