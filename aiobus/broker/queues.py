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

Where the code is. :class:`QueueRouter` is one class built in layers, each a subclass of
the one below and a module of its own (queue_table.py says why): queue_table.py holds
the state, the table of queues and the bookkeeping every transition shares (``_gone``,
``_forget``, the byte accounts); queue_failures.py failed attempts, retries, dead
letters and the timers (``_fail``, ``dead_letter``, ``_expire_lease``, TTLs and
delays); queue_delivery.py the pump, deliveries, consumers and lease answers (``pump``,
``_deliver``, ``_take``, ``ack_later``, ``_settle_leases``); queue_producing.py sends,
parking and overflow (``send``, ``_accept``, ``_admit_parked``); and this module the
administration (``declare``, ``purge``, ``delete``, ``requeue_dead_letters``,
``restore``, ``sweep``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import msgpack

from ..errors import InvalidName, NoSuchQueue, QueueMismatch, QueueNotEmpty, shown
from ..names import check_name, is_reserved
from .browse import DEAD_LETTER_HEADERS
from .dedup import DedupWindow
from .queue_producing import QueueProducing
from .queue_state import MESSAGE_OVERHEAD, SMALL, Item, MsgState, QMsg, Queue, pack_message
from .queue_table import (
    ACKED,
    DEAD_LETTERED,
    DROPPED,
    EXPIRED,
    REJECTED,
    JournalSink,
    QueueSink,
    _held,
    _size,
)
from .settings import BadOption, QueueSettings

# The router and its limits, and, from queue_table.py, the sinks it is given and the
# removal reasons it journals (imported from here before the router was split).
__all__ = ["ACKED", "DEAD_LETTERED", "DROPPED", "EXPIRED", "MAX_PREFETCH", "PARK_LIMIT",
           "REJECTED", "JournalSink", "QueueRouter", "QueueSink"]

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



class QueueRouter(QueueProducing):
    """All queues of a broker and every transition of their messages (its constructor
    and state: queue_table.py's ``QueueTable``; the module docstring says where the rest
    is)."""

    # -- administration -------------------------------------------------------------

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
