"""Reading a queue without consuming it: PEEK (browse), for dead letters above all. No I/O.

A dead-letter queue is looked at more than it is consumed: an operator wants to see what
failed and why before deciding to requeue or purge. Consuming to look (lease, then
release) was what ``aiobus dlq list`` did, and it is not neutral: it bumps ``delivered``,
competes with real consumers for the messages, and a client that dies while holding the
leases counts an attempt against each. PEEK reads the READY messages where they are
(the ``ready`` deque, sealed Runs, the unsealed tail; tombstones skipped) and changes
nothing: no lease, no counter, no journal record.

It is an administrator's tool, O(offset + limit) per call: it walks the queue from its
oldest message. Finding one message by id unpacks only those whose bytes contain the id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import msgpack

from ..errors import shown
from .queue_state import MsgState, QMsg, Queue, Run
from .settings import BadOption

__all__ = ["DEAD_LETTER_HEADERS", "DEFAULT_PEEK_LIMIT", "MAX_PEEK_LIMIT", "check_peek",
           "peek", "ready_messages"]

DEFAULT_PEEK_LIMIT: Final = 100
MAX_PEEK_LIMIT: Final = 1000
# Bodies longer than this are cut in a PEEK result unless asked otherwise (a page of 100
# is then at most 6.4 MB); the entry still says the full size.
DEFAULT_MAX_BODY: Final = 64 * 1024
# Headers the broker (and the FIFO bridge) add when dead-lettering: a requeued message
# leaves without them.
DEAD_LETTER_HEADERS: Final = frozenset({
    "x-original-queue", "x-dead-reason", "x-attempts", "x-dead-time", "x-reason-text",
    "x-consumer-pid", "x-consumer-uid", "x-record-length",
})


def check_peek(options: dict[str, Any] | None) -> tuple[int, int, int, str | None]:
    """PEEK's options, checked: ``(offset, limit, max_body, id)``.

    Raises:
        BadOption: naming the option.
    """
    offset, limit, max_body, wanted = 0, DEFAULT_PEEK_LIMIT, DEFAULT_MAX_BODY, None
    for key, value in (options or {}).items():
        if key == "id":
            if type(value) is not str:
                raise BadOption(f"PEEK id must be a message id (str); got {shown(value)}")
            wanted = value
            continue
        if type(value) is not int or value < 0:
            raise BadOption(f"PEEK {key} must be a non-negative int; got {shown(value)}")
        if key == "offset":
            offset = value
        elif key == "limit":
            if not 1 <= value <= MAX_PEEK_LIMIT:
                raise BadOption(f"PEEK limit must be from 1 to {MAX_PEEK_LIMIT}; got {value}")
            limit = value
        elif key == "max_body":
            max_body = value
        else:
            raise BadOption(f"unknown PEEK option {shown(key)}; known: id, limit, max_body,"
                            " offset")
    return offset, limit, max_body, wanted


def ready_messages(queue: Queue) -> Iterator[bytes]:
    """The packed form of each READY message of ``queue``, oldest first, untouched."""
    for entry in queue.ready:
        kind = type(entry)
        if kind is Run:
            data, ends = entry.data, entry.ends  # type: ignore[union-attr]
            for i in range(entry.next, len(ends)):  # type: ignore[union-attr]
                yield data[ends[i - 1] if i else 0 : ends[i]]
        elif kind is QMsg:
            if entry.state is MsgState.READY:  # type: ignore[union-attr]
                yield entry.packed  # type: ignore[union-attr]
        else:
            yield entry  # type: ignore[misc]  # a stateless message: its bytes
    yield from queue.tail


def _entry(packed: bytes, max_body: int) -> list[Any]:
    message = msgpack.unpackb(packed)
    body = message[2]
    size = len(body)
    if size > max_body:
        message[2] = body[:max_body]
    return [message, size]


def peek(queue: Queue, offset: int, limit: int, max_body: int,
         wanted: str | None) -> dict[str, Any]:
    """PEEK's result for ``queue`` (docs/PROTOCOL.md, PEEK): ``messages``, a list of
    ``[message, size]`` (``message`` as in DELIVER, its body cut to ``max_body`` bytes,
    ``size`` the full length), the ``limit`` READY messages from position ``offset``
    (or just the one whose id is ``wanted``, if it is ready); ``ready``, how many there
    are in all."""
    messages: list[list[Any]] = []
    if wanted is not None:
        needle = wanted.encode()
        for packed in ready_messages(queue):
            if needle in packed:
                entry = _entry(packed, max_body)
                if entry[0][0] == wanted:
                    messages.append(entry)
                    break
    else:
        for i, packed in enumerate(ready_messages(queue)):
            if i >= offset:
                if len(messages) == limit:
                    break
                messages.append(_entry(packed, max_body))
    return {"messages": messages, "ready": queue.ready_len, "offset": offset}
