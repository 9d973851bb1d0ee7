"""Reading a queue's state on NATS without changing it: ``bus.stats()`` in the local
broker's shape (``broker/core_state.py`` ``stats``) from JetStream stream and consumer info (the
mapping of each field is ``nats_map.queue_stats``), and ``bus.peek()`` from the stream's
stored messages.

Kept apart from the backend so that it can follow the typed statistics model when that
replaces the dict.

PEEK reads stored messages with ``STREAM.MSG.GET`` (``next_by_subj``: the first message
at or after a sequence on the queue's subject, so delayed sends, stored on their schedule
subjects, and interior gaps are skipped), never through the consumer, so nothing is
delivered, leased or counted. The ready messages are those after the shared consumer's
delivered stream sequence (its ``num_pending``, which ``stats()`` calls ``ready``); a
message given back sits before it, ack-pending until delivered again, and is ``unacked``
on NATS (docs/nats.md). One request per message read: O(offset + limit), as the local
broker's walk; finding an id reads the ready messages until it turns up.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from ..broker.browse import check_peek
from ..errors import BusError, InvalidOption, shown
from ..names import check_pattern, matches
from . import nats_map as nm

if TYPE_CHECKING:
    from .nats import NatsBackend

__all__ = ["collect", "peek"]

_DEFAULT_LIMIT = 10_000
_ERR_NO_MESSAGE = 10037  # STREAM.MSG.GET: no message at or after that sequence


async def collect(backend: NatsBackend, options: dict[str, Any]) -> dict[str, Any]:
    """Statistics of the namespace's queues and of this client's subscriptions."""
    pattern = options.get("queues")
    limit = options.get("limit", _DEFAULT_LIMIT)
    after = options.get("after")
    if pattern is not None:
        check_pattern(pattern)
    if type(limit) is not int or not 1 <= limit <= _DEFAULT_LIMIT:
        raise InvalidOption(f"limit must be an int from 1 to {_DEFAULT_LIMIT}")
    ns = backend.ns
    names: list[str] = []
    offset = 0
    while True:
        page = await backend._api("STREAM.LIST", {"offset": offset,
                                                  "subject": ns.queue_prefix + ">"})
        streams = page.get("streams") or []
        for info in streams:
            subjects = info["config"].get("subjects") or []
            if not subjects or not subjects[0].startswith(ns.queue_prefix):
                continue
            names.append(ns.queue_of(subjects[0]))
            backend._stream_info_cache[names[-1]] = info
        offset += len(streams)
        if not streams or offset >= int(page.get("total", 0)):
            break
    selected = sorted(n for n in names if (after is None or n > after)
                      and (pattern is None or matches(pattern, n)))
    total = len(selected) + (sum(1 for n in names if after is not None and n <= after
                                 and (pattern is None or matches(pattern, n))))
    page_names = selected[:limit]
    queues: dict[str, Any] = {}
    for name in page_names:
        info = backend._stream_info_cache.pop(name)
        settings, _ = nm.settings_from_metadata(name, info["config"].get("metadata"))
        consumer = await backend._api(f"CONSUMER.INFO.{ns.stream(name)}.{nm.CONSUMER}")
        stats = nm.queue_stats(info, None if "error" in consumer else consumer, settings)
        if stats["delayed"] and "error" not in consumer:
            # num_pending follows a stored message a moment later: what looks delayed
            # may be a message it has not counted yet. Ask once more (only then).
            consumer = await backend._api(f"CONSUMER.INFO.{ns.stream(name)}.{nm.CONSUMER}")
            if "error" not in consumer:
                stats = nm.queue_stats(info, consumer, settings)
        queues[name] = stats
        queues[name]["parked"] = backend._parked.get(name, 0)  # this client's
    backend._stream_info_cache.clear()
    subs = [window.stats() for window in list(backend._subs.values())[:limit]]
    return {
        "server": backend.server_info.get("server", "nats-server"),
        "time": time.time(),
        "queues": queues,
        "queues_total": total,
        "queues_next": page_names[-1] if len(selected) > limit else None,
        "topics": {
            "published": backend._published,  # by this client: NATS does not count
            "unrouted": None,  # NATS does not tell a publisher who received a message
            "subscriptions": subs,  # this client's only
            "subscriptions_total": len(backend._subs),
        },
        # This client's own: NATS lists connections in its monitoring endpoint (/connz).
        "connections": [{
            "conn": None, "name": backend.name, "pid": os.getpid(), "uid": os.getuid(),
            "gid": os.getgid(), "consumers": len(backend._pulls),
            "subscriptions": len(backend._subs),
            "parked": sum(backend._parked.values()), "parked_bytes": 0}],
        "connections_total": None,
        "journal": None,
    }


async def peek(backend: NatsBackend, queue: str, options: dict[str, Any]) -> dict[str, Any]:
    """PEEK's result (``broker/browse.py`` ``peek``) for ``queue``: see the module
    docstring.

    Raises:
        NoSuchQueue: the queue's stream does not exist (none is created).
        InvalidOption: a bad option, as the local broker names it.
    """
    offset, limit, max_body, wanted = check_peek(options)
    ns = backend.ns
    stream = ns.stream(queue)
    info = await backend._api("STREAM.INFO." + stream)
    if "error" in info:
        raise nm.no_such_queue(queue)
    found = await backend._api(f"CONSUMER.INFO.{stream}.{nm.CONSUMER}")
    consumer = None if "error" in found else found
    ready = nm.queue_stats(info, consumer, nm.settings_from_metadata(queue, None)[0])["ready"]
    seq = 1 + (int(consumer["delivered"]["stream_seq"]) if consumer is not None else 0)
    subject = ns.queue_subject(queue)
    messages: list[list[Any]] = []
    position = 0
    while len(messages) < limit and position < ready:
        got = await backend._api(f"STREAM.MSG.GET.{stream}",
                                 {"seq": seq, "next_by_subj": subject})
        stored = got.get("message")
        if stored is None:
            if got.get("error", {}).get("err_code") != _ERR_NO_MESSAGE:
                raise BusError(f"NATS refused to read queue {shown(queue)}:"
                               f" {got.get('error', {}).get('description')}")
            break
        seq = int(stored["seq"]) + 1
        if wanted is not None:
            entry = nm.peeked_entry(queue, stream, stored, max_body)
            if entry[0][0] == wanted:
                messages.append(entry)
                break
        elif position >= offset:
            messages.append(nm.peeked_entry(queue, stream, stored, max_body))
        position += 1
    return {"messages": messages, "ready": ready, "offset": offset}
