"""The broker core's CPU per queued message, W3-shaped, with no I/O (not part of `make test`).

    PYTHONPATH=<tree> python benchmarks/bench_queue_core.py [--seq] [--messages 100000]
        [--repeats 5]

A :class:`~aiobus.broker.core.BrokerCore` with a sink that keeps only what it must: one
producer sends confirmed SENDs of 128 bytes (``--seq``: resendable ones, with a
``client_id`` and a seq each, as the Python client sends them) to a queue with one
consumer (prefetch 100), which acks each 100 with one ACK_MANY; ``now`` moves once per
100 messages. Prints process (CPU) time per message, each repeat and the median. The
core's API has been stable since before issue 11, so ``PYTHONPATH=<older tree>`` runs
it against older code (without ``--seq`` there). Run trees alternately: the machine is
shared.
"""

from __future__ import annotations

import argparse
import statistics
import time

import bench_dedup
import msgpack

from aiobus.broker.core import BrokerCore
from aiobus.protocol import Op

SEND, HELLO, CONSUME, ACK_MANY = int(Op.SEND), int(Op.HELLO), int(Op.CONSUME), int(Op.ACK_MANY)
BATCH = 100  # messages per loop turn, and the consumer's prefetch


class Sink(bench_dedup.Sink):
    """bench_dedup's null sink, keeping the consumer's DELIVERs (its tags are acked)."""

    def __init__(self) -> None:
        self.delivered: list[bytes] = []

    def send_raw(self, conn: int, data: bytes) -> None:
        if conn == 2:
            self.delivered.append(data)


def run(n: int, seq: bool) -> float:
    """CPU microseconds per message for ``n`` messages."""
    sink = Sink()
    core = BrokerCore(sink, id_prefix="p")
    now = 10.0
    core.connect(1, 100, 1000, 1000, now)
    core.connect(2, 101, 1000, 1000, now)
    core.receive(1, [HELLO, 1, {"client_id": "0123456789abcdef"} if seq else {}], now)
    core.receive(2, [HELLO, 1, {}], now)
    core.receive(2, [CONSUME, 1, 7, "q", BATCH], now)
    body = b"x" * 128
    unpack = msgpack.unpackb
    started = time.process_time()
    for start in range(0, n, BATCH):
        for i in range(start + 1, start + BATCH + 1):
            if seq:
                core.receive(1, [SEND, i, "q", body, 0, None, None, None, None, i], now)
            else:
                core.receive(1, [SEND, i, "q", body, 0, None, None, None], now)
        tags = [unpack(d)[2] for d in sink.delivered]  # as the consumer reads them
        sink.delivered.clear()
        core.receive(2, [ACK_MANY, tags], now)
        now += 0.0001
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", action="store_true", help="resendable SENDs (a seq each)")
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    runs = [run(args.messages, args.seq) for _ in range(args.repeats)]
    print(f"{'seq' if args.seq else 'plain'}: median {statistics.median(runs):.2f} us/msg"
          f" (runs: {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
