"""Pipelined confirmed sends against unconfirmed ones, through a real broker process.

    python benchmarks/bench_confirm.py [--messages 100000] [--in-flight 10000] [--repeats 3]

Starts ``python -m aiobus.cli.broker`` on a socket in a fresh temp dir and, from this
process (one connection), times ``send(confirm=False)`` for every message (returns once
buffered; the last is followed by a ping so the broker has them all), then confirmed sends
with ``--in-flight`` outstanding, two ways:

- ``send_nowait`` futures in a sliding window: the oldest is awaited once the window is
  full (the pipelining API; the broker confirms runs of sends with one OK_RANGE frame);
- ``await send()`` (confirm=True) in ``asyncio.gather`` batches: what a user without
  ``send_nowait`` writes, which costs a Task per send.

Nothing consumes: the broker just queues. Prints the rates and their ratios to the
unconfirmed rate (the benchmark issue's target: confirmed at least half of it). The broker
is stopped by PID in ``finally``; every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import aiobus


async def measure(path: str, messages: int, in_flight: int) -> tuple[float, float]:
    body = b"x" * 128
    async with aiobus.connect(path) as bus:
        start = time.perf_counter()
        for _ in range(messages):
            await bus.send("unconfirmed", body, confirm=False)
        await bus.ping()
        unconfirmed = messages / (time.perf_counter() - start)
        start = time.perf_counter()
        window: collections.deque[asyncio.Future[None]] = collections.deque()
        for _ in range(messages):
            window.append(bus.send_nowait("confirmed", body))
            if len(window) >= in_flight:
                await window.popleft()
        for fut in window:
            await fut
        confirmed = messages / (time.perf_counter() - start)
        start = time.perf_counter()
        for _ in range(0, messages, in_flight):
            await asyncio.gather(*(bus.send("confirmed", body) for _ in range(in_flight)))
        gathered = messages / (time.perf_counter() - start)
    return unconfirmed, confirmed, gathered


def start_broker(tmp: str, name: str, *extra: str) -> tuple[str, subprocess.Popen[bytes]]:
    path = os.path.join(tmp, f"{name}.sock")
    return path, subprocess.Popen([sys.executable, "-m", "aiobus.cli.broker", "--socket", path,
                                   "--data-dir", os.path.join(tmp, f"{name}.data"),
                                   "--log-level", "WARNING", *extra])


def listening(path: str) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
        return True


def stop_broker(broker: subprocess.Popen[bytes]) -> None:
    broker.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        broker.wait(10)
    if broker.poll() is None:
        broker.kill()
        broker.wait(10)


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="ab-", dir="/tmp") as tmp:
        setups: dict[str, tuple[str, ...]] = {"no policy": ()}
        if args.policy_rules:
            from policy_file import write_policy

            policy = write_policy(os.path.join(tmp, "policy.toml"), args.policy_rules)
            setups[f"{args.policy_rules}-rule policy"] = ("--policy", policy)
        brokers = {}
        try:
            for i, (setup, extra) in enumerate(setups.items()):
                brokers[setup] = start_broker(tmp, f"b{i}", *extra)
            async with asyncio.timeout(10):
                for path, _ in brokers.values():
                    while not listening(path):  # the file exists a moment before listen()
                        await asyncio.sleep(0.02)
            print(f"aiobus {aiobus.__version__}, {args.messages:,} sends of 128 B,"
                  f" {args.in_flight:,} confirmed in flight")
            for _ in range(args.repeats):  # alternating between the brokers
                for setup, (path, _) in brokers.items():
                    async with asyncio.timeout(300):
                        unconfirmed, confirmed, gathered = await measure(
                            path, args.messages, args.in_flight)
                    print(f"{setup:<16} confirm=False {unconfirmed:>9,.0f} msgs/s  "
                          f" send_nowait window {confirmed:>9,.0f}"
                          f" ({confirmed / unconfirmed:.2f})   gather(send)"
                          f" {gathered:>9,.0f} ({gathered / unconfirmed:.2f})")
        finally:
            for _, broker in brokers.values():
                stop_broker(broker)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--in-flight", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy-rules", type=int, default=0, metavar="N",
                        help="also run a second broker with a policy of N rules, alternating"
                             " runs between the two (issue 12's check)")
    asyncio.run(main(parser.parse_args()))
