"""The queue router's state: its table of queues, per-uid quotas and byte accounts, its
sinks, and the bookkeeping every transition of a message shares. No I/O.

:class:`QueueTable` is the base of :class:`~aiobus.broker.queues.QueueRouter`, whose
theory of operation (at the top of queues.py) explains the transitions and says which
module holds which. The router is one class cut into layers by responsibility, each a
subclass of the one below (mixins side by side would be multiple inheritance, which mypyc
does not compile): this table, then failures and timers (queue_failures.py), delivering
and lease answers (queue_delivery.py), producing (queue_producing.py), and
administration (queues.py). A layer calls the layers below it directly, so the
per-message paths (``send``, ``_accept``, ``pump``, ``_deliver``, ``ack_later``,
``_take``) compile to the same direct calls as the single class did. The three calls
that go up a layer are declared at the end of this class, so each layer type-checks on
its own: ``pump`` from a retry or an expiry, ``_accept`` from ``dead_letter``, and
``_admit_parked`` from ``pump`` while sends are parked; compiled, those go through the
vtable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from ..errors import BusError, NoSuchQueue, QuotaExceeded, shown
from ..stats import JournalStats
from .queue_state import MESSAGE_OVERHEAD, Account, Item, Lease, MsgState, QMsg, Queue
from .settings import (
    DEFAULT_DEDUP_SIZE,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_QUEUED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUES_PER_UID,
    QueueSettings,
    check_dedup,
)
from .timers import Timers

__all__ = ["ACKED", "DEAD_LETTERED", "DROPPED", "EXPIRED", "REJECTED", "JournalSink",
           "QueueSink", "QueueTable"]


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


class QueueTable:
    """The router's state and its table of queues (the layers above add the
    transitions: see the module docstring)."""

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

    # -- bookkeeping shared by every transition -------------------------------------

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

    # -- implemented by the layers above (see the module docstring) -----------------

    def pump(self, queue: Queue, now: float) -> None:
        """queue_delivery.py's."""
        raise NotImplementedError

    def _accept(self, queue: Queue, msg: Item, now: float, *, pump: bool = True,
                prefix: str | None = None, seq: int = 0) -> None:
        """queue_producing.py's."""
        raise NotImplementedError

    def _admit_parked(self, queue: Queue, now: float) -> bool:
        """queue_producing.py's."""
        raise NotImplementedError
