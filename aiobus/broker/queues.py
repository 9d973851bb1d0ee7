"""Point-to-point queues: leases, redelivery, retries, dead letters, overflow. No I/O.

Theory of operation
-------------------
Storage. A queued message is its encoded wire form: the msgpack array
``[id, queue, body, kind, headers, timestamp]`` that DELIVER frames carry as is, so a
delivery copies no field and re-encodes nothing. A message that never failed, has no TTL
and is not a request is stored as that ``bytes`` object alone (the common case, and the
cheapest in memory); one that needs state (failed attempts, an expiry, a reply route,
its last consumer) is wrapped in a :class:`QMsg` the first time it does. An *item* below
is either. A backlog of small stateless messages is kept denser still: every 256 of them
are sealed into one :class:`Run` (one ``bytes`` for all, see queue_state.py), and taken
back out one by one in order.

A message (:class:`QMsg`) is in exactly one place, recorded in ``msg.state``:

* ``READY``: in its queue's ``ready`` deque (or, stateless, in a Run or the tail),
  waiting for a consumer;
* ``LEASED``: delivered to one consumer under a :class:`Lease` with a deadline;
* ``DELAYED``: waiting on a timer before it becomes ready again (nack with a delay, or
  the queue's ``retry_delays`` schedule: then to the front), or ready for the first time
  (a SEND with a ``delay``, ``msg.due`` set: then to the back, as if sent at its due
  time, which is also when its TTL starts); the queue keeps them in ``delayed_msgs``;
* ``PARKED``: sent to a full queue with ``overflow="block"``; admitted when room frees;
* ``GONE``: acked, dead-lettered, or discarded.

(A bare ``bytes`` item is READY while in the deque and LEASED while a lease holds it.)
Every transition goes through a method of :class:`QueueRouter`. A durable queue (one with
``queue.journal``; every message of it has a per-queue ``seq``) records them there,
without I/O: ``_accept`` (sent), ``_deliver`` (delivered), ``_fail`` (failed, with
its due time, reason and consumer), a CANCEL release (no attempt), and ``_gone`` (acked,
rejected, dead-lettered, expired, dropped); the shell writes the records out once per loop
turn before the turn's output. A small durable message without state is bytes as well,
its ``seq`` beside it (queue_state.py: in its Run or the tail while READY, in its Lease
while LEASED), so the common durable message costs what a plain one does plus its three
records; it becomes a QMsg with that ``seq`` where it needs state (a failure, a release,
the rare paths that take it out of the deque: ``Queue.take_ready``). Leaving ``READY`` by
TTL expiry marks the message ``GONE`` where it sits in the deque (removal from the middle
of a deque is O(n)); ``pump`` skips such tombstones and ``Queue.ready_len`` counts only
live ones.

Administration. ``purge`` drops what waits (READY and DELAYED) and leaves leases alone;
``delete`` drops the queue object with everything in it, ends its leases (a later
answer is ``lease-unknown``) and moves its consumers to a fresh queue of the same name.
A durable queue journals either as one record (``purged``, ``deleted``), not one per
message. ``requeue_dead_letters`` (the dashboard's) takes READY dead letters out of the
middle of a dead-letter queue, so it rebuilds that queue's ready deque: O(n), an admin
action. Reading a queue without consuming it is browse.py's PEEK, which changes nothing.

Counters and gauges live on the queue and change with the transitions above (one
integer add each, never a scan): ``unacked`` goes up in ``_deliver`` and down when a
lease is answered (``_take``), expires (``_expire_lease``) or is settled by a stopping
consumer (``_settle_leases``); STATS only reads them.

A lease ends in one of four ways. ``ack`` and ``reply`` remove the message. ``nack``,
an ack timeout and a lost connection are *failures*: they count an attempt, and after
``max_deliveries`` attempts the message is dead-lettered. A consumer that stops
(``CANCEL``) *releases* its leases: the messages go back to the front of the queue and
no attempt is counted, since nobody processed them.

An expired lease stays in its consumer's prefetch window as a "zombie" until the
consumer answers it (the late answer fails with ``lease-expired`` but frees the slot) or
disconnects. So a stalled consumer receives nothing new, and a message does not bounce
back to a consumer that has not processed the previous delivery.

Lease deadlines: with one ``ack_timeout`` per queue and a non-decreasing ``now``, leases
expire in delivery order, so each queue keeps its leases in an insertion-ordered dict and
arms a single timer for the oldest. Only ``extend`` takes a lease out of that order; it
gets a timer entry of its own.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection
from typing import Any, Protocol

import msgpack

from ..errors import (
    BusError,
    InvalidName,
    JournalError,
    LeaseError,
    NoSuchQueue,
    NotARequest,
    QueueFull,
    QueueMismatch,
    QueueNotEmpty,
    QuotaExceeded,
    shown,
)
from ..names import check_name, is_reserved
from ..stats import JournalStats
from .browse import DEAD_LETTER_HEADERS
from .dedup import DedupWindow, split_id
from .queue_state import (
    FIRST_ATTEMPT_TAIL,
    MESSAGE_OVERHEAD,
    SMALL,
    Account,
    Consumer,
    Item,
    Lease,
    MsgState,
    QMsg,
    Queue,
    Run,
    pack_message,
    packb,
    promote,
)
from .settings import (
    DEFAULT_DEDUP_SIZE,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_QUEUED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUES_PER_UID,
    MAX_SECONDS,
    BadOption,
    QueueSettings,
    check_dedup,
)
from .timers import Timers

__all__ = ["MAX_PREFETCH", "PARK_LIMIT", "QueueRouter"]

_join = b"".join  # one copy of a DELIVER's parts, where + would make three
MAX_PREFETCH = 65535
# A producer with this many sends parked on full queues stops being read until some are
# admitted (RabbitMQ blocks a publishing connection the same way).
PARK_LIMIT = 256


def _requeueable(target: object) -> bool:
    """A dead letter's ``x-original-queue`` names a queue it may go back to."""
    if type(target) is not str or is_reserved(target):
        return False
    try:
        check_name(target, "queue name")
    except InvalidName:
        return False
    return True


def _size(item: Item) -> int:
    """Bytes a parked message holds: its encoded form (a QMsg adds ~100 bytes, ignored)."""
    return len(item) if type(item) is bytes else len(item.packed)  # type: ignore[union-attr]


def _held(item: Item) -> int:
    """What a message in a queue is charged to its payer's Account."""
    return (len(item) if type(item) is bytes else len(item.packed)) + MESSAGE_OVERHEAD  # type: ignore[union-attr]


class QueueSink(Protocol):
    """What the router needs from its owner (the broker core); DELIVERs go straight to
    the shell's ``send_raw``, given to the router apart."""

    def reply_ok(self, conn: int, rid: int) -> None: ...

    def set_parked(self, conn: int, delta: int, size: int, queue: str | None = None) -> None:
        """``delta`` sends of ``size`` bytes in all were parked (or, negative, left)."""

    def reply_error(self, conn: int, rid: int, error: BusError) -> None: ...


