"""``aiobus dlq list|show|requeue|purge QUEUE``: the dead letters of a queue.

QUEUE is the original queue; the commands act on its dead-letter queue, found in the
queue's settings (``bus.stats()``). A queue the broker does not know is an error, unless
its default dead-letter queue ``<QUEUE>.dlq`` exists (a queue created by use goes away
when it stays empty and unused, its dead letters do not). Nothing here creates a queue.

Theory of operation. ``list`` and ``show`` read with PEEK (``bus.peek``): the broker
shows the ready messages where they are, and nothing is leased, counted or changed.
``requeue`` and ``purge`` change the queue:

* ``requeue`` leases the dead letters that are ready at the start (their count from
  ``stats()``, so letters that arrive meanwhile, perhaps requeued ones failing again,
  are left for next time), with a prefetch that covers them all, and sends each back to
  the queue named in its ``x-original-queue`` header, with its body and its own headers
  (the ``x-`` headers of dead-lettering removed), and acks it from the dead-letter queue
  only once the broker has accepted the send. Up to SEND_WINDOW sends are in flight (one
  round trip per letter had taken 6.6 s for 50,000), and on a terminal stderr shows the
  count. Interrupted midway, nothing is lost; at worst the letters whose sends were
  accepted and not yet acked are in both queues (at-least-once).
  Records the FIFO bridge dead-lettered as ``too-large`` carry only the head of the
  record, so they are left where they are rather than passed on truncated.
* ``purge`` removes them with one PURGE.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sized
from typing import Final

from ..broker.browse import DEAD_LETTER_HEADERS, MAX_PEEK_LIMIT
from ..broker.queues import MAX_PREFETCH  # the most a consumer may lease at once
from ..broker.settings import DLQ_SUFFIX
from ..client.browse import PeekedMessage
from ..client.bus import Bus
from ..client.message import Message
from ..errors import BodyDecodeError, NoSuchQueue, PermissionDenied
from .bodies import CliError, body_of, preview, render, table, to_jsonable
from .commands import SEND_WINDOW, Progress, next_message
from .options import add_command, positive_int, queue_name

__all__ = ["register"]

# ``show`` prints a body up to this size (PEEK cuts it there; the full size is shown).
SHOW_MAX_BODY: Final = 1024 * 1024
# Ready messages are delivered at once; a pause this long means another consumer of the
# dead-letter queue took the rest.
IDLE_TIMEOUT: Final = 2.0


async def dead_letter_queue(bus: Bus, queue: str) -> tuple[str, int]:
    """The dead-letter queue of ``queue`` and how many messages are ready in it.

    The queue's settings name its dead-letter queue; they come from STATS, which a policy
    grants only with ``admin``: without it the default ``<queue>.dlq`` is taken. The
    count comes from PEEK, which needs ``consume`` on the dead-letter queue, as the
    commands themselves do.

    Raises:
        CliError: the queue discards instead (declared with ``dead_letter=None``), or
            neither it nor its dead-letter queue exists.
    """
    target: str | None = f"{queue}{DLQ_SUFFIX}"
    try:
        # Just the queue asked about (a name is a pattern without wildcards).
        found = (await bus.stats(queues=queue))["queues"].get(queue)
    except PermissionDenied:
        found = None  # no admin right: the default dead-letter queue
    else:
        if found is not None:
            target = found["settings"].get("dead_letter", target)
    if target is None:
        raise CliError(f"queue {queue!r} has no dead-letter queue: it discards failed"
                       " messages (declared with dead_letter=None)")
    try:
        ready = (await bus.peek(target, limit=1, max_body=0)).ready
    except NoSuchQueue:
        if found is None:
            raise CliError(f"there is no queue {queue!r}: it was never used since the"
                           " broker started, or it was deleted (see 'aiobus queue list')"
                           ) from None
        ready = 0
    return target, ready


async def _each(bus: Bus, dlq: str, count: int,
                handle: Callable[[Message], Awaitable[None]], *,
                settle: Callable[[], Awaitable[None]] | None = None,
                pending: Sized = ()) -> int:
    """Lease ``count`` dead letters and pass each to ``handle``; then, while ``pending``
    is not empty, await ``settle()`` (answers ``handle`` left in flight), all before the
    consumer stops: leases not answered by then are released. Returns how many were
    handled (fewer than ``count`` when another consumer took some)."""
    if count <= 0:
        return 0
    handled = 0
    async with bus.consume(dlq, prefetch=min(count, MAX_PREFETCH)) as consumer:
        while handled < count:
            msg = await next_message(consumer, IDLE_TIMEOUT)
            if msg is None:
                break
            await handle(msg)
            handled += 1
        while settle is not None and len(pending):
            await settle()
    return handled


def _letters(count: int) -> str:
    return f"{count} dead letter" if count == 1 else f"{count} dead letters"


def _dead_time(msg: Message | PeekedMessage) -> str:
    try:
        when = float(msg.headers["x-dead-time"])
    except (KeyError, ValueError):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def _row(msg: PeekedMessage) -> list[str]:
    headers = msg.headers
    return [msg.id, headers.get("x-dead-reason", "-"), headers.get("x-attempts", "-"),
            _dead_time(msg), preview(headers.get("x-reason-text", "-"), 30),
            preview(msg.raw_body if msg.truncated else body_of(msg))]


def _json(msg: PeekedMessage) -> str:
    """One dead letter as a JSON line (the fields 'aiobus consume --json' prints)."""
    return json.dumps(to_jsonable({
        "body": body_of(msg), "queue": msg.queue, "headers": msg.headers, "id": msg.id,
        "timestamp": msg.timestamp, "size": msg.size, "truncated": msg.truncated,
    }), ensure_ascii=False)


async def _peek(bus: Bus, dlq: str, **options: object) -> tuple[list[PeekedMessage], int]:
    """The dead letters PEEK shows (none when the dead-letter queue does not exist yet:
    it is created by the first dead letter) and how many are ready."""
    try:
        page = await bus.peek(dlq, **options)  # type: ignore[arg-type]
    except NoSuchQueue:
        return [], 0
    return page.messages, page.ready


async def _list(bus: Bus, args: argparse.Namespace) -> int:
    dlq, _ = await dead_letter_queue(bus, args.queue)
    letters: list[PeekedMessage] = []
    wanted = args.limit or MAX_PREFETCH
    ready = 0
    while len(letters) < wanted:  # pages of PEEK, oldest first
        page, ready = await _peek(bus, dlq, offset=len(letters),
                                  limit=min(MAX_PEEK_LIMIT, wanted - len(letters)),
                                  max_body=1024)
        letters += page
        if len(page) < MAX_PEEK_LIMIT:
            break
    if args.json:
        for msg in letters:
            print(_json(msg))
    elif not letters:
        print(f"{dlq}: no dead letters")
    else:
        more = f" (showing {len(letters)})" if len(letters) < ready else ""
        print(f"{dlq}: {_letters(ready)}{more}")
        print("\n".join(table(["ID", "REASON", "ATTEMPTS", "DEAD SINCE", "REASON TEXT",
                                "BODY"], [_row(msg) for msg in letters], right=(2,))))
    return 0


async def _show(bus: Bus, args: argparse.Namespace) -> int:
    dlq, _ = await dead_letter_queue(bus, args.queue)
    found, _ = await _peek(bus, dlq, id=args.id, max_body=SHOW_MAX_BODY)
    if not found:
        raise CliError(f"no dead letter {args.id!r} is ready in {dlq}"
                       " (see 'aiobus dlq list')")
    msg = found[0]
    if args.json:
        print(_json(msg))
        return 0
    print(f"id: {msg.id}")
    print(f"queue: {msg.queue}")
    print(f"dead since: {_dead_time(msg)}")
    for key, value in sorted(msg.headers.items()):
        print(f"header {key}: {value}")
    cut = f", first {len(msg.raw_body)} shown" if msg.truncated else ""
    print(f"body ({msg.size} bytes{cut}, {'msgpack' if msg.kind else 'raw'}):")
    print(render(body_of(msg)))
    return 0


async def _requeue(bus: Bus, args: argparse.Namespace) -> int:
    dlq, ready = await dead_letter_queue(bus, args.queue)
    requeued = skipped = undecodable = 0
    in_flight: collections.deque[tuple[asyncio.Future[None], Message]] = collections.deque()
    progress = Progress("requeued") if sys.stderr.isatty() else None

    async def settle_oldest() -> None:
        nonlocal requeued
        sent, msg = in_flight.popleft()
        await sent  # accepted by the broker...
        msg.ack_nowait()  # ...before it leaves the dead-letter queue
        requeued += 1
        if progress is not None:
            progress.show(requeued)

    async def send_back(msg: Message) -> None:
        nonlocal skipped, undecodable
        if msg.headers.get("x-dead-reason") == "too-large":
            skipped += 1  # only the record's head is here; leave it for a person
            return
        try:
            body = msg.body
        except BodyDecodeError:
            undecodable += 1  # resending would change what it claims to be
            return
        target = msg.headers.get("x-original-queue") or args.queue
        headers = {k: v for k, v in msg.headers.items() if k not in DEAD_LETTER_HEADERS}
        in_flight.append((bus.send_nowait(target, body, headers), msg))
        if len(in_flight) >= SEND_WINDOW:
            await settle_oldest()

    try:
        await _each(bus, dlq, ready, send_back, settle=settle_oldest, pending=in_flight)
    finally:
        for sent, _ in in_flight:  # failed or interrupted: nobody awaits the rest
            sent.cancel()
        if progress is not None:
            progress.done(requeued)
    print(f"requeued {_letters(requeued)} from {dlq}")
    if skipped:
        print(f"left {_letters(skipped)} with reason too-large in {dlq}: each holds only"
              " the head of its record")
    if undecodable:
        print(f"left {_letters(undecodable)} whose body does not decode in {dlq}")
    return 0


async def _purge(bus: Bus, args: argparse.Namespace) -> int:
    dlq, _ = await dead_letter_queue(bus, args.queue)
    try:
        purged = await bus.purge_queue(dlq)  # one frame: the broker drops them all at once
    except NoSuchQueue:
        purged = 0  # no dead letter yet: its dead-letter queue was never created
    print(f"purged {_letters(purged)} from {dlq}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
             common: argparse.ArgumentParser) -> None:
    parent = add_command(subparsers, common, "dlq",
                         help="list, requeue or purge the dead letters of a queue",
                         description="Act on the dead-letter queue of QUEUE (its"
                                     " dead_letter setting, by default QUEUE.dlq).")
    actions = parent.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = add_command(actions, common, "list", run=_list,
                    help="show the dead letters without removing them",
                    description="Show each dead letter of QUEUE: id, reason, attempts,"
                                " when it was dead-lettered, the reason text and the start"
                                " of its body. Nothing is leased, removed or counted (the"
                                " broker's PEEK).")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    p.add_argument("--limit", type=positive_int, metavar="N",
                   help=f"show at most N (default all, up to {MAX_PREFETCH})")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line, as 'aiobus consume --json' prints")
    p = add_command(actions, common, "show", run=_show,
                    help="show one dead letter: its headers and whole body",
                    description="Show the dead letter ID of QUEUE (an id from 'dlq list'):"
                                " every header and its body, decoded when it is msgpack,"
                                f" up to {SHOW_MAX_BODY} bytes. Nothing is changed.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    p.add_argument("id", metavar="ID")
    p.add_argument("--json", action="store_true", help="as one JSON object")
    p = add_command(actions, common, "requeue", run=_requeue,
                    help="send the dead letters back to their queue",
                    description="Send each dead letter back to the queue it came from"
                                " (its x-original-queue header), with its body and its own"
                                " headers, then remove it from the dead-letter queue; an"
                                " interruption loses nothing (at-least-once).")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
    p = add_command(actions, common, "purge", run=_purge,
                    help="delete the dead letters",
                    description="Acknowledge (delete) every dead letter of QUEUE.")
    p.add_argument("queue", metavar="QUEUE", type=queue_name)
