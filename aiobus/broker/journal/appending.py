"""The journal store's state and its appending side: records into the write buffer, the
runs being merged, and the owner index. No I/O (the core calls these per message).

Theory of operation
-------------------
Appending is sans-IO: :meth:`~JournalAppending.sent` and its siblings encode one record
into an in-memory buffer and update counters; they never touch a file or a clock. Once
per loop turn the shell calls :meth:`~.store.Journal.write` (one append of the whole
buffer) and then, as its ``--fsync`` policy says, syncs (one fdatasync); only after the
sync may it confirm that turn's sends (Redis's ``appendfsync always`` in beforeSleep).

Runs (format versions 4 and 5): while the core journals one queue, its stateless Sent
records with consecutive seqs (and one accepted time) are collected as their messages,
its Delivered records as their seqs and its Removed records of one reason as their seqs,
three runs side by side (``_sent_run``, ``_delivered_run``, ``_removed_run``); anything
else appended, and ``write`` (segments.py), first appends them as one SentRun, one
DeliveredRun and one RemovedRun, in that order (:meth:`_end_runs`), and only then updates
the owner index for them. A send, its delivery and its ack then cost a list append each
instead of a framed, checksummed record and two dict updates, and the journal about 4
bytes a message and a byte or so a delivery and an ack instead of 26, 21 and 22
(docs/journal.md "Runs"). Writing the Sent run first, then the deliveries, then the
removals keeps every message's own records in the order they were made (a message is
sent, delivered and removed at most once each while the runs are open: a second
delivery follows a Failed, which ends them); records of different messages commute.

The owner index. Each live message is *owned* by the segment holding its Sent record;
``_owner`` maps qid -> seq -> ``segment << 32 | record bytes`` (one int per message), and
``_flying`` qid -> the seqs of those with a delivery outstanding, which is what a copy
must repeat and what a purge keeps (a set per queue, updated a run at a time: a set of
(qid, seq) tuples made two objects per delivery on the hot path). Segments that own
nothing are deleted (segments.py); compaction copies what old ones still own forward
(compaction.py).

Where the code is. :class:`~.store.Journal` is one class cut into layers by
responsibility, each a subclass of the one below and a module of its own (mixins side by
side would be multiple inheritance, which mypyc does not compile), as the queue router
is (broker/queue_table.py): this state and appending (:class:`JournalAppending`, whose
``__init__`` sets every attribute of every layer, so that compiled they are always set),
then writing, syncing and rotating segments (segments.py), compaction and the rebuild
after a failed sync (compaction.py), and opening a journal (store.py). A layer calls only
the layers below it and none overrides a method, so compiled, every call is the direct
call it was in the single class, and the per-message methods here are as they were.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

from ...stats import JournalStats
from . import records as r
from .files import Files

__all__ = ["JournalAppending"]


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    live: int = 0  # messages it owns
    live_bytes: int = 0


_Failure = tuple[int, float | None, str | None, tuple[int, int] | None]


@dataclass(slots=True)
class _State:
    qids: dict[str, int] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)
    settings: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_seq: dict[int, int] = field(default_factory=dict)
    owner: dict[int, dict[int, int]] = field(default_factory=dict)
    flying: dict[int, set[int]] = field(default_factory=dict)  # delivered, not answered
    # (qid, seq) -> what compaction must fold into a copy: failures, due, last reason and
    # consumer. Only for messages that failed (or were sent with failures, a DLQ's).
    failed: dict[tuple[int, int], _Failure] = field(default_factory=dict)
    next_qid: int = 1


# A run of more seqs (messages) is cut into several records (512 KiB of seqs at most).
_RUN_MAX = 65536
# Only messages up to this size join a SentRun (so a run is at most 64 MiB, within
# MAX_RECORD); a larger one is a Sent of its own, whose few header bytes do not matter.
_RUN_MESSAGE_MAX = 1024

# An owner entry: segment << 32 | the Sent's size (a record is at most 256 MiB).
_SIZE = (1 << 32) - 1


class JournalAppending:
    """The journal's state, and appending records to its buffer (see the module
    docstring); the layers above add the files."""

    def __init__(self, files: Files, segment_size: int) -> None:
        self.files = files
        self.segment_size = segment_size
        self._s = _State()
        self._segments: list[_Segment] = []
        self._by_number: dict[int, _Segment] = {}  # the same segments, by number
        self._handle: int | None = None
        self._buffer = bytearray()  # records appended and not yet written
        # The runs being merged (module docstring, "Runs"), all of queue ``_run_qid``
        # (-1: none open): stateless Sent records with consecutive seqs from
        # ``_sent_first`` (the next one would be ``_sent_next``) and one accepted time,
        # as their messages; Delivered records as their seqs; Removed records of reason
        # ``_removed_reason`` as their seqs. Any other record, and write(), first appends
        # them to the buffer, in that order (_end_runs).
        self._run_qid = -1
        # Its name, as the core passes it: the appending fast paths compare it by
        # identity (the core passes ``queue.name``, one str object) rather than look up
        # the qid each call; an equal name that is another object takes the slow path.
        self._run_name: str | None = None
        self._sent_run: list[bytes] = []
        self._sent_first = self._sent_next = -1
        self._sent_accepted: float | None = None
        self._delivered_run: list[int] = []
        self._removed_run: list[int] = []
        self._removed_reason = 0
        # Bytes written by write() since open, and how many of those are known to be on
        # disk (segments.py, "Syncing in three steps").
        self.written = 0
        self.synced = 0
        self._tickets = 0  # begun and not yet ended
        self._retired: list[int] = []  # handles of rotated segments a ticket may hold
        self._must_truncate = False
        # A fdatasync failed: what was written may be lost, and a later sync proves
        # nothing, until rebuild() has written the live state afresh (segments.py).
        self.damaged = False
        # Where a new segment's head gets each queue's deduplication window: the core's
        # once attached (attach_windows: as DedupRuns), until then what recovery found
        # (open: as DedupIds; None once attached).
        self._recovered_windows: dict[str, list[tuple[str, float]]] | None = {}
        self._windows: Callable[[str], list[tuple[str, int, int, float]]] = (
            lambda name: [])

    # --- appending: plain methods, no I/O ------------------------------------------

    def declare(self, name: str, settings: dict[str, Any]) -> None:
        """A durable queue was declared (or redeclared with new settings)."""
        self._end_runs()
        s = self._s
        qid = s.qids.get(name)
        if qid is None:
            qid = s.qids[name] = s.next_qid
            s.next_qid += 1
            s.names[qid], s.next_seq[qid], s.owner[qid] = name, 0, {}
            s.flying[qid] = set()
        s.settings[qid] = settings
        self._append(r.encode_declared(qid, name, settings, s.next_seq[qid]))

    def sent(self, queue: str, seq: int, message: bytes, failures: int = 0,
             expires: float | None = None, due: float | None = None,
             accepted: float | None = None) -> None:
        """A message entered ``queue`` (also: a dead letter entering its DLQ);
        ``accepted``: when its id entered the queue's deduplication window, if it did."""
        if (queue is self._run_name and seq == self._sent_next
                and accepted == self._sent_accepted and not failures and expires is None
                and due is None and len(message) <= _RUN_MESSAGE_MAX
                and len(self._sent_run) < _RUN_MAX):
            self._sent_run.append(message)  # the common case: one more in the run
            self._sent_next = seq + 1
            return
        self._sent(self._s.qids[queue], queue, seq, message, failures, expires, due, accepted)

    def _sent(self, qid: int, name: str, seq: int, message: bytes, failures: int,
              expires: float | None, due: float | None, accepted: float | None) -> None:
        """sent() when the message does not continue the Sent run: it starts one, or
        (with state, large, or already live: a copy) is a record of its own."""
        s = self._s
        owners = s.owner[qid]
        stateless = not (failures or expires is not None or due is not None)
        if (stateless and len(message) <= _RUN_MESSAGE_MAX and seq not in owners
                and seq >= s.next_seq[qid]):
            if qid != self._run_qid or self._sent_run:
                self._end_runs()
            self._run_qid, self._run_name = qid, name
            self._sent_run.append(message)
            self._sent_first, self._sent_next = seq, seq + 1
            self._sent_accepted = accepted
            return
        self._end_runs()
        if stateless:
            size = r.append_sent(self._buffer, qid, seq, message, accepted)
        else:
            record = r.encode_sent(qid, seq, message, failures, expires, due,
                                   accepted=accepted)
            size = len(record)
            self._buffer += record
            if failures:
                s.failed[qid, seq] = (failures, due, None, None)
        self._own(qid, seq, size)
        if seq >= s.next_seq[qid]:
            s.next_seq[qid] = seq + 1

    def delivered(self, queue: str, seq: int) -> None:
        """A delivery attempt started (a lease was granted)."""
        if queue is self._run_name and len(self._delivered_run) < _RUN_MAX:
            self._delivered_run.append(seq)
            return
        qid = self._s.qids[queue]
        if qid != self._run_qid or self._delivered_run:
            self._end_runs()
        self._run_qid, self._run_name = qid, queue
        self._delivered_run.append(seq)

    def failed(self, queue: str, seq: int, failures: int, due: float | None, *,
               reason: str | None = None, consumer: tuple[int, int] | None = None) -> None:
        """Nack, ack timeout or lost connection: the new failures count and due time,
        and the message's last failure (its reason text, the consumer's (pid, uid)).
        Also a release (no attempt counted: the same count and details again)."""
        self._end_runs()
        qid = self._s.qids[queue]
        self._s.flying[qid].discard(seq)
        self._s.failed[qid, seq] = (failures, due, reason, consumer)
        self._append(r.encode_failed(qid, seq, failures, due, reason, consumer))

    def removed(self, queue: str, seq: int, reason: int) -> None:
        """Ack, reply, reject, dead-letter, TTL expiry or overflow drop (a RemovalReason)."""
        run = self._removed_run
        if queue is self._run_name and reason == self._removed_reason and len(run) < _RUN_MAX:
            run.append(seq)
            return
        qid = self._s.qids[queue]
        if qid != self._run_qid or run:
            self._end_runs()
        self._run_qid, self._run_name = qid, queue
        self._removed_reason = reason
        self._removed_run.append(seq)

    def purged(self, queue: str) -> None:
        """Every message of ``queue`` not out for delivery was discarded."""
        self._end_runs()
        qid = self._s.qids[queue]
        flying = self._s.flying[qid]
        for seq in list(self._s.owner[qid]):
            if seq not in flying:
                self._disown(qid, seq)
        self._append(r.encode_purged(qid))

    def deleted(self, queue: str) -> None:
        """``queue`` and all its messages are gone."""
        self._end_runs()
        s = self._s
        qid = s.qids.pop(queue)
        for seq in list(s.owner[qid]):
            self._disown(qid, seq)
        del s.names[qid], s.settings[qid], s.next_seq[qid], s.owner[qid], s.flying[qid]
        self._append(r.encode_deleted(qid))

    def remembered(self, queue: str, entries: list[tuple[str, float]]) -> None:
        """Ids entered ``queue``'s deduplication window without a Sent in it."""
        self._append(r.encode_dedup(self._s.qids[queue], entries))

    def attach_windows(self, source: Callable[[str], list[tuple[str, int, int, float]]]
                       ) -> None:
        """Read each queue's deduplication window from ``source(name)`` (as runs of ids,
        (prefix, first seq, last seq, accepted-at in epoch seconds), oldest first)
        whenever a segment starts."""
        self._windows = source
        self._recovered_windows = None

    def _append(self, record: bytes) -> None:
        if self._run_qid >= 0:
            self._end_runs()
        self._buffer += record

    def _end_runs(self) -> None:
        """Append the runs being merged to the buffer, Sent, then Delivered, then
        Removed, one record each (one of one message or seq as the Sent, Delivered or
        Removed it is), and bring the owner index up to date. That order keeps each
        message's own records in the order they were made: in the span of the runs a
        message is sent, delivered and removed at most once each, in that order (a
        second delivery follows a Failed, which ends the runs; a seq is never sent
        twice), and records of different messages commute (docs/journal.md "Runs")."""
        qid = self._run_qid
        if qid < 0:
            return
        s = self._s
        owners = s.owner[qid]
        buffer = self._buffer
        messages = self._sent_run
        if messages:
            first, count = self._sent_first, len(messages)
            segment = self._segments[-1]
            base = segment.number << 32
            if count == 1:
                size = r.append_sent(buffer, qid, first, messages[0], self._sent_accepted)
                owners[first] = base | size
            else:  # (each owns its bytes and its length's 4: base + 4 + len is base | ...)
                r.append_sent_run(buffer, qid, first, messages, self._sent_accepted)
                owners.update(zip(range(first, first + count),
                                  map((base + 4).__add__, map(len, messages)), strict=True))
                size = sum(map(len, messages)) + 4 * count
            segment.live += count
            segment.live_bytes += size
            if first + count > s.next_seq[qid]:
                s.next_seq[qid] = first + count
            self._sent_run = []
            self._sent_first = self._sent_next = -1
        run = self._delivered_run
        if run:
            s.flying[qid].update(run)
            if len(run) == 1:
                r.append_delivered(buffer, qid, run[0])
            else:
                buffer += r.encode_delivered_run(qid, run)
            self._delivered_run = []
        run = self._removed_run
        if run:
            # _disown for each, a run at a time: this is every message's last record
            popped = list(map(owners.pop, run, repeat(None)))
            entries = (cast("list[int]", popped) if None not in popped
                       else [entry for entry in popped if entry is not None])
            if entries:  # (None: not live, e.g. a removal after a purge)
                number = min(entries) >> 32
                if number == max(entries) >> 32:  # the common case: from one segment
                    owning = self._by_number.get(number)
                    if owning is not None:
                        owning.live -= len(entries)
                        owning.live_bytes -= sum(entries) - len(entries) * (number << 32)
                else:
                    for entry in entries:
                        owning = self._by_number.get(entry >> 32)
                        if owning is not None:
                            owning.live -= 1
                            owning.live_bytes -= entry & _SIZE
            flying = s.flying[qid]
            if flying:
                flying.difference_update(run)
            failed = s.failed
            if failed:
                for seq in run:
                    failed.pop((qid, seq), None)
            reason = self._removed_reason
            if len(run) == 1:
                r.append_removed(buffer, qid, run[0], reason)
            else:
                buffer += r.encode_removed_run(qid, reason, run)
            self._removed_run = []
        self._run_qid, self._run_name = -1, None

    def _own(self, qid: int, seq: int, size: int) -> None:
        owners = self._s.owner[qid]
        if seq in owners:  # a copy (still out for delivery if it was: _flying keeps it)
            self._disown(qid, seq, forget=False)
        segment = self._segments[-1]
        owners[seq] = segment.number << 32 | size
        segment.live += 1
        segment.live_bytes += size

    def _disown(self, qid: int, seq: int, *, forget: bool = True) -> None:
        entry = self._s.owner[qid].pop(seq, None)
        if entry is None:
            return
        segment = self._by_number.get(entry >> 32)
        if segment is not None:
            segment.live -= 1
            segment.live_bytes -= entry & _SIZE
        if forget:
            self._s.failed.pop((qid, seq), None)

    @property
    def pending(self) -> int:
        """Bytes appended and not yet written; an entry of a run being merged counts 8
        (the shell asks every turn whether anything is pending: no sum over the runs;
        statistics() ends them first, so its figure is exact)."""
        if self._run_qid < 0:
            return len(self._buffer)
        return len(self._buffer) + 8 * (len(self._sent_run) + len(self._delivered_run)
                                        + len(self._removed_run))

    def statistics(self) -> JournalStats:
        self._end_runs()  # (into the buffer: the counts include them)
        return {
            "segments": len(self._segments),
            "bytes": sum(seg.size for seg in self._segments) + self.pending,
            "live_messages": sum(seg.live for seg in self._segments),
            "live_bytes": sum(seg.live_bytes for seg in self._segments),
            "pending": self.pending,
        }
