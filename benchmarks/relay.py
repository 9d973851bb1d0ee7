"""The minimal uvloop relay: the least work any Python broker in the middle can do.

It measures nothing itself; the "relay" rows of W1, W4 and W5 run through it. A client's
first byte names its side: b"P" (publisher, requester) or b"S" (subscriber, responder),
and the relay answers b"K" once the side is registered. After that every frame is a 4-byte
big-endian length and a body. The relay decodes each frame from a P connection and
forwards it to every S connection, and each frame from an S connection to every P
connection (so a responder's replies reach the requester).

It is as lean as such a broker gets: an `asyncio.Protocol` on uvloop, each frame's header
read in place (`struct.unpack_from`), no per-message objects, and the whole frames of one
`data_received` call sent with one `transport.write` per peer, so writes are flushed once
per loop turn, as redis does (networking.c, `putClientInPendingWriteQueue`). Backpressure:
when a peer's transport pauses writing, the relay pauses reading the senders.

Usage: python benchmarks/relay.py --socket PATH   (SIGTERM or SIGINT stops it)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import struct

import uvloop

HEADER = struct.Struct(">I")


class Hub:
    def __init__(self) -> None:
        self.sides: dict[bytes, list[RelayProtocol]] = {b"P": [], b"S": []}
        self.paused: set[RelayProtocol] = set()

    def pause_senders(self) -> None:
        for side in self.sides.values():
            for proto in side:
                proto.transport.pause_reading()

    def resume_senders(self) -> None:
        if not self.paused:
            for side in self.sides.values():
                for proto in side:
                    proto.transport.resume_reading()


class RelayProtocol(asyncio.Protocol):
    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.side = b""
        self.buffer = bytearray()
        self.transport: asyncio.Transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.side:
            self.side = bytes(buffer[:1])
            del buffer[:1]
            self.hub.sides[self.side].append(self)
            self.transport.write(b"K")  # registered: frames sent from now on are relayed
        pos, end = 0, len(buffer)
        while end - pos >= 4:  # cut every frame, as a broker must to route it
            (size,) = HEADER.unpack_from(buffer, pos)
            if end - pos - 4 < size:
                break
            pos += 4 + size
        if pos:
            # The whole frames of this read are contiguous: one write per peer.
            with memoryview(buffer) as view:
                out = bytes(view[:pos])  # one copy (a bytearray slice would be two)
            del buffer[:pos]
            for peer in self.hub.sides[b"S" if self.side == b"P" else b"P"]:
                peer.transport.write(out)

    def pause_writing(self) -> None:
        self.hub.paused.add(self)
        self.hub.pause_senders()

    def resume_writing(self) -> None:
        self.hub.paused.discard(self)
        self.hub.resume_senders()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.side:
            self.hub.sides[self.side].remove(self)
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
