"""Topic fan-out, tree against tree in one run: the broker's CPU per published message.

    python benchmarks/bench_fanout.py --trees /work/wt-base,/work/wt-new [--subscribers 4]
        [--messages 50000] [--size 128] [--repeats 3] [--broker-args "..."] [--profile DIR]

For each tree (first on ``PYTHONPATH`` of its broker and of the children, as in
``bench_ack.py``) a broker is started; per run ``--subscribers`` processes subscribe to
one topic (``max_pending`` large enough that nothing is dropped) and one process
publishes ``--messages`` bodies of ``--size`` bytes to it, then pings. Runs alternate
tree by tree. Reported, medians: deliveries per second (wall clock, from the first
publish to the last subscriber's last message: noisy on a shared machine), the broker's
CPU (``/proc/<pid>/stat`` user+system, from GO until every subscriber is done) per
published message and per delivery, a subscriber's and the publisher's CPU per message. With
``--subscribers 1`` this is W1 (topic 1 -> 1); 4 is W2's fan-out.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time

from bench_ack import _cpu, _spawn, _wait_go, start_broker
from bench_aiobus import _read_line, _stop

TIMEOUT = 120.0
TOPIC = "bench.fanout"


async def child(role: str, path: str, n: int, size: int) -> str:
    import aiobus

    body = os.urandom(size)
    async with aiobus.connect(path) as bus:
        if role == "publisher":
            await _wait_go()
            first, cpu = time.monotonic_ns(), time.process_time()
            for _ in range(n):
                await bus.publish(TOPIC, body)
            await bus.ping()
            return f"DONE {first} {time.process_time() - cpu}"
        count = last = 0
        async with bus.subscribe(TOPIC, max_pending=max(1024, n)) as sub:
            await _wait_go()
            cpu = time.process_time()
            async for _msg in sub:
                count += 1
                last = time.monotonic_ns()
                if count == n:
                    break
            cpu = time.process_time() - cpu
        return f"DONE {count} {last} {cpu}"


def measure(tree: str, broker: int, path: str, subscribers: int, n: int, size: int,
            profile: str | None = None) -> tuple[float, float, float, float]:  # fmt: skip
    """One run; returns (deliveries per second, broker CPU µs per published message,
    the median subscriber's and the publisher's CPU µs per message)."""
    common = ["--socket", path, "--messages", str(n), "--size", str(size)]
    script = os.path.abspath(__file__)
    deadline = time.monotonic() + TIMEOUT
    procs = []
    try:
        for i in range(subscribers):
            procs.append(_spawn(tree, [script, "--child", "subscriber", *common],
                                profile and os.path.join(profile, f"subscriber-{i}.prof")))
            if _read_line(procs[-1], deadline) != "READY":
                raise RuntimeError("subscriber not ready")
        procs.append(_spawn(tree, [script, "--child", "publisher", *common],
                            profile and os.path.join(profile, "publisher.prof")))
        if _read_line(procs[-1], deadline) != "READY":
            raise RuntimeError("publisher not ready")
        cpu = _cpu(broker)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        lasts, sub_cpus = [], []
        for proc in procs[:-1]:
            _, count, last, sub_cpu = _read_line(proc, deadline).split()
            if int(count) != n:
                raise RuntimeError(f"a subscriber received {count} of {n}")
            lasts.append(int(last))
            sub_cpus.append(float(sub_cpu))
        cpu = _cpu(broker) - cpu
        _, first, pub_cpu = _read_line(procs[-1], deadline).split()
        seconds = (max(lasts) - int(first)) / 1e9
        return (n * subscribers / seconds, cpu / n * 1e6,
                statistics.median(sub_cpus) / n * 1e6, float(pub_cpu) / n * 1e6)
    finally:
        for proc in procs:
            _stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), help="comma-separated source trees to compare")
    parser.add_argument("--subscribers", type=int, default=4)
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=128, help="body bytes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--broker-args", default="", help="extra aiobus-broker arguments")
    parser.add_argument("--profile", metavar="DIR",
                        help="run everything under cProfile; the last run's profiles go to"
                             " DIR/<tree #>/{broker,publisher,subscriber-<i>}.prof")
    parser.add_argument("--child", choices=["publisher", "subscriber"], help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        print(run(child(args.child, args.socket, args.messages, args.size)), flush=True)
        return 0

    trees = args.trees.split(",")
    tmp = tempfile.mkdtemp(prefix="aiobus-fanout-", dir="/tmp")  # short: AF_UNIX caps at 107
    brokers: dict[str, tuple[int, str]] = {}
    procs = []
    results: dict[str, list[tuple[float, float, float, float]]] = {tree: [] for tree in trees}
    profiles = {tree: args.profile and os.path.abspath(os.path.join(args.profile, str(i)))
                for i, tree in enumerate(trees)}  # fmt: skip
    try:
        for i, tree in enumerate(trees):
            os.mkdir(os.path.join(tmp, str(i)))
            path = os.path.join(tmp, str(i), "bus.sock")
            if profiles[tree]:
                os.makedirs(profiles[tree], exist_ok=True)
            procs.append(start_broker(tree, path, profiles[tree] and os.path.join(
                profiles[tree], "broker.prof"), args.broker_args.split()))
            brokers[tree] = procs[-1].pid, path
        for _ in range(args.repeats):
            for tree in trees:
                pid, path = brokers[tree]
                results[tree].append(measure(tree, pid, path, args.subscribers,
                                             args.messages, args.size, profiles[tree]))
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"1 publisher -> {args.subscribers} subscribers, {args.messages:,} messages of"
          f" {args.size} B, median of {args.repeats}")
    print(f"{'tree':<24} {'deliveries/s':>13} {'broker µs/msg':>14} {'min-max':>12}"
          f" {'vs tree 1':>10} {'µs/delivery':>12} {'subscriber µs/msg':>18}"
          f" {'publisher µs/msg':>17}")
    base = statistics.median(r[1] for r in results[trees[0]])
    for tree in trees:
        cpus = [r[1] for r in results[tree]]
        cpu, rate = statistics.median(cpus), statistics.median(r[0] for r in results[tree])
        print(f"{os.path.basename(tree):<24} {rate:>13,.0f}"
              f" {cpu:>14.2f} {f'{min(cpus):.1f}-{max(cpus):.1f}':>12} {cpu / base:>9.2f}x"
              f" {cpu / args.subscribers:>12.2f}"
              f" {statistics.median(r[2] for r in results[tree]):>18.2f}"
              f" {statistics.median(r[3] for r in results[tree]):>17.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
