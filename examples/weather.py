"""Weather stations publish readings on topics; subscribers pick them with wildcards.

    .venv/bin/python examples/weather.py listen 'weather.*.temp'     # every city's temperature
    .venv/bin/python examples/weather.py listen 'weather.hk.>'       # everything from Hong Kong
    .venv/bin/python examples/weather.py station hk --count 5        # five rounds of readings
    .venv/bin/python examples/weather.py demo                        # three stations, two listeners

Topics look like ``weather.<city>.<metric>``. In a pattern ``*`` stands for exactly one
token and ``>`` (last only) for one or more, so ``weather.*.temp`` matches
``weather.hk.temp`` but not ``weather.hk.wind``, and ``weather.hk.>`` matches all of Hong
Kong's metrics. Topics are fire-and-forget: a reading published while nobody listens is
gone, which is why a listener says so only once the broker has registered it.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys

import anyio
import anyio.abc
from _common import report_connection

import aiobus

CITIES = {"hk": 29.0, "london": 11.0, "paris": 14.0}  # a typical temperature per city
METRICS = ("temp", "humidity", "wind")


def reading(city: str, metric: str, rng: random.Random) -> float:
    base = {"temp": CITIES.get(city, 20.0), "humidity": 70.0, "wind": 12.0}[metric]
    return round(base + rng.uniform(-3, 3), 1)


async def station(bus: aiobus.Bus, city: str, count: int, interval: float) -> None:
    rng = random.Random(city)  # seeded: the same city reports the same weather every run
    for n in range(count):
        if n:
            await anyio.sleep(interval)
        for metric in METRICS:
            await bus.publish(f"weather.{city}.{metric}", reading(city, metric, rng))
    print(f"station {city}: published {count * len(METRICS)} readings")


async def listen(bus: aiobus.Bus, pattern: str, count: int | None, *,
                 task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
    """Print readings on topics matching ``pattern``; stop after ``count`` if given."""
    seen = 0
    async with bus.subscribe(pattern) as readings:  # registered with the broker from here on
        print(f"listening to {pattern}")
        task_status.started()
        async for msg in readings:
            assert msg.topic is not None
            _, city, metric = msg.topic.split(".")
            print(f"[{pattern}] {city:<7} {metric:<8} {msg.body}")
            if msg.dropped:  # we fell behind and the broker dropped the oldest readings
                print(f"[{pattern}] ({msg.dropped} readings dropped before this one)")
            seen += 1
            if seen == count:
                break
    print(f"[{pattern}] done after {seen} readings")


async def demo(bus: aiobus.Bus, count: int) -> None:
    listeners = {"weather.*.temp": len(CITIES) * count, "weather.hk.>": len(METRICS) * count}
    async with anyio.create_task_group() as tg:
        for pattern, expected in listeners.items():
            await tg.start(listen, bus, pattern, expected)  # subscribed before anyone publishes
        async with anyio.create_task_group() as stations:
            for city in CITIES:
                stations.start_soon(station, bus, city, count, 0.05)


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
    p = sub.add_parser("station", parents=[common],
                       help="publish readings for one city")
    p.add_argument("city")
    p.add_argument("--count", type=int, default=10, help="rounds of readings (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between rounds")
    p = sub.add_parser("listen", parents=[common],
                       help="print readings matching a pattern")
    p.add_argument("pattern")
    p.add_argument("--count", type=int, help="stop after this many readings")
    p = sub.add_parser("demo", parents=[common],
                       help="three stations and two listeners in one process")
    p.add_argument("--count", type=int, default=2, help="rounds of readings (default 2)")
    args = parser.parse_args()

    async with (
        aiobus.connect(args.socket, name=f"weather-{args.role}") as bus,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(report_connection, bus)
        if args.role == "station":
            await station(bus, args.city, args.count, args.interval)
        elif args.role == "listen":
            await listen(bus, args.pattern, args.count)
        else:
            await demo(bus, args.count)
        tg.cancel_scope.cancel()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except* (aiobus.BrokerUnavailable, aiobus.ConnectionLost) as errors:  # from a task group
        sys.exit(f"error: {errors.exceptions[0]}")  # no broker, or it never came back
    except* KeyboardInterrupt:
        sys.exit(130)
