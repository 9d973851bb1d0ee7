"""A first, standalone benchmark of aiobus alone: messages per second through a real broker.

    python benchmarks/bench_aiobus.py [--messages 100000] [--size 128] [--repeats 3]

It starts `python -m aiobus.cli.broker` on a socket in a fresh temp dir, then measures two
paths, each with the producer and the consumer as separate processes (this script run
again as a child with --child):

- queue: `send(confirm=False)` (the last one confirmed) -> `consume(prefetch=256)` ->
  `msg.ack_nowait()` per message;
- topic: `publish` -> `subscribe` (registered before the publisher starts; `max_pending`
  raised so that nothing is dropped).

Children talk over stdin/stdout: a child prints READY when connected (the subscriber once
the broker has registered it), the parent answers GO to all, and each prints one DONE line
with its numbers. The time is from the producer's first send to the consumer's last
receive, both read from CLOCK_MONOTONIC (`time.monotonic_ns`), which all processes on the
machine share. Every wait has a timeout, and the broker and the children are stopped by
PID in `finally`. Needs only aiobus (and uvloop, used when importable). The full
comparison with NATS, Redis and ZeroMQ is `benchmarks/run.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import aiobus

TIMEOUT = 120.0  # seconds for any one run


# -- children -------------------------------------------------------------------------------


async def _wait_go() -> None:
    print("READY", flush=True)
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "GO":
        raise SystemExit("expected GO")


async def child(role: str, mode: str, path: str, n: int, size: int) -> str:
    body = os.urandom(size)
    name = "bench.aiobus"
    async with aiobus.connect(path) as bus:
        if role == "producer":
            await bus.declare_queue(name)
            await _wait_go()
            first = time.monotonic_ns()
            if mode == "queue":
                for _ in range(n - 1):
                    await bus.send(name, body, confirm=False)
                await bus.send(name, body)
            else:
                for _ in range(n):
                    await bus.publish(name, body)
                await bus.ping()
            return f"DONE {first}"
        count = last = 0
        if mode == "queue":
            await bus.declare_queue(name)
            await _wait_go()
            async for msg in bus.consume(name, prefetch=256):
                msg.ack_nowait()
                count += 1
                last = time.monotonic_ns()
                if count == n:
                    break
            await bus.ping()  # the acks reached the broker
        else:
            async with bus.subscribe(name, max_pending=max(1024, n)) as sub:
                await _wait_go()
                async for _msg in sub:
                    count += 1
                    last = time.monotonic_ns()
                    if count == n:
                        break
        return f"DONE {count} {last}"


# -- parent ---------------------------------------------------------------------------------


def _spawn(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip


def _read_line(proc: subprocess.Popen[str], deadline: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"child {proc.pid} said nothing in time")
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"child {proc.pid} exited with {proc.wait()}")
    return line.strip()


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop one process we started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def start_broker(path: str, *extra: str) -> subprocess.Popen[str]:
    # Its data directory beside the socket, never the user's default (one broker per dir).
    data_dir = os.path.join(os.path.dirname(path), "data")
    broker = subprocess.Popen([sys.executable, "-m", "aiobus.cli.broker", "--socket", path,
                               "--data-dir", data_dir, "--log-level", "WARNING", *extra],
                              text=True)  # fmt: skip
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


def measure(mode: str, path: str, n: int, size: int) -> float:
    """One run: consumer and producer processes; returns messages per second."""
    common = ["--mode", mode, "--socket", path, "--messages", str(n), "--size", str(size)]
    script = os.path.abspath(__file__)
    deadline = time.monotonic() + TIMEOUT
    procs = [_spawn([script, "--child", "consumer", *common])]
    try:
        if _read_line(procs[0], deadline) != "READY":
            raise RuntimeError("consumer not ready")
        procs.append(_spawn([script, "--child", "producer", *common]))
        if _read_line(procs[1], deadline) != "READY":
            raise RuntimeError("producer not ready")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("GO\n")
            proc.stdin.flush()
        _, count, last = _read_line(procs[0], deadline).split()
        _, first = _read_line(procs[1], deadline).split()
        if int(count) != n:
            raise RuntimeError(f"{mode}: received {count} of {n}")
        return n / ((int(last) - int(first)) / 1e9)
    finally:
        for proc in procs:
            _stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=128, help="body bytes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--policy-rules", type=int, default=0, metavar="N",
                        help="also run a second broker with a policy of N rules, alternating"
                             " runs between the two (issue 12's check)")
    parser.add_argument("--child", choices=["producer", "consumer"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["queue", "topic"], help=argparse.SUPPRESS)
    parser.add_argument("--socket", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        try:
            import uvloop

            run = uvloop.run
        except ImportError:
            run = asyncio.run
        print(run(child(args.child, args.mode, args.socket, args.messages, args.size)),
              flush=True)  # fmt: skip
        return 0

    tmp = tempfile.mkdtemp(prefix="aiobus-bench-", dir="/tmp")  # short: AF_UNIX caps at 107
    setups = {"": ()}
    if args.policy_rules:
        from policy_file import write_policy

        policy = write_policy(os.path.join(tmp, "policy.toml"), args.policy_rules)
        setups[f" [{args.policy_rules}-rule policy]"] = ("--policy", policy)
    brokers: dict[str, tuple[str, subprocess.Popen[str]]] = {}
    rates: dict[tuple[str, str], list[float]] = {
        (mode, setup): [] for mode in ("queue", "topic") for setup in setups}
    try:
        for i, (setup, extra) in enumerate(setups.items()):
            os.mkdir(os.path.join(tmp, str(i)))
            path = os.path.join(tmp, str(i), "bus.sock")
            brokers[setup] = path, start_broker(path, *extra)
        for _ in range(args.repeats):  # interleaved: queue, topic, queue, topic, ...
            for mode, setup in rates:  # ... and with and without a policy
                rates[mode, setup].append(
                    measure(mode, brokers[setup][0], args.messages, args.size))
    finally:
        for _, broker in brokers.values():
            _stop(broker)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"aiobus {aiobus.__version__}, {args.messages:,} messages of {args.size} B, "
          f"{args.repeats} runs each")
    print(f"{'path':<52} {'msgs/s (median)':>16} {'min-max':>20}")
    labels = {"queue": "queue: send -> consume -> ack", "topic": "topic: publish -> subscribe"}
    for (mode, setup), values in rates.items():
        spread = f"{min(values):,.0f}-{max(values):,.0f}"
        print(f"{labels[mode] + setup:<52} {statistics.median(values):>16,.0f} {spread:>20}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
