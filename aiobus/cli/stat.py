"""``aiobus stat``: the broker's statistics as a table, once or redrawn like ``top``.

The broker reports counters (``sent``, ``delivered``, ``acked``, ``dead_lettered``,
``published``) and gauges (``ready``, ``unacked``, ...), not rates. Rates are computed
here from two samples: the previous redraw in ``--watch`` mode, otherwise a second sample
taken ``--sample`` seconds after the first. The interval is measured with the local
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
from dataclasses import dataclass
from typing import Any

from ..client.bus import Bus
from ..errors import ConnectionLost
from .bodies import table, to_jsonable
from .options import add_command, non_negative_float, positive_float

__all__ = ["register"]

# Home the cursor and clear the screen: each redraw replaces the last, as top does.
CLEAR = "\x1b[H\x1b[2J"
RATE_COUNTERS = ("sent", "delivered", "acked", "dead_lettered")


@dataclass(frozen=True, slots=True)
class Sample:
    at: float  # time.monotonic() when the stats arrived
    stats: dict[str, Any]


async def take_sample(bus: Bus) -> Sample:
    stats = await bus.stats()
    return Sample(time.monotonic(), stats)


def _per_second(new: Any, old: Any, interval: float) -> float | None:
    delta = (new or 0) - (old or 0)
    return None if delta < 0 else delta / interval


def compute_rates(previous: Sample | None, current: Sample) -> dict[str, Any] | None:
    """Messages per second between two samples, or None without a usable interval.

    Returns:
        ``{"interval": s, "published": r, "queues": {name: {"sent": r, "delivered": r,
        "acked": r, "dead_lettered": r}}}``; a queue absent from ``previous`` counts
        from zero (it was created in between).
    """
    if previous is None:
        return None
    interval = current.at - previous.at
    if interval <= 0:
        return None
    queues: dict[str, dict[str, float | None]] = {}
    old_queues = previous.stats.get("queues", {})
    for name, queue in current.stats.get("queues", {}).items():
        old = old_queues.get(name, {})
        queues[name] = {key: _per_second(queue.get(key), old.get(key), interval)
                        for key in RATE_COUNTERS}
    published = _per_second(current.stats.get("topics", {}).get("published"),
                            previous.stats.get("topics", {}).get("published"), interval)
    return {"interval": interval, "published": published, "queues": queues}


# -- the table ------------------------------------------------------------------------


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _journal_line(journal: dict[str, Any] | None) -> str:
    """What the durable queues' journal holds, or that the broker has none."""
    if journal is None:
        return "journal: none (started without a data directory: no durable queues)"
    return (f"journal: {journal.get('bytes', 0):,} bytes in {journal.get('segments', 0)}"
            f" segments, {journal.get('live_messages', 0):,} live messages"
            f" ({journal.get('live_bytes', 0):,} bytes)")


def rendertable(current: Sample, rates: dict[str, Any] | None, where: str) -> str:
    stats = current.stats
    queue_rates = rates["queues"] if rates else {}
    topics = stats.get("topics", {})
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats.get("time", time.time())))
    lines = [
        f"{stats.get('server', 'aiobus')} at {where}   {when}",
        f"topics: {topics.get('published', 0)} published"
        f" ({_rate(rates['published'] if rates else None)}/s),"
        f" {topics.get('unrouted', 0)} with no subscriber",
        _journal_line(stats.get("journal")),
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


def render_json(current: Sample, rates: dict[str, Any] | None) -> str:
    return json.dumps(to_jsonable({**current.stats, "rates": rates}), ensure_ascii=False)


# -- the command ----------------------------------------------------------------------


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


async def _stat(bus: Bus, args: argparse.Namespace) -> int:
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
    while True:
        if not bus.connected:
            if not args.json:  # JSON lines stay samples; stderr tells of the outage
                since = time.strftime("%H:%M:%S")
                _write(CLEAR + f"every {args.watch:g} s; Ctrl-C to quit\n"
                       f"broker at {bus.path} unreachable since {since}; reconnecting"
                       f"{' (the last sample below)' if shown else ''}\n\n" + shown)
            await bus.wait_connected()  # raises if the client gives up
            previous = None  # a rate across the outage would mean nothing
        try:
            current = await take_sample(bus)
        except ConnectionLost:
            continue  # dropped while asking: the top of the loop shows the outage
        rates = compute_rates(previous, current)
        if args.json:
            _write(render_json(current, rates) + "\n")
        else:
            shown = rendertable(current, rates, bus.path)
            _write(CLEAR + f"every {args.watch:g} s; Ctrl-C to quit\n" + shown)
        previous = current
        await asyncio.sleep(args.watch)


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
    p.add_argument("--json", action="store_true",
                   help="print the raw statistics plus a 'rates' object as JSON (with"
                        " --watch: one line per sample)")
