"""Delivering: the pump that hands ready messages to consumers, their leases, and the
answers to a lease (ack, nack, reject, extend, reply). No I/O.

A layer of :class:`~aiobus.broker.queues.QueueRouter` (queue_table.py says how the
layers stack; queues.py's theory of operation says how a message moves). ``pump`` and
``_deliver`` run for every message, ``ack_later`` and ``_take`` for every ack: they are
kept flat (Run.take inline, one DELIVER written with one join), and what they call is
defined here or in the layers below.
"""

from __future__ import annotations

from ..errors import LeaseError, NotARequest
from .queue_failures import QueueFailures
from .queue_state import (
    FIRST_ATTEMPT_TAIL,
    MESSAGE_OVERHEAD,
    Consumer,
    Item,
    Lease,
    MsgState,
    QMsg,
    Queue,
    Run,
    packb,
)
from .queue_table import ACKED
from .settings import MAX_SECONDS, BadOption

__all__ = ["QueueDelivery"]

_join = b"".join  # one copy of a DELIVER's parts, where + would make three


class QueueDelivery(QueueFailures):
    """Deliveries, consumers and lease answers (see the module docstring)."""

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
