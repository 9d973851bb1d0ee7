"""RabbitMQ rows (W3 only): aio-pika on uvloop over TCP on 127.0.0.1, driven for speed as
the RabbitMQ and aio-pika docs advise for a work queue with manual acks:

- one non-durable queue per case on the default exchange, transient messages (no disk);
- the producer publishes on a channel without publisher confirms (fire-and-forget, as
  aiobus's `send(confirm=False)`), then closes the connection, which flushes;
- each consumer sets `basic.qos(prefetch_count=256)`, iterates `queue.iterator()` and
  acks every message with `message.ack()`, which writes basic.ack without waiting.

RabbitMQ itself runs as servers.py starts it (no plugins, default settings).
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import aio_pika
from harness import Case, Control, Worker

PREFETCH = 256


async def prepare_queue(ctl: Control, url: str, queue: str) -> dict:
    conn = await aio_pika.connect(url)
    async with conn:
        channel = await conn.channel()
        await channel.declare_queue(queue, durable=False, auto_delete=False)
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


def queue_case(env: Any, n: int, size: int, consumers: int = 1) -> Case:
    queue, url = f"bench.q{env.next_id()}", env.amqp_url
    workers = [Worker(consumer, {"url": url, "queue": queue, "n": n}, "consumer")
               for _ in range(consumers)]  # fmt: skip
    workers.append(Worker(producer, {"url": url, "queue": queue, "n": n, "size": size}))
    return Case(workers, prepare=[Worker(prepare_queue, {"url": url, "queue": queue}, "step")],
                cleanup=[Worker(delete_queue, {"url": url, "queue": queue}, "step")])
