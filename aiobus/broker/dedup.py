"""The deduplication window of a queue: recent ids of resendable SENDs. No I/O, no clock.

Theory of operation
-------------------
A client that did not get the OK of a confirmed SEND before its connection dropped
cannot tell whether the broker accepted it, so it sends it again after reconnecting.
For such a SEND the client gives a ``seq`` and, once per connection, a ``client_id``
in HELLO that it keeps across reconnects; the message id is then ``<client_id>-<seq>``
(PROTOCOL.md §8 "Resends and deduplication"). Each queue remembers the ids of the
messages it accepted from such SENDs: if a resend's id is still remembered, the broker
answers OK and does not enqueue the message again.

What a queue remembers is bounded twice: ids accepted in the last ``span`` seconds
(``--dedup-window``, default 120 s, the default ``duplicate_window`` of NATS
JetStream, whose ``Nats-Msg-Id`` deduplication this follows), and at most ``size`` of
them (``--dedup-size``, default 100,000), the oldest going first. A resend later than
that is a new message: the window is there to cover a reconnect, not to be a history.

Storage: ``ids`` maps id -> accepted-at (the core's monotonic ``now``); ``order`` holds
the same ids in the same order. ``now`` never decreases, so the ids in acceptance order
are also in expiry order and every expired one is at the front: trimming pops from the
front, O(1) each and once per id. The deque is what makes that O(1): a dict alone keeps
insertion order, but finding its first key (``next(iter(d))``) walks over the holes
its deletions left at the front until it is next resized, which made the trim cost
33 µs per id in steady state at 100,000 ids (measured; with the deque: under 1 µs).
An id is never in the dict twice, and both structures only lose ids at the front, so
they hold the same ids in the same order at all times. No timer per id: the window is
trimmed when it is used, and a queue that gets no more resendable SENDs keeps its last
ids until then (bounded by ``size``).

Memory: a dict entry, a deque slot and the accepted-at float (shared by the ids of one
loop turn), about 70 bytes, plus the id string itself, which outlives the message only
here (docs/performance.md, "Resends and deduplication").
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Iterable

from ..errors import RemoteProtocolError, shown
from .settings import BadOption

__all__ = ["MAX_CLIENT_ID", "MAX_SEQ", "DedupWindow", "check_client_id", "check_seq"]

MAX_CLIENT_ID = 64
MAX_SEQ = 2**63 - 1  # a signed 64-bit counter, as the clients that keep one have
_CLIENT_ID = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def check_client_id(value: object) -> str | None:
    """HELLO ``options.client_id``: None, or 1..64 of ``[A-Za-z0-9_.-]``.

    Raises:
        RemoteProtocolError: ``bad-field``, as for a bad HELLO ``options.name``.
    """
    if value is None:
        return None
    if type(value) is not str or _CLIENT_ID.fullmatch(value) is None:
        what = shown(value) if type(value) is str else type(value).__name__
        raise RemoteProtocolError(
            "HELLO.options.client_id must be a str of 1 to 64 characters from"
            f" [A-Za-z0-9_.-]; got {what}", code="bad-field")
    return value


def check_seq(seq: int, client_id: str | None, token: int | None) -> str:
    """The message id of a SEND with ``seq`` on a connection whose HELLO gave
    ``client_id``.

    Raises:
        BadOption: seq out of range, no client_id, or a request (``reply_token``).
    """
    if not 0 < seq <= MAX_SEQ:
        raise BadOption(f"SEND.seq must be a positive int up to 2**63-1; got {seq}")
    if client_id is None:
        raise BadOption("SEND.seq needs a client_id: give HELLO options.client_id on this"
                        " connection, or send without seq")
    if token is not None:
        raise BadOption("SEND.seq with a reply_token: a request is never resent (it has a"
                        " timeout instead); send it without seq")
    return f"{client_id}-{seq}"


class DedupWindow:
    """The ids a queue accepted recently (module docstring)."""

    __slots__ = ("ids", "order", "size", "span", "trim_at")

    def __init__(self, span: float, size: int) -> None:
        self.span = span
        self.size = size
        self.ids: dict[str, float] = {}
        self.order: deque[str] = deque()
        # No id expires before this time: the oldest's accepted-at plus span, or earlier
        # (ids leaving by count only make it earlier than it could be, which is safe: a
        # check at an early trim_at finds nothing to trim and moves it on). One compare
        # per resendable SEND instead of a lookup of the oldest id.
        self.trim_at = math.inf

    def __len__(self) -> int:
        return len(self.ids)

    def seen(self, mid: str, now: float) -> bool:
        """Whether ``mid`` was accepted less than ``span`` seconds before ``now`` (and is
        among the ``size`` newest)."""
        ids, order = self.ids, self.order
        if now >= self.trim_at:
            oldest = now - self.span
            while order and ids[order[0]] <= oldest:
                del ids[order.popleft()]
            self.trim_at = ids[order[0]] + self.span if order else math.inf
        return mid in ids

    def add(self, mid: str, now: float) -> None:
        """``mid`` was accepted at ``now`` (callers check :meth:`seen` first; an id
        already there keeps its place, so that each id is in ``order`` once)."""
        ids = self.ids
        if mid in ids:
            return
        ids[mid] = now
        order = self.order
        order.append(mid)
        count = len(order)
        if count > self.size:
            del ids[order.popleft()]
        elif count == 1:
            self.trim_at = now + self.span

    def load(self, entries: Iterable[tuple[str, float]], now: float) -> None:
        """Add ``(id, accepted-at)`` pairs (a restart's window, from the journal).

        An id may come more than once: a resend accepted again after its first
        acceptance left the window is the same id with a later time, and that later time
        is the one that counts (keeping the first would drop the id as expired, and a
        resend within the window would then be queued twice). The ids are added oldest
        first, whatever order the journal gave them in, because trimming pops from the
        front. A time after ``now`` (the wall clock went back) counts as ``now``.
        """
        latest: dict[str, float] = {}
        for mid, at in entries:
            at = min(at, now)
            if at > latest.get(mid, -math.inf):
                latest.pop(mid, None)  # in its latest place: ties keep the journal's order
                latest[mid] = at
        for mid, at in sorted(latest.items(), key=lambda entry: entry[1]):
            self.add(mid, at)
        self.seen("", now)  # drop what expired while the broker was down

    def entries(self) -> list[tuple[str, float]]:
        """``(id, accepted-at)``, oldest first."""
        return list(self.ids.items())
