"""Producing: a SEND entering its queue, or waiting for room in it (parking), or pushing
out the oldest message of a full queue (overflow), and the queue's deduplication window
of resendable SENDs. No I/O.

A layer of :class:`~aiobus.broker.queues.QueueRouter` (queue_table.py says how the
layers stack; queues.py's theory of operation says how a message moves). ``send`` and
``_accept`` run for every message: ``send`` hands a message straight to a consumer with
room when nothing waits (what ``_accept`` and ``pump`` would do, in one step), else
``_accept`` queues it and pumps.
"""

from __future__ import annotations

from collections import deque

from ..errors import JournalError, QueueFull, QuotaExceeded, shown
from .dedup import DedupWindow, split_id
from .queue_delivery import QueueDelivery
from .queue_state import MESSAGE_OVERHEAD, SMALL, Item, MsgState, QMsg, Queue, promote
from .queue_table import DROPPED, _size

__all__ = ["QueueProducing"]


class QueueProducing(QueueDelivery):
    """SENDs, parked sends, overflow and deduplication (see the module docstring)."""

    # -- producing ------------------------------------------------------------------

    def _window(self, queue: Queue) -> DedupWindow:
        """``queue``'s deduplication window, made on first use."""
        window = queue.dedup
        if window is None:
            window = queue.dedup = DedupWindow(self.dedup_window, self.dedup_size)
        return window

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
