"""``aiobus queue list|purge|delete``: the broker's queues, and removing what they hold.

``list`` reads ``bus.stats()``, the one statistics model the broker reports (``stat``
shows the same numbers with rates); ``purge`` and ``delete`` are one request each, so
they act at once on whatever the queue holds when the broker gets them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Final

from ..client.bus import Bus
from .bodies import table
from .options import add_command, queue_name

__all__ = ["register"]

COLUMNS: Final = ("ready", "unacked", "delayed", "consumers")


def _messages(count: int) -> str:
    return f"{count} message" if count == 1 else f"{count} messages"


def rows(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per queue, sorted by name: its name, whether it is durable, and the
    gauges of ``COLUMNS``."""
    result = []
    for name, queue in sorted(stats.get("queues", {}).items()):
        durable = bool(queue.get("settings", {}).get("durable", False))
        result.append({"name": name, "durable": durable,
                       **{key: int(queue.get(key, 0)) for key in COLUMNS}})
    return result


async def all_queues(bus: Bus, pattern: str | None = None) -> dict[str, Any]:
    """Every queue's statistics (matching ``pattern``), a page of STATS at a time."""
    stats = await bus.stats(queues=pattern)
    queues: dict[str, Any] = dict(stats.get("queues", {}))
    while stats.get("queues_next") is not None:
        stats = await bus.stats(queues=pattern, after=stats["queues_next"])
        queues.update(stats.get("queues", {}))
    return queues


async def _list(bus: Bus, args: argparse.Namespace) -> int:
    queues = rows({"queues": await all_queues(bus)})
    if args.json:
        for queue in queues:
            print(json.dumps(queue, ensure_ascii=False))
    elif not queues:
        print("no queues")
    else:
        print("\n".join(table(
            ["QUEUE", "DURABLE", "READY", "UNACKED", "DELAYED", "CONSUMERS"],
            [[q["name"], "yes" if q["durable"] else "no", *(str(q[k]) for k in COLUMNS)]
             for q in queues],
            right=range(2, 6))))
    return 0


async def _purge(bus: Bus, args: argparse.Namespace) -> int:
    count = await bus.purge_queue(args.queue)
    print(f"purged {_messages(count)} from {args.queue}")
    return 0


async def _delete(bus: Bus, args: argparse.Namespace) -> int:
    count = await bus.delete_queue(args.queue, if_empty=args.if_empty)
    print(f"deleted queue {args.queue} with {_messages(count)}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    parent = add_command(subparsers, common, "queue",
                         help="list queues, purge or delete one",
                         description="The broker's queues: list them, remove the messages"
                                     " waiting in one, or remove one altogether.")
    actions = parent.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(actions, common, "list", run=_list,
                    help="show every queue with its message counts",
                    description="Show each queue the broker has: whether it is durable,"
                                " its messages ready, unacked (leased to a consumer) and"
                                " delayed, and its consumers.")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per queue and line: name, durable, ready,"
                        " unacked, delayed, consumers")
    p = add_command(actions, common, "purge", run=_purge,
                    help="remove the messages waiting in a queue",
                    description="Remove every message waiting in QUEUE, ready or delayed,"
                                " and print how many. Messages consumers hold stay and are"
                                " answered as usual. A durable queue stays purged across"
                                " a broker restart.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    p = add_command(actions, common, "delete", run=_delete,
                    help="remove a queue, its settings and all its messages",
                    description="Remove QUEUE with its settings and every message,"
                                " leased ones too (their consumers' answers then fail)."
                                " Consumers stay registered, so a queue they use exists"
                                " again at once, empty, with default settings. A durable"
                                " queue stays deleted across a broker restart.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    p.add_argument("--if-empty", action="store_true",
                   help="refuse (exit 1) if the queue holds any message")
