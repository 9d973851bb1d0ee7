"""A pipeline of filter stages over queues, with a clean end of stream.

    numbers --> [divisible by 2] --> [divisible by 5] --> sink

    .venv/bin/python examples/pipeline.py all --count 50       # every stage a task in one process

or each stage its own process, started in any order (queues hold the messages meanwhile):

    .venv/bin/python examples/pipeline.py sink     # reads pipeline.by10
    .venv/bin/python examples/pipeline.py by5      # pipeline.by2 -> pipeline.by10
    .venv/bin/python examples/pipeline.py by2      # pipeline.numbers -> pipeline.by2
    .venv/bin/python examples/pipeline.py source --count 50    # -> pipeline.numbers

A queue has no "closed" state, so the source ends the stream with a marker message (header
``end-of-stream``). Each stage forwards what passes its filter, and when it reads the
marker it forwards the marker and exits; the sink prints what arrived and exits too. This
works because a queue keeps send order for first deliveries and each stage has one
consumer that forwards a message before acking it: nothing overtakes the marker.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from functools import partial

import anyio
from _common import report_connection

import aiobus

END = {"end-of-stream": "true"}


def is_end(msg: aiobus.Message) -> bool:
    return msg.headers.get("end-of-stream") == "true"


async def source(bus: aiobus.Bus, output: str, count: int) -> None:
    for n in range(1, count + 1):
        await bus.send(output, n)
    await bus.send(output, None, headers=END)
    print(f"source: sent 1..{count} and end of stream to {output}")


async def filter_stage(bus: aiobus.Bus, by: int, input: str, output: str) -> None:
    passed = 0
    async for msg in bus.consume(input):
        if is_end(msg):
            await bus.send(output, None, headers=END)
            await ack(msg)
            break
        if msg.body % by == 0:
            await bus.send(output, msg.body)  # forward first, then ack: at-least-once
            passed += 1
        await ack(msg)
    print(f"filter by {by}: passed {passed} numbers from {input} to {output}, then end of stream")


async def sink(bus: aiobus.Bus, input: str) -> None:
    received: list[int] = []
    async for msg in bus.consume(input):
        await ack(msg)
        if is_end(msg):
            break
        received.append(msg.body)
        print(f"sink: {msg.body}")
    print(f"sink: end of stream after {len(received)} numbers: {received}")


async def ack(msg: aiobus.Message) -> None:
    try:
        await msg.ack()
    except aiobus.LeaseError as exc:  # the broker restarted: it delivers the message again
        print(f"{msg.queue}: {exc}; it comes again", file=sys.stderr)


Stage = Callable[[aiobus.Bus], Awaitable[None]]


def stages(count: int) -> dict[str, Stage]:
    """The pipeline, from its end to its start (a consumer may start before its producer)."""
    return {
        "sink": partial(sink, input="pipeline.by10"),
        "by5": partial(filter_stage, by=5, input="pipeline.by2", output="pipeline.by10"),
        "by2": partial(filter_stage, by=2, input="pipeline.numbers", output="pipeline.by2"),
        "source": partial(source, output="pipeline.numbers", count=count),
    }


async def run_stage(socket: str | None, name: str, stage: Stage) -> None:
    """Run one stage on its own connection, as a separate process would."""
    async with (
        aiobus.connect(socket, name=f"pipeline-{name}") as bus,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(report_connection, bus)
        await stage(bus)
        tg.cancel_scope.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--socket", help="broker socket (default: the library's default)")
    parser.add_argument("role", choices=["all", *stages(0)],
                        help="one stage, or all of them as tasks in this process")
    parser.add_argument("--count", type=int, default=50, help="source: send 1..COUNT")
    args = parser.parse_args()

    pipeline = stages(args.count)
    if args.role != "all":
        await run_stage(args.socket, args.role, pipeline[args.role])
        return
    async with anyio.create_task_group() as tg:
        for name, stage in pipeline.items():
            tg.start_soon(run_stage, args.socket, name, stage)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
