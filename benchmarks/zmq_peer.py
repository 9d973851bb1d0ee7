"""ZeroMQ rows (pyzmq's `zmq.asyncio` on uvloop, over ipc://), driven as the zguide and
pyzmq docs advise: no broker, libzmq batches small messages on its I/O thread, and
`zmq.COPY_THRESHOLD` (64 KiB) makes large sends zero-copy on its own.

- PUB/SUB (W1, W2, W5): the PUB binds, SUBs connect and subscribe to everything. The
  publisher sends on a plain (shadow) socket, which never blocks at HWM 0; a subscriber
  awaits `poll()` and then drains with non-blocking `recv`, so the event loop is visited
  once per burst rather than once per message (a zmq.asyncio future per message costs
  more than the message: 47k against 700k msgs/s here at 128 B).
  High-water marks are 0 (unbounded) on both ends, since a PUB drops at its HWM and the run
  counts deliveries. The "slow joiner" problem (a subscription reaches the PUB a moment
  after connect) is handled by the publisher sending 1-byte warm-up messages until go;
  each subscriber is ready once one arrived and skips the rest.
- REQ/REP (W4): a REP server echoes, a REQ client times each round trip.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import zmq
import zmq.asyncio
from harness import Case, Control, Worker

WARMUP = b"w"


async def publisher(ctl: Control, address: str, n: int, size: int) -> dict:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.bind(address)
    body = os.urandom(size)
    ctl.send_ready()
    while not ctl.go_nowait():  # until every subscriber has heard us (see the docstring)
        await sock.send(WARMUP)
        await asyncio.sleep(0.002)
    fast = zmq.Socket.shadow(sock.underlying)  # with HWM 0 a send never blocks
    first = time.monotonic_ns()
    for _ in range(n):
        fast.send(body)
    sock.close(linger=30_000)  # linger: let libzmq deliver what it has queued
    ctx.term()
    return {"first_ns": first, "sent": n}


async def subscriber(ctl: Control, address: str, n: int) -> dict:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.connect(address)
    while await sock.recv() != WARMUP:
        pass
    await ctl.ready()

    fast = zmq.Socket.shadow(sock.underlying)

    async def loop() -> None:
        while True:
            await sock.poll(flags=zmq.POLLIN)
            got = 0
            try:
                while True:  # drain what has arrived without a future per message
                    if len(fast.recv(zmq.NOBLOCK)) > 1:
                        got += 1
            except zmq.Again:
                pass
            if got:
                ctl.count += got
                ctl.last_ns = time.monotonic_ns()

    await ctl.run_until(loop(), n, idle=2.0)
    sock.close(linger=0)
    ctx.term()
    return ctl.received()


async def rep_server(ctl: Control, address: str) -> dict:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.REP)
    sock.bind(address)
    await ctl.ready()

    async def loop() -> None:
        while True:
            await sock.send(await sock.recv())

    serving = asyncio.ensure_future(loop())
    await ctl.wait_stop()
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    sock.close(linger=0)
    ctx.term()
    return {}


async def req_client(ctl: Control, address: str, n: int, size: int, warmup: int) -> dict:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.REQ)
    sock.connect(address)
    body = os.urandom(size)
    await ctl.ready()
    latencies = []
    for i in range(warmup + n):
        start = time.perf_counter_ns()
        await sock.send(body)
        await sock.recv()
        if i >= warmup:
            latencies.append(time.perf_counter_ns() - start)
    sock.close(linger=0)
    ctx.term()
    return {"latencies": latencies}


def topic_case(env: Any, n: int, size: int, subscribers: int = 1) -> Case:
    address = f"ipc://{env.path('zmq')}"
    subs = [Worker(subscriber, {"address": address, "n": n}, "consumer")
            for _ in range(subscribers)]  # fmt: skip
    pub = Worker(publisher, {"address": address, "n": n, "size": size})
    return Case([*subs, pub], expected=n * subscribers)


def rpc_case(env: Any, n: int, size: int, warmup: int) -> Case:
    address = f"ipc://{env.path('zmq')}"
    return Case([
        Worker(rep_server, {"address": address}, "server"),
        Worker(req_client, {"address": address, "n": n, "size": size, "warmup": warmup}),
    ])  # fmt: skip
