"""Journal numbers for docs/journal.md (not part of `make test`).

    python benchmarks/bench_journal.py checksums   # zlib.crc32 vs crc32c vs xxhash, if installed
    python benchmarks/bench_journal.py write       # 128-byte messages, write+fdatasync per 1,000
    python benchmarks/bench_journal.py recover     # replay of 1,000,000 queued messages
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import timeit
import zlib
from collections.abc import Callable
from typing import Any

import msgpack

from aiobus.broker.journal import Journal, OsFiles, RemovalReason


def checksums() -> None:
    candidates: dict[str, Callable[[bytes], Any]] = {"zlib.crc32": zlib.crc32}
    try:
        import crc32c
        candidates["crc32c.crc32c"] = crc32c.crc32c
    except ImportError:
        print("crc32c not installed")
    try:
        import xxhash
        candidates["xxhash.xxh32_intdigest"] = xxhash.xxh32_intdigest
        candidates["xxhash.xxh3_64_intdigest"] = xxhash.xxh3_64_intdigest
    except ImportError:
        print("xxhash not installed")
    for size in (64, 1024, 65536):
        data = os.urandom(size)
        number = max(2000, 20_000_000 // size)
        for name, func in candidates.items():
            best = min(timeit.repeat("f(d)", globals={"f": func, "d": data},
                                     number=number, repeat=5)) / number
            print(f"{size:>6} B  {name:<26} {best * 1e9:8.0f} ns  {size / best / 1e9:6.2f} GB/s")


def message(seq: int) -> bytes:
    body = b"x" * 88  # the whole encoded message is 128 bytes
    return msgpack.packb([f"{seq:020d}", "jobs", body, 0, None, 1.7e9])


def write(total: int = 200_000, batch: int = 1000) -> None:
    size = len(message(0))
    with tempfile.TemporaryDirectory() as tmp:
        journal, _ = Journal.open(OsFiles(tmp))
        journal.declare("jobs", {})
        start = time.perf_counter()
        for first in range(0, total, batch):
            for seq in range(first, first + batch):
                journal.sent("jobs", seq, message(seq))
            journal.write()
            journal.sync()
        elapsed = time.perf_counter() - start
        sent_bytes = journal.statistics()["bytes"]
        written = journal.written  # (bytes appended; settled segments are deleted)
        half = total // 2
        for seq in range(half):  # a turn per delivery, one per ack: no runs
            journal.delivered("jobs", seq)
            journal.write()
            journal.removed("jobs", seq, RemovalReason.ACKED)
            journal.write()
        journal.sync()
        one_by_one = journal.written - written
        for first in range(half, total, 100):  # a broker's turns with prefetch 100 (W3):
            for seq in range(first, first + 100):  # a pump's deliveries in a row, then
                journal.delivered("jobs", seq)  # an ACK_MANY's acks in a row (version 4
            for seq in range(first, first + 100):  # merges each into one run record;
                # version 5 sends too: `write` sends in turns of `batch`, a SentRun each)
                journal.removed("jobs", seq, RemovalReason.ACKED)
        journal.write()
        journal.sync()
        in_turns = journal.written - written - one_by_one
        journal.close()
    print(f"message {size} B; {total / elapsed:,.0f} sends/s with write+fdatasync per {batch}")
    print(f"journal bytes per message: send only {sent_bytes / total:.1f} "
          f"({sent_bytes / total / size:.2f}x); send+delivered+acked one by one "
          f"{(sent_bytes + 2 * one_by_one) / total:.1f} "
          f"({(sent_bytes + 2 * one_by_one) / total / size:.2f}x), in turns of 100 "
          f"{(sent_bytes + 2 * in_turns) / total:.1f} "
          f"({(sent_bytes + 2 * in_turns) / total / size:.2f}x)")


def recover(total: int = 1_000_000) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        journal, _ = Journal.open(OsFiles(tmp))
        journal.declare("jobs", {})
        for seq in range(total):
            journal.sent("jobs", seq, message(seq))
            if seq % 10_000 == 9_999:
                journal.write()
        journal.write()
        journal.sync()
        journal.close()
        _, recovered = Journal.open(OsFiles(tmp))
    report = recovered.report
    print(f"recovered {report.messages:,} messages, {report.bytes / 1e6:.1f} MB "
          f"in {report.seconds:.2f} s")


if __name__ == "__main__":
    {"checksums": checksums, "write": write, "recover": recover}[sys.argv[1]]()
