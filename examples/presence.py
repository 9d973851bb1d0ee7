"""Service up/down notification from presence events, and state reports on a signal.

    .venv/bin/python examples/presence.py monitor               # terminal 1: prints UP, STATE, DOWN
    .venv/bin/python examples/presence.py service --name alice  # terminal 2: prints its pid
    kill -USR1 <pid>                                  # alice reports its state
    kill <pid>  (or kill -9 <pid>)                    # alice goes down either way

Up and down come from the broker's presence events: it publishes on
``$sys.client.connected`` and ``$sys.client.disconnected`` whenever a client connects or
its connection ends, for whatever reason, ``kill -9`` included. A service names itself
with ``aiobus.connect(name="svc:<name>")``; the event carries that name and the pid and
uid the kernel reported for the socket. No pid files, no heartbeats.

The state report uses the signal bridge: inside the service,
``signals_to_bus(bus, {SIGUSR1: "svc.<name>.state"})`` publishes a message for every
SIGUSR1 the process receives (body ``"SIGUSR1"``; headers ``signal``, ``pid``, ``time``
and ``count``). Because the message is published from the service's own event loop, a
report also proves the loop is alive, which a pid file cannot. Signals of one kind that
arrive faster than they are published are merged into one message whose ``count`` says
how many it stands for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

import anyio
from _common import report_connection

import aiobus
from aiobus.bridges import signals_to_bus

PREFIX = "svc:"  # client names of services, as the monitor recognises them


async def wait_for_stop() -> signal.Signals:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        return await anext(signals)


async def service(socket: str | None, name: str) -> None:
    async with aiobus.connect(socket, name=PREFIX + name) as bus, anyio.create_task_group() as tg:
        tg.start_soon(report_connection, bus)
        async with signals_to_bus(bus, {signal.SIGUSR1: f"svc.{name}.state"}) as stats:
            pid = os.getpid()
            print(f"service {name} up, pid {pid}:"
                  f" `kill -USR1 {pid}` for a state report, `kill {pid}` to stop")
            signum = await wait_for_stop()
        seen = stats.delivered.get(signal.SIGUSR1, 0)
        sent = stats.published.get(signal.SIGUSR1, 0)
        print(f"service {name}: {signum.name}, stopping"
              f" ({seen} SIGUSR1 received, {sent} state reports published)")
        tg.cancel_scope.cancel()


def describe(event: Any) -> str:
    return f"{event['name'][len(PREFIX):]} (pid {event['pid']}, uid {event['uid']})"


def is_service(event: Any) -> bool:
    name = event.get("name") if isinstance(event, dict) else None
    return isinstance(name, str) and name.startswith(PREFIX)


async def monitor(socket: str | None, downs: int | None) -> None:
    async with (
        aiobus.connect(socket, name="presence-monitor") as bus,
        bus.subscribe("$sys.client.*") as presence,
        bus.subscribe("svc.*.state") as states,
        anyio.create_task_group() as tg,
    ):
        up = [describe(conn) for conn in (await bus.stats())["connections"] if is_service(conn)]
        print(f"monitor: watching services; up now: {', '.join(up) or 'none'}")

        async def print_states() -> None:
            async for msg in states:
                assert msg.topic is not None
                h = msg.headers
                print(f"STATE {msg.topic.split('.')[1]}: alive, answered {h['signal']}"
                      f" (pid {h['pid']}, {h['count']} signal(s) in this report)")

        tg.start_soon(print_states)
        tg.start_soon(report_connection, bus)
        down = 0
        async for msg in presence:
            if not is_service(msg.body):
                continue
            if msg.topic == "$sys.client.connected":
                print(f"UP    {describe(msg.body)}")
            else:
                print(f"DOWN  {describe(msg.body)}")
                down += 1
                if down == downs:
                    break
        tg.cancel_scope.cancel()
    print(f"monitor: {down} service(s) went down, exiting")


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
    p = sub.add_parser("service", parents=[common],
                       help="a service that reports its state on SIGUSR1")
    p.add_argument("--name", default="alice")
    p = sub.add_parser("monitor", parents=[common],
                       help="print services going up and down")
    p.add_argument("--downs", type=int, help="exit after this many services went down")
    args = parser.parse_args()
    if args.role == "service":
        await service(args.socket, args.name)
    else:
        await monitor(args.socket, args.downs)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
