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

Storage: runs, not ids. A client numbers its resendable SENDs 1, 2, 3, ... and (the
Python client does) sends them in that order, so what a queue accepts from one client
in one loop turn is almost always a run of consecutive seqs with one accepted-at time.
The window keeps those runs: ``runs``, every run in acceptance order (which is also
expiry order, since ``now`` never decreases), and per client id (the id's
``<client_id>-`` prefix) its runs sorted by seq and the highest seq it had accepted
(``top``). A new in-order SEND is then one compare (``seq > top``: not seen) and, when
it continues the newest run, one attribute update: no string hashed, no entry
allocated, no 100,000-entry table whose inserts and deletes miss the cache (the id
dict this replaced cost ~1.6 µs per resendable SEND in the real broker,
docs/performance.md). Anything else is still exact: a resend or an out-of-order seq
is looked up by bisection among its client's runs, and starts a run of its own.
Trimming takes whole runs from the front when they expire and single ids from the
front run (its lowest seq, its oldest id) when there are more than ``size``; a client
whose runs are all gone is forgotten. No timer per id: the window is trimmed when it
is used, and a queue that gets no more resendable SENDs keeps its last ids until then
(bounded by ``size``).

Memory: one small object per run (a loop turn's in-order SENDs of one client share
one): ~2 bytes per id for a client sending in order, ~140 when every id is a run of its
own, against ~120 for the dict entry, deque slot and id string per id this replaced
(docs/performance.md, "Resends and deduplication").
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections import deque
from collections.abc import Iterable

from ..errors import RemoteProtocolError, shown
from .settings import BadOption

__all__ = ["MAX_CLIENT_ID", "MAX_SEQ", "DedupWindow", "check_client_id", "check_seq", "split_id"]

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


def split_id(mid: str) -> tuple[str, int] | None:
    """``(prefix, seq)`` of a resendable SEND's id ``<client_id>-<seq>`` (the prefix ends
    with its ``-``), or None for an id not of that form (no broker makes one)."""
    head, dash, digits = mid.rpartition("-")
    if not dash or not head or not digits.isascii() or not digits.isdigit():
        return None
    seq = int(digits)
    if not 0 < seq <= MAX_SEQ or str(seq) != digits:  # the id of that seq, exactly
        return None
    return head + dash, seq


class _Client:
    """One client id's runs in a window, sorted by seq, and its highest accepted seq.

    ``runs[head:]`` are the live ones: the window drops a client's oldest run, which is
    (in seq order) its first, so a drop moves ``head`` instead of shifting the list (a
    ``list.remove`` at the front of a client's thousands of runs cost microseconds per
    drop once a window was full); the dead prefix is cut off when it is half the list.
    """

    __slots__ = ("head", "prefix", "runs", "top")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.runs: list[_Run] = []
        self.head = 0
        self.top = 0  # no run holds a higher seq (it may be gone: an upper bound)

    def holds(self, seq: int) -> bool:
        runs, head = self.runs, self.head
        i = bisect_right(runs, seq, lo=head, key=_first) - 1
        return i >= head and runs[i].last >= seq

    def drop(self, run: _Run) -> bool:
        """``run`` left the window; True if this client has no run left."""
        runs, head = self.runs, self.head
        if runs[head] is run:
            head += 1
            if head > 32 and 2 * head > len(runs):
                del runs[:head]
                head = 0
            self.head = head
        else:  # an out-of-order run (an older seq accepted later): rare
            runs.remove(run)
        return head == len(runs)


class _Run:
    """The seqs ``first``..``last`` of one client, accepted at ``at``."""

    __slots__ = ("at", "client", "first", "last")

    def __init__(self, client: _Client, seq: int, at: float) -> None:
        self.client = client
        self.first = self.last = seq
        self.at = at


def _first(run: _Run) -> int:
    return run.first


