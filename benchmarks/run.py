"""Benchmark suite: aiobus against NATS, Redis, ZeroMQ, multiprocessing.Queue and two
brokerless baselines, on this machine, every client in a process of its own.

    python benchmarks/run.py [--quick] [--only W1,W3] [--systems aiobus,relay]
        [--out docs/benchmarks.md]

It starts redis-server, nats-server, the aiobus broker (and the compiled build's, when
`make compiled` has made it: the "compiled" rows) and the minimal relay itself (see
servers.py), runs the workloads (workloads.py; W6 starts fresh servers of its own), stops
every server by PID in `finally`, and writes the markdown report, a PNG chart beside it
(same name, .png) and the raw numbers as JSON under benchmarks/results/. Progress goes to
stderr. `--quick` uses small counts and finishes in under a minute; the full run takes
11-14 minutes on 2 cores (667 s and 841 s on 2026-12-06, before the compiled build's
durable rows, whose cases took ~50 s more in a W3 run; plus ~2 min for `make compiled`).
Only a full run of every workload and system writes docs/benchmarks.md by default; others
write benchmarks/results/latest.md. Run `bash benchmarks/setup.sh` and `make compiled`
first (or `make bench`, which does both).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import report  # noqa: E402  (after the path set-up above)
import workloads  # noqa: E402
from servers import Servers  # noqa: E402

SERVERS_FOR = {"W1": {"aiobus", "aiobus_compiled", "nats", "redis", "relay"},
               "W2": {"aiobus", "aiobus_compiled", "nats", "redis"},
               "W3": {"aiobus", "aiobus_compiled", "nats", "redis", "rabbitmq", "redis_aof",
                      "aiobus_durable", "aiobus_durable_compiled"},
               "W4": {"aiobus", "aiobus_compiled", "nats", "relay"},
               "W5": {"aiobus", "nats", "redis", "relay"}, "W6": set(), "W7": {"aiobus"}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small counts, under a minute")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. W1,W3")
    parser.add_argument("--out", default="",
                        help="markdown report path; the chart goes beside it as .png"
                             " (default docs/benchmarks.md for a full run of every workload,"
                             " else benchmarks/results/latest.md, which git ignores)")
    parser.add_argument("--repeats", type=int, default=0, help="override repeats per case")
    parser.add_argument("--systems", default="",
                        help="comma-separated parts of row names: run only the rows whose"
                             " name contains one of them (e.g. 'aiobus,relay')")
    args = parser.parse_args(argv)

    keys = [k.strip().upper() for k in args.only.split(",") if k.strip()] or workloads.WORKLOADS
    unknown = set(keys) - set(workloads.WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads: {', '.join(sorted(unknown))}")
    plan = workloads.QUICK if args.quick else workloads.FULL
    if args.repeats:
        plan = dataclasses.replace(plan, repeats=args.repeats, w3_repeats=args.repeats,
                                   w6_repeats=args.repeats)

    # 1,000 idle connections plus the broker's own: lift the soft limit on open files.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))

    started = time.monotonic()

    def log(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {line}", file=sys.stderr, flush=True)

    tables: list[workloads.Table] = []
    with Servers() as env:  # closing it stops every server by PID
        needed = set().union(*(SERVERS_FOR[k] for k in keys))
        for name in ("redis", "redis_aof", "nats", "aiobus", "aiobus_compiled",
                     "aiobus_durable", "aiobus_durable_compiled", "relay", "rabbitmq"):
            if name in needed:
                try:
                    getattr(env, f"start_{name}")()
                except (OSError, RuntimeError) as exc:
                    log(f"could not start {name}: {exc}")  # its rows fail and say so
        log(f"servers up in {env.dir}: {', '.join(env.procs)}")
        systems = [part for part in args.systems.split(",") if part]
        for key in keys:
            tables += workloads.run_workload(key, env, plan, log, systems)

    elapsed = time.monotonic() - started
    mode = "quick" if args.quick else "full"
    meta = report.meta(["benchmarks/run.py", *(argv or sys.argv[1:])], mode, plan.repeats,
                       elapsed, plan.w3_repeats)  # fmt: skip
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    # Only a full run of everything replaces the published report.
    full = not args.quick and not args.only and not args.repeats and not args.systems
    out = Path(args.out or (HERE.parent / "docs" / "benchmarks.md" if full
                            else results / "latest.md"))
    report.write_markdown(out, tables, meta)
    report.write_chart(out.with_suffix(".png"), tables)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    raw = {"meta": meta, "tables": [{"key": t.key, "title": t.title, "metrics": t.metrics,
                                     "rows": {" / ".join(r).strip(" /"): v
                                              for r, v in t.rows.items()},
                                     "errors": {" / ".join(r).strip(" /"): e
                                                for r, e in t.errors.items()}}
                                    for t in tables]}  # fmt: skip
    (results / f"{stamp}-{mode}.json").write_text(json.dumps(raw, indent=1))
    log(f"wrote {out}, {out.with_suffix('.png')} and benchmarks/results/{stamp}-{mode}.json")
    return 1 if any(t.errors for t in tables) else 0


if __name__ == "__main__":
    sys.exit(main())
