"""``aiobus stat``: the broker's statistics as a table, once or redrawn like ``top``.

The broker reports counters (``sent``, ``delivered``, ``acked``, ``dead_lettered``,
``published``) and gauges (``ready``, ``unacked``, ...), not rates. Rates come from two
samples (:func:`aiobus.stats.compute_rates`, the one place rates are computed): the
previous redraw in ``--watch`` mode, otherwise a second sample taken ``--sample`` seconds
after the first. The interval is measured with the local
monotonic clock when each answer arrives. A counter that went down (the broker was
restarted between samples) has no rate rather than a negative one. ``--watch`` keeps
running across a broker restart: while the client reconnects it shows the outage above
the last table, and rates start again from the first two samples after it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable
from typing import Any

from ..client.bus import Bus
from ..errors import ConnectionLost
from ..metrics import render as render_prometheus
from ..stats import JournalStats, ProcessStats, Rates, Sample, compute_rates
from .bodies import table, to_jsonable
from .options import add_command, non_negative_float, positive_float

__all__ = ["register"]

# Home the cursor and clear the screen: each redraw replaces the last, as top does. Only
# to a terminal: into a pipe or a file each redraw follows the last, after its header.
CLEAR = "\x1b[H\x1b[2J"


async def take_sample(bus: Bus) -> Sample:
    stats = await bus.stats()
    return Sample(time.monotonic(), stats)


# -- the table ------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _journal_line(journal: JournalStats | None) -> str:
    """What the durable queues' journal holds, or that the broker has none."""
    if journal is None:
        return "journal: none (started without a data directory: no durable queues)"
    return (f"journal: {journal.get('bytes', 0):,} bytes in {journal.get('segments', 0)}"
            f" segments, {journal.get('live_messages', 0):,} live messages"
            f" ({journal.get('live_bytes', 0):,} bytes)")


def _process_line(process: ProcessStats | None) -> list[str]:
    """The broker process's memory and loop lag (none from a broker that does not say)."""
    if process is None:
        return []
    return [f"broker: pid {process.get('pid', '?')}, {process.get('rss_bytes', 0) / 2**20:.1f}"
            f" MiB resident, event loop lag {process.get('loop_lag', 0.0) * 1000:.1f} ms"]


def rendertable(current: Sample, rates: Rates | None, where: str) -> str:
    stats = current.stats
    queue_rates: dict[str, Any] = dict(rates.queues) if rates else {}
    topics = stats.get("topics", {})
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats.get("time", time.time())))
    lines = [
        f"{stats.get('server', 'aiobus')} at {where}   {when}",
        f"topics: {topics.get('published', 0)} published"
        f" ({_rate(rates.published if rates else None)}/s),"
        f" {topics.get('unrouted', 0)} with no subscriber",
        _journal_line(stats.get("journal")),
        *_process_line(stats.get("process")),
        "",
    ]
    queues = stats.get("queues", {})
    if queues:
        rows = []
        for name, queue in queues.items():
            rate = queue_rates.get(name, {})
            rows.append([name, *(_cell(queue.get(key)) for key in
                                 ("ready", "unacked", "delayed", "consumers", "dead_lettered")),
                         _rate(rate.get("sent")), _rate(rate.get("acked"))])
        lines += table(["QUEUE", "READY", "UNACKED", "DELAYED", "CONSUMERS", "DEAD-LETTERED",
                        "SENT/S", "ACKED/S"], rows, right=range(1, 8))
    else:
        lines.append("no queues")
    lines.append("")
    connections = stats.get("connections", [])
    names = {conn.get("conn"): conn.get("name") for conn in connections}
    subscriptions = topics.get("subscriptions", [])
    if subscriptions:
        rows = [[sub.get("pattern", "?"), _cell(sub.get("conn")),
                 _cell(names.get(sub.get("conn"))), _cell(sub.get("pending")),
                 _cell(sub.get("delivered")), _cell(sub.get("dropped"))]
                for sub in subscriptions]
        lines += table(["SUBSCRIPTION", "CONN", "CLIENT", "PENDING", "DELIVERED", "DROPPED"],
                       rows, right=(1, 3, 4, 5))
    else:
        lines.append("no subscriptions")
    lines.append("")
    rows = [[_cell(conn.get("conn")), _cell(conn.get("name")), _cell(conn.get("pid")),
             _cell(conn.get("uid")), _cell(conn.get("consumers")),
             _cell(conn.get("subscriptions"))]
            for conn in connections]
    lines += table(["CONN", "NAME", "PID", "UID", "CONSUMERS", "SUBSCRIPTIONS"], rows,
                   right=(0, 2, 3, 4, 5))
    return "\n".join(lines) + "\n"


