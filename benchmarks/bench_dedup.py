"""What resendable SENDs (a ``seq``, PROTOCOL.md §8 "Resends and deduplication") cost the
broker core per message, and what the deduplication window costs in memory per id (not
part of `make test`).

    python benchmarks/bench_dedup.py [--messages 100000] [--repeats 5] [--modes ...]

A :class:`~aiobus.broker.core.BrokerCore` without sockets or journal: one producer
sends ``--messages`` confirmed SENDs of 128 bytes to a queue nobody consumes, a frame at
a time as the shell hands them over, ``now`` moving once per 100 frames (one loop turn).
Modes, run interleaved, medians printed in ns/message of process (CPU) time:

* ``plain``: 8-field SENDs, no seq (what every SEND was before; runs on older trees too,
  so ``PYTHONPATH=<old tree> python benchmarks/bench_dedup.py --modes plain`` compares);
* ``seq``: 10-field SENDs with a new seq each: checked against the window, then added;
* ``resend``: the same seqs again: every one a duplicate, answered and not queued.

Then the window's memory, with tracemalloc: bytes per id of a full window (100,000 ids of
a 16-hex-digit client id), counting the id strings (which outlive their messages only
here) and without them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
import tracemalloc
from typing import Any

from aiobus.broker.core import BrokerCore
from aiobus.protocol import Op

TURN = 100  # frames per loop turn: one ``now`` for all of them
CLIENT_ID = "0123456789abcdef"  # as the Python client makes them: 16 random hex digits


class Sink:
    def send(self, conn: int, frame: list[Any]) -> None:
        if frame[0] == Op.ERROR:
            raise RuntimeError(f"the core answered {frame}")

    def send_raw(self, conn: int, data: bytes) -> None:
        pass

    def confirm(self, conn: int, rid: int) -> None:
        pass

    def event(self, conn: int, sid: int, message: bytes, dropped: int) -> None:
        pass

    def close(self, conn: int, code: str, message: str) -> None:
        raise RuntimeError(f"the core closed connection {conn}: {code} {message}")

    def set_reading(self, conn: int, reading: bool) -> None:
        pass


def frames(mode: str, n: int) -> list[list[Any]]:
    body = b"x" * 128
    if mode == "plain":
        return [[int(Op.SEND), i + 10, "q", body, 0, None, None, None] for i in range(n)]
    return [[int(Op.SEND), i + 10, "q", body, 0, None, None, None, None, i + 1]
            for i in range(n)]


def run(mode: str, n: int) -> float:
    """ns per SEND for ``mode``."""
    core = BrokerCore(Sink(), id_prefix="b")
    core.connect(1, 1000, 1000, 1000, 0.0)
    core.receive(1, [int(Op.HELLO), 1, {"client_id": CLIENT_ID}], 0.0)
    if mode == "resend":  # the originals, untimed
        for frame in frames("seq", n):
            core.receive(1, frame, 0.0)
    batch = frames("seq" if mode == "resend" else mode, n)
    receive = core.receive
    gc.collect()
    started = time.process_time()  # CPU time: the machine is shared
    now = 1.0
    for start in range(0, n, TURN):
        for frame in batch[start:start + TURN]:
            receive(1, frame, now)
        now += 0.001
    elapsed = time.process_time() - started
    stats = core.stats()["queues"]["q"]
    assert stats["ready"] == n, stats  # the resends' originals: queued once
    assert stats.get("duplicates", 0) == (n if mode == "resend" else 0), stats
    return elapsed / n * 1e9


def window_memory(n: int) -> tuple[float, float]:
    """Bytes per id of a window of ``n`` ids: with the id strings (made while traced, as
    the core makes them), and without them (made before)."""
    from aiobus.broker.dedup import DedupWindow

    def fill(ids: Any) -> float:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        window = DedupWindow(120.0, n)
        now = 1.0
        for i, mid in enumerate(ids):
            if i % TURN == 0:
                now += 0.001  # one float per loop turn, as the shell passes ``now``
            window.add(mid, now)
        used = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        assert len(window) == n
        return used / n

    made = [f"{CLIENT_ID}-{i}" for i in range(1, n + 1)]
    return fill(f"{CLIENT_ID}-{i}" for i in range(1, n + 1)), fill(made)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--modes", nargs="+", default=["plain", "seq", "resend"],
                        choices=["plain", "seq", "resend"])
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    results: dict[str, list[float]] = {mode: [] for mode in args.modes}
    for _ in range(args.repeats):
        for mode in args.modes:
            results[mode].append(run(mode, args.messages))
    for mode, values in results.items():
        runs = ", ".join(f"{v:.0f}" for v in values)
        print(f"{mode:7s} {statistics.median(values):6.0f} ns/SEND  (runs: {runs})")
    if not args.no_memory:
        total, structure = window_memory(100_000)
        print(f"window: {total:.0f} bytes/id with the id string, {structure:.0f} without"
              f" (100,000 ids like {CLIENT_ID}-12345)")


if __name__ == "__main__":
    main()
