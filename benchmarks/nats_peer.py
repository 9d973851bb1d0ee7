"""NATS rows (nats-py on uvloop against nats-server on 127.0.0.1), driven for speed as the
nats.py README and the NATS docs advise.

- Pub/sub (W1, W2, W5): `nc.publish` only appends to the client's pending buffer, which
  its flusher task writes in large chunks; one `nc.flush()` at the end. Subscribers use a
  callback subscription with the client-side pending limits turned off (0), so a burst is
  buffered instead of dropped as a slow consumer; ready after `subscribe` + `flush()`, i.e.
  once the server has the SUB.
- JetStream queue (W3, W5): a memory-storage stream with work-queue retention and one
  durable pull consumer with explicit acks shared by all consumers (pull consumers are what
  NATS recommends for scalable work queues). The producer uses `js.publish_async`, a
  window of PubAcks in flight, then waits for them all; consumers `fetch(batch=256)` and
  `msg.ack()` each message (an ack is a publish, so it is batched by the flusher too).
- Request/reply (W4): `nc.request`, a responder that answers with `msg.respond`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from typing import Any

import nats
from harness import Case, Control, Worker
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

FETCH = 256


async def _report(error: Exception) -> None:
    print(f"nats-py error in pid {os.getpid()}: {error!r}", file=sys.stderr, flush=True)


async def _connect(url: str) -> Any:
    return await nats.connect(url, max_reconnect_attempts=0, pending_size=8 * 1024 * 1024,
                              error_cb=_report)  # fmt: skip


async def publisher(ctl: Control, url: str, subject: str, n: int, size: int) -> dict:
    nc = await _connect(url)
    body = os.urandom(size)
    await ctl.ready()
    first = time.monotonic_ns()
    for _ in range(n):
        await nc.publish(subject, body)
    await nc.flush(timeout=60)
    await nc.close()
    return {"first_ns": first, "sent": n}


async def subscriber(ctl: Control, url: str, subject: str, n: int) -> dict:
    nc = await _connect(url)

    async def on_message(msg: Any) -> None:
        ctl.count += 1
        ctl.last_ns = time.monotonic_ns()

    await nc.subscribe(subject, cb=on_message, pending_msgs_limit=0, pending_bytes_limit=0)
    await nc.flush()
    await ctl.ready()
    await ctl.run_until(asyncio.sleep(3600), n, idle=2.0)
    await nc.close()
    return ctl.received()


async def prepare_stream(ctl: Control, url: str, stream: str, subject: str) -> dict:
    nc = await _connect(url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=stream, subjects=[subject], storage=StorageType.MEMORY,
                                     retention=RetentionPolicy.WORK_QUEUE))  # fmt: skip
    await js.add_consumer(stream, ConsumerConfig(durable_name="workers",
                                                 ack_policy=AckPolicy.EXPLICIT,
                                                 max_ack_pending=100_000))  # fmt: skip
    await nc.close()
    return {}


async def delete_stream(ctl: Control, url: str, stream: str) -> dict:
    nc = await _connect(url)
    with contextlib.suppress(Exception):
        await nc.jetstream().delete_stream(stream)
    await nc.close()
    return {}


async def js_producer(ctl: Control, url: str, subject: str, n: int, size: int) -> dict:
    nc = await _connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    body = os.urandom(size)
    await ctl.ready()
    first = time.monotonic_ns()
    for _ in range(n):
        await js.publish_async(subject, body, wait_stall=60)
    await asyncio.wait_for(js.publish_async_completed(), 60)
    await nc.close()
    return {"first_ns": first, "sent": n}


async def js_consumer(ctl: Control, url: str, stream: str, subject: str, n: int,
                      sync: bool = False) -> dict:  # fmt: skip
    """``sync``: ``await msg.ack_sync()`` (the server's confirmation awaited: a round trip
    per message); else ``await msg.ack()``, which nats-py writes without waiting."""
    nc = await _connect(url)
    js = nc.jetstream()
    psub = await js.pull_subscribe_bind("workers", stream=stream)
    await ctl.ready()

    async def loop() -> None:
        while not ctl.stopping:
            try:
                msgs = await psub.fetch(FETCH, timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in msgs:
                if sync:
                    await msg.ack_sync()
                else:
                    await msg.ack()
                ctl.count += 1
            ctl.last_ns = time.monotonic_ns()

    await ctl.run_until(loop(), n, shared=True)
    await nc.flush()  # the last acks
    await nc.close()
    return ctl.received()


async def responder(ctl: Control, url: str, subject: str) -> dict:
    nc = await _connect(url)

    async def on_request(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=on_request)
    await nc.flush()
    await ctl.ready()
    await ctl.wait_stop()
    await nc.close()
    return {}


async def requester(ctl: Control, url: str, subject: str, n: int, size: int,
                    warmup: int) -> dict:  # fmt: skip
    nc = await _connect(url)
    body = os.urandom(size)
    await ctl.ready()
    latencies = []
    for i in range(warmup + n):
        start = time.perf_counter_ns()
        await nc.request(subject, body, timeout=5)
        if i >= warmup:
            latencies.append(time.perf_counter_ns() - start)
    await nc.close()
    return {"latencies": latencies}


def topic_case(env: Any, n: int, size: int, subscribers: int = 1) -> Case:
    subject = f"bench.t{env.next_id()}"
    subs = [Worker(subscriber, {"url": env.nats_url, "subject": subject, "n": n}, "consumer")
            for _ in range(subscribers)]  # fmt: skip
    pub = Worker(publisher, {"url": env.nats_url, "subject": subject, "n": n, "size": size})
    return Case([*subs, pub], expected=n * subscribers)


def queue_case(env: Any, n: int, size: int, consumers: int = 1, sync: bool = False) -> Case:
    """``sync``: the consumers ``ack_sync()`` (see js_consumer)."""
    ident = env.next_id()
    stream, subject = f"BENCH{ident}", f"bench.q{ident}"
    url = env.nats_url
    workers = [Worker(js_consumer, {"url": url, "stream": stream, "subject": subject, "n": n,
                                    "sync": sync}, "consumer")
               for _ in range(consumers)]  # fmt: skip
    workers.append(Worker(js_producer, {"url": url, "subject": subject, "n": n, "size": size}))
    prepare = Worker(prepare_stream, {"url": url, "stream": stream, "subject": subject}, "step")
    cleanup = Worker(delete_stream, {"url": url, "stream": stream}, "step")
    return Case(workers, prepare=[prepare], cleanup=[cleanup])


def rpc_case(env: Any, n: int, size: int, warmup: int) -> Case:
    subject = f"bench.rpc{env.next_id()}"
    return Case([
        Worker(responder, {"url": env.nats_url, "subject": subject}, "server"),
        Worker(requester, {"url": env.nats_url, "subject": subject, "n": n, "size": size,
                           "warmup": warmup}),
    ])  # fmt: skip