def render_json(current: Sample, rates: Rates | None) -> str:
    return json.dumps(to_jsonable({**current.stats,
                                   "rates": rates.as_dict() if rates else None}),
                      ensure_ascii=False)


# -- the command ----------------------------------------------------------------------


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _redraw(header: str) -> str:
    """What starts a redraw: the screen cleared on a terminal, else only the header."""
    return (CLEAR + header) if sys.stdout.isatty() else header


async def _stat(bus: Bus, args: argparse.Namespace) -> int:
    if args.prometheus:
        _write(render_prometheus(await bus.stats()))
        return 0
    if args.watch is None:
        first = await take_sample(bus)
        previous: Sample | None = None
        current = first
        if args.sample > 0:
            await asyncio.sleep(args.sample)
            previous, current = first, await take_sample(bus)
        rates = compute_rates(previous, current)
        _write(render_json(current, rates) + "\n" if args.json
               else rendertable(current, rates, bus.path))
        return 0
    return await _watch(bus, args)


async def _watch(bus: Bus, args: argparse.Namespace) -> int:
    """Redraw every ``args.watch`` seconds; across a broker restart, show the outage (the
    last table under a banner) until the client has reconnected, then go on."""
    previous: Sample | None = None
    shown = ""  # the last table drawn

    def outage() -> None:
        if not args.json:  # JSON lines stay samples; stderr tells of the outage
            since = time.strftime("%H:%M:%S")
            _write(_redraw(f"every {args.watch:g} s; Ctrl-C to quit\n")
                   + f"broker at {bus.path} unreachable since {since}; reconnecting"
                   f"{' (the last sample below)' if shown else ''}\n\n" + shown)

    while True:
        if not bus.connected:
            outage()
            await bus.wait_connected()  # raises if the client gives up
            previous = None  # a rate across the outage would mean nothing
        try:
            current = await _sample_or_outage(bus, args.watch, outage)
        except ConnectionLost:
            continue  # dropped while asking: the top of the loop shows the outage
        if not bus.connected or current is None:
            previous = None
            continue
        rates = compute_rates(previous, current)
        if args.json:
            _write(render_json(current, rates) + "\n")
        else:
            shown = rendertable(current, rates, bus.path)
            _write(_redraw(f"every {args.watch:g} s; Ctrl-C to quit\n") + shown)
        previous = current
        await asyncio.sleep(args.watch)


async def _sample_or_outage(bus: Bus, every: float, outage: Callable[[], None]
                            ) -> Sample | None:
    """A sample; if the connection drops while it is asked for, the outage is shown at
    once rather than when the broker is back (STATS is resent after a reconnect, so the
    ask itself waits across the outage). None: the sample came after an outage."""
    sample = asyncio.ensure_future(take_sample(bus))
    reported = False
    try:
        while True:
            done, _ = await asyncio.wait({sample}, timeout=every)
            if done:
                result = sample.result()
                return None if reported else result
            if not bus.connected and not reported:
                outage()
                reported = True
    finally:
        if not sample.done():
            sample.cancel()
            await asyncio.gather(sample, return_exceptions=True)


def _watching_runs_until_interrupted(args: argparse.Namespace) -> None:
    args.long_running = args.watch is not None


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    p = add_command(
        subparsers, common, "stat", run=_stat,
        help="show queues, subscriptions and connections",
        description="Show the broker's statistics: per queue ready, unacked, delayed,"
                    " consumers, dead-lettered and rates (messages per second sent and"
                    " acked); topic subscriptions with pending and dropped messages;"
                    " connections with name, pid and uid. Rates come from two samples.",
    )
    p.epilog = ("with --watch, runs until interrupted: SIGINT (Ctrl-C) or SIGTERM end it"
                f" with status 0\n{p.epilog}")
    p.set_defaults(check=_watching_runs_until_interrupted)
    p.add_argument("--watch", "-w", nargs="?", const=2.0, type=positive_float,
                   metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until interrupted, like top")
    p.add_argument("--sample", type=non_negative_float, default=1.0, metavar="SECONDS",
                   help="without --watch: seconds between the two samples the rates come"
                        " from (default 1; 0: one sample, no rates)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--json", action="store_true",
                     help="print the raw statistics plus a 'rates' object as JSON (with"
                          " --watch: one line per sample)")
    how.add_argument("--prometheus", action="store_true",
                     help="print the statistics once in the Prometheus text format, as the"
                          " broker's /metrics serves them (for node_exporter's textfile"
                          " collector: redirect into a .prom file)")
