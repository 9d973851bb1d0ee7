"""What a durable queue costs the broker per message, in process (not part of `make test`).

    python benchmarks/bench_durable_core.py [--messages 50000] [--size 128] [--repeats 5]
        [--profile] [--cpu] [--queued] [--seq]

A :class:`~aiobus.broker.core.BrokerCore` with a :class:`~aiobus.broker.journal.Journal`
on a temp dir (``OsFiles``; written once per batch as the shell does once per loop turn,
never synced: fsync is not what this measures), no sockets: one producer sends batches
of 100 confirmed SENDs of ``--size`` bytes to a queue with one consumer (prefetch 100),
which acks each batch with one ACK_MANY. With ``--queued`` the consumer acks each batch
only after the next one was sent, so every message waits in the queue and takes the
queued path (``_accept``, then ``pump`` on the ACK_MANY), as most do in W3 with 256
confirmed sends in flight; without it every message goes straight to the consumer (the
send fast path). With ``--seq`` every SEND carries a seq, as every confirmed send of the
Python client does (deduplication; the journal's Sent then has an ``accepted`` time).
Timed: the core's handling of the frames and the journal write; not
timed: reading the delivery tags back out of the DELIVER bytes.
Prints µs/message for an in-memory queue and a durable one, runs interleaved, medians,
and with ``--profile`` a cProfile of one durable run. ``--cpu`` times with the process's
CPU clock instead of the wall clock (for a shared, loaded machine). W3's durable rows
(``benchmarks/run.py --only W3``) are the end-to-end check.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import statistics
import tempfile
import time
from itertools import islice
from typing import Any

import msgpack

from aiobus.broker.core import BrokerCore
from aiobus.broker.journal import Journal, OsFiles
from aiobus.protocol import Op

BATCH = 100


class Sink:
    """The core's output, kept as given (DELIVERs stay bytes until the timer stops)."""

    def __init__(self) -> None:
        self.raw: list[bytes] = []

    def send(self, conn: int, frame: list[Any]) -> None:
        if frame[0] == Op.ERROR:
            raise RuntimeError(f"the core answered {frame}")

    def send_raw(self, conn: int, data: bytes) -> None:
        self.raw.append(data)

    def confirm(self, conn: int, rid: int) -> None:
        pass

    def event(self, conn: int, sid: int, message: bytes, dropped: int) -> None:
        pass

    def close(self, conn: int, code: str, message: str) -> None:
        raise RuntimeError(f"the core closed connection {conn}: {code} {message}")

    def set_reading(self, conn: int, reading: bool) -> None:
        pass


def delivered(sink: Sink) -> list[int]:
    """The delivery tags of the DELIVERs the core wrote since the last call."""
    unpacker = msgpack.Unpacker(raw=False)
    for data in sink.raw:
        unpacker.feed(data)
    sink.raw.clear()
    return [frame[2] for frame in unpacker]


def run(durable: bool, n: int, size: int, profile: bool = False,
        clock: Any = time.perf_counter, queued: bool = False, seq: bool = False) -> float:
    """µs per message: send, deliver, ack."""
    directory = tempfile.mkdtemp(prefix="aiobus-bench-core-")
    try:
        journal, _ = Journal.open(OsFiles(directory))
        sink = Sink()
        core = BrokerCore(sink, journal=journal, id_prefix="b")
        for conn in (1, 2):
            core.connect(conn, 1000 + conn, 1000, 1000, 0.0)
            core.receive(conn, [int(Op.HELLO), 1, {"client_id": f"c{conn}"} if seq else {}],
                         0.0)
        core.receive(1, [int(Op.DECLARE), 2, "q", {"durable": durable}], 0.0)
        core.receive(2, [int(Op.CONSUME), 3, 1, "q", BATCH], 0.0)
        body = b"x" * size
        rids = iter(range(10, 10 + n))
        receive = core.receive
        profiler = cProfile.Profile() if profile else None
        timed = 0.0
        held: list[int] = []  # --queued: the batch the consumer still holds
        for _ in range(n // BATCH):
            sends = [[int(Op.SEND), rid, "q", body, 0, None, None, None, None,
                      rid if seq else None] for rid in islice(rids, BATCH)]
            started = clock()
            if profiler:
                profiler.enable()
            for frame in sends:
                receive(1, frame, 0.0)
            journal.write()
            if profiler:
                profiler.disable()
            timed += clock() - started
            tags = delivered(sink)
            if queued:  # ack what the consumer held; the batch just sent waits in the queue
                if not held:  # the first batch went straight to the consumer
                    held = tags
                    continue
                tags, held = held, tags
            if len(tags) != BATCH:
                raise RuntimeError(f"expected {BATCH} deliveries, got {len(tags)}")
            started = clock()
            if profiler:
                profiler.enable()
            receive(2, [int(Op.ACK_MANY), tags], 0.0)
            journal.write()
            if profiler:
                profiler.disable()
            timed += clock() - started
            if queued:  # the acks let the queued batch out
                held = delivered(sink)
        journal.close()
        if profiler:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(16)
            print(out.getvalue())
        return timed / n * 1e6
    finally:
        shutil.rmtree(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="time with the CPU clock")
    parser.add_argument("--queued", action="store_true",
                        help="every message waits in the queue (the consumer acks late)")
    parser.add_argument("--seq", action="store_true",
                        help="SENDs with a seq, as the Python client's confirmed sends")
    args = parser.parse_args()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for durable in (False, True):
            times[durable].append(run(durable, args.messages, args.size,
                                      clock=time.process_time if args.cpu else time.perf_counter,
                                      queued=args.queued, seq=args.seq))
    memory, durable = statistics.median(times[False]), statistics.median(times[True])
    path = ("queued path" if args.queued else "send fast path") + (", seq" if args.seq else "")
    print(f"{args.messages:,} messages of {args.size} B ({path}), {args.repeats} runs each,"
          " medians")
    print(f"memory   {memory:6.2f} µs/msg   {[round(t, 2) for t in times[False]]}")
    print(f"durable  {durable:6.2f} µs/msg   {[round(t, 2) for t in times[True]]}")
    print(f"durable / memory: {durable / memory:.2f}x the time")
    if args.profile:
        run(True, args.messages, args.size, profile=True, queued=args.queued, seq=args.seq)


if __name__ == "__main__":
    main()