class JournalSink(Protocol):
    """What durable queues record (``journal.Journal``); plain methods, no I/O. Times
    are epoch seconds."""

    def declare(self, name: str, settings: dict[str, Any]) -> None: ...

    def sent(self, queue: str, seq: int, message: bytes, failures: int = 0,
             expires: float | None = None, due: float | None = None,
             accepted: float | None = None) -> None:
        """``accepted``: the message's id entered the queue's deduplication window at
        this time (a SEND with a seq), else None."""

    def remembered(self, queue: str, entries: list[tuple[str, float]]) -> None:
        """These ids entered the queue's deduplication window (without a Sent record in
        the queue: a message overflow dead-lettered at once)."""

    def attach_windows(self, source: Callable[[str], list[tuple[str, int, int, float]]]
                       ) -> None:
        """Where the journal reads a queue's window, as runs of ids (prefix, first seq,
        last seq, accepted-at) oldest first, when it starts a segment."""

    def delivered(self, queue: str, seq: int) -> None: ...

    def failed(self, queue: str, seq: int, failures: int, due: float | None, *,
               reason: str | None = None, consumer: tuple[int, int] | None = None
               ) -> None: ...

    def removed(self, queue: str, seq: int, reason: int) -> None: ...

    def purged(self, queue: str) -> None: ...

    def deleted(self, queue: str) -> None: ...

    def statistics(self) -> JournalStats: ...


# journal.RemovalReason, by value (the core does not import the journal's I/O side).
ACKED, REJECTED, DEAD_LETTERED, EXPIRED, DROPPED = 1, 2, 3, 4, 5
_REMOVAL = {"rejected": REJECTED, "max-deliveries": DEAD_LETTERED, "expired": EXPIRED,
            "overflow": DROPPED}


