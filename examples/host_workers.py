"""A host hands out tasks to N workers: tasks on a request queue, results on a response queue.

    .venv/bin/python examples/host_workers.py demo --workers 3 --tasks 12    # all in one process

or in separate terminals, as many workers as you like:

    .venv/bin/python examples/host_workers.py worker --name w1
    .venv/bin/python examples/host_workers.py worker --name w2
    .venv/bin/python examples/host_workers.py host --tasks 12

The host sends each task to ``work.requests`` and collects results from ``work.responses``.
Workers compete for requests: the broker gives each request to one worker, round-robin
over those with a free slot. A worker consumes with ``prefetch=1``, so it holds one task
at a time and a slow worker is not sent more than it can take; that is what spreads the
work. Once every result is in, the host publishes on the topic ``work.shutdown`` and the
workers exit.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections import Counter

import anyio
import anyio.abc
from _common import report_connection

import aiobus

REQUESTS = "work.requests"
RESPONSES = "work.responses"
SHUTDOWN = "work.shutdown"


async def work(n: int) -> int:
    """The job: square a number, taking a while to do it."""
    await anyio.sleep(random.uniform(0.02, 0.08))
    return n * n


async def serve_tasks(bus: aiobus.Bus, name: str, *,
                      task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
                      ) -> None:
    async with bus.consume(REQUESTS, prefetch=1) as tasks:
        print(f"worker {name}: ready")
        task_status.started()
        async for msg in tasks:
            result = await work(msg.body["n"])
            await bus.send(RESPONSES, {"task": msg.body["task"], "result": result,
                                       "worker": name})
            try:
                # After the result is sent: a worker dying mid-task loses nothing. confirm:
                # wait for the broker, to hear of a restart (a plain ack() would be dropped).
                await msg.ack(confirm=True)
            except aiobus.LeaseError as exc:  # the broker restarted: the task comes again
                print(f"worker {name}: {exc}", file=sys.stderr)


async def worker(socket: str | None, name: str, *,
                 task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Serve tasks until the host publishes on ``work.shutdown``."""
    async with (
        aiobus.connect(socket, name=f"worker-{name}") as bus,
        bus.subscribe(SHUTDOWN) as shutdown,  # registered before we say we are ready
        anyio.create_task_group() as tg,
    ):
        await tg.start(serve_tasks, bus, name)
        tg.start_soon(report_connection, bus)
        task_status.started()
        async for _ in shutdown:
            print(f"worker {name}: shutting down")
            tg.cancel_scope.cancel()
            break


async def host(socket: str | None, tasks: int) -> None:
    async with aiobus.connect(socket, name="host") as bus:
        # Listen first, then send: results may come back before the last task is sent.
        async with bus.consume(RESPONSES) as responses:
            for task in range(1, tasks + 1):
                await bus.send(REQUESTS, {"task": task, "n": task})
            print(f"host: sent {tasks} tasks")
            done: Counter[str] = Counter()
            async for msg in responses:
                try:
                    await msg.ack(confirm=True)  # counted once: only if the broker has it
                except aiobus.LeaseError:
                    continue  # the broker restarted: this response comes again
                body = msg.body
                print(f"host: task {body['task']:>3} = {body['result']:<5} by {body['worker']}")
                done[body["worker"]] += 1
                if done.total() == tasks:
                    break
        print("host: per worker: " + ", ".join(f"{w}={n}" for w, n in sorted(done.items())))
        await bus.publish(SHUTDOWN, None)


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="broker socket (default: the library's default)")
    # --socket after the role too, as the aiobus command takes it (SUPPRESS: a role that
    # is not given it keeps the one given before the role).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--socket", default=argparse.SUPPRESS,
                        help="broker socket (default: the library's default)")
    sub = parser.add_subparsers(dest="role", required=True)
    p = sub.add_parser("host", parents=[common],
                       help="send tasks and collect the results")
    p.add_argument("--tasks", type=int, default=12)
    p = sub.add_parser("worker", parents=[common],
                       help="do tasks until the host is done")
    p.add_argument("--name", default="w1")
    p = sub.add_parser("demo", parents=[common],
                       help="a host and N workers as tasks in one process")
    p.add_argument("--tasks", type=int, default=12)
    p.add_argument("--workers", type=int, default=3)
    args = parser.parse_args()

    if args.role == "host":
        await host(args.socket, args.tasks)
    elif args.role == "worker":
        await worker(args.socket, args.name)
    else:
        async with anyio.create_task_group() as tg:
            for i in range(1, args.workers + 1):
                await tg.start(worker, args.socket, f"w{i}")  # each on its own connection
            tg.start_soon(host, args.socket, args.tasks)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
