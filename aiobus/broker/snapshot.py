"""What the durable queues hold, read out of the core for the journal to write whole. No I/O.

Theory of operation
-------------------
After a failed fdatasync the journal's file cannot be trusted: Linux may have marked
the pages it lost clean (PostgreSQL's "fsyncgate", 2018), so a later sync succeeds and
proves nothing, and reading the file back may return what the cache still has or what
the disk lost. The truth is in memory, in the core. :func:`durable_snapshot` lists it:
every durable queue with its settings, next sequence number and deduplication window,
and every message the journal must keep, with the state a compaction copy folds in
(failures, expiry, due time, the last failure's reason and consumer) and whether a
delivery of it is outstanding. The journal writes that as a fresh *base* segment
(``Journal.rebuild``), which supersedes every older one.

A message is listed where the core holds it: READY in its queue's ready deque (a
:class:`Run` of stateless ones from ``next`` on, or a :class:`QMsg`; tombstones of
expired ones are skipped) or its tail; DELAYED in ``delayed_msgs`` (its due time is its
timer's deadline); LEASED under a live lease (a zombie's message is back in the queue,
and found there). PARKED sends were never accepted: they have no Sent record and are
not listed. Times are turned from the core's monotonic clock into epoch seconds with the
router's ``wall_offset``, as the journal records them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from .queue_state import Lease, MsgState, QMsg, Queue, Run

if TYPE_CHECKING:
    from .queues import QueueRouter

__all__ = ["QueueSnapshot", "SnapshotMessage", "durable_snapshot"]


class SnapshotMessage(NamedTuple):
    """One live message of a durable queue, as a compaction copy would write it."""

    seq: int
    message: bytes  # its packed wire form
    failures: int
    expires: float | None  # epoch seconds
    due: float | None  # epoch seconds: DELAYED until then
    last_reason: str | None
    last_consumer: tuple[int, int] | None
    delivered: bool  # out for delivery: a restart counts one more failed attempt


class QueueSnapshot(NamedTuple):
    name: str
    settings: dict[str, Any]
    next_seq: int
    # The deduplication window as runs of ids: (prefix, first seq, last seq, accepted-at
    # in epoch seconds), oldest first (QueueRouter.dedup_runs)
    dedup: list[tuple[str, int, int, float]]
    messages: list[SnapshotMessage]  # in sequence order


def durable_snapshot(router: QueueRouter) -> list[QueueSnapshot]:
    """Every durable queue of ``router`` and the messages it holds (module docstring)."""
    leased: dict[str, list[Lease]] = {}
    for lease in router.leases.values():
        if not lease.expired:  # (a zombie's message went back to its queue)
            leased.setdefault(lease.consumer.queue.name, []).append(lease)
    wall = router.wall_offset
    snapshot = []
    for name, queue in router.queues.items():
        if queue.journal is None:
            continue
        messages = _waiting(queue, wall)
        for lease in leased.get(name, ()):
            msg = lease.msg
            if type(msg) is QMsg:
                messages.append(_stateful(msg, wall, None, True))
            else:  # a stateless one (bytes), its seq in the lease
                assert lease.seq >= 0, f"a message of durable queue {name} without a seq"
                messages.append(SnapshotMessage(lease.seq, msg, 0,  # type: ignore[arg-type]
                                                None, None, None, None, True))
        messages.sort(key=lambda m: m.seq)
        snapshot.append(QueueSnapshot(name, queue.settings.as_dict(), queue.next_seq,
                                      router.dedup_runs(name), messages))
    return snapshot


def _waiting(queue: Queue, wall: float) -> list[SnapshotMessage]:
    """The READY and DELAYED messages of durable ``queue``."""
    messages = []
    for entry in queue.ready:
        if type(entry) is Run:
            seqs, ends, data = entry.seqs, entry.ends, entry.data
            assert seqs is not None, f"a Run of durable queue {queue.name} without seqs"
            for i in range(entry.next, len(ends)):
                messages.append(SnapshotMessage(seqs[i], data[ends[i - 1] if i else 0:ends[i]],
                                                0, None, None, None, None, False))
        elif type(entry) is QMsg:
            if entry.state is not MsgState.GONE:  # (GONE: a tombstone, expired)
                messages.append(_stateful(entry, wall, None, False))
        else:
            raise AssertionError(f"a message of durable queue {queue.name} without a seq")
    for message, seq in zip(queue.tail, queue.tail_seqs, strict=True):
        messages.append(SnapshotMessage(seq, message, 0, None, None, None, None, False))
    for msg in queue.delayed_msgs:
        timer = msg.delay_timer
        assert timer is not None, "a DELAYED message without its timer"
        messages.append(_stateful(msg, wall, timer[0] + wall, False))
    return messages


def _stateful(msg: QMsg, wall: float, due: float | None, delivered: bool) -> SnapshotMessage:
    assert msg.seq >= 0, "a message of a durable queue without a seq"
    return SnapshotMessage(msg.seq, msg.packed, msg.failures,
                           None if msg.expires is None else msg.expires + wall, due,
                           msg.last_reason, msg.last_consumer, delivered)
