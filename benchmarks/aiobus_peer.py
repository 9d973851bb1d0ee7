"""aiobus rows (the aiobus client on uvloop against `aiobus-broker` on a Unix socket).

Driven the fastest way its API offers, each choice matching what the peers get:
- Pub/sub (W1, W2, W5): `bus.publish` buffers and the client flushes once per loop turn or
  every 64 KiB. Subscribers enter `async with bus.subscribe(...)`, which returns once the
  broker has registered them (ready), with `max_pending` raised to the run's count so a
  burst is buffered rather than dropped, as the peers' limits are raised (broker drops,
  if any, are counted from `msg.dropped` and reported).
- Queues (W3, W5, W7): the producer sends with `confirm=False` (returns once buffered,
  like nats' `publish` or a pipelined XADD) and makes the last send confirmed, so it ends
  only when the broker has accepted everything. Consumers use `prefetch=256` (the fetch
  and COUNT the peers get) and answer each message three ways, a row each: the README's
  worker loop `async with msg.process():`, `await msg.ack()`, and `msg.ack_nowait()`. All
  three queue the ack for the connection's next ACK_MANY and do not wait for the broker,
  as nats' `msg.ack()` and aio-pika's `message.ack()` do not (W5 and W7 use
  `ack_nowait()`).
- Confirmed and durable queues (W3's durable rows): the producer keeps `WINDOW` confirmed
  sends in flight (`send_nowait` futures in a sliding window, the oldest awaited once it
  is full), as many as the Redis pipeline and the RabbitMQ confirm window hold; the
  queue is declared `durable=True` on a broker started with `--fsync always|batch|never`,
  or not (the in-memory row with the same producer). Consumers as above.
- Request/reply (W4): `bus.request`, a responder doing `await msg.reply(body)` (which also
  acks).
- W7 (many clients): 100 connections over 4 producer processes, each `await bus.send`
  (confirmed) in a loop with the send time in the body; 10 consumers over 5 processes
  take the latency from it at receipt.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import struct
import time
from typing import Any

from harness import Case, Control, Worker

import aiobus

PREFETCH = 256
WINDOW = 256  # confirmed sends in flight (durable rows)
STAMP = struct.Struct("<q")


async def publisher(ctl: Control, path: str, topic: str, n: int, size: int) -> dict:
    body = os.urandom(size)
    async with aiobus.connect(path) as bus:
        await ctl.ready()
        first = time.monotonic_ns()
        for _ in range(n):
            await bus.publish(topic, body)
        await bus.ping()  # everything before it was written and read by the broker
    return {"first_ns": first, "sent": n}


async def subscriber(ctl: Control, path: str, topic: str, n: int) -> dict:
    async with aiobus.connect(path) as bus:
        sub = bus.subscribe(topic, max_pending=max(1024, n))
        async with sub:
            await ctl.ready()

            async def loop() -> None:
                async for _msg in sub:
                    ctl.count += 1
                    ctl.last_ns = time.monotonic_ns()

            await ctl.run_until(loop(), n, idle=2.0)
            dropped = sub.dropped
    return ctl.received(dropped=dropped)


async def producer(ctl: Control, path: str, queue: str, n: int, size: int) -> dict:
    body = os.urandom(size)
    async with aiobus.connect(path) as bus:
        await bus.declare_queue(queue)
        await ctl.ready()
        first = time.monotonic_ns()
        for _ in range(n - 1):
            await bus.send(queue, body, confirm=False)
        await bus.send(queue, body)  # confirmed: the broker has accepted all n
    return {"first_ns": first, "sent": n}


async def confirmed_producer(ctl: Control, path: str, queue: str, n: int, size: int,
                             durable: bool) -> dict:  # fmt: skip
    body = os.urandom(size)
    async with aiobus.connect(path) as bus:
        await bus.declare_queue(queue, durable=durable)
        await ctl.ready()
        first = time.monotonic_ns()
        window: collections.deque[asyncio.Future[None]] = collections.deque()
        for _ in range(n):
            window.append(bus.send_nowait(queue, body))
            if len(window) >= WINDOW:
                await window.popleft()
        for fut in window:
            await fut
    return {"first_ns": first, "sent": n}


async def consumer(ctl: Control, path: str, queue: str, n: int, ack: str = "nowait",
                   durable: bool = False) -> dict:  # fmt: skip
    """``ack``: "process" (the README's worker loop, ``async with msg.process()``),
    "await" (``await msg.ack()``), "confirm" (``await msg.ack(confirm=True)``: a round
    trip per message, as JetStream's ``ack_sync()``) or "nowait" (``msg.ack_nowait()``)."""
    async with aiobus.connect(path) as bus:
        await bus.declare_queue(queue, durable=durable)
        await ctl.ready()

        async def loop() -> None:
            async for msg in bus.consume(queue, prefetch=PREFETCH):
                if ack == "process":
                    async with msg.process():
                        ctl.count += 1
                elif ack == "await":
                    await msg.ack()
                    ctl.count += 1
                elif ack == "confirm":
                    await msg.ack(confirm=True)
                    ctl.count += 1
                else:
                    msg.ack_nowait()
                    ctl.count += 1
                ctl.last_ns = time.monotonic_ns()

        await ctl.run_until(loop(), n, shared=True)
        await bus.ping()  # the last acks reached the broker
    return ctl.received()


async def responder(ctl: Control, path: str, queue: str) -> dict:
    async with aiobus.connect(path) as bus:
        await bus.declare_queue(queue)

        async def loop() -> None:
            async for msg in bus.consume(queue):
                await msg.reply(msg.body)

        serving = asyncio.ensure_future(loop())
        await ctl.ready()
        await ctl.wait_stop()
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
    return {}


async def requester(ctl: Control, path: str, queue: str, n: int, size: int,
                    warmup: int) -> dict:  # fmt: skip
    body = os.urandom(size)
    latencies = []
    async with aiobus.connect(path) as bus:
        await ctl.ready()
        for i in range(warmup + n):
            start = time.perf_counter_ns()
            await bus.request(queue, body, timeout=5.0)
            if i >= warmup:
                latencies.append(time.perf_counter_ns() - start)
    return {"latencies": latencies}


async def many_producer(ctl: Control, path: str, queue: str, conns: int, each: int,
                        size: int) -> dict:  # fmt: skip
    pad = os.urandom(size - STAMP.size)
    async with contextlib.AsyncExitStack() as stack:
        buses = [await stack.enter_async_context(aiobus.connect(path)) for _ in range(conns)]
        await buses[0].declare_queue(queue)
        await ctl.ready()
        first = time.monotonic_ns()

        async def one(bus: Any) -> None:
            for _ in range(each):
                await bus.send(queue, STAMP.pack(time.monotonic_ns()) + pad)

        async with asyncio.TaskGroup() as tg:
            for bus in buses:
                tg.create_task(one(bus))
    return {"first_ns": first, "sent": conns * each}


async def many_consumer(ctl: Control, path: str, queue: str, conns: int, n: int) -> dict:
    latencies: list[int] = []
    async with contextlib.AsyncExitStack() as stack:
        buses = [await stack.enter_async_context(aiobus.connect(path)) for _ in range(conns)]
        await buses[0].declare_queue(queue)
        await ctl.ready()

        async def one(bus: Any) -> None:
            async for msg in bus.consume(queue, prefetch=PREFETCH):
                now = time.monotonic_ns()
                latencies.append(now - STAMP.unpack_from(msg.body)[0])
                msg.ack_nowait()
                ctl.count += 1
                ctl.last_ns = now

        async def all_of_them() -> None:
            async with asyncio.TaskGroup() as tg:
                for bus in buses:
                    tg.create_task(one(bus))

        await ctl.run_until(all_of_them(), n, shared=True)
    return ctl.received(latencies=latencies)


def topic_case(env: Any, n: int, size: int, subscribers: int = 1,
               path: str | None = None) -> Case:
    """``path``: another place to connect, e.g. a nats:// URL (the NATS backend's rows)."""
    topic = f"bench.t{env.next_id()}"
    path = path or env.aiobus_socket
    subs = [Worker(subscriber, {"path": path, "topic": topic, "n": n}, "consumer")
            for _ in range(subscribers)]  # fmt: skip
    pub = Worker(publisher, {"path": path, "topic": topic, "n": n, "size": size})
    return Case([*subs, pub], expected=n * subscribers)


def queue_case(env: Any, n: int, size: int, consumers: int = 1, ack: str = "nowait",
               path: str | None = None) -> Case:
    queue = f"bench.q{env.next_id()}"
    path = path or env.aiobus_socket
    workers = [Worker(consumer, {"path": path, "queue": queue, "n": n, "ack": ack},
                      "consumer") for _ in range(consumers)]  # fmt: skip
    workers.append(Worker(producer, {"path": path, "queue": queue, "n": n, "size": size}))
    return Case(workers)


def confirmed_queue_case(env: Any, n: int, size: int, consumers: int = 1,
                         fsync: str = "", ack: str = "nowait",
                         path: str | None = None, compiled: bool = False) -> Case:  # fmt: skip
    """W3's durable rows: `WINDOW` confirmed sends in flight; with `fsync`, a durable queue
    on the broker started with that policy (``compiled``: the compiled build's), else a
    plain queue on the in-memory one (or at ``path``). ``ack`` as for :func:`consumer`
    (the README's loop: "process")."""
    queue = f"bench.dq{env.next_id()}"
    durables = env.aiobus_durable_compiled if compiled else env.aiobus_durable
    if fsync and fsync not in durables:
        raise RuntimeError(f"no broker for --fsync {fsync} (see the run's log)")
    path = durables[fsync] if fsync else path or env.aiobus_socket
    durable = bool(fsync)
    workers = [Worker(consumer, {"path": path, "queue": queue, "n": n, "ack": ack,
                                 "durable": durable}, "consumer") for _ in range(consumers)]
    workers.append(Worker(confirmed_producer, {"path": path, "queue": queue, "n": n,
                                               "size": size, "durable": durable}))
    return Case(workers, cleanup=[Worker(delete_queue, {"path": path, "queue": queue},
                                         "step")])  # fmt: skip


async def delete_queue(ctl: Control, path: str, queue: str) -> dict:
    """After a durable case: the journal forgets the queue, so the next starts clean."""
    async with aiobus.connect(path) as bus:
        await bus.delete_queue(queue)
    return {}


def rpc_case(env: Any, n: int, size: int, warmup: int, path: str | None = None) -> Case:
    queue = f"bench.rpc{env.next_id()}"
    path = path or env.aiobus_socket
    return Case([
        Worker(responder, {"path": path, "queue": queue}, "server"),
        Worker(requester, {"path": path, "queue": queue, "n": n, "size": size,
                           "warmup": warmup}),
    ])  # fmt: skip


def many_clients_case(env: Any, each: int, size: int = 128, producers: int = 4,
                      conns: int = 25, consumers: int = 5, per_consumer: int = 2) -> Case:
    """W7: producers x conns connections each sending `each` messages."""
    queue = f"bench.many{env.next_id()}"
    path = env.aiobus_socket
    n = producers * conns * each
    workers = [Worker(many_consumer, {"path": path, "queue": queue, "conns": per_consumer,
                                      "n": n}, "consumer") for _ in range(consumers)]
    workers += [Worker(many_producer, {"path": path, "queue": queue, "conns": conns,
                                       "each": each, "size": size}) for _ in range(producers)]
    return Case(workers, timeout=120.0)  # fmt: skip
