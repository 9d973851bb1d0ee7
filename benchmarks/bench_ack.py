"""W3 as issue 13 measures it, old tree against new tree in one run: the consumer's ack
styles side by side, with the broker's CPU per message.

    python benchmarks/bench_ack.py --trees /work/wt-base,/work/wt-new [--messages 50000]
        [--repeats 3] [--modes process,ack,ack_nowait] [--profile DIR]

For each tree (its directory is put first on ``PYTHONPATH`` of the broker and both
children, so each side runs its own code; ``BROKER_TREE+CLIENT_TREE`` runs the broker of
one and the clients of the other, to tell which side a difference is on; a virtual
environment instead of a tree, such as ``make compiled``'s ``/tmp/aiobus-compiled/venv``,
runs its own Python and the aiobus installed there: the compiled build), a broker is
started on a socket in a fresh temp dir, then per run a producer keeps ``WINDOW``
confirmed sends in flight (``send_nowait``) and one consumer (``--prefetch``, default 100)
answers every message with:

- ``process``: ``async with msg.process():`` (the README's worker loop);
- ``ack``: ``await msg.ack()``;
- ``ack_nowait``: ``msg.ack_nowait()``;
- ``ack_confirm``: ``await msg.ack(confirm=True)`` (one ACK and one OK per loop turn: the
  broker's fixed cost per turn; not in trees before ``confirm`` existed).

A mode with the suffix ``:durable`` (``ack_nowait:durable``) runs on a durable queue of the
same broker instead, journaled with ``--fsync`` (default ``batch``): in-memory and durable
rows of one run, each tree against the others, as W3's durable rows (``--window 256``).

Runs alternate tree by tree and mode by mode (the machine is shared and noisy), and the
table gives medians and each tree's ratio to the first tree within this one run. Broker
CPU is its user+system time (``/proc/<pid>/stat``) from GO to the consumer's last
message, per message. Every wait has a timeout; processes are stopped by PID.

With ``--profile DIR`` the broker and the clients run under cProfile and write
``DIR/broker-<i>.prof`` (all of tree i's runs), ``DIR/consumer-<i>-<mode>.prof`` and
``DIR/producer-<i>-<mode>.prof`` (the last run); the timings are then the profiled
ones: compare the profiles, call counts per message are exact where the machine is too
noisy for times.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench_aiobus import _read_line, _stop

TIMEOUT = 120.0
WINDOW = 100  # confirmed sends in flight (issue 13's W3)
PREFETCH = 100
QUEUE = "bench.ack"
_TICK = os.sysconf("SC_CLK_TCK")


async def _wait_go() -> None:
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        raise SystemExit("expected GO")


async def child(role: str, mode: str, path: str, n: int, size: int,
                window_size: int = WINDOW, prefetch: int = PREFETCH) -> str:  # fmt: skip
    import aiobus

    body = os.urandom(size)
    mode, durable = mode.removesuffix(":durable"), mode.endswith(":durable")
    queue = QUEUE + ".durable" if durable else QUEUE
    async with aiobus.connect(path) as bus:
        await bus.declare_queue(queue, durable=durable)
        if role == "producer":
            await _wait_go()
            first = time.monotonic_ns()
            window: collections.deque[asyncio.Future[None]] = collections.deque()
            for _ in range(n):
                window.append(bus.send_nowait(queue, body))
                if len(window) >= window_size:
                    await window.popleft()
            for fut in window:
                await fut
            return f"DONE {first}"
        count = last = 0
        await _wait_go()
        cpu = time.process_time()
        async for msg in bus.consume(queue, prefetch=prefetch):
            if mode == "process":
                async with msg.process():
                    count += 1
            elif mode == "ack":
                await msg.ack()
                count += 1
            elif mode == "ack_confirm":  # one ACK and one OK per loop turn (new API only)
                await msg.ack(confirm=True)
                count += 1
            else:
                msg.ack_nowait()
                count += 1
            last = time.monotonic_ns()
            if count == n:
                break
        cpu = time.process_time() - cpu
        await bus.ping()  # the last acks reached the broker
        return f"DONE {count} {last} {cpu}"


def _profiled(profile: str | None) -> list[str]:
    return [] if profile is None else ["-m", "cProfile", "-o", profile]


def python_of(tree: str) -> tuple[str, dict[str, str]]:
    """The interpreter and environment that run ``tree``: a source tree goes first on
    ``PYTHONPATH`` of this interpreter; a virtual environment (a directory with
    ``bin/python``, such as ``make compiled``'s ``/tmp/aiobus-compiled/venv``) runs its own
    Python and the aiobus installed in it (the compiled build)."""
    venv_python = os.path.join(tree, "bin", "python")
    if os.path.exists(venv_python):
        return venv_python, {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return sys.executable, {**os.environ, "PYTHONPATH": tree}


def _spawn(tree: str, argv: list[str], profile: str | None = None) -> subprocess.Popen[str]:
    python, env = python_of(tree)
    return subprocess.Popen([python, *_profiled(profile), *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime


def start_broker(tree: str, path: str, profile: str | None = None,
                 extra: list[str] | None = None) -> subprocess.Popen[str]:
    data_dir = os.path.join(os.path.dirname(path), "data")
    python, env = python_of(tree)
    broker = subprocess.Popen([python, *_profiled(profile), "-m", "aiobus.cli.broker",
                               "--socket", path, "--data-dir", data_dir, "--log-level",
                               "WARNING", "--drain-timeout", "0", *(extra or [])], text=True,
                              env=env,
                              # `-m` puts the working directory first on sys.path, ahead
                              # of PYTHONPATH: run in the tree, or a broker started from
                              # another checkout would import that checkout's aiobus.
                              cwd=tree)  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if broker.poll() is not None:
            raise RuntimeError(f"the broker exited with {broker.returncode}")
        if os.path.exists(path):
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    return broker
                except OSError:
                    pass
        time.sleep(0.01)
    _stop(broker)
    raise RuntimeError("the broker did not come up within 10 s")


def measure(tree: str, broker: int, mode: str, path: str, n: int, size: int,
            profile: str | None = None, window: int = WINDOW,
            prefetch: int = PREFETCH) -> tuple[float, float, float]:
    """One run; returns (messages per second, broker and consumer CPU µs per message)."""
    common = ["--mode", mode, "--socket", path, "--messages", str(n), "--size", str(size),
              "--window", str(window), "--prefetch", str(prefetch)]
    script = os.path.abspath(__file__)
    deadline = time.monotonic() + TIMEOUT
    procs = [_spawn(tree, [script, "--child", "consumer", *common], profile)]
    try:
        if _read_line(procs[0], deadline) != "READY":
            raise RuntimeError("consumer not ready")
        procs.append(_spawn(tree, [script, "--child", "producer", *common],
                            profile and profile.replace("consumer-", "producer-")))
        if _read_line(procs[1], deadline) != "READY":
            raise RuntimeError("producer not ready")
        cpu = _cpu(broker)
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        _, count, last, consumer_cpu = _read_line(procs[0], deadline).split()
        cpu = _cpu(broker) - cpu
        _, first = _read_line(procs[1], deadline).split()
        if int(count) != n:
            raise RuntimeError(f"{mode}: received {count} of {n}")
        return (n / ((int(last) - int(first)) / 1e9), cpu / n * 1e6,
                float(consumer_cpu) / n * 1e6)
    finally:
        for proc in procs:
            if profile is not None:  # let it exit by itself: cProfile writes at exit
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
            _stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", default=os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), help="comma-separated source trees to compare")
    parser.add_argument("--modes", default="process,ack,ack_nowait")
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=128, help="body bytes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--window", type=int, default=WINDOW,
                        help="confirmed sends in flight (W3's durable rows: 256)")
    parser.add_argument("--prefetch", type=int, default=PREFETCH,
                        help="the consumer's prefetch (W3's: 256)")
    parser.add_argument("--fsync", default="batch", choices=["always", "batch", "never"],
                        help="the brokers' --fsync, for the ':durable' modes")
    parser.add_argument("--broker-args", default="", metavar="ARGS",
                        help="more aiobus-broker options for the broker of each tree after"
                             " the first, e.g. '--dedup-size 0'")
    parser.add_argument("--profile", metavar="DIR",
                        help="run the broker and the consumer under cProfile, into DIR")
    parser.add_argument("--child", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        print(run(child(args.child, args.mode, args.socket, args.messages, args.size,
                        args.window, args.prefetch)), flush=True)  # fmt: skip
        return 0

    trees = args.trees.split(",")
    if len(set(trees)) != len(trees):
        parser.error("name each tree once (a symlink gives the same tree a second name)")
    modes = args.modes.split(",")
    tmp = tempfile.mkdtemp(prefix="aiobus-ack-", dir="/tmp")  # short: AF_UNIX caps at 107
    brokers: dict[str, tuple[subprocess.Popen[str], str]] = {}
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = collections.defaultdict(list)
    try:
        profiles = {}
        for i, tree in enumerate(trees):
            os.mkdir(os.path.join(tmp, str(i)))
            path = os.path.join(tmp, str(i), "bus.sock")
            if args.profile:
                os.makedirs(args.profile, exist_ok=True)
                profiles[tree] = os.path.join(os.path.abspath(args.profile), f"{{}}-{i}")
            broker_tree = tree.split("+")[0]
            brokers[tree] = start_broker(
                broker_tree, path,
                profiles[tree].format("broker") + ".prof" if profiles else None,
                ["--fsync", args.fsync, *(args.broker_args.split() if i else [])]), path
        for _ in range(args.repeats):
            for mode in modes:
                for tree in trees:
                    broker, path = brokers[tree]
                    profile = (profiles[tree].format("consumer")
                               + f"-{mode.replace(':', '-')}.prof" if profiles else None)
                    results[tree, mode].append(measure(tree.split("+")[-1], broker.pid, mode,
                                                       path, args.messages, args.size, profile,
                                                       args.window, args.prefetch))
    finally:
        for broker, _ in brokers.values():
            _stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.messages:,} messages of {args.size} B, {args.window} confirmed sends in"
          f" flight, prefetch {args.prefetch}, median of {args.repeats}; durable: --fsync"
          f" {args.fsync}")
    print(f"{'tree':<24} {'mode':<19} {'msgs/s':>9} {'min-max':>15} {'vs tree 1':>10}"
          f" {'broker µs/msg':>14} {'(min-max)':>11} {'consumer µs/msg':>16}")
    for mode in modes:
        base = statistics.median(r[0] for r in results[trees[0], mode])
        for tree in trees:
            rates = [r[0] for r in results[tree, mode]]
            broker_cpus = [r[1] for r in results[tree, mode]]
            broker_cpu = statistics.median(broker_cpus)
            # CPU time only grows when others load the machine: the minimum is the
            # least disturbed run.
            broker_spread = f"{min(broker_cpus):.1f}-{max(broker_cpus):.1f}"
            consumer_cpu = statistics.median(r[2] for r in results[tree, mode])
            rate = statistics.median(rates)
            spread = f"{min(rates) / 1000:.1f}k-{max(rates) / 1000:.1f}k"
            label = "+".join(os.path.basename(t) for t in tree.split("+"))
            print(f"{label:<24} {mode:<19} {rate:>9,.0f} {spread:>15}"
                  f" {rate / base:>9.2f}x {broker_cpu:>14.1f} {broker_spread:>11}"
                  f" {consumer_cpu:>16.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
