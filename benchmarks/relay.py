"""The minimal uvloop relay: the least work any Python broker in the middle can do.

It measures nothing itself; the "relay" rows of W1, W4 and W5 run through it. Every frame
is a 4-byte big-endian length and a msgpack array. A client's first frame is the list of
subjects it subscribes to (possibly empty), and the relay answers b"K" once they are
registered. Every later frame is `[subject, body]` or `[subject, body, reply_to]`: the
relay decodes it and forwards the frame, unchanged, to every connection subscribed to
its subject. That is what the issue asks of this row ("a minimal uvloop relay process
that decodes and routes each frame"): a broker must at least read a frame's destination
and look it up; this one does nothing else. No wildcards, no checks, no state per message.

It is as lean as such a broker gets: an `asyncio.Protocol` on uvloop, each frame cut in
place (`struct.unpack_from`) and decoded with one `msgpack.unpackb`, and every peer's
frames of one `data_received` call sent with one `transport.write`, so writes are
flushed once per loop turn, as redis does (networking.c, `putClientInPendingWriteQueue`).
Backpressure: when a peer's transport pauses writing, the relay pauses reading everyone.

Usage: python benchmarks/relay.py --socket PATH   (SIGTERM or SIGINT stops it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import struct

import msgpack
import uvloop

HEADER = struct.Struct(">I")


class Hub:
    def __init__(self) -> None:
        self.routes: dict[str, list[RelayProtocol]] = {}
        self.connections: set[RelayProtocol] = set()
        self.paused: set[RelayProtocol] = set()

    def pause_senders(self) -> None:
        for proto in self.connections:
            proto.transport.pause_reading()

    def resume_senders(self) -> None:
        if not self.paused:
            for proto in self.connections:
                proto.transport.resume_reading()


class RelayProtocol(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.subjects: list[str] | None = None  # None until the registration frame
        self.buffer = bytearray()
        self.out: list[bytes] = []
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        self.hub.connections.add(self)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        routes, unpackb = self.hub.routes, msgpack.unpackb
        pos, end, dirty = 0, len(buffer), []
        with memoryview(buffer) as view:
            while end - pos >= 4:
                (size,) = HEADER.unpack_from(view, pos)
                start, stop = pos + 4, pos + 4 + size
                if stop > end:
                    break
                message = unpackb(view[start:stop])  # decode, as any broker must
                if self.subjects is None:
                    self.register(message)
                else:
                    frame = bytes(view[pos:stop])  # forwarded as is
                    for peer in routes.get(message[0], ()):  # route
                        if not peer.out:
                            dirty.append(peer)
                        peer.out.append(frame)
                pos = stop
        del buffer[:pos]
        for peer in dirty:  # one write per peer per read
            peer.transport.write(b"".join(peer.out))
            peer.out.clear()

    def register(self, subjects: list[str]) -> None:
        self.subjects = subjects
        for subject in subjects:
            self.hub.routes.setdefault(subject, []).append(self)
        self.transport.write(b"K")

    def pause_writing(self) -> None:
        self.hub.paused.add(self)
        self.hub.pause_senders()

    def resume_writing(self) -> None:
        self.hub.paused.discard(self)
        self.hub.resume_senders()

    def connection_lost(self, exc: Exception | None) -> None:
        for subject in self.subjects or ():
            self.hub.routes[subject].remove(self)
        self.hub.connections.discard(self)
        self.hub.paused.discard(self)
        self.hub.resume_senders()


async def serve(path: str) -> None:
    hub = Hub()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    server = await loop.create_unix_server(lambda: RelayProtocol(hub), path)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    uvloop.run(serve(parser.parse_args().socket))


if __name__ == "__main__":
    main()
