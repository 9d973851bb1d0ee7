"""Recovery time of the real broker: a durable queue of 1,000,000 messages, killed, restarted.

    python benchmarks/bench_recovery.py [--messages 1000000] [--size 128] [--restarts 3]
        [--trees OLD,NEW]

Starts `python -m aiobus.cli.broker` (servers.py: socket and data directory in a fresh
temp dir), fills one durable queue through it (`send(confirm=False)`, the last send
confirmed, nothing consuming), and kills it with SIGKILL: a crash, nothing flushed or
synced on the way out. Then, `--restarts` times: starts a broker on the same data
directory, times it from the spawn until its socket accepts a connection, reads its own
log line "journal ...: recovered Q queues, M messages, B bytes in S s", checks with
STATS that the queue holds every message, and kills it again. For scale, the same
start-up timed once on an empty data directory (interpreter start and imports).

With ``--trees``, each restart runs the broker of each tree in turn on the same journal
(the first tree's broker fills it; the format must be one both read), each tree's
directory first on its ``PYTHONPATH``: old code against new in one run, on a machine
whose load changes from minute to minute; medians per tree.

Every broker is stopped by its PID (servers.py); every wait has a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import Servers, rss_bytes

import aiobus

QUEUE = "bench.recovery"
RECOVERED = re.compile(rb"recovered (\d+) queues, (\d+) messages, (\d+) bytes in ([\d.]+) s")


async def fill(path: str, n: int, size: int) -> dict[str, int]:
    body = os.urandom(size)
    async with asyncio.timeout(600), aiobus.connect(path) as bus:
        await bus.declare_queue(QUEUE, durable=True)
        for _ in range(n - 1):
            await bus.send(QUEUE, body, confirm=False)
        await bus.send(QUEUE, body)
        stats = await bus.stats()
    return {"held": stats["queues"][QUEUE]["ready"], **stats["journal"]}


async def held(path: str) -> int:
    async with asyncio.timeout(60), aiobus.connect(path) as bus:
        return int((await bus.stats())["queues"][QUEUE]["ready"])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat): on a busy machine, what the work
    cost, where wall time also counts the waits for a core."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def kill(servers: Servers, name: str) -> None:
    """SIGKILL by the PID servers.py started: a crash."""
    proc = servers.procs.pop(name)
    proc.kill()
    proc.wait(timeout=10)


def start(servers: Servers, name: str, data_dir: str,
          tree: str = "") -> tuple[str, float, float]:  # fmt: skip
    """Spawn a broker; (socket, wall seconds until it accepts, its CPU seconds then)."""
    started = time.monotonic()
    path = servers.start_aiobus(name, data_dir=data_dir, tree=tree)  # waits 60 s at most
    return path, time.monotonic() - started, cpu_seconds(servers.pid(name))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--size", type=int, default=128, help="body bytes")
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--trees", default="", metavar="OLD,NEW",
                        help="restart each tree's broker in turn (source directories)")
    args = parser.parse_args()
    trees = [os.path.abspath(t) for t in args.trees.split(",")] if args.trees else [""]
    with Servers() as servers:
        empty = os.path.join(servers.dir, "empty-data")
        _, baseline, baseline_cpu = start(servers, "aiobus-empty", empty, trees[0])
        kill(servers, "aiobus-empty")
        data = os.path.join(servers.dir, "data")
        path, _, _ = start(servers, "aiobus-fill", data, trees[0])
        began = time.monotonic()
        filled = uvloop.run(fill(path, args.messages, args.size))
        fill_seconds = time.monotonic() - began
        filled_rss = rss_bytes(servers.pid("aiobus-fill"))
        kill(servers, "aiobus-fill")
        print(f"aiobus {aiobus.__version__}: {filled['held']:,} messages of {args.size} B"
              f" queued in {fill_seconds:.1f} s; journal {filled['bytes'] / 1e6:.1f} MB"
              f" ({filled['bytes'] / filled['held']:.1f} B per message), broker RSS"
              f" {filled_rss / 2**20:.0f} MiB; killed (SIGKILL)")
        print(f"start-up with an empty data directory: {baseline:.2f} s to accept"
              f" ({baseline_cpu:.2f} s CPU)")
        accepts: dict[str, list[float]] = {tree: [] for tree in trees}
        cpus: dict[str, list[float]] = {tree: [] for tree in trees}
        logged: dict[str, list[float]] = {tree: [] for tree in trees}
        for i, tree in ((i, tree) for i in range(1, args.restarts + 1) for tree in trees):
            name = f"aiobus-restart{i}-{trees.index(tree)}"
            path, accept, cpu = start(servers, name, data, tree)
            count = uvloop.run(held(path))
            rss = rss_bytes(servers.pid(name))
            kill(servers, name)
            line = RECOVERED.search(Path(servers.dir, f"{name}.log").read_bytes())
            seconds = float(line.group(4)) if line else float("nan")
            accepts[tree].append(accept)
            cpus[tree].append(cpu)
            logged[tree].append(seconds)
            got = f"{int(line.group(2)):,}" if line else "?"
            print(f"restart {i}{f' {tree}' if tree else ''}: socket accepts after"
                  f" {accept:.2f} s ({cpu:.2f} s CPU);"
                  f" log: recovered {got} messages in {seconds:.2f} s;"
                  f" STATS ready {count:,}; RSS {rss / 2**20:.0f} MiB")
            if count != filled["held"]:
                print(f"MISMATCH: {count:,} recovered, {filled['held']:,} were queued")
                return 1
        for tree in trees:
            print(f"{tree + ': ' if tree else ''}median of {args.restarts}:"
                  f" {statistics.median(accepts[tree]):.2f} s to accept"
                  f" ({statistics.median(cpus[tree]):.2f} s CPU),"
                  f" {statistics.median(logged[tree]):.2f} s of journal replay (log)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