class DedupWindow:
    """The ids a queue accepted recently (module docstring).

    The hot path takes an id as its parts, ``prefix`` (``<client_id>-``) and ``seq``
    (:meth:`seen_seq`, :meth:`add_seq`), as the core has them; :meth:`seen` and
    :meth:`add` take the id string.
    """

    __slots__ = ("clients", "count", "runs", "size", "span", "tail", "trim_at")

    def __init__(self, span: float, size: int) -> None:
        self.span = span
        self.size = size
        self.clients: dict[str, _Client] = {}
        self.runs: deque[_Run] = deque()
        self.tail: _Run | None = None  # the newest run (runs[-1]): the one a SEND extends
        self.count = 0
        # No id expires before this time: the oldest's accepted-at plus span, or earlier
        # (ids leaving by count only make it earlier than it could be, which is safe: a
        # check at an early trim_at finds nothing to trim and moves it on). One compare
        # per resendable SEND instead of a look at the oldest run.
        self.trim_at = math.inf

    def __len__(self) -> int:
        return self.count

    def trim(self, now: float) -> None:
        """Drop the ids accepted ``span`` seconds or more before ``now``."""
        if now < self.trim_at:
            return
        runs = self.runs
        oldest = now - self.span
        while runs and runs[0].at <= oldest:
            run = runs.popleft()
            self.count -= run.last - run.first + 1
            self._forget(run)
        self.trim_at = runs[0].at + self.span if runs else math.inf

    def seen_seq(self, prefix: str, seq: int, now: float) -> bool:
        """Whether the id ``prefix + str(seq)`` was accepted less than ``span`` seconds
        before ``now`` (and is among the ``size`` newest)."""
        if now >= self.trim_at:
            self.trim(now)
        client = self.clients.get(prefix)
        return client is not None and seq <= client.top and client.holds(seq)

    def seen(self, mid: str, now: float) -> bool:
        """:meth:`seen_seq` of an id string."""
        parts = split_id(mid)
        return parts is not None and self.seen_seq(parts[0], parts[1], now)

    def add_seq(self, prefix: str, seq: int, now: float) -> None:
        """The id ``prefix + str(seq)`` was accepted at ``now`` (callers check
        :meth:`seen_seq` first; an id already there keeps its place, so that each id is
        in the window once)."""
        tail = self.tail
        if (tail is not None and tail.last + 1 == seq and tail.at == now
                and tail.client.prefix == prefix):
            client = tail.client
            if seq > client.top:
                client.top = seq
            elif client.holds(seq):
                return
            tail.last = seq
        else:
            known = self.clients.get(prefix)  # (one name per type: mypyc types variables)
            if known is None:
                known = self.clients[prefix] = _Client(prefix)
            client = known
            run = _Run(client, seq, now)
            if seq > client.top:
                client.runs.append(run)
                client.top = seq
            elif client.holds(seq):
                return
            else:
                client.runs.insert(
                    bisect_right(client.runs, seq, lo=client.head, key=_first), run)
            self.runs.append(run)
            self.tail = run
            if len(self.runs) == 1:
                self.trim_at = now + self.span
        self.count += 1
        if self.count > self.size:
            run = self.runs[0]
            self.count -= 1
            if run.first < run.last:
                run.first += 1
            else:
                self.runs.popleft()
                self._forget(run)

    def add(self, mid: str, now: float) -> None:
        """:meth:`add_seq` of an id string (one not of the ``<client_id>-<seq>`` form
        is not kept: no broker makes one)."""
        parts = split_id(mid)
        if parts is not None:
            self.add_seq(parts[0], parts[1], now)

    def _forget(self, run: _Run) -> None:
        """``run`` left ``runs``: it leaves its client too."""
        client = run.client
        if client.drop(run):
            del self.clients[client.prefix]
        if run is self.tail:
            self.tail = None

    def load(self, entries: Iterable[tuple[str, float]], now: float) -> None:
        """Add ``(id, accepted-at)`` pairs (a restart's window, from the journal).

        An id may come more than once: a resend accepted again after its first
        acceptance left the window is the same id with a later (or, in the same loop
        turn, the same) time, and its last mention is the one that counts, in its place
        (keeping the first would drop the id as expired or first by count, and a resend
        within the window would then be queued twice). The ids are added oldest
        first, whatever order the journal gave them in, because trimming takes from the
        front. A time after ``now`` (the wall clock went back) counts as ``now``.
        """
        latest: dict[str, float] = {}
        for mid, at in entries:
            at = min(at, now)
            if at >= latest.get(mid, -math.inf):
                latest.pop(mid, None)  # in its latest place: the journal's last mention
                latest[mid] = at
        for mid, at in sorted(latest.items(), key=lambda entry: entry[1]):
            self.add(mid, at)
        self.trim(now)  # drop what expired while the broker was down

    def run_entries(self) -> list[tuple[str, int, int, float]]:
        """``(prefix, first, last, accepted-at)`` of each run, oldest first: the ids
        ``prefix + str(seq)`` for seq from first to last (the journal writes these: a
        loop turn's ids are one run, where :meth:`entries` makes a string each)."""
        return [(run.client.prefix, run.first, run.last, run.at) for run in self.runs]

    def entries(self) -> list[tuple[str, float]]:
        """``(id, accepted-at)``, oldest first."""
        out: list[tuple[str, float]] = []
        for run in self.runs:
            prefix, at = run.client.prefix, run.at
            out.extend((prefix + str(seq), at) for seq in range(run.first, run.last + 1))
        return out
