"""RabbitMQ rows (W3 only): aio-pika on uvloop over TCP on 127.0.0.1, driven for speed as
the RabbitMQ and aio-pika docs advise for a work queue with manual acks:

- one non-durable queue per case on the default exchange, transient messages (no disk);
- the producer publishes on a channel without publisher confirms (fire-and-forget, as
  aiobus's `send(confirm=False)`), then closes the connection, which flushes;
- each consumer sets `basic.qos(prefetch_count=256)`, iterates `queue.iterator()` and
  acks every message with `message.ack()`, which writes basic.ack without waiting.

W3's durable row ("RabbitMQ durable + confirms"): a durable classic queue, persistent
messages (`delivery_mode=2`), and a channel with publisher confirms; the producer keeps
`WINDOW` publishes awaiting their confirms (one task per publish, the way aio-pika
pipelines confirms; the oldest is awaited once the window is full). Consumers as above.

RabbitMQ itself runs as servers.py starts it (no plugins, default settings).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import time
from typing import Any

import aio_pika
from harness import Case, Control, Worker

PREFETCH = 256
WINDOW = 256  # publishes awaiting their confirms (durable row)


async def prepare_queue(ctl: Control, url: str, queue: str, durable: bool = False) -> dict:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel()
        await channel.declare_queue(queue, durable=durable, auto_delete=False)
    return {}


async def delete_queue(ctl: Control, url: str, queue: str) -> dict:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel()
        with contextlib.suppress(Exception):
            await channel.queue_delete(queue)
    return {}


async def producer(ctl: Control, url: str, queue: str, n: int, size: int) -> dict:
    conn = await aio_pika.connect(url)
    channel = await conn.channel(publisher_confirms=False)
    exchange = channel.default_exchange
    body = os.urandom(size)
    await ctl.ready()
    first = time.monotonic_ns()
    for _ in range(n):
        await exchange.publish(aio_pika.Message(body), routing_key=queue)
    await conn.close()
    return {"first_ns": first, "sent": n}


async def confirmed_producer(ctl: Control, url: str, queue: str, n: int, size: int) -> dict:
    conn = await aio_pika.connect(url)
    channel = await conn.channel(publisher_confirms=True)
    exchange = channel.default_exchange
    body = os.urandom(size)
    await ctl.ready()
    first = time.monotonic_ns()
    window: collections.deque[asyncio.Future[Any]] = collections.deque()
    for _ in range(n):
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        window.append(asyncio.ensure_future(exchange.publish(message, routing_key=queue)))
        if len(window) >= WINDOW:
            await window.popleft()
    for fut in window:
        await fut
    await conn.close()
    return {"first_ns": first, "sent": n}


async def consumer(ctl: Control, url: str, queue: str, n: int) -> dict:
    conn = await aio_pika.connect(url)
    channel = await conn.channel()
    await channel.set_qos(prefetch_count=PREFETCH)
    q: Any = await channel.get_queue(queue, ensure=True)
    await ctl.ready()

    async def loop() -> None:
        async with q.iterator() as messages:
            async for message in messages:
                await message.ack()
                ctl.count += 1
                ctl.last_ns = time.monotonic_ns()

    await ctl.run_until(loop(), n, shared=True)
    await conn.close()
    return ctl.received()


def queue_case(env: Any, n: int, size: int, consumers: int = 1, durable: bool = False) -> Case:
    """With `durable`: a durable queue, persistent messages, publisher confirms."""
    queue, url = f"bench.q{env.next_id()}", env.amqp_url
    workers = [Worker(consumer, {"url": url, "queue": queue, "n": n}, "consumer")
               for _ in range(consumers)]  # fmt: skip
    workers.append(Worker(confirmed_producer if durable else producer,
                          {"url": url, "queue": queue, "n": n, "size": size}))
    prepare = Worker(prepare_queue, {"url": url, "queue": queue, "durable": durable}, "step")
    return Case(workers, prepare=[prepare],
                cleanup=[Worker(delete_queue, {"url": url, "queue": queue}, "step")])
