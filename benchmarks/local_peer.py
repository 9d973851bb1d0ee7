"""Brokerless baselines: multiprocessing.Queue, a bare Unix socket, and the minimal relay.

- "mp.Queue": `multiprocessing.Queue.put` / `.get`, one process each side (a pipe plus a
  feeder thread that pickles); the standard library's answer to "send to another process".
- "limit": two uvloop processes joined by one Unix socket, frames of a 4-byte big-endian
  length plus body, no broker. The producer packs frames into a 64 KiB buffer per write
  (what a good client library does); the consumer, an `asyncio.Protocol`, cuts every frame
  and makes its body a `bytes` object, as a client must before handing it to user code.
  No broker can beat this, so it is the ceiling for every other row.
- "relay": the same clients through `relay.py`, the least a Python broker can do.

W4's limit and relay rows echo each request frame back (limit: the server echoes;
relay: a responder behind the relay echoes) and time each round trip.
"""

from __future__ import annotations

import asyncio
import os
import queue
import struct
import time
from typing import Any

from harness import CTX, Case, Control, Worker

HEADER = struct.Struct(">I")
CHUNK = 64 * 1024


class FrameProtocol(asyncio.Protocol):
    """Cuts frames; counts them, or echoes them, or resolves the pending request.

    With a side (b"P" or b"S") it first registers with the relay and waits for b"K".
    """

    def __init__(self, ctl: Control | None = None, echo: bool = False, side: bytes = b"") -> None:
        self.ctl = ctl
        self.echo = echo
        self.side = side
        self.buffer = bytearray()
        self.transport: Any = None
        self.waiter: asyncio.Future[bytes] | None = None
        loop = asyncio.get_running_loop()
        self.registered = loop.create_future()
        self.lost = loop.create_future()
        if not side:
            self.registered.set_result(None)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.side:
            transport.write(self.side)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.registered.done():
            if buffer[:1] != b"K":
                raise RuntimeError("relay did not register the connection")
            del buffer[:1]
            self.registered.set_result(None)
        pos, end, bodies = 0, len(buffer), []
        with memoryview(buffer) as view:  # one copy per body, not two
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(view, pos)
                if end - pos - 4 < size:
                    break
                bodies.append(bytes(view[pos + 4 : pos + 4 + size]))
                pos += 4 + size
        if not bodies:
            return
        if self.echo:
            self.transport.write(bytes(buffer[:pos]))
        elif self.waiter is not None:
            self.waiter.set_result(bodies[-1])
            self.waiter = None
        elif self.ctl is not None:
            ctl = self.ctl
            ctl.count += len(bodies)
            ctl.last_ns = time.monotonic_ns()
        del buffer[:pos]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    async def request(self, frame: bytes) -> bytes:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(frame)
        return await self.waiter


async def _open(path: str, side: bytes, ctl: Control | None = None, echo: bool = False) -> Any:
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(lambda: FrameProtocol(ctl, echo, side), path)
    await proto.registered
    return proto


async def _listen(path: str, ctl: Control | None = None, echo: bool = False) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: FrameProtocol(ctl, echo), path)


async def frame_producer(ctl: Control, path: str, side: bytes, n: int, size: int) -> dict:
    await ctl.ready()  # connect after go: the limit row's consumer listens only once ready
    reader, writer = await asyncio.open_unix_connection(path)
    if side:
        writer.write(side)
        await reader.readexactly(1)
    head, body = HEADER.pack(size), os.urandom(size)
    frame = head + body
    buffer = bytearray()
    ctl.first_ns = time.monotonic_ns()
    for _ in range(n):
        if size >= CHUNK:  # large: no copy into a buffer of ours
            writer.writelines((head, body))
            await writer.drain()
            continue
        buffer += frame
        if len(buffer) >= CHUNK:
            writer.write(buffer)
            buffer = bytearray()
            await writer.drain()
    writer.write(buffer)
    await writer.drain()
    writer.close()
    return {"first_ns": ctl.first_ns, "sent": n}


async def frame_consumer(ctl: Control, path: str, side: bytes, n: int, listen: bool) -> dict:
    if listen:  # the limit row: the consumer is the server end of the one socket
        server = await _listen(path, ctl)
        await ctl.ready()
        await ctl.run_until(asyncio.sleep(3600), n, idle=2.0)
        server.close()
    else:
        proto = await _open(path, side, ctl)
        await ctl.ready()
        await ctl.run_until(proto.lost, n, idle=2.0)
        proto.transport.close()
    return ctl.received()


async def echo_server(ctl: Control, path: str, side: bytes) -> dict:
    if side:
        proto = await _open(path, side, echo=True)
        closing = proto.transport
    else:
        closing = await _listen(path, echo=True)
    await ctl.ready()
    await ctl.wait_stop()
    closing.close()
    return {}


async def frame_requester(ctl: Control, path: str, side: bytes, n: int, size: int,
                          warmup: int) -> dict:  # fmt: skip
    await ctl.ready()
    proto = await _open(path, side)
    frame = HEADER.pack(size) + os.urandom(size)
    latencies = []
    for i in range(warmup + n):
        start = time.perf_counter_ns()
        await proto.request(frame)
        if i >= warmup:
            latencies.append(time.perf_counter_ns() - start)
    proto.transport.close()
    return {"latencies": latencies}


def mpq_producer(ctl: Control, q: Any, n: int, size: int) -> dict:
    body = os.urandom(size)
    ctl.ready_sync()
    first = time.monotonic_ns()
    for _ in range(n):
        q.put(body)
    q.close()
    q.join_thread()
    return {"first_ns": first, "sent": n}


def mpq_consumer(ctl: Control, q: Any, n: int) -> dict:
    ctl.ready_sync()
    try:
        for _ in range(n):
            q.get(timeout=5.0)
            ctl.count += 1
            ctl.last_ns = time.monotonic_ns()
    except queue.Empty:
        pass
    return ctl.received()


def topic_case(kind: str, env: Any, n: int, size: int, subscribers: int = 1) -> Case:
    """W1/W5 through no broker: kind is "mpq", "limit" or "relay"."""
    if kind == "mpq":
        q = CTX.Queue()
        return Case([Worker(mpq_consumer, {"q": q, "n": n}, "consumer"),
                     Worker(mpq_producer, {"q": q, "n": n, "size": size})])  # fmt: skip
    if kind == "limit":
        path = env.path("limit")
        consumer = Worker(frame_consumer, {"path": path, "side": b"", "n": n, "listen": True},
                          "consumer")  # fmt: skip
        return Case([consumer, Worker(frame_producer,
                                      {"path": path, "side": b"", "n": n, "size": size})])
    path = env.relay_socket
    consumers = [Worker(frame_consumer, {"path": path, "side": b"S", "n": n, "listen": False},
                        "consumer") for _ in range(subscribers)]  # fmt: skip
    producer = Worker(frame_producer, {"path": path, "side": b"P", "n": n, "size": size})
    return Case([*consumers, producer], expected=n * subscribers)


def rpc_case(kind: str, env: Any, n: int, size: int, warmup: int) -> Case:
    """W4: "limit" echoes over one socket, "relay" echoes behind the relay."""
    path, side = (env.path("echo"), b"") if kind == "limit" else (env.relay_socket, b"S")
    client_side = b"" if kind == "limit" else b"P"
    return Case([
        Worker(echo_server, {"path": path, "side": side}, "server"),
        Worker(frame_requester, {"path": path, "side": client_side, "n": n, "size": size,
                                 "warmup": warmup}),
    ])  # fmt: skip
