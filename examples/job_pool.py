"""A pool of job workers fed through a FIFO, with delayed retries and a dead-letter queue.

    .venv/bin/python examples/job_pool.py --fifo /tmp/jobs.fifo
    echo https://example.org/report >> /tmp/jobs.fifo     # from any shell, as often as you like
    echo https://flaky.example/page >> /tmp/jobs.fifo     # fails twice, then works
    echo https://down.example/      >> /tmp/jobs.fifo     # never works: dead-lettered in the end
    echo not-a-url                  >> /tmp/jobs.fifo     # invalid: dead-lettered at once

Each line written to the FIFO becomes a message on the queue ``jobpool.jobs`` (the FIFO
bridge, :func:`aiobus.bridges.fifo_to_bus`, does that). Workers "fetch" the URL (there is
no network here: the fetch is simulated and fails on purpose for some hosts) and answer
each message one of three ways:

* success: ``msg.ack()``; the job is done.
* transient failure (the host is down): ``msg.nack()``. The queue's ``retry_delays`` make
  each retry wait longer than the one before; after ``max_deliveries`` attempts the broker
  moves the job to the dead-letter queue with reason ``max-deliveries``.
* permanent failure (the input is invalid): ``msg.reject(reason=...)``. Retrying cannot
  help, so the job goes to the dead-letter queue at once, with reason ``rejected``.

A watcher reads the dead-letter queue ``jobpool.jobs.dlq`` and prints why each job died.
With ``--jobs N`` the pool exits once N jobs are settled (done or dead), else on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from urllib.parse import urlsplit

import anyio
from _common import report_connection
from anyio.streams.memory import MemoryObjectSendStream

import aiobus
from aiobus.bridges import fifo_to_bus

JOBS = "jobpool.jobs"
DEAD_LETTERS = f"{JOBS}.dlq"  # the default dead-letter queue of JOBS
MAX_DELIVERIES = 4


class InvalidJob(Exception):
    """Permanent: the same input will fail the same way every time."""


class TransientError(Exception):
    """Temporary: the same input may work later."""


async def fetch(url: str, attempt: int) -> int:
    """Pretend to download ``url``; returns its size. Fails on purpose for some hosts."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidJob(f"not an http(s) URL: {url!r}")
    await anyio.sleep(0.01)  # the "download"
    if parts.hostname == "down.example":
        raise TransientError("connection refused")
    if parts.hostname == "flaky.example" and attempt < 3:
        raise TransientError("connection reset by peer")
    return 100 * len(url)


def text(body: object) -> str:
    # FIFO records arrive as str when they are UTF-8 (as `aiobus send` sends them), else bytes.
    return body.decode(errors="replace") if isinstance(body, bytes) else str(body)


async def worker(socket: str | None, name: str, retry_delays: list[float],
                 settled: MemoryObjectSendStream[str]) -> None:
    async with aiobus.connect(socket, name=name) as bus, settled:
        async for msg in bus.consume(JOBS, prefetch=1):
            # A job held when the broker restarts is given out again (at-least-once);
            # its late ack, nack or reject is dropped by the client, never raised.
            await work_on(msg, name, retry_delays, settled)


async def work_on(msg: aiobus.Message, name: str, retry_delays: list[float],
                  settled: MemoryObjectSendStream[str]) -> None:
    url = text(msg.body)
    try:
        size = await fetch(url, msg.attempt)
    except InvalidJob as exc:
        print(f"{name}: {url!r} is invalid, dead-lettered at once")
        await msg.reject(reason=str(exc))
    except TransientError as exc:
        if msg.attempt < MAX_DELIVERIES:
            delay = retry_delays[min(msg.attempt, len(retry_delays)) - 1]
            print(f"{name}: {url} attempt {msg.attempt} failed ({exc}),"
                  f" retry in {delay:g} s")
        else:
            print(f"{name}: {url} attempt {msg.attempt} failed ({exc}), giving up")
        await msg.nack(reason=str(exc))  # the broker applies retry_delays
    else:
        print(f"{name}: {url} done on attempt {msg.attempt} ({size} bytes)")
        await msg.ack()
        await settled.send("done")


async def watch_dead_letters(bus: aiobus.Bus, settled: MemoryObjectSendStream[str]) -> None:
    async with settled:
        async for msg in bus.consume(DEAD_LETTERS):
            h = msg.headers
            age = time.time() - msg.timestamp
            print(f"dead letter: {text(msg.body)!r}"
                  f" reason={h['x-dead-reason']} attempts={h['x-attempts']}"
                  f" ({h.get('x-reason-text', '')}) {age:.1f} s after it was first queued")
            try:
                await msg.ack(confirm=True)  # confirmed: a dead letter is counted once
            except aiobus.LeaseError:
                continue  # the broker restarted: it gives the dead letter out again
            await settled.send("dead")


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="broker socket (default: the library's default)")
    parser.add_argument("--fifo", help="the FIFO to read jobs from (created if missing)",
                        default=os.path.join(tempfile.gettempdir(), f"jobs-{os.getuid()}.fifo"))
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--backoff", type=float, default=0.25,
                        help="first retry delay in seconds; each later one doubles")
    parser.add_argument("--jobs", type=int, help="exit once this many jobs are settled")
    args = parser.parse_args()
    retry_delays = [args.backoff * 2**n for n in range(MAX_DELIVERIES - 1)]

    async with aiobus.connect(args.socket, name="job-pool") as bus:
        try:
            await bus.declare_queue(JOBS, retry_delays=retry_delays,
                                    max_deliveries=MAX_DELIVERIES)
        except aiobus.QueueMismatch as exc:
            sys.exit(f"{exc}\n(the broker still has {JOBS} from a run with another --backoff)")
        send_settled, settled = anyio.create_memory_object_stream[str](100)
        async with anyio.create_task_group() as tg, send_settled:
            # The bridge reports readiness once the FIFO is open: from then on, writes count.
            await tg.start(partial(fifo_to_bus, bus, args.fifo, queue=JOBS, framing="lines"))
            print(f"{args.workers} workers, retries after {retry_delays} s;"
                  f" feed me: echo https://example.org >> {args.fifo}")
            for n in range(1, args.workers + 1):
                tg.start_soon(worker, args.socket, f"worker-{n}", retry_delays,
                              send_settled.clone())
            tg.start_soon(watch_dead_letters, bus, send_settled.clone())
            tg.start_soon(report_connection, bus)  # the workers' connections recover alike
            tally: Counter[str] = Counter()
            async for outcome in settled:
                tally[outcome] += 1
                if tally.total() == args.jobs:
                    break
            print(f"{tally['done']} done, {tally['dead']} dead-lettered")
            tg.cancel_scope.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
