"""Brokerless baselines: multiprocessing.Queue, a bare Unix socket, and the minimal relay.

- "mp.Queue": `multiprocessing.Queue.put` / `.get`, one process each side (a pipe plus a
  feeder thread that pickles); the standard library's answer to "send to another process".
- "limit": two uvloop processes joined by one Unix socket, frames of a 4-byte big-endian
  length plus body, no broker. The producer packs frames into a 64 KiB buffer per write
  (what a good client library does); the consumer, an `asyncio.Protocol`, cuts every frame
  and makes its body a `bytes` object, as a client must before handing it to user code.
  No broker can beat this, so it is the ceiling for every other row.
- "relay": the clients through `relay.py`, the least a Python broker can do. Their frames
  are msgpack `[subject, body]`: the producer subscribes to nothing, the consumer to the
  subject, and the consumer decodes each frame to get its body.

W4's limit and relay rows echo each request back (limit: the server echoes the frame;
relay: a responder behind the relay answers `[reply_to, body]`) and time each round trip.
"""

from __future__ import annotations

import asyncio
import os
import queue
import struct
import time
from typing import Any

import msgpack
from harness import CTX, Case, Control, Worker

HEADER = struct.Struct(">I")
CHUNK = 64 * 1024
SUBJECT = "bench"  # the relay rows' one subject


class FrameProtocol(asyncio.Protocol):
    """Cuts frames; counts them, or echoes them, or resolves the pending request.

    With `subjects` (a list, possibly empty) it talks to the relay: it registers them,
    waits for b"K", and decodes every frame's msgpack `[subject, body, ...]` as a client
    library must; the echo then answers `[reply_to, body]`. Without, frames are raw bodies.
    """

    def __init__(self, ctl: Control | None = None, echo: bool = False,
                 subjects: list[str] | None = None) -> None:  # fmt: skip
        self.ctl = ctl
        self.echo = echo
        self.subjects = subjects
        self.buffer = bytearray()
        self.transport: Any = None
        self.waiter: asyncio.Future[bytes] | None = None
        loop = asyncio.get_running_loop()
        self.registered = loop.create_future()
        self.lost = loop.create_future()
        if subjects is None:
            self.registered.set_result(None)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.subjects is not None:
            transport.write(frame_of(msgpack.packb(self.subjects)))

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.registered.done():
            if buffer[:1] != b"K":
                raise RuntimeError("relay did not register the connection")
            del buffer[:1]
            self.registered.set_result(None)
        decode = self.subjects is not None
        pos, end, bodies = 0, len(buffer), []
        with memoryview(buffer) as view:  # one copy per body, not two
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(view, pos)
                if end - pos - 4 < size:
                    break
                start, stop = pos + 4, pos + 4 + size
                bodies.append(msgpack.unpackb(view[start:stop]) if decode
                              else bytes(view[start:stop]))  # fmt: skip
                pos += 4 + size
        if not bodies:
            return
        if self.echo:
            if decode:  # a responder behind the relay answers to the request's reply_to
                self.transport.write(b"".join(
                    frame_of(msgpack.packb([m[2], m[1]])) for m in bodies))  # fmt: skip
            else:
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


def frame_of(payload: bytes) -> bytes:
    return HEADER.pack(len(payload)) + payload


async def _open(path: str, subjects: list[str] | None, ctl: Control | None = None,
                echo: bool = False) -> Any:  # fmt: skip
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_unix_connection(
        lambda: FrameProtocol(ctl, echo, subjects), path)  # fmt: skip
    await proto.registered
    return proto


async def _listen(path: str, ctl: Control | None = None, echo: bool = False) -> Any:
    loop = asyncio.get_running_loop()
    return await loop.create_unix_server(lambda: FrameProtocol(ctl, echo), path)


async def frame_producer(ctl: Control, path: str, relay: bool, n: int, size: int) -> dict:
    await ctl.ready()  # connect after go: the limit row's consumer listens only once ready
    reader, writer = await asyncio.open_unix_connection(path)
    body = os.urandom(size)
    if relay:  # register no subjects; every frame is [subject, body]
        writer.write(frame_of(msgpack.packb([])))
        await reader.readexactly(1)
        payload = msgpack.packb([SUBJECT, body])
    else:
        payload = body
    head, body = HEADER.pack(len(payload)), payload
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


async def frame_consumer(ctl: Control, path: str, n: int, listen: bool) -> dict:
    if listen:  # the limit row: the consumer is the server end of the one socket
        server = await _listen(path, ctl)
        await ctl.ready()
        await ctl.run_until(asyncio.sleep(3600), n, idle=2.0)
        server.close()
    else:
        proto = await _open(path, [SUBJECT], ctl)
        await ctl.ready()
        await ctl.run_until(proto.lost, n, idle=2.0)
        proto.transport.close()
    return ctl.received()


async def echo_server(ctl: Control, path: str, relay: bool) -> dict:
    if relay:
        proto = await _open(path, ["echo"], echo=True)
        closing = proto.transport
    else:
        closing = await _listen(path, echo=True)
    await ctl.ready()
    await ctl.wait_stop()
    closing.close()
    return {}


async def frame_requester(ctl: Control, path: str, relay: bool, n: int, size: int,
                          warmup: int) -> dict:  # fmt: skip
    await ctl.ready()
    body = os.urandom(size)
    if relay:  # requests go to "echo" and name the subject this client listens on
        proto = await _open(path, ["reply"])
        frame = frame_of(msgpack.packb(["echo", body, "reply"]))
    else:
        proto = await _open(path, None)
        frame = frame_of(body)
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
        consumer = Worker(frame_consumer, {"path": path, "n": n, "listen": True}, "consumer")
        return Case([consumer, Worker(frame_producer,
                                      {"path": path, "relay": False, "n": n, "size": size})])
    path = env.relay_socket
    consumers = [Worker(frame_consumer, {"path": path, "n": n, "listen": False}, "consumer")
                 for _ in range(subscribers)]  # fmt: skip
    producer = Worker(frame_producer, {"path": path, "relay": True, "n": n, "size": size})
    return Case([*consumers, producer], expected=n * subscribers)


def rpc_case(kind: str, env: Any, n: int, size: int, warmup: int) -> Case:
    """W4: "limit" echoes over one socket, "relay" echoes behind the relay."""
    relay = kind == "relay"
    path = env.relay_socket if relay else env.path("echo")
    return Case([
        Worker(echo_server, {"path": path, "relay": relay}, "server"),
        Worker(frame_requester, {"path": path, "relay": relay, "n": n, "size": size,
                                 "warmup": warmup}),
    ])  # fmt: skip
