"""The journal store: segments, the append buffer, write/sync, compaction, and loading
what recovery (recovery.py) replayed.

Theory of operation
-------------------
Appending is sans-IO: :meth:`Journal.sent` and its siblings encode one record into an
in-memory buffer and update counters; they never touch a file or a clock. Once per loop
turn the shell calls :meth:`Journal.write` (one append of the whole buffer) and then,
as its ``--fsync`` policy says, syncs (one fdatasync); only after the sync may it
confirm that turn's sends (Redis's ``appendfsync always`` in beforeSleep).

Runs (format versions 4 and 5): while the core journals one queue, its stateless Sent
records with consecutive seqs (and one accepted time) are collected as their messages,
its Delivered records as their seqs and its Removed records of one reason as their seqs,
three runs side by side (``_sent_run``, ``_delivered_run``, ``_removed_run``); anything
else appended, and :meth:`write`, first appends them as one SentRun, one DeliveredRun and
one RemovedRun, in that order (:meth:`_end_runs`), and only then updates the owner
index for them. A send, its delivery and its ack then cost a list append each instead
of a framed, checksummed record and two dict updates, and the journal about 4 bytes a
message and a byte or so a delivery and an ack instead of 26, 21 and 22
(docs/journal.md "Runs"). Writing the Sent run first, then the deliveries, then the
removals keeps every message's own records in the order they were made (a message is
sent, delivered and removed at most once each while the runs are open: a second
delivery follows a Failed, which ends them); records of different messages commute.

Syncing in three steps, so that the fdatasync can run in another thread while the loop
goes on appending and writing: :meth:`begin_sync` (in the loop) notes how many bytes
have been written so far and which segments may go once they are on disk, and returns a
:class:`SyncTicket`; :meth:`sync_file` (any thread) is the fdatasync alone; and
:meth:`end_sync` (in the loop) records that those bytes are on disk (``synced``) and
deletes the segments. Bytes written after the ticket began are not covered by it: the
shell confirms a turn's sends only once ``synced`` reaches what was ``written`` at the
end of that turn. :meth:`sync` does the three in a row. A segment rotated away while a
ticket still holds its handle is closed when the last ticket ends.

Segments are files ``<number>.seg`` (16 digits, so names sort in order). A new segment
is written as ``.tmp`` (header, then a QueueDeclared for each live queue and a DedupIds
with its deduplication window, read from the core through :meth:`attach_windows`),
synced, renamed and the directory synced, so a segment that has its name always has a
whole header, knows its queues and holds every id they must still refuse as duplicates
(which is what lets the older segments go once their messages are acked). The current
segment is synced before the next one is created: the window in the new head may name
ids whose Sent records are in the old segment's unsynced tail, and a crash must not keep
the names without the messages. :meth:`write` rotates to a new segment once the current
one reaches ``segment_size``.

A failed append (ENOSPC, EIO) truncates the segment back to its last good length and
raises :class:`JournalError`; the buffer keeps its records, so the next :meth:`write`
retries them. If the truncate fails too, every write raises until it succeeds: the file
never holds a half record that later records follow.

A failed fdatasync is different: the pages it covered may be lost for good and marked
clean (PostgreSQL's fsyncgate), so the journal becomes ``damaged``: every later sync
raises, however its fdatasync went, and compaction and rotation stop, until
:meth:`rebuild` has written a new *base* segment from the core's memory
(``snapshot.durable_snapshot``), synced it and deleted every older segment; recovery
skips segments older than the newest base (docs/journal.md, "After a failed sync").

Compaction. Each live message is *owned* by the segment holding its Sent record;
``_owner`` maps qid -> seq -> ``segment << 32 | record bytes`` (one int per message), and
``_flying`` qid -> the seqs of those with a delivery outstanding, which is what a copy
must repeat and what a purge keeps (a set per queue, updated a run at a time: a set of
(qid, seq) tuples made two objects per delivery on the hot path). A prefix of sealed
segments that owns no live message is deleted on :meth:`sync` (a later segment's
removal records can only concern earlier segments, so only prefixes may go). While the
journal is larger than ``2 * live bytes + 2 * segment_size`` (the bound), :meth:`compact`
copies the live messages of the oldest segments forward (a Sent with the failures, due
time and last failure's details folded in, plus a Delivered if one is outstanding); a
later Sent for the same (qid, seq) replaces the earlier one on replay, so once the
copies are synced the old segment owns nothing and goes. See docs/journal.md for why
that bounds disk use.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, cast

from ...stats import JournalStats
from ..snapshot import QueueSnapshot
from . import decode as d
from . import records as r
from .errors import JournalError, os_error_name
from .files import Files, segment_name
from .recovery import (
    Recovered,
    RecoveredQueue,
    RecoveryReport,
    recovered_messages,
    replay_files,
)
from .replay import Replay

__all__ = ["DEFAULT_SEGMENT_SIZE", "Journal", "SyncTicket"]

# 16 MiB, as NATS JetStream's file store blocks are 8-16 MiB (Kafka's log segments are
# 1 GiB, but Kafka never replays them at start): rotation (two syncs) every ~100,000
# small messages is rare, and the settled data a restart may replay is bounded by the
# compaction trigger at 2 segments: 32 MiB, about a second (64 MiB segments meant 128 MiB
# of dead records to read through before serving).
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024


@dataclass(slots=True)
class _Segment:
    number: int
    size: int
    live: int = 0  # messages it owns
    live_bytes: int = 0


_Failure = tuple[int, float | None, str | None, tuple[int, int] | None]


@dataclass(frozen=True, slots=True, eq=False)  # (tickets are told apart by identity)
class SyncTicket:
    """One sync begun by :meth:`Journal.begin_sync` (module docstring)."""

    handle: int  # the segment to fdatasync; -1: nothing written is unsynced
    written: int  # the journal's ``written`` when it began: what it makes durable
    drop_below: int  # segments numbered below this own nothing: delete them after it
    name: str  # the segment's file name, for an error


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

# rebuild() writes its segment in parts of about this size (a million messages need not
# be one bytes object besides the core's copies).
_REBUILD_CHUNK = 1 << 20

# An owner entry: segment << 32 | the Sent's size (a record is at most 256 MiB).
_SIZE = (1 << 32) - 1


class Journal:
    """An open journal: recovered state out, records in. Use :meth:`open`.

    Example::

        journal, recovered = Journal.open(OsFiles("/var/lib/aiobus/journal"))
        journal.declare("jobs", {"ttl": 60.0})
        journal.sent("jobs", 0, packed)
        journal.write(); journal.sync()   # then confirm the send
    """

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
        # disk (module docstring, "Syncing in three steps").
        self.written = 0
        self.synced = 0
        self._tickets = 0  # begun and not yet ended
        self._retired: list[int] = []  # handles of rotated segments a ticket may hold
        self._must_truncate = False
        # A fdatasync failed: what was written may be lost, and a later sync proves
        # nothing, until rebuild() has written the live state afresh (module docstring).
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

    def _add_segment(self, segment: _Segment) -> None:
        self._segments.append(segment)
        self._by_number[segment.number] = segment

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

    # --- I/O -------------------------------------------------------------------------

    def write(self) -> int:
        """Append the buffered records to the current segment; returns bytes written.

        Raises:
            JournalError: the append failed (``cause`` is the errno name, e.g.
                ``"ENOSPC"``); nothing torn is left behind, the records stay buffered.
        """
        segment = self._segments[-1]
        assert self._handle is not None, "journal is closed"
        name = segment_name(segment.number)
        if self._run_qid >= 0:
            self._end_runs()
        try:
            if self._must_truncate:
                self.files.truncate(self._handle, segment.size)
                self._must_truncate = False
            if not self._buffer:
                return 0
            data = self._buffer
            self.files.append(self._handle, data)
        except OSError as exc:
            try:
                self.files.truncate(self._handle, segment.size)
            except OSError:
                self._must_truncate = True
            raise JournalError(f"cannot write journal segment {name}: {exc}",
                               file=name, cause=os_error_name(exc)) from exc
        self._buffer = bytearray()  # not clear(): ``files`` may keep what it was given
        segment.size += len(data)
        self.written += len(data)
        if segment.size >= self.segment_size and not self.damaged:  # (else: rebuild)
            try:
                self._rotate()
            except JournalError:
                pass  # stay on the current segment; the next write tries again
        return len(data)

    @property
    def unsynced(self) -> bool:
        """Whether bytes written are not yet known to be on disk."""
        return self.written > self.synced

    def sync(self) -> None:
        """fdatasync what :meth:`write` wrote; then delete segments that own nothing.

        Raises:
            JournalError: the fdatasync failed; what was written is not durable.
        """
        ticket = self.begin_sync()
        error: OSError | None = None
        try:
            self.sync_file(ticket)
        except OSError as exc:
            error = exc
        self.end_sync(ticket, error)

    def begin_sync(self) -> SyncTicket:
        """Start a sync of everything written so far (in the loop; module docstring)."""
        assert self._handle is not None, "journal is closed"
        segments = self._segments
        drop_below = segments[0].number
        if not self._buffer and self._run_qid < 0:  # else compaction copies may be unwritten
            for segment in segments[:-1]:
                if segment.live:
                    break
                drop_below = segment.number + 1
        self._tickets += 1
        return SyncTicket(self._handle if self.written > self.synced else -1, self.written,
                          drop_below, segment_name(segments[-1].number))

    def sync_file(self, ticket: SyncTicket) -> None:
        """The fdatasync of ``ticket`` (from any thread: it touches nothing else).

        Raises:
            OSError: as the fdatasync did; pass it to :meth:`end_sync`.
        """
        if ticket.handle >= 0:
            self.files.sync(ticket.handle)

    def end_sync(self, ticket: SyncTicket, error: OSError | None = None) -> None:
        """Finish ``ticket`` (in the loop): its bytes are on disk unless ``error``; then
        delete the segments it found owning nothing.

        Raises:
            JournalError: ``error`` was given: what it covered is not durable.
        """
        self._end_ticket()
        if error is not None:
            self.damaged = True
            raise JournalError(f"cannot sync journal segment {ticket.name}: {error}",
                               file=ticket.name, cause=os_error_name(error)) from error
        if self.damaged:
            raise JournalError(f"journal segment {ticket.name} is not trusted since a sync"
                               " failed; it must be rebuilt first", file=ticket.name,
                               cause="EIO")
        if ticket.written > self.synced:
            self.synced = ticket.written
        dropped = False
        segments = self._segments
        while (len(segments) > 1 and segments[0].number < ticket.drop_below
               and segments[0].live == 0):
            number = segments.pop(0).number
            del self._by_number[number]
            self.files.remove(segment_name(number))
            dropped = True
        if dropped:
            self.files.sync_directory()

    def abandon_sync(self, ticket: SyncTicket) -> None:
        """End ``ticket`` without counting its bytes as synced (its outcome is unknown or
        proves nothing, e.g. it ran while another sync failed; a later sync or a rebuild
        covers them)."""
        self._end_ticket()

    def _end_ticket(self) -> None:
        self._tickets -= 1
        if not self._tickets and self._retired:
            for handle in self._retired:
                self.files.close(handle)
            self._retired = []

    def compact(self) -> int:
        """Copy live messages out of the oldest segments while the journal exceeds its
        bound (module docstring); returns how many messages were copied. The copies are
        buffered: the old segments go at the first :meth:`sync` after they are written.
        """
        if self.damaged:  # (the segments are not read back now: rebuild() replaces them)
            return 0
        self._end_runs()  # (the owner index must be up to date)
        total = sum(seg.size for seg in self._segments)
        live = sum(seg.live_bytes for seg in self._segments)
        copied = 0
        for segment in self._segments[:-1]:
            if total <= 2 * live + 2 * self.segment_size:
                break
            total -= segment.size - segment.live_bytes
            if segment.live:
                copied += self._copy_forward(segment)
        return copied

    def _copy_forward(self, segment: _Segment) -> int:
        decoded = d.decode_segment(self.files.read(segment_name(segment.number)), last=False)
        copied = 0
        for _, record in decoded.records:
            if type(record) is r.Sent:
                copied += self._copy(segment, record.qid, record.seq, record.message,
                                     (record.failures, record.due, record.last_reason,
                                      record.last_consumer), record.expires)
            elif type(record) is r.SentRun:
                for seq, message in enumerate(record.messages, record.first):
                    copied += self._copy(segment, record.qid, seq, message,
                                         (0, None, None, None), None)
        return copied

    def _copy(self, segment: _Segment, qid: int, seq: int, message: bytes,
              state: _Failure, expires: float | None) -> int:
        """Copy message ``seq`` forward if ``segment`` owns it (1, else 0); ``state``:
        the failures, due time and last failure its Sent record says."""
        s = self._s
        entry = s.owner.get(qid, {}).get(seq)
        if entry is None or entry >> 32 != segment.number:
            return 0
        failures, due, reason, consumer = s.failed.get((qid, seq), state)
        # No accepted time: a copy is not an acceptance, and the window it was in
        # is in the head of every segment since (a copy read as one would move
        # its id after ids accepted later in the same turn).
        data = r.encode_sent(qid, seq, message, failures, expires, due, reason, consumer,
                             None)
        self._own(qid, seq, len(data))
        self._append(data)
        if seq in s.flying[qid]:
            self._append(r.encode_delivered(qid, seq))
        return 1

    def _rotate(self) -> None:
        """Seal the current segment and start the next one (module docstring)."""
        assert self._handle is not None
        number = self._segments[-1].number + 1
        name = segment_name(number)
        s = self._s
        parts = [r.segment_header(number)]
        for qid in sorted(s.names):
            parts.append(r.encode_declared(qid, s.names[qid], s.settings[qid], s.next_seq[qid]))
            recovered = self._recovered_windows
            if recovered is None:
                runs = self._windows(s.names[qid])
                if runs:
                    parts.append(r.encode_dedup_runs(qid, runs))
            else:  # (before the core is attached: the windows recovery found)
                window = recovered.get(s.names[qid])
                if window:
                    parts.append(r.encode_dedup(qid, window))
        data = b"".join(parts)
        try:  # first the old segment (module docstring: the window may name its tail)
            self.files.sync(self._handle)
        except OSError as exc:
            self.damaged = True
            old = segment_name(self._segments[-1].number)
            raise JournalError(f"cannot sync journal segment {old}: {exc}",
                               file=old, cause=os_error_name(exc)) from exc
        self._create(name, data)
        try:
            handle = self.files.open_append(name)
        except OSError as exc:
            raise JournalError(f"cannot open journal segment {name}: {exc}",
                               file=name, cause=os_error_name(exc)) from exc
        if self._tickets:  # a sync in another thread may be using it (module docstring)
            self._retired.append(self._handle)
        else:
            self.files.close(self._handle)
        self._handle = handle
        self.synced = self.written  # the old segment was synced above, the new one made so
        self._add_segment(_Segment(number, len(data)))

    def _create(self, name: str, data: bytes | list[bytes]) -> None:
        """Write ``name`` whole and durably (``data``, or each of its parts in order):
        tmp file, fdatasync, rename, directory sync."""
        tmp = name + ".tmp"
        try:
            handle = self.files.create(tmp)
            try:
                for part in [data] if isinstance(data, bytes) else data:
                    self.files.append(handle, part)
                self.files.sync(handle)
            finally:
                self.files.close(handle)
            self.files.rename(tmp, name)
            self.files.sync_directory()
        except OSError as exc:
            try:
                self.files.remove(tmp)
            except OSError:
                pass
            raise JournalError(f"cannot create journal segment {name}: {exc}",
                               file=name, cause=os_error_name(exc)) from exc

    def rebuild(self, queues: Iterable[QueueSnapshot]) -> int:
        """Write the live state afresh after a failed sync: a new *base* segment
        (``records.BASE``) holding each durable queue of ``queues`` (the core's
        ``snapshot.durable_snapshot``: settings, next seq, deduplication window) and
        each of its messages as a compaction copy (a Sent with its state folded in, and
        a Delivered if one is outstanding); synced, renamed, the directory synced, and
        only then every older segment deleted. Nothing is read back: the old segments'
        pages are not trusted. The buffer is dropped: ``queues`` is the state it would
        have led to. Returns the new segment's size.

        Raises:
            JournalError: the new segment could not be written or synced; the journal
                stays damaged and the old segments stay (call again later).
        """
        assert self._handle is not None, "journal is closed"
        old = self._s
        s = _State(next_qid=old.next_qid)
        number = self._segments[-1].number + 1
        name = segment_name(number)
        segment = _Segment(number, 0)
        chunk = bytearray(r.segment_header(number, base=True))
        chunks: list[bytes] = []
        for q in queues:
            qid = old.qids.get(q.name)
            if qid is None:
                qid = s.next_qid
                s.next_qid += 1
            s.qids[q.name], s.names[qid], s.settings[qid] = qid, q.name, q.settings
            s.next_seq[qid] = q.next_seq
            owners: dict[int, int] = {}
            s.owner[qid] = owners
            flying: set[int] = set()
            s.flying[qid] = flying
            chunk += r.encode_declared(qid, q.name, q.settings, q.next_seq)
            if q.dedup:
                chunk += r.encode_dedup_runs(qid, q.dedup)
            for m in q.messages:
                record = r.encode_sent(qid, m.seq, m.message, m.failures, m.expires, m.due,
                                       m.last_reason, m.last_consumer, None)
                chunk += record
                size = len(record)
                owners[m.seq] = number << 32 | size
                if m.delivered:
                    flying.add(m.seq)
                segment.live += 1
                segment.live_bytes += size
                if m.failures:
                    s.failed[qid, m.seq] = (m.failures, m.due, m.last_reason,
                                            m.last_consumer)
                if m.delivered:
                    r.append_delivered(chunk, qid, m.seq)
                if len(chunk) >= _REBUILD_CHUNK:
                    chunks.append(bytes(chunk))
                    chunk = bytearray()
        chunks.append(bytes(chunk))
        segment.size = sum(map(len, chunks))
        self._create(name, chunks)
        try:
            handle = self.files.open_append(name)
        except OSError as exc:  # (the base is on disk: the next rebuild supersedes it)
            raise JournalError(f"cannot open journal segment {name}: {exc}",
                               file=name, cause=os_error_name(exc)) from exc
        if self._tickets:  # a sync in another thread may be using it
            self._retired.append(self._handle)
        else:
            self.files.close(self._handle)
        self._handle = handle
        removed = [seg.number for seg in self._segments]
        self._s = s
        self._segments, self._by_number = [], {}
        self._add_segment(segment)
        self._buffer = bytearray()
        self._run_qid, self._run_name = -1, None  # (the runs are dropped with the buffer)
        self._sent_run, self._delivered_run, self._removed_run = [], [], []
        self._sent_first = self._sent_next = -1
        self._must_truncate = False
        self.synced = self.written  # (positions only grow: tickets begun before count nothing)
        self.damaged = False
        try:  # superseded: recovery skips them even if a crash keeps them (recovery.py)
            for number in removed:
                self.files.remove(segment_name(number))
            self.files.sync_directory()
        except OSError:
            pass  # (the next open removes them)
        return segment.size

    def close(self) -> None:
        """Close the current segment (write and sync first if you mean to keep the buffer)."""
        if self._handle is not None:
            self.files.close(self._handle)
            self._handle = None
        for handle in self._retired:
            self.files.close(handle)
        self._retired = []

    # --- recovery --------------------------------------------------------------------

    @classmethod
    def open(cls, files: Files, *, segment_size: int = DEFAULT_SEGMENT_SIZE
             ) -> tuple[Journal, Recovered]:
        """Replay the journal in ``files`` and open it for appending.

        Returns:
            The journal, and what it recovered (queues with their live messages in
            sequence order, and a :class:`RecoveryReport`).

        Raises:
            JournalCorrupt: a bad record before the tail; see :func:`repair`.
            JournalError: a file could not be read or the tail not truncated.
        """
        started = time.perf_counter()
        # Recovery makes a few objects per message and no reference cycles; the cyclic
        # collector, triggered by allocation counts, would rescan everything built so
        # far again and again: 40% of the time for a million messages (measured, see
        # docs/journal.md). So it is paused, as bulk loaders do, and restored after.
        collecting = gc.isenabled()
        gc.disable()
        try:
            replay, segments, torn = replay_files(files)
            journal = cls(files, segment_size)
            for number, size in segments:
                journal._add_segment(_Segment(number, size))
            inferred = replay.finish()
            queues = journal._load(replay)
        finally:
            if collecting:
                gc.enable()
        if segments:
            journal._handle = files.open_append(segment_name(segments[-1][0]))
            if replay.version != r.FORMAT_VERSION:  # never append to an older format
                journal._rotate()
        else:
            journal._create(segment_name(1), r.segment_header(1))
            journal._handle = files.open_append(segment_name(1))
            journal._add_segment(_Segment(1, r.HEADER_SIZE))
        for qid, msg in inferred:  # make the inferred failure a record of its own
            journal.failed(journal._s.names[qid], msg.seq, msg.failures, msg.due,
                           reason=msg.last_reason, consumer=msg.last_consumer)
        report = RecoveryReport(len(queues), sum(len(q) for q in queues.values()),
                                replay.bytes, time.perf_counter() - started, torn)
        return journal, Recovered(queues, report)

    def _load(self, replay: Replay) -> dict[str, RecoveredQueue]:
        """Build the store's indexes from a finished replay (its owner index is the
        store's, as is; each segment's live counts are added up per run of messages it
        owns); return what :meth:`open` returns."""
        s = self._s
        by_number = self._by_number
        queues: dict[str, RecoveredQueue] = {}
        for q in replay.queues.values():
            qid = q.qid
            s.qids[q.name], s.names[qid], s.settings[qid] = qid, q.name, q.settings
            s.next_seq[qid] = q.next_seq
            s.next_qid = max(s.next_qid, qid + 1)
            s.owner[qid] = q.owner
            s.flying[qid] = set()  # (finish() made each unanswered delivery a failure)
            number, live, live_bytes = -1, 0, 0
            segment: _Segment | None = None
            for entry in q.owner.values():
                if entry >> 32 != number:  # messages come in runs of one segment
                    if segment is not None:
                        segment.live += live
                        segment.live_bytes += live_bytes
                    number, live, live_bytes = entry >> 32, 0, 0
                    segment = by_number[number]
                live += 1
                live_bytes += entry & _SIZE
            if segment is not None:
                segment.live += live
                segment.live_bytes += live_bytes
            failed = s.failed
            for seq, m in q.messages.items():
                if m.failures:  # (a last failure's details come with a failure)
                    failed[qid, seq] = (m.failures, m.due, m.last_reason, m.last_consumer)
            dedup = sorted(q.dedup.items(), key=lambda entry: entry[1])
            queues[q.name] = RecoveredQueue(q.name, q.settings, q.next_seq, q.plain,
                                            recovered_messages(q.messages.values()), dedup)
            if dedup and self._recovered_windows is not None:
                self._recovered_windows[q.name] = dedup
        return queues
