"""The data of queues: messages, leases, consumers, queues. No I/O.

:mod:`aiobus.broker.queues` explains how they move (its "theory of operation"); this
module only holds them. A stateless message is its packed wire form (``bytes``); a
:class:`QMsg` wraps it once it needs state. In a durable queue a stateless message is
bytes too, and its sequence number is held beside it: by its Run (``Run.seqs``) or the
queue's ``tail_seqs`` while it waits, by its :class:`Lease` (``Lease.seq``) while it is
out for delivery.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from enum import IntEnum
from itertools import accumulate
from typing import Any

import msgpack

from ..protocol import Op
from ..stats import QueueStats
from .dedup import DedupWindow
from .settings import QueueSettings
from .timers import TimerEntry

__all__ = [
    "FIRST_ATTEMPT_TAIL",
    "MESSAGE_OVERHEAD",
    "RUN",
    "SMALL",
    "Account",
    "Consumer",
    "Entry",
    "Item",
    "Lease",
    "MsgState",
    "QMsg",
    "Queue",
    "Run",
    "pack_message",
    "packb",
    "promote",
]


class MsgState(IntEnum):
    READY = 0  # in the ready deque
    LEASED = 1  # held by a consumer
    DELAYED = 2  # waiting for a timer: a retry/nack delay, or a scheduled first delivery
    PARKED = 3  # waiting for room in a full queue (overflow="block")
    GONE = 4  # acked, dead-lettered, discarded or expired


packb = msgpack.Packer().pack  # shared: packing is synchronous, one event loop
FIRST_ATTEMPT_TAIL: bytes = packb(1) + packb(None)  # DELIVER's attempt 1, reply_to nil


def pack_message(id: str, queue: str, body: bytes, kind: int,
                 headers: dict[str, str] | None, timestamp: float) -> bytes:
    """The stored and delivered form of a queue message (see the module docstring)."""
    return packb([id, queue, body, kind, headers, timestamp])  # type: ignore[no-any-return]


class QMsg:
    """A queued message with state. ``failures`` counts failed attempts (attempt =
    failures + 1); ``packed`` is its wire form."""

    __slots__ = ("delay_timer", "due", "expires", "failures", "last_consumer", "last_reason",
                 "packed", "reply", "seq", "state", "ttl_timer")

    def __init__(self, packed: bytes, expires: float | None = None,
                 reply: tuple[int, int] | None = None, due: float | None = None) -> None:
        self.packed = packed
        self.expires = expires
        self.reply = reply  # (requester connection id, its token) for a request
        # A scheduled message (SEND with a delay): when it is first ready. Cleared when
        # it is; a retry delay never sets it (a retry goes to the front, this to the back).
        self.due = due
        self.failures = 0
        self.state = MsgState.READY
        self.last_reason: str | None = None
        self.last_consumer: tuple[int, int] | None = None  # (pid, uid)
        self.ttl_timer: TimerEntry | None = None  # armed for ``expires``, until it runs
        self.delay_timer: TimerEntry | None = None  # while DELAYED
        self.seq = -1  # its number in a durable queue's journal (-1: not journaled)

    def fields(self) -> list[Any]:
        """``[id, queue, body, kind, headers, timestamp]`` decoded (the rare paths)."""
        return msgpack.unpackb(self.packed)  # type: ignore[no-any-return]


Item = bytes | QMsg  # a stateless message is just its packed form


def promote(item: Item) -> QMsg:
    """The message as a QMsg (wrapping a stateless one), to give it state."""
    return QMsg(item) if type(item) is bytes else item  # type: ignore[return-value]


class Account:
    """The bytes of queued messages charged to one uid: those in the queues its clients
    created (and in the dead-letter queues the broker made for them), each message
    counted as its encoded size plus ``MESSAGE_OVERHEAD``; ``limit`` is the uid's
    ``max_queued_bytes_per_uid``. Queues share their payer's Account, so charging one
    is a single attribute update. A queue the broker made for nobody (restored from the
    journal, re-created for consumers after a DELETE) has an Account of its own, without
    a uid or a limit."""

    __slots__ = ("bytes", "limit", "uid")

    def __init__(self, uid: int | None, limit: float) -> None:
        self.uid = uid
        self.limit = limit
        self.bytes = 0


# What the broker holds per queued message besides its encoded form (a bytes object's
# header, its deque slot, allocator rounding: docs/performance.md measured 47 bytes).
MESSAGE_OVERHEAD = 64


class Run:
    """Small stateless messages sealed together in a queue's ready deque.

    Memory is the point. A ``bytes`` object costs 33 bytes of header, 8 more for its
    deque slot and allocator rounding on top: as much as the message's own envelope
    (id, queue name, timestamp). So small stateless messages sent to a queue collect in
    its ``tail`` list, and every ``RUN`` of them (or fewer, when something else must
    queue behind them or the deque runs dry) is sealed into one Run: their packed forms
    concatenated in ``data`` (one ``bytes``), ``ends[i]`` the offset where message i ends
    (4 bytes each), ``next`` the first not yet taken. Taking one slices it back out, the
    one copy a delivery makes anyway, and puts the Run back at the front until it is
    empty. Stateful items (:class:`QMsg`) and large messages (whose header is small
    beside them) are never sealed. Runs of 256 keep the sealing copy, and the slack of a
    partly taken run, small.

    A durable queue's Run also holds each message's sequence number (``seqs``, 8 bytes
    each; None in other queues): that is all a stateless durable message needs beyond
    its bytes, until it fails and becomes a QMsg.
    """

    __slots__ = ("data", "ends", "next", "seqs")

    def __init__(self, messages: list[bytes], seqs: list[int] | None = None) -> None:
        self.data = b"".join(messages)
        self.ends = array("I", accumulate(map(len, messages)))
        self.next = 0
        self.seqs = None if seqs is None else array("q", seqs)

    def take(self, ready: deque[Entry]) -> bytes:
        """The oldest message not yet taken; the Run was just popped from the front of
        ``ready`` and goes back there unless this was its last message. (``pump`` does
        the same inline.)"""
        i, ends = self.next, self.ends
        self.next = i + 1
        if i + 1 < len(ends):
            ready.appendleft(self)
        return self.data[ends[i - 1] if i else 0 : ends[i]]


RUN = 256  # small stateless messages sealed into one Run
SMALL = 1024  # bytes: larger messages are never sealed


Entry = Item | Run  # what a ready deque holds


class Lease:
    __slots__ = ("consumer", "deadline", "expired", "extended", "msg", "seq", "tag", "timer")

    def __init__(self, tag: int, msg: Item, consumer: Consumer, deadline: float,
                 seq: int = -1) -> None:
        self.tag = tag
        self.msg = msg
        # The sequence number of a durable queue's message held as bare bytes (a QMsg
        # keeps its own); -1 otherwise.
        self.seq = seq
        self.consumer = consumer
        self.deadline = deadline
        self.expired = False  # a zombie: the message went back to the queue
        self.extended = False  # out of the queue's deadline order; has its own timer
        self.timer: TimerEntry | None = None  # that timer, while armed


class Consumer:
    __slots__ = ("active", "conn", "held", "in_available", "leases", "pid", "prefetch",
                 "prefix", "queue", "queued", "sid", "uid", "zombies")

    def __init__(
        self, conn: int, sid: int, queue: Queue, prefetch: int, pid: int, uid: int
    ) -> None:
        self.conn = conn
        self.sid = sid
        self.queue = queue
        self.prefetch = prefetch
        self.pid = pid
        self.uid = uid
        self.leases: dict[int, Lease] = {}  # active leases and zombies, by tag
        self.active = True
        # Whether it may take a message now, and whether it has an entry in its queue's
        # ``available`` deque: an entry whose consumer is no longer available is stale
        # and skipped when it comes up (see Queue.available).
        self.in_available = False
        self.queued = False
        self.zombies = 0  # expired leases not yet answered: while > 0, nothing new is sent
        self.held = False  # its connection has too much unread output: nothing new is sent
        # DELIVER [30, sid, tag, message, attempt, reply_to]: its first two elements.
        self.prefix: bytes = b"\x96" + packb(int(Op.DELIVER)) + packb(sid)


class Queue:
    __slots__ = (
        "account",
        "acked",
        "available",
        "bytes",
        "consumers",
        "dead_lettered",
        "dead_reasons",
        "dedup",
        "delayed_msgs",
        "delivered",
        "direct_durable",
        "discarded",
        "duplicates",
        "expired",
        "explicit",
        "journal",
        "lease_timer",
        "leases",
        "name",
        "next_seq",
        "owner",
        "parked",
        "plain",
        "ready",
        "ready_len",
        "redelivered",
        "sent",
        "settings",
        "stale_available",
        "tail",
        "tail_seqs",
        "tombstones",
        "unacked",
    )

    def __init__(self, name: str, settings: QueueSettings, explicit: bool) -> None:
        self.name = name
        self.explicit = explicit  # declared (True) or created by first use (False)
        self.owner: int | None = None  # the uid whose client created it (its quota)
        # Who pays for its messages' bytes (max_queued_bytes_per_uid), and how many it
        # holds now: ready, delayed and leased, each its encoded size + MESSAGE_OVERHEAD.
        self.account = Account(None, math.inf)
        self.bytes = 0
        self.settings = settings
        # The journal of a durable queue (see queues.py), else None; the next message's
        # sequence number in it.
        self.journal: Any = None
        self.next_seq = 0
        self.plain = settings.ttl is None  # no TTL, not journaled: the send fast path
        self.direct_durable = False  # no TTL, journaled: the send fast path, journaling
        # READY messages, oldest first: the deque, then the tail (see Run).
        self.ready: deque[Entry] = deque()
        self.tail: list[bytes] = []  # small stateless messages not yet sealed
        # A durable queue's: the sequence numbers of the tail's messages (every stateless
        # message of a durable queue has one; in other queues it stays empty).
        self.tail_seqs: list[int] = []
        self.ready_len = 0  # live READY messages (the deque may hold GONE tombstones)
        self.tombstones = 0  # GONE messages still in the deque (their bodies released)
        # DELAYED messages (only their timers reach them otherwise), so that a purge or
        # a delete can find them; insertion-ordered, O(1) removal.
        self.delayed_msgs: dict[QMsg, None] = {}
        self.leases: dict[int, Lease] = {}  # active, non-extended leases, in deadline order
        self.lease_timer: float | None = None  # deadline of the armed lease timer, if any
        self.consumers: dict[Consumer, None] = {}  # insertion-ordered, O(1) removal
        # Consumers with a free prefetch slot, in turn order. Removing one from the middle
        # of a deque is O(n), and a connection cancelling thousands of consumers made that
        # quadratic; so a consumer that stops being available only clears its
        # in_available flag, and its stale entry is skipped when it reaches the front, or
        # dropped when stale entries outnumber live ones (``drop_stale_available``).
        self.available: deque[Consumer] = deque()
        self.stale_available = 0
        # (conn, rid, item, id): blocked sends; id: the message id that enters the
        # deduplication window when it is accepted (a SEND with a seq), else None.
        self.parked: deque[tuple[int, int, Item, str | None]] = deque()
        # The ids of resendable SENDs accepted recently (see dedup.py); None until one
        # arrives, so that other queues pay nothing for it.
        self.dedup: DedupWindow | None = None
        # Counters and gauges, kept as things happen (stats() only reads them): one
        # integer add per event on the hot path, no scan of leases or messages.
        self.sent = self.delivered = self.acked = self.redelivered = 0
        self.dead_lettered = self.expired = self.discarded = 0
        self.duplicates = 0  # resends answered OK and not enqueued again
        self.unacked = 0  # leases held and not expired (QueueRouter keeps it)
        # Dead letters by x-dead-reason; None until the first (most queues have none).
        self.dead_reasons: dict[str, int] | None = None

    @property
    def delayed(self) -> int:
        """How many messages are DELAYED."""
        return len(self.delayed_msgs)

    def append_ready(self, msg: Item) -> None:
        """Queue ``msg`` behind every READY message (sealing the tail into a Run when
        it is full, or when ``msg`` must not join it)."""
        if type(msg) is bytes and len(msg) <= SMALL:
            tail = self.tail
            tail.append(msg)
            if len(tail) == RUN:
                self.seal()
        else:
            if self.tail:
                self.seal()
            self.ready.append(msg)

    def append_durable(self, msg: bytes, seq: int) -> None:
        """Queue a small stateless message of a durable queue, numbered ``seq``, behind
        every READY message (``append_ready`` for those: the tail takes the number too)."""
        tail = self.tail
        tail.append(msg)
        self.tail_seqs.append(seq)
        if len(tail) == RUN:
            self.seal()

    def extend_durable(self, messages: list[bytes], seqs: list[int]) -> None:
        """``append_durable`` for each message and its seq, in bulk (restore): sealed
        into Runs of ``RUN`` straight away. Each message must be at most ``SMALL``."""
        if self.tail:
            self.seal()
        ready = self.ready
        for i in range(0, len(messages), RUN):
            ready.append(Run(messages[i:i + RUN], seqs[i:i + RUN]))

    def take_ready(self) -> Item:
        """Remove and return the oldest READY item (maybe a tombstone); there must be
        one. A durable queue's stateless message comes back as a QMsg with its ``seq``
        (the callers are the rare paths, which journal what they do with it).
        (``QueueRouter.pump`` does the same inline.)"""
        if not self.ready:
            self.seal()
        entry = self.ready.popleft()
        if type(entry) is Run:
            seqs = entry.seqs
            if seqs is None:
                return entry.take(self.ready)
            seq = seqs[entry.next]
            msg = QMsg(entry.take(self.ready))
            msg.seq = seq
            return msg
        return entry  # type: ignore[return-value]  # not a Run: an Item

    def seal(self) -> None:
        """Move the tail to the end of the deque: as one Run, or as is if it holds one
        (a durable queue's always as a Run: the Run holds their sequence numbers)."""
        tail, self.tail = self.tail, []
        if self.tail_seqs:
            self.ready.append(Run(tail, self.tail_seqs))
            self.tail_seqs = []
        elif len(tail) > 1:
            self.ready.append(Run(tail))
        else:
            self.ready.extend(tail)

    def configure(self, settings: QueueSettings, journal: Any) -> None:
        """Set the queue's settings and its journal (None: kept in memory only)."""
        self.settings = settings
        self.journal = journal
        self.plain = settings.ttl is None and journal is None
        self.direct_durable = settings.ttl is None and journal is not None

    def is_empty(self) -> bool:
        """Nothing waiting, leased or parked."""
        return not (self.ready_len or self.delayed_msgs or self.leases or self.parked
                    or any(c.leases for c in self.consumers))

    def make_available(self, consumer: Consumer) -> None:
        """``consumer`` may take a message: give it a turn at the back, unless its old
        entry is still in the deque, which then counts again where it stands."""
        consumer.in_available = True
        if consumer.queued:
            self.stale_available -= 1
        else:
            consumer.queued = True
            self.available.append(consumer)

    def make_unavailable(self, consumer: Consumer) -> None:
        """``consumer`` may take nothing more for now (stalled, full, or removed)."""
        consumer.in_available = False
        if consumer.queued:
            self.stale_available += 1
            if self.stale_available > 32 and 2 * self.stale_available > len(self.available):
                self.drop_stale_available()

    def drop_stale_available(self) -> None:
        """Rebuild ``available`` without stale entries (in place: callers hold it)."""
        live: list[Consumer] = []
        for consumer in self.available:
            if consumer.in_available:
                live.append(consumer)
            else:
                consumer.queued = False
        self.available.clear()
        self.available.extend(live)
        self.stale_available = 0

    def drop_tombstones(self) -> None:
        """Rebuild ``ready`` without the GONE messages left in it (in place)."""
        live = [e for e in self.ready
                if type(e) is not QMsg or e.state is not MsgState.GONE]
        self.ready.clear()
        self.ready.extend(live)
        self.tombstones = 0

    def is_full(self) -> bool:
        """At ``max_length``, which counts the messages waiting: ready plus delayed."""
        limit = self.settings.max_length
        return limit is not None and self.ready_len + len(self.delayed_msgs) >= limit

    def stats(self) -> QueueStats:
        """This queue's part of STATS (aiobus.stats.QueueStats): numbers read, not
        counted."""
        return {
            "ready": self.ready_len,
            "unacked": self.unacked,
            "delayed": self.delayed,
            "parked": len(self.parked),
            "consumers": len(self.consumers),
            "sent": self.sent,
            "delivered": self.delivered,
            "redelivered": self.redelivered,
            "acked": self.acked,
            "dead_lettered": self.dead_lettered,
            "dead_lettered_reasons": dict(self.dead_reasons or {}),
            "expired": self.expired,
            "discarded": self.discarded,
            "duplicates": self.duplicates,
            "settings": self.settings.as_dict(),
        }
