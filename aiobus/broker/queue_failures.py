"""What happens to a message that fails, expires or waits: attempts, retries, dead
letters, and the timers of leases, delays and TTLs. No I/O.

A layer of :class:`~aiobus.broker.queues.QueueRouter` (queue_table.py says how the
layers stack; queues.py's theory of operation says how a message moves). A failure is a
nack, an ack timeout or a lost connection: it counts an attempt (``_fail``), and after
``max_deliveries`` attempts the message is dead-lettered (``dead_letter``), else it is
retried, at once (to the front) or after a delay (``_delay``).
"""

from __future__ import annotations

from .queue_state import Item, Lease, MsgState, QMsg, Queue, pack_message
from .queue_table import DEAD_LETTERED, DROPPED, EXPIRED, REJECTED, QueueTable

__all__ = ["QueueFailures"]

_REMOVAL = {"rejected": REJECTED, "max-deliveries": DEAD_LETTERED, "expired": EXPIRED,
            "overflow": DROPPED}


class QueueFailures(QueueTable):
    """Failed attempts, retries, dead letters and timers (see the module docstring)."""

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
        msg = QueueFailures._leased_msg(lease)
        msg.last_consumer = (lease.consumer.pid, lease.consumer.uid)
        return msg

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
