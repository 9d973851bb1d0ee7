"""Redis rows (redis-py asyncio with the hiredis parser, on uvloop, over a Unix socket),
driven for speed as the Redis docs advise: pipeline round trips away.

- Pub/sub (W1, W2, W5): the publisher sends PUBLISH in pipelines of 256 commands
  (`pipeline(transaction=False)`, one write and one read of 256 replies per batch). The
  subscriber reads with `PubSub.listen()`; ready once the SUBSCRIBE confirmation arrived.
- Streams as a queue (W3, W5): a consumer group on one stream. The producer pipelines XADD
  in batches of 256. Each consumer loops on one pipeline of [XACK of the entries it has
  just handled, XREADGROUP COUNT 256 BLOCK 100 >]: every entry is acked by id (XACK takes
  many ids per command), and the ack rides in the same round trip as the next read.
- W6 fills a list with RPUSH (1,000 values per command) and a stream with pipelined XADD.

The server runs with `client-output-buffer-limit pubsub 0 0 0` (see servers.py). W3's
durable row runs the same Streams workload against a second server with the AOF on and
`appendfsync always`: Redis writes and fsyncs the AOF once per event-loop turn before it
sends that turn's replies, so a pipeline's replies are its confirmations.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis.asyncio as redis
from harness import Case, Control, Worker

BATCH = 256
GROUP = "workers"


def _client(path: str) -> Any:
    return redis.Redis(unix_socket_path=path)


async def publisher(ctl: Control, path: str, channel: str, n: int, size: int) -> dict:
    r = _client(path)
    await r.ping()
    body = os.urandom(size)
    await ctl.ready()
    first = time.monotonic_ns()
    for start in range(0, n, BATCH):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(BATCH, n - start)):
            pipe.publish(channel, body)
        await pipe.execute()
    await r.aclose()
    return {"first_ns": first, "sent": n}


async def subscriber(ctl: Control, path: str, channel: str, n: int) -> dict:
    r = _client(path)
    pubsub = r.pubsub()
    await pubsub.subscribe(channel)
    while True:  # the confirmation: from here on the server routes to us
        msg = await pubsub.get_message(timeout=5.0)
        if msg is not None and msg["type"] == "subscribe":
            break
    await ctl.ready()

    async def loop() -> None:
        async for msg in pubsub.listen():
            if msg["type"] == "message":
                ctl.count += 1
                ctl.last_ns = time.monotonic_ns()

    await ctl.run_until(loop(), n, idle=2.0)
    await pubsub.aclose()
    await r.aclose()
    return ctl.received()


async def prepare_group(ctl: Control, path: str, stream: str) -> dict:
    r = _client(path)
    await r.xgroup_create(stream, GROUP, id="$", mkstream=True)
    await r.aclose()
    return {}


async def delete_key(ctl: Control, path: str, key: str) -> dict:
    r = _client(path)
    await r.delete(key)
    await r.aclose()
    return {}


async def stream_producer(ctl: Control, path: str, stream: str, n: int, size: int) -> dict:
    r = _client(path)
    await r.ping()
    body = os.urandom(size)
    await ctl.ready()
    first = time.monotonic_ns()
    for start in range(0, n, BATCH):
        pipe = r.pipeline(transaction=False)
        for _ in range(min(BATCH, n - start)):
            pipe.xadd(stream, {"b": body})
        await pipe.execute()
    await r.aclose()
    return {"first_ns": first, "sent": n}


async def stream_consumer(ctl: Control, path: str, stream: str, name: str, n: int,
                          awaited: bool = False) -> dict:  # fmt: skip
    """``awaited``: each entry's XACK is its own awaited command (a round trip per
    message, as a worker acking each job when it is done); else the batch's XACK goes in
    the pipeline with the next XREADGROUP."""
    r = _client(path)
    await r.ping()
    await ctl.ready()

    async def each() -> None:
        while not ctl.stopping:
            replies = await r.xreadgroup(GROUP, name, {stream: ">"}, count=BATCH, block=100)
            for _key, entries in replies or ():
                for entry_id, _fields in entries:
                    await r.xack(stream, GROUP, entry_id)
                    ctl.count += 1
                ctl.last_ns = time.monotonic_ns()

    async def loop() -> None:
        handled: list[bytes] = []
        while not ctl.stopping:
            pipe = r.pipeline(transaction=False)
            if handled:
                pipe.xack(stream, GROUP, *handled)
            pipe.xreadgroup(GROUP, name, {stream: ">"}, count=BATCH, block=100)
            replies = await pipe.execute()
            handled = []
            for _key, entries in replies[-1] or ():
                for entry_id, _fields in entries:
                    handled.append(entry_id)
            if handled:
                ctl.count += len(handled)
                ctl.last_ns = time.monotonic_ns()
        if handled:
            await r.xack(stream, GROUP, *handled)

    await ctl.run_until(each() if awaited else loop(), n, shared=True)
    await r.aclose()
    return ctl.received()


def topic_case(env: Any, n: int, size: int, subscribers: int = 1) -> Case:
    channel = f"bench.t{env.next_id()}"
    path = env.redis_socket
    subs = [Worker(subscriber, {"path": path, "channel": channel, "n": n}, "consumer")
            for _ in range(subscribers)]  # fmt: skip
    pub = Worker(publisher, {"path": path, "channel": channel, "n": n, "size": size})
    return Case([*subs, pub], expected=n * subscribers)


def queue_case(env: Any, n: int, size: int, consumers: int = 1, aof: bool = False,
               awaited: bool = False) -> Case:  # fmt: skip
    """With `aof`, against the server that fsyncs its AOF before every reply; `awaited`:
    the consumers await each XACK (see stream_consumer)."""
    stream = f"bench.s{env.next_id()}"
    path = env.redis_aof_socket if aof else env.redis_socket
    workers = [Worker(stream_consumer, {"path": path, "stream": stream, "name": f"c{i}", "n": n,
                                        "awaited": awaited}, "consumer")
               for i in range(consumers)]  # fmt: skip
    workers.append(Worker(stream_producer, {"path": path, "stream": stream, "n": n, "size": size}))
    return Case(workers,
                prepare=[Worker(prepare_group, {"path": path, "stream": stream}, "step")],
                cleanup=[Worker(delete_key, {"path": path, "key": stream}, "step")])  # fmt: skip