class QueueRouter:
    """All queues of a broker and every transition of their messages."""

    def __init__(self, sink: QueueSink, timers: Timers, wall_offset: float, *,
                 send_raw: Callable[[int, bytes], None],
                 journal: JournalSink | None = None,
                 dedup_window: float = DEFAULT_DEDUP_WINDOW,
                 dedup_size: int = DEFAULT_DEDUP_SIZE,
                 max_queues_per_uid: int = DEFAULT_MAX_QUEUES_PER_UID,
                 max_queued_bytes_per_uid: int = DEFAULT_MAX_QUEUED_BYTES_PER_UID) -> None:
        self.queues: dict[str, Queue] = {}
        # Queues each uid's clients created (SEND, CONSUME, DECLARE of a new name), at
        # most max_queues_per_uid; queues the broker creates itself (dead-letter targets,
        # re-created after DELETE for their consumers, restored) belong to nobody.
        self.max_queues_per_uid = max_queues_per_uid
        self.owned: dict[int, int] = {}
        # The bytes each uid's queues hold (queue_state.Account), at most
        # max_queued_bytes_per_uid before a SEND is refused.
        self.max_queued_bytes_per_uid = max_queued_bytes_per_uid
        self.accounts: dict[int, Account] = {}
        self._idle: dict[str, int] = {}  # sweep: idle queues seen, and their activity
        self.leases: dict[int, Lease] = {}  # every lease a consumer holds, zombies too
        self._sink = sink
        self._send_raw = send_raw
        self._timers = timers
        self._next_tag = 1
        self.wall_offset = wall_offset  # wall clock = now + wall_offset (for headers)
        # Where durable queues record every change of their messages (a journal.Journal,
        # owned by the shell, which writes it out once per loop turn); None: none.
        self.journal: JournalSink | None = journal
        self.paused = False  # shutting down: nothing more is delivered (see pause)
        # Set by the shell while the journal cannot be written (e.g. "ENOSPC"): sends to
        # durable queues are refused. And the connections that got a confirmation of a
        # durable send since the shell last wrote the journal: if that write fails, the
        # shell drops their output (those confirmations must not go out) and closes them.
        self.journal_error: str | None = None
        self.journaled_confirms: set[int] = set()
        # Each queue's deduplication window of resendable SENDs (dedup.py): how long and
        # how many ids; a size of 0 means off (either setting 0 turns it off).
        self.dedup_window, size = check_dedup(dedup_window, dedup_size)
        self.dedup_size = size if self.dedup_window else 0
        if journal is not None:
            journal.attach_windows(self.dedup_runs)

    # -- queues ---------------------------------------------------------------------

    def get(self, name: str) -> Queue:
        """The queue ``name``, created with defaults on first use."""
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name, QueueSettings.for_queue(name), False)
        return queue

    def get_for(self, name: str, uid: int) -> Queue:
        """The queue ``name``, created with defaults for a client of ``uid`` (which it
        counts against) if it does not exist.

        Raises:
            QuotaExceeded: ``uid`` already created max_queues_per_uid queues.
        """
        queue = self.queues.get(name)
        if queue is None:
            self._charge(uid)
            queue = self.queues[name] = Queue(name, QueueSettings.for_queue(name), False)
            queue.owner = uid
            queue.account = self.account(uid)
        return queue

    def account(self, uid: int) -> Account:
        """The Account of ``uid``'s queued bytes (made on first use, kept: one per uid)."""
        account = self.accounts.get(uid)
        if account is None:
            account = self.accounts[uid] = Account(uid, self.max_queued_bytes_per_uid)
        return account

    def _charge(self, uid: int) -> None:
        count = self.owned.get(uid, 0)
        if count >= self.max_queues_per_uid:
            raise QuotaExceeded(
                f"uid {uid} already has max_queues_per_uid={self.max_queues_per_uid} queues;"
                " delete some (empty queues created by use go by themselves)")
        self.owned[uid] = count + 1

    def _remove(self, queue: Queue) -> None:
        """``queue`` leaves the broker's table (DELETE, or the sweep)."""
        del self.queues[queue.name]
        owner = queue.owner
        if owner is not None:
            left = self.owned[owner] - 1
            if left:
                self.owned[owner] = left
            else:
                del self.owned[owner]

    def sweep(self, now: float) -> int:
        """Remove queues created by use that stayed empty and unused since the last sweep
        (settings.SWEEP_INTERVAL); returns how many. Declared and durable queues stay."""
        idle, self._idle = self._idle, {}
        removed = 0
        for queue in list(self.queues.values()):
            if (queue.explicit or queue.journal is not None or queue.consumers
                    or not queue.is_empty()):
                continue
            dedup = queue.dedup
            if dedup is not None:
                dedup.trim(now)
                if len(dedup):
                    continue
            activity = queue.sent + queue.delivered + queue.acked + queue.duplicates
            if idle.get(queue.name) == activity:
                self._remove(queue)
                removed += 1
            else:
                self._idle[queue.name] = activity
        return removed

    def declare(self, name: str, options: dict[str, Any], uid: int | None = None) -> Queue:
        """Create ``name`` with ``options``, or check them against an existing declaration.

        A queue created implicitly by use adopts the settings of its first declaration.

        Raises:
            BadOption: an option is invalid.
            QueueMismatch: the queue was declared before with different settings.
            QuotaExceeded: it would be a new queue of ``uid``, which has its quota.
        """
        settings = QueueSettings.for_queue(name, options)
        self._check_dead_letter_chain(name, settings)
        if settings.durable and self.journal is None:
            raise BadOption("durable=True needs a broker with a journal: this one was"
                            " started without a data directory")
        queue = self.queues.get(name)
        if queue is None:
            if uid is not None:
                self._charge(uid)
            queue = self.queues[name] = Queue(name, settings, True)
            queue.owner = uid
            if uid is not None:
                queue.account = self.account(uid)
            self._journal_settings(queue, settings)
        elif not queue.explicit:
            if settings.durable != queue.settings.durable and not queue.is_empty():
                raise BadOption(
                    f"queue {shown(name)} already holds messages in memory: declare it"
                    f" durable={settings.durable} before it is first used"
                )
            if queue.leases and settings.ack_timeout != queue.settings.ack_timeout:
                # Their deadlines came from the old ack_timeout; new leases would not sort
                # after them, so each keeps a timer of its own.
                for lease in queue.leases.values():
                    lease.extended = True
                    lease.timer = self._timers.call_at(lease.deadline,
                                                       self._on_extended_timer, lease)
                queue.leases.clear()
                queue.lease_timer = None  # the next lease arms one with the new timeout
            self._journal_settings(queue, settings)
            queue.explicit = True
        elif queue.settings != settings:
            old, new = queue.settings.as_dict(), settings.as_dict()
            diff = ", ".join(f"{k}: {shown(old[k])} != {shown(new[k])}"
                             for k in old if old[k] != new[k])
            raise QueueMismatch(
                f"queue {shown(name)} is already declared with other settings ({diff});"
                " use the same settings or another queue name"
            )
        return queue

    def _check_dead_letter_chain(self, name: str, settings: QueueSettings) -> None:
        """Refuse a declaration whose dead letters would come back to ``name``: two
        queues with a TTL dead-lettering into each other passed a message back and forth
        forever, its ``x-attempts`` starting again each time (issue 12). The chain is
        followed through the queues as they are, and queues not yet created with the
        defaults they would get (``<name>.dlq``, which has none).

        Raises:
            BadOption: naming the cycle.
        """
        chain = [name]
        seen = {name}
        target = settings.dead_letter
        while target is not None:
            chain.append(target)
            if target in seen:
                shown_chain = " -> ".join(shown(q) for q in chain[:8])
                raise BadOption(f"dead_letter would make a cycle ({shown_chain}"
                                f"{' -> ...' if len(chain) > 8 else ''}): a dead letter"
                                " would never leave it; end the chain in a queue whose"
                                " dead_letter is None")
            seen.add(target)
            queue = self.queues.get(target)
            target = (queue.settings if queue is not None
                      else QueueSettings.for_queue(target)).dead_letter

    def _journal_settings(self, queue: Queue, settings: QueueSettings) -> None:
        """Apply ``settings`` to ``queue``, journaling them if it is durable (or dropping
        it from the journal if it no longer is: the caller allows that only while the
        queue holds nothing). A durable queue's
        dead-letter queue is made durable too when it does not exist yet or is empty and
        undeclared: dead letters must survive what their queue survives."""
        journal = self.journal if settings.durable else None
        if journal is not None:
            journal.declare(queue.name, settings.as_dict())
        elif queue.journal is not None:
            queue.journal.deleted(queue.name)
        queue.configure(settings, journal)
        target = settings.dead_letter
        if journal is None or target is None:
            return
        dlq = self.queues.get(target)
        if dlq is None:
            dlq = self.queues[target] = Queue(target, QueueSettings.for_queue(target), False)
            dlq.account = queue.account  # made for this queue: its payer pays for it
        if not dlq.explicit and dlq.journal is None and dlq.is_empty():
            # Undeclared, so it has the defaults: the same, made durable.
            self._journal_settings(dlq, QueueSettings.for_queue(target, {"durable": True}))

    def existing(self, name: str) -> Queue:
        """The queue ``name``, which must exist (PURGE, DELETE, PEEK, a passive CONSUME):
        reading a queue never creates it.

        Raises:
            NoSuchQueue: it does not.
        """
        queue = self.queues.get(name)
        if queue is None:
            raise NoSuchQueue(f"there is no queue {shown(name)}: it was never used since the"
                              " broker started, or it was deleted")
        return queue

    def purge(self, name: str, now: float) -> int:
        """Remove the messages waiting in ``name``, ready and delayed, and return how
        many. Leased ones stay (as RabbitMQ's queue.purge): their consumers are working
        on them. Sends parked on the full queue are then admitted into the room made.

        Raises:
            NoSuchQueue: the queue does not exist.
        """
        queue = self.existing(name)
        count = queue.ready_len + len(queue.delayed_msgs)
        if queue.journal is not None:
            queue.journal.purged(name)  # one record, for what is not out for delivery
        leased = sum(_held(lease.msg) for consumer in queue.consumers
                     for lease in consumer.leases.values() if not lease.expired)
        queue.account.bytes -= queue.bytes - leased
        queue.bytes = leased
        self._forget_waiting(queue)
        self.pump(queue, now)
        return count

    def requeue_dead_letters(self, name: str, ids: Collection[str] | None,
                             now: float) -> int:
        """Send READY dead letters of ``name`` (those whose id is in ``ids``; every one
        with None) back to the queue their ``x-original-queue`` header names, and return
        how many. Each leaves ``name`` as if acked (counted in ``acked``, journaled so)
        and enters its queue at the back as a new message (counted in ``sent``), with its
        id, body, kind and timestamp, and its own headers: those dead-lettering added
        (``DEAD_LETTER_HEADERS``) are dropped, so it has a fresh set of attempts. Dead
        letters without a valid ``x-original-queue``, and the FIFO bridge's ``too-large``
        records (only the head of a record), stay. O(n) in the queue: an admin action.

        Raises:
            NoSuchQueue: ``name`` does not exist.
        """
        queue = self.existing(name)
        kept: list[Item] = []
        moved: list[tuple[Item, list[Any]]] = []
        while queue.ready or queue.tail:
            item = queue.take_ready()
            if type(item) is QMsg and item.state is not MsgState.READY:
                continue  # a tombstone: dropped here
            fields = msgpack.unpackb(item if type(item) is bytes else item.packed)  # type: ignore[union-attr]
            headers = fields[4] or {}
            target = headers.get("x-original-queue")
            if ((ids is not None and fields[0] not in ids) or not _requeueable(target)
                    or headers.get("x-dead-reason") == "too-large"):
                kept.append(item)
            else:
                moved.append((item, fields))
        queue.tombstones = 0
        for item in kept:
            queue.append_ready(item)
        queue.ready_len = len(kept)
        for item, (mid, _, body, kind, headers, timestamp) in moved:
            self._release(queue, item)  # its bytes leave the dead-letter queue's payer
            if type(item) is QMsg:
                self._gone(queue, item, ACKED)
            queue.acked += 1
            target = headers["x-original-queue"]
            own = {k: v for k, v in headers.items() if k not in DEAD_LETTER_HEADERS}
            back = pack_message(mid, target, body, kind, own or None, timestamp)
            home = self.get(target)
            self._charge_bytes(home, back)
            self._accept(home, back, now)
        if moved and queue.parked:
            self.pump(queue, now)  # room for sends waiting on a full dead-letter queue
        return len(moved)

    def delete(self, name: str, if_empty: bool, now: float) -> int:
        """Remove ``name`` with its settings and every message (ready, delayed, leased),
        and return how many messages that was.

        The leases end: answering one later is ``lease-unknown``. Consumers stay
        registered on the name, which is then created again empty, with defaults, as
        any queue is by use. Sends parked on the queue were never accepted: each is
        refused with NoSuchQueue.

        Raises:
            NoSuchQueue: the queue does not exist.
            QueueNotEmpty: ``if_empty`` and the queue holds any message or parked send.
        """
        queue = self.existing(name)
        unacked = queue.unacked
        count = queue.ready_len + len(queue.delayed_msgs) + unacked
        if if_empty and (count or queue.parked):
            raise QueueNotEmpty(
                f"queue {shown(name)} is not empty: {queue.ready_len} ready, {queue.delayed}"
                f" delayed, {unacked} unacked, {len(queue.parked)} sends waiting for room;"
                " purge it first, or delete it without if_empty"
            )
        if queue.journal is not None:
            queue.journal.deleted(name)  # one record: all of it, settings too
        queue.account.bytes -= queue.bytes
        queue.bytes = 0
        self._remove(queue)
        self._forget_waiting(queue)
        consumers = list(queue.consumers)
        for consumer in consumers:
            for tag, lease in consumer.leases.items():
                del self.leases[tag]
                if lease.timer is not None:
                    self._timers.cancel(lease.timer)
                if not lease.expired and type(lease.msg) is QMsg:
                    self._forget(lease.msg)
            consumer.leases.clear()
            consumer.zombies = 0
        queue.leases.clear()  # its lease timer, if armed, finds nothing
        for conn, rid, item, _ in queue.parked:
            if type(item) is QMsg:
                self._forget(item)
            self._sink.set_parked(conn, -1, -_size(item))
            self._sink.reply_error(conn, rid, NoSuchQueue(
                f"queue {shown(name)} was deleted while this send waited for room in it;"
                " the message was not accepted"))
        queue.parked.clear()
        if consumers:  # they use the name: it exists again, as a new queue
            fresh = self.get(name)
            for consumer in consumers:
                consumer.queue = fresh
                consumer.in_available = consumer.queued = False
                fresh.consumers[consumer] = None
                self._make_available(consumer)
        return count

    def _forget_waiting(self, queue: Queue) -> None:
        """Drop every READY and DELAYED message of ``queue`` (the caller journals)."""
        for entry in queue.ready:
            if type(entry) is QMsg:
                self._forget(entry)
        for msg in queue.delayed_msgs:
            self._forget(msg)
        queue.ready.clear()
        queue.tail.clear()
        queue.tail_seqs.clear()
        queue.delayed_msgs.clear()
        queue.ready_len = queue.tombstones = 0

    def restore(self, recovered: Any, now: float) -> None:
        """Load what the journal recovered (``journal.Recovered``) after a restart:
        durable queues with their settings, and their messages, ready again (or delayed
        until their due time) with their failed attempts counted and their last failure
        (reason text, consumer) for dead-letter headers. A message whose attempts
        reached ``max_deliveries`` (the crash took its last one: its reason text is
        ``broker-restart``) is dead-lettered now. Nothing is journaled again except
        what changes."""
        wall = self.wall_offset
        loaded: list[tuple[Queue, Any]] = []
        for name, rq in recovered.queues.items():
            settings = QueueSettings.for_queue(name, rq.settings)
            queue = self.queues[name] = Queue(name, settings, True)
            queue.configure(settings, self.journal)
            queue.next_seq = rq.next_seq
            if rq.dedup and self.dedup_size:
                window = queue.dedup = DedupWindow(self.dedup_window, self.dedup_size)
                window.load([(mid, at - wall) for mid, at in rq.dedup], now)
            loaded.append((queue, rq))
        for queue, rq in loaded:  # every queue exists before a dead letter is moved
            stateful: list[Any] = rq.stateful  # journal.RecoveredMessage, in seq order
            stateless: dict[int, bytes] = rq.stateless  # most of them: bytes and a seq
            n = len(stateless)
            held = sum(map(len, stateless.values()))
            k, count = 0, len(stateful)
            if not stateful and (not n or max(map(len, stateless.values())) <= SMALL):
                queue.extend_durable(list(stateless.values()), list(stateless))  # in bulk
            else:
                append_durable = queue.append_durable
                for seq, message in stateless.items():
                    while k < count and stateful[k].seq < seq:
                        self._restore_message(queue, stateful[k], now)
                        k += 1
                    if len(message) <= SMALL:
                        append_durable(message, seq)
                    else:
                        msg = QMsg(message)
                        msg.seq = seq
                        queue.append_ready(msg)
            queue.sent += n
            queue.ready_len += n
            held += n * MESSAGE_OVERHEAD  # _held, summed (a restored queue belongs to
            queue.bytes += held           # nobody: no limit)
            queue.account.bytes += held
            for m in stateful[k:]:
                self._restore_message(queue, m, now)

    def _restore_message(self, queue: Queue, m: Any, now: float) -> None:
        """Load one recovered message with state (``journal.RecoveredMessage``)."""
        wall = self.wall_offset
        limit = queue.settings.max_deliveries
        msg = QMsg(m.message, None if m.expires is None else m.expires - wall)
        msg.seq, msg.failures = m.seq, m.failures
        msg.last_reason, msg.last_consumer = m.last_reason, m.last_consumer
        queue.sent += 1
        size = len(m.message) + MESSAGE_OVERHEAD  # _held, inline
        queue.bytes += size  # (a restored queue belongs to nobody: no limit)
        queue.account.bytes += size
        if limit is not None and msg.failures >= limit:
            self.dead_letter(queue, msg, "max-deliveries", None, now)
        elif m.due is not None and m.due - wall > now:
            if not msg.failures:  # never delivered: a scheduled message
                msg.due = m.due - wall
            self._delay(queue, msg, m.due - wall)
            if msg.expires is not None:
                self._arm_ttl(queue, msg)
        else:
            if msg.expires is not None:
                self._arm_ttl(queue, msg)
            queue.append_ready(msg)
            queue.ready_len += 1

    # -- producing ------------------------------------------------------------------

    def _window(self, queue: Queue) -> DedupWindow:
        """``queue``'s deduplication window, made on first use."""
        window = queue.dedup
        if window is None:
            window = queue.dedup = DedupWindow(self.dedup_window, self.dedup_size)
        return window

    def dedup_runs(self, name: str) -> list[tuple[str, int, int, float]]:
        """The deduplication window of queue ``name`` as runs of ids (prefix, first seq,
        last seq, accepted-at in epoch seconds), oldest first: what the journal writes
        at the head of a segment (a run a loop turn, not a string an id: a window of
        100,000 ids took 77 ms to write as ids)."""
        queue = self.queues.get(name)
        if queue is None or queue.dedup is None:
            return []
        wall = self.wall_offset
        return [(prefix, first, last, at + wall)
                for prefix, first, last, at in queue.dedup.run_entries()]

    def _check_journal(self, queue: Queue) -> None:
        """Raise while the journal cannot be written (callers test ``journal_error``
        first: this runs per durable SEND)."""
        if self.journal_error is not None:
            raise JournalError(
                f"queue {shown(queue.name)} is durable and the journal cannot be written"
                f" ({self.journal_error}); the message was not accepted, retry later",
                cause=self.journal_error)

    def send(self, conn: int, rid: int, queue: Queue, msg: Item, now: float,
             prefix: str | None = None, seq: int = 0) -> None:
        """A message from ``conn``; confirms with OK to ``rid`` (0: no confirmation).

        ``prefix`` and ``seq``: a resendable SEND's (one with a seq) id is
        ``prefix + str(seq)`` (``prefix``: ``<client_id>-``). If it is in the queue's
        deduplication window, the message was accepted before: it is confirmed, counted
        in ``duplicates``, and not enqueued again (PROTOCOL.md §8 "Resends and
        deduplication"); else it enters the window when the message is accepted.

        Raises:
            JournalError: the queue is durable and the journal cannot be written.
            QueueFull: the queue is full and its overflow policy is ``reject``.
            QuotaExceeded: the queue's payer holds max_queued_bytes_per_uid.
            (In any case the id does not enter the window.)
        """
        if prefix is not None:
            if not self.dedup_size:  # deduplication is off: a SEND like any other
                prefix = None
            else:
                if queue.journal is not None and self.journal_error is not None:
                    self._check_journal(queue)  # a duplicate is refused as the original
                window = queue.dedup
                if window is None:
                    window = queue.dedup = DedupWindow(self.dedup_window, self.dedup_size)
                if window.seen_seq(prefix, seq, now):
                    queue.duplicates += 1
                    if rid:
                        if queue.journal is not None:  # the original may wait to be written
                            self.journaled_confirms.add(conn)
                        self._sink.reply_ok(conn, rid)
                    return
        size = (len(msg) if type(msg) is bytes else len(msg.packed)) + MESSAGE_OVERHEAD  # type: ignore[union-attr]
        account = queue.account
        if account.bytes + size > account.limit:
            raise QuotaExceeded(
                f"uid {account.uid} already has {account.bytes} bytes queued, and"
                f" max_queued_bytes_per_uid={self.max_queued_bytes_per_uid}: queue"
                f" {shown(queue.name)} takes no more until its messages are consumed")
        available = queue.available
        if (available and not queue.ready_len and not queue.delayed_msgs and not queue.parked
                and type(msg) is bytes
                and (queue.plain or (queue.direct_durable and self.journal_error is None))):
            # The common case on a busy queue: nothing waits (so it cannot be full) and a
            # consumer has room, so the message goes straight to it: what _accept and
            # pump would do, in one step (journaling it as they would: Sent, Delivered).
            consumer = available.popleft()
            if consumer.in_available:
                queue.sent += 1
                queue.bytes += size
                account.bytes += size
                if prefix is not None:
                    queue.dedup.add_seq(prefix, seq, now)  # type: ignore[union-attr]  # made above
                if queue.plain:
                    self._deliver(queue, consumer, msg, now)
                else:  # bytes, its seq held by the lease (module docstring)
                    qseq = queue.next_seq
                    queue.next_seq = qseq + 1
                    if prefix is None:
                        queue.journal.sent(queue.name, qseq, msg)
                    else:
                        queue.journal.sent(queue.name, qseq, msg, 0, None, None,
                                           now + self.wall_offset)
                    self._deliver(queue, consumer, msg, now, qseq)
                    if rid:  # confirmed only if this turn's records reach the journal
                        self.journaled_confirms.add(conn)
                if len(consumer.leases) < consumer.prefetch:
                    available.append(consumer)
                else:
                    consumer.in_available = consumer.queued = False
                if rid:
                    self._sink.reply_ok(conn, rid)
                return
            consumer.queued = False  # a stale entry (see Queue.available): the long way
            queue.stale_available -= 1
        if queue.journal is not None:
            if self.journal_error is not None:
                self._check_journal(queue)
            if rid:  # confirmed only if this turn's records reach the journal
                self.journaled_confirms.add(conn)
        if queue.parked:
            if any(parked[0] == conn for parked in queue.parked):
                # Keep this producer's order: it already waits for room in this queue.
                self._park(conn, rid, queue, msg, prefix, seq)
                return
        if queue.is_full():
            policy = queue.settings.overflow
            if policy == "block":
                self._park(conn, rid, queue, msg, prefix, seq)
                return
            if policy == "reject":
                raise QueueFull(
                    f"queue {shown(queue.name)} is full (max_length={queue.settings.max_length},"
                    " overflow='reject'); retry later or consume faster"
                )
            if not self._drop_oldest(queue, now):
                # Only delayed messages fill the queue: the new one is the one to go.
                queue.sent += 1
                queue.bytes += size  # accepted, then dead-lettered
                account.bytes += size
                if prefix is not None:  # accepted (and confirmed) before it goes
                    self._window(queue).add_seq(prefix, seq, now)
                    if queue.journal is not None:  # no Sent of its own here to say so
                        queue.journal.remembered(
                            queue.name, [(prefix + str(seq), now + self.wall_offset)])
                self.dead_letter(queue, promote(msg), "overflow", None, now)
                if rid:
                    self._sink.reply_ok(conn, rid)
                return
        queue.bytes += size
        account.bytes += size
        self._accept(queue, msg, now, prefix=prefix, seq=seq)
        if rid:
            self._sink.reply_ok(conn, rid)

    def _park(self, conn: int, rid: int, queue: Queue, msg: Item, prefix: str | None,
              seq: int) -> None:
        mid = None if prefix is None else prefix + str(seq)  # what the parked tuple keeps
        self._sink.set_parked(conn, +1, _size(msg), queue.name)  # may raise QuotaExceeded
        if type(msg) is QMsg:
            msg.state = MsgState.PARKED
        queue.parked.append((conn, rid, msg, mid))

    def _drop_oldest(self, queue: Queue, now: float) -> bool:
        while queue.ready or queue.tail:
            oldest = queue.take_ready()
            if type(oldest) is bytes or oldest.state is MsgState.READY:  # type: ignore[union-attr]
                queue.ready_len -= 1
                self.dead_letter(queue, promote(oldest), "overflow", None, now)
                return True
            queue.tombstones -= 1
        return False

    def _accept(self, queue: Queue, msg: Item, now: float, *, pump: bool = True,
                prefix: str | None = None, seq: int = 0) -> None:
        """``msg`` enters ``queue``: READY at the back, or, a scheduled message, DELAYED
        until its due time (then it joins the back: it counts as sent then, and so does
        the queue's TTL). ``prefix``, ``seq``: a resendable SEND's id, which enters the window. The
        caller has charged its bytes (``_charge_bytes``; send has the size at hand)."""
        queue.sent += 1
        if prefix is not None:
            window = queue.dedup
            if window is None:
                window = queue.dedup = DedupWindow(self.dedup_window, self.dedup_size)
            window.add_seq(prefix, seq, now)
        due = None
        if type(msg) is QMsg and msg.due is not None:
            if msg.due > now:
                due = msg.due
            else:
                msg.due = None  # it waited parked past its due time
        ttl = queue.settings.ttl
        if ttl is not None:
            msg = promote(msg)
            if msg.expires is None:
                msg.expires = (now if due is None else due) + ttl
        journal = queue.journal
        if journal is not None:
            qseq = queue.next_seq  # (``seq`` is the SEND's, for its id)
            queue.next_seq = qseq + 1
            wall = self.wall_offset
            if type(msg) is bytes and len(msg) <= SMALL:
                # Stateless (no TTL, not scheduled): bytes in a Run, its seq beside it.
                if prefix is None:
                    journal.sent(queue.name, qseq, msg)
                else:
                    journal.sent(queue.name, qseq, msg, 0, None, None, now + wall)
                queue.append_durable(msg, qseq)
                queue.ready_len += 1
                if pump and (queue.available or queue.parked):
                    self.pump(queue, now)
                return
            msg = promote(msg)
            msg.seq = qseq
            journal.sent(queue.name, qseq, msg.packed, msg.failures,
                         None if msg.expires is None else msg.expires + wall,
                         None if due is None else due + wall,
                         None if prefix is None else now + wall)
        if due is not None:
            self._delay(queue, msg, due)  # type: ignore[arg-type]  # a QMsg
            return  # its TTL timer is armed when it is due (its TTL counts from then)
        if type(msg) is QMsg:
            if msg.expires is not None:
                self._arm_ttl(queue, msg)
            msg.state = MsgState.READY
        queue.append_ready(msg)
        queue.ready_len += 1
        if pump and (queue.available or queue.parked):  # else pump has nothing to do
            self.pump(queue, now)

    def _admit_parked(self, queue: Queue, now: float) -> bool:
        """Accept parked sends while there is room (without pumping); True if any was."""
        admitted = False
        while queue.parked and not queue.is_full():
            conn, rid, msg, mid = queue.parked.popleft()
            self._sink.set_parked(conn, -1, -_size(msg))
            parts = None if mid is None else split_id(mid)
            if parts is not None and queue.dedup is not None and queue.dedup.seen_seq(
                    parts[0], parts[1], now):
                # The same id was accepted while this one waited (a resend that came
                # another way): a duplicate after all.
                if type(msg) is QMsg:
                    self._forget(msg)
                queue.duplicates += 1
            else:
                self._charge_bytes(queue, msg)
                self._accept(queue, msg, now, pump=False,
                             prefix=None if parts is None else parts[0],
                             seq=0 if parts is None else parts[1])
            admitted = True
            if rid:
                if queue.journal is not None:
                    self.journaled_confirms.add(conn)
                self._sink.reply_ok(conn, rid)
        return admitted

    def drop_parked(self, conn: int, queues: set[str]) -> int:
        """Forget the parked sends of a producer that disconnected before they were
        accepted: it never got their confirmation, so a retry must not duplicate them."""
        dropped = 0
        for name in queues:
            queue = self.queues.get(name)
            if queue is None or not queue.parked:
                continue
            kept: deque[tuple[int, int, Item, str | None]] = deque()
            for item in queue.parked:
                if item[0] == conn:
                    if type(item[2]) is QMsg:
                        self._gone(queue, item[2], DROPPED)
                    dropped += 1
                else:
                    kept.append(item)
            queue.parked = kept
        return dropped

    # -- delivering -----------------------------------------------------------------

    def pump(self, queue: Queue, now: float) -> None:
        """Deliver ready messages to consumers with free prefetch slots, round-robin, and
        admit parked sends while there is room. Loops rather than recursing, so any number
        of parked sends is admitted at constant stack depth."""
        ready, available = queue.ready, queue.available
        while True:
            while queue.ready_len and available:
                consumer = available.popleft()
                if not consumer.in_available:  # a stale entry (see Queue.available)
                    consumer.queued = False
                    queue.stale_available -= 1
                    continue
                if not ready:
                    queue.seal()
                entry = ready.popleft()
                msg: Item
                if type(entry) is Run:  # Run.take, inline: this loop is the hot path
                    i, ends = entry.next, entry.ends
                    entry.next = i + 1
                    if i + 1 < len(ends):
                        ready.appendleft(entry)
                    msg = entry.data[ends[i - 1] if i else 0 : ends[i]]
                    seqs = entry.seqs
                    if seqs is not None:  # a durable queue's: the lease holds its seq
                        queue.ready_len -= 1
                        self._deliver(queue, consumer, msg, now, seqs[i])
                        if len(consumer.leases) < consumer.prefetch:
                            available.append(consumer)
                        else:
                            consumer.in_available = consumer.queued = False
                        continue
                else:
                    msg = entry  # type: ignore[assignment]  # not a Run: an Item
                if type(msg) is QMsg:
                    if msg.state is not MsgState.READY:
                        queue.tombstones -= 1  # of an expired message
                        available.appendleft(consumer)
                        continue
                    if msg.expires is not None and msg.expires <= now:
                        queue.ready_len -= 1
                        self._expire(queue, msg, now)
                        available.appendleft(consumer)
                        continue
                queue.ready_len -= 1
                self._deliver(queue, consumer, msg, now)
                if len(consumer.leases) < consumer.prefetch:
                    available.append(consumer)
                else:
                    consumer.in_available = consumer.queued = False
            if not (queue.parked and self._admit_parked(queue, now)):
                return

    def _deliver(self, queue: Queue, consumer: Consumer, msg: Item, now: float,
                 seq: int = -1) -> None:
        """Lease ``msg`` to ``consumer`` and write its DELIVER. ``seq``: the number of a
        durable queue's stateless message (bytes), which the lease holds."""
        tag = self._next_tag
        self._next_tag = tag + 1
        deadline = now + queue.settings.ack_timeout
        lease = Lease(tag, msg, consumer, deadline, seq)
        if type(msg) is bytes:
            packed, tail = msg, FIRST_ATTEMPT_TAIL
            if seq >= 0:
                queue.journal.delivered(queue.name, seq)
        else:
            msg.state = MsgState.LEASED  # type: ignore[union-attr]
            if queue.journal is not None:
                queue.journal.delivered(queue.name, msg.seq)  # type: ignore[union-attr]
            packed = msg.packed  # type: ignore[union-attr]
            reply = msg.reply  # type: ignore[union-attr]
            failures = msg.failures  # type: ignore[union-attr]
            if failures:
                queue.redelivered += 1
            if not failures and reply is None:
                tail = FIRST_ATTEMPT_TAIL
            else:
                tail = packb(failures + 1) + packb(
                    f"{reply[0]}.{reply[1]}" if reply is not None else None)
        queue.leases[tag] = lease
        consumer.leases[tag] = lease
        self.leases[tag] = lease
        queue.delivered += 1
        queue.unacked += 1
        if queue.lease_timer is None:
            queue.lease_timer = deadline
            self._timers.call_at(deadline, self._on_lease_timer, queue)
        self._send_raw(consumer.conn, _join((consumer.prefix, packb(tag), packed, tail)))

    # -- consumers ------------------------------------------------------------------

    def pause(self) -> None:
        """Deliver nothing more: a broker shutting down lets the leases it granted end
        (acks, nacks, rejects and extends still work) before it closes connections.
        A consumer marked inactive is never made available again (``_make_available``)."""
        self.paused = True
        for queue in self.queues.values():
            for consumer in queue.consumers:
                consumer.active = False
                if consumer.in_available:
                    queue.make_unavailable(consumer)

    def held(self) -> int:
        """Leases held and not expired: the work a draining broker waits for."""
        return sum(1 for lease in self.leases.values() if not lease.expired)

    def add_consumer(self, consumer: Consumer, now: float) -> None:
        queue = consumer.queue
        queue.consumers[consumer] = None
        if self.paused:
            consumer.active = False  # registered, but given nothing (see pause)
            return
        if consumer.held:
            return
        queue.make_available(consumer)
        self.pump(queue, now)

    def set_consumers_held(self, consumers: list[Consumer], held: bool, now: float) -> None:
        """Hold (no new deliveries) or release consumers whose connection has too much
        unread output. Holding only marks them, since it may come from inside a pump: a
        held consumer is skipped when its turn comes, as a stale entry is."""
        for consumer in consumers:
            consumer.held = held
            if held:
                if consumer.in_available:
                    consumer.queue.make_unavailable(consumer)
            elif consumer.active:
                self._free_slot(consumer, now)

    def remove_consumers(self, consumers: list[Consumer], now: float, *, failed: bool) -> None:
        """Stop consumers: one on CANCEL, all of a connection's when it is lost. Their
        active leases are released (``failed=False``: no attempt counted) or failed (an
        attempt counted for each lease: one per lease, not one per consumer).

        All of them stop before any lease is settled: a message freed here must not be
        delivered to another consumer that is about to go too (the same dead
        connection's next consumer would fail it again).
        """
        for consumer in consumers:
            queue = consumer.queue
            consumer.active = False
            del queue.consumers[consumer]
            if consumer.in_available:
                queue.make_unavailable(consumer)
        for consumer in consumers:
            self._settle_leases(consumer, now, failed=failed)

    def _settle_leases(self, consumer: Consumer, now: float, *, failed: bool) -> None:
        queue = consumer.queue
        # In delivery order (dead letters and delays keep it); what goes back to the front
        # of the queue goes newest first, so it too ends up in delivery order.
        front: list[Item] = []
        for tag, lease in consumer.leases.items():
            del self.leases[tag]
            if lease.timer is not None:
                self._timers.cancel(lease.timer)
            if lease.expired:
                continue
            self._unlease(queue, lease)
            queue.unacked -= 1
            if failed:
                msg = self._record_consumer(lease)
                self._fail(queue, msg, None, "connection-lost", now, front=front)
            else:
                if queue.journal is not None:  # no longer out for delivery; no attempt
                    released = self._leased_msg(lease)
                    queue.journal.failed(queue.name, released.seq, released.failures, None,
                                         reason=released.last_reason,
                                         consumer=released.last_consumer)
                front.append(lease.msg)
        consumer.leases.clear()
        consumer.zombies = 0
        self._requeue_all(queue, front, now)

    def _unlease(self, queue: Queue, lease: Lease) -> None:
        if not lease.extended:
            del queue.leases[lease.tag]

    def _free_slot(self, consumer: Consumer, now: float) -> None:
        self._make_available(consumer)
        self.pump(consumer.queue, now)

    @staticmethod
    def _make_available(consumer: Consumer) -> None:
        """A prefetch slot of ``consumer`` was freed: it may take a message again."""
        if (consumer.active and not consumer.in_available and not consumer.zombies
                and not consumer.held):
            consumer.queue.make_available(consumer)

    # -- answers to a lease ---------------------------------------------------------

    def _take(self, conn: int, tag: int, verb: str, now: float) -> Lease:
        """The live lease ``tag`` of ``conn``, removed from the books. A zombie frees its
        prefetch slot and raises LeaseError."""
        lease = self.leases.get(tag)
        if lease is None or lease.consumer.conn != conn:
            raise LeaseError(
                f"cannot {verb} delivery {tag}: this connection holds no such lease (already"
                " answered, or released when its consumer stopped)",
                code="lease-unknown",
            )
        consumer = lease.consumer
        del self.leases[tag]
        del consumer.leases[tag]
        if lease.timer is not None:
            self._timers.cancel(lease.timer)
        if lease.expired:
            consumer.zombies -= 1
            self._free_slot(consumer, now)
            raise LeaseError(
                f"cannot {verb} delivery {tag}: its lease expired after ack_timeout="
                f"{consumer.queue.settings.ack_timeout}s and the message went back to the queue;"
                " answer sooner or call extend()",
                code="lease-expired",
            )
        self._unlease(consumer.queue, lease)
        consumer.queue.unacked -= 1
        return lease

    def ack(self, conn: int, tag: int, now: float) -> None:
        self.pump(self.ack_later(conn, tag, now), now)

    def ack_later(self, conn: int, tag: int, now: float) -> Queue:
        """Ack, freeing the slot but delivering nothing yet: the caller pumps the queue
        returned, once for a whole ACK_MANY (one pump for many acks, not one each)."""
        lease = self._take(conn, tag, "ack", now)
        consumer = lease.consumer
        queue = consumer.queue
        msg = lease.msg
        size = (len(msg) if type(msg) is bytes else len(msg.packed)) + MESSAGE_OVERHEAD  # type: ignore[union-attr]  # _held, inline
        queue.bytes -= size
        queue.account.bytes -= size
        if type(msg) is QMsg:  # _gone, inline: every durable message ends here
            journal = queue.journal
            if journal is not None and msg.seq >= 0:
                journal.removed(queue.name, msg.seq, ACKED)
            self._forget(msg)
        elif lease.seq >= 0 and queue.journal is not None:  # a durable one held as bytes
            queue.journal.removed(queue.name, lease.seq, ACKED)
        queue.acked += 1
        self._make_available(consumer)
        return queue

    def nack(self, conn: int, tag: int, delay: float | None, reason: str | None,
             now: float) -> None:
        if delay is not None and not 0 <= delay < MAX_SECONDS:
            raise BadOption("nack delay must be a number of seconds from 0 up to 1e9, or None")
        lease = self._take(conn, tag, "nack", now)
        msg = self._record_consumer(lease)
        self._fail(lease.consumer.queue, msg, delay, reason, now)
        self._free_slot(lease.consumer, now)

    def reject(self, conn: int, tag: int, reason: str | None, now: float) -> None:
        lease = self._take(conn, tag, "reject", now)
        msg = self._record_consumer(lease)
        msg.failures += 1
        self.dead_letter(lease.consumer.queue, msg, "rejected", reason, now)
        self._free_slot(lease.consumer, now)

    def extend(self, conn: int, tag: int, seconds: float, now: float) -> None:
        if not 0 < seconds < MAX_SECONDS:
            raise BadOption("extend needs a positive number of seconds below 1e9")
        lease = self.leases.get(tag)
        if lease is None or lease.consumer.conn != conn or lease.expired:
            # Reuse _take's messages and zombie handling for the failure case.
            self._take(conn, tag, "extend", now)
        assert lease is not None
        self._unlease(lease.consumer.queue, lease)
        lease.extended = True
        lease.deadline = now + seconds
        if lease.timer is not None:  # extended before: one timer per lease, not per EXTEND
            self._timers.cancel(lease.timer)
        lease.timer = self._timers.call_at(lease.deadline, self._on_extended_timer, lease)

    def reply(self, conn: int, tag: int, now: float) -> tuple[int, int]:
        """Ack a request's lease and return its reply route (requester conn, token)."""
        lease = self.leases.get(tag)
        if (lease is not None and lease.consumer.conn == conn and not lease.expired
                and (type(lease.msg) is bytes or lease.msg.reply is None)):  # type: ignore[union-attr]
            raise NotARequest(
                f"delivery {tag} was sent with send(), not request(): there is nobody to reply"
                " to; ack it instead"
            )
        lease = self._take(conn, tag, "reply to", now)
        msg = lease.msg
        assert type(msg) is QMsg and msg.reply is not None
        self._release(lease.consumer.queue, msg)
        self._gone(lease.consumer.queue, msg, ACKED)
        lease.consumer.queue.acked += 1
        self._free_slot(lease.consumer, now)
        return msg.reply

    @staticmethod
    def _leased_msg(lease: Lease) -> QMsg:
        """The leased message as a QMsg, made one (with the seq its lease held, if it is
        a durable queue's) if it was bytes: it is about to get state."""
        msg = lease.msg
        if type(msg) is QMsg:
            return msg
        promoted = lease.msg = QMsg(msg)  # type: ignore[arg-type]  # bytes
        promoted.seq = lease.seq
        promoted.state = MsgState.LEASED
        return promoted

    @staticmethod
    def _record_consumer(lease: Lease) -> QMsg:
        """Note who held the message last (for dead-letter headers); returns it as QMsg."""
        msg = QueueRouter._leased_msg(lease)
        msg.last_consumer = (lease.consumer.pid, lease.consumer.uid)
        return msg

    # -- failure, retry, dead letters -----------------------------------------------

    def _fail(self, queue: Queue, msg: QMsg, delay: float | None, reason: str | None,
              now: float, *, front: list[Item] | None = None) -> None:
        """Count a failed attempt; dead-letter after max_deliveries, else retry. With
        ``front``, a message to retry at once is collected there instead of requeued."""
        msg.failures += 1
        msg.last_reason = reason
        limit = queue.settings.max_deliveries
        if limit is not None and msg.failures >= limit:
            self.dead_letter(queue, msg, "max-deliveries", reason, now)
            return
        if delay is None:
            delays = queue.settings.retry_delays
            delay = delays[min(msg.failures, len(delays)) - 1] if delays else 0.0
        if queue.journal is not None:
            queue.journal.failed(queue.name, msg.seq, msg.failures,
                                 now + delay + self.wall_offset if delay > 0 else None,
                                 reason=reason, consumer=msg.last_consumer)
        if delay > 0:
            expires = msg.expires
            if expires is not None:  # a TTL that passes during the delay acts at once
                if expires <= now:
                    self._expire(queue, msg, now)
                    return
                self._arm_ttl(queue, msg)
            self._delay(queue, msg, now + delay)
        elif front is not None:
            front.append(msg)
        else:
            self._requeue(queue, msg, now)

    def _requeue_all(self, queue: Queue, msgs: list[Item], now: float) -> None:
        """Put messages back at the front in the order given, then deliver."""
        for msg in reversed(msgs):
            self._requeue(queue, msg, now, pump=False)
        self.pump(queue, now)

    def _requeue(self, queue: Queue, msg: Item, now: float, *, pump: bool = True) -> None:
        """Back to the front of the queue: it is older than what waits behind it."""
        if type(msg) is QMsg:
            expires = msg.expires
            if expires is not None:
                if expires <= now:
                    self._expire(queue, msg, now)
                    return
                self._arm_ttl(queue, msg)  # it may have run while leased or delayed
            msg.state = MsgState.READY
        queue.ready.appendleft(msg)
        queue.ready_len += 1
        if pump:
            self.pump(queue, now)

    def _expire(self, queue: Queue, msg: QMsg, now: float) -> None:
        queue.expired += 1
        if msg.reply is not None:
            # A request expires when its caller's timeout passed: the caller has given up
            # and nobody could use an answer, so it is discarded (counted), not kept.
            self._release(queue, msg)
            self._gone(queue, msg, EXPIRED)
            queue.discarded += 1
        else:
            self.dead_letter(queue, msg, "expired", None, now)

    def dead_letter(self, queue: Queue, msg: QMsg, reason: str, text: str | None,
                    now: float) -> None:
        """Move ``msg`` to its queue's dead-letter queue with headers saying why.

        A queue without a dead-letter queue discards the message (counted in stats).
        The dead-letter queue accepts it even above its own max_length: a dead letter is
        never dropped for lack of room.
        """
        self._release(queue, msg)
        self._gone(queue, msg, _REMOVAL.get(reason, DEAD_LETTERED))
        target = queue.settings.dead_letter
        if target is None:
            queue.discarded += 1
            return
        queue.dead_lettered += 1
        reasons = queue.dead_reasons
        if reasons is None:
            reasons = queue.dead_reasons = {}
        reasons[reason] = reasons.get(reason, 0) + 1
        mid, _, body, kind, old_headers, timestamp = msg.fields()
        headers = dict(old_headers) if old_headers else {}
        headers["x-original-queue"] = queue.name
        headers["x-dead-reason"] = reason
        headers["x-attempts"] = str(msg.failures)
        headers["x-dead-time"] = f"{now + self.wall_offset:.6f}"
        text = text if text is not None else msg.last_reason
        if text is not None:
            headers["x-reason-text"] = text
        if msg.last_consumer is not None:
            headers["x-consumer-pid"] = str(msg.last_consumer[0])
            headers["x-consumer-uid"] = str(msg.last_consumer[1])
        dlq = self.queues.get(target)
        if dlq is None:  # made for this queue: its payer pays for its dead letters too
            dlq = self.get(target)
            dlq.account = queue.account
        dead = pack_message(mid, target, body, kind, headers, timestamp)
        self._charge_bytes(dlq, dead)
        self._accept(dlq, dead, now)

    # -- timers ---------------------------------------------------------------------

    def _on_lease_timer(self, queue: Queue, now: float) -> None:
        queue.lease_timer = None
        leases = queue.leases
        due: list[Lease] = []
        for lease in leases.values():
            if lease.deadline > now:
                queue.lease_timer = lease.deadline
                self._timers.call_at(lease.deadline, self._on_lease_timer, queue)
                break
            due.append(lease)
        front: list[Item] = []
        for lease in due:
            del leases[lease.tag]
            self._expire_lease(queue, lease, now, front=front)
        if due:
            self._requeue_all(queue, front, now)

    def _on_extended_timer(self, lease: Lease, now: float) -> None:
        lease.timer = None
        if lease.expired or lease.deadline > now or self.leases.get(lease.tag) is not lease:
            return  # answered, extended again, or its consumer is gone
        self._expire_lease(lease.consumer.queue, lease, now)

    def _expire_lease(self, queue: Queue, lease: Lease, now: float, *,
                      front: list[Item] | None = None) -> None:
        lease.expired = True  # stays in the consumer's window until answered
        queue.unacked -= 1
        consumer = lease.consumer
        consumer.zombies += 1
        if consumer.in_available:  # stalled: no new work until it answers the zombie
            queue.make_unavailable(consumer)
        msg = self._record_consumer(lease)
        self._fail(queue, msg, None, "ack-timeout", now, front=front)

    def _delay(self, queue: Queue, msg: QMsg, due: float) -> None:
        """DELAYED until ``due``: a retry delay, or a scheduled message (``msg.due``)."""
        msg.state = MsgState.DELAYED
        queue.delayed_msgs[msg] = None
        msg.delay_timer = self._timers.call_at(due, self._on_delay_done, (queue, msg))

    def _on_delay_done(self, item: tuple[Queue, QMsg], now: float) -> None:
        queue, msg = item
        msg.delay_timer = None
        del queue.delayed_msgs[msg]
        if msg.due is None:
            self._requeue(queue, msg, now)  # a retry: older than what waits, to the front
            return
        # A scheduled message joins the back, as if sent now; its TTL starts now.
        msg.due = None
        if msg.expires is not None:
            if msg.expires <= now:  # only if the broker was down past it
                self._expire(queue, msg, now)
                return
            self._arm_ttl(queue, msg)
        msg.state = MsgState.READY
        queue.append_ready(msg)
        queue.ready_len += 1
        self.pump(queue, now)

    def _arm_ttl(self, queue: Queue, msg: QMsg) -> None:
        """Expire ``msg`` (READY in ``queue``) when its TTL passes; one timer at a time."""
        if msg.ttl_timer is None:
            msg.ttl_timer = self._timers.call_at(msg.expires, self._on_ttl,  # type: ignore[arg-type]
                                                 (queue, msg))

    @staticmethod
    def _charge_bytes(queue: Queue, msg: Item) -> None:
        """``msg`` enters ``queue``: its bytes are charged (send does this inline)."""
        size = _held(msg)
        queue.bytes += size
        queue.account.bytes += size

    @staticmethod
    def _release(queue: Queue, msg: Item) -> None:
        """``msg`` leaves ``queue``: its bytes are no longer charged."""
        size = _held(msg)
        queue.bytes -= size
        queue.account.bytes -= size

    def _gone(self, queue: Queue, msg: QMsg, reason: int) -> None:
        """``msg`` left ``queue`` for good (``reason``: ACKED, ...): journaled if the
        queue is durable, and its timers must not keep it in memory."""
        if queue.journal is not None and msg.seq >= 0:
            queue.journal.removed(queue.name, msg.seq, reason)
        self._forget(msg)

    def _forget(self, msg: QMsg) -> None:
        """``msg`` is GONE; its timers are cancelled (journaling is the caller's)."""
        msg.state = MsgState.GONE
        if msg.ttl_timer is not None:
            self._timers.cancel(msg.ttl_timer)
            msg.ttl_timer = None
        if msg.delay_timer is not None:
            self._timers.cancel(msg.delay_timer)
            msg.delay_timer = None

    def _on_ttl(self, item: tuple[Queue, QMsg], now: float) -> None:
        queue, msg = item
        msg.ttl_timer = None
        if msg.state is MsgState.DELAYED:
            del queue.delayed_msgs[msg]
            self._expire(queue, msg, now)
        elif msg.state is MsgState.READY:
            queue.ready_len -= 1
            self._expire(queue, msg, now)  # GONE, where it stands in the ready deque
            msg.packed = b""  # the dead letter has its copy; the tombstone keeps no body
            queue.tombstones += 1
            if queue.tombstones > 64 and queue.tombstones > queue.ready_len:
                queue.drop_tombstones()
        else:
            return  # leased: expiry is checked when it comes back
        self.pump(queue, now)  # room for parked sends
