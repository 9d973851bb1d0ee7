"""The journal store: segments, the append buffer, write/sync, compaction, and loading
what recovery (recovery.py) replayed.

Theory of operation
-------------------
Appending is sans-IO: :meth:`Journal.sent` and its siblings encode one record into an
in-memory buffer and update counters; they never touch a file or a clock. Once per loop
turn the shell calls :meth:`Journal.write` (one append of the whole buffer) and then,
as its ``--fsync`` policy says, syncs (one fdatasync); only after the sync may it
confirm that turn's sends (Redis's ``appendfsync always`` in beforeSleep).

Runs (format version 4): Delivered records of one queue in a row, or Removed records of
one queue and reason, are collected as their seqs (``_run``) and appended as one
DeliveredRun or RemovedRun when anything else is appended, or at :meth:`write`; a pump's
deliveries and an ACK_MANY's acks then cost a list append each instead of a framed,
checksummed record, and a byte or so of journal instead of 21 (docs/journal.md "Runs").
Ending the run before any other record keeps every change in the order it was made.

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
``_owner`` maps qid -> seq -> ``segment << 32 | record bytes``, plus ``_FLYING`` (bit 31:
a record is at most 256 MiB) while a delivery of it is outstanding, which is what a copy
must repeat; one int per message, where a set of (qid, seq) tuples made two objects per
delivery on the hot path. A prefix of sealed
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
from typing import Any

from ...stats import JournalStats
from ..snapshot import QueueSnapshot
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
    # (qid, seq) -> what compaction must fold into a copy: failures, due, last reason and
    # consumer. Only for messages that failed (or were sent with failures, a DLQ's).
    failed: dict[tuple[int, int], _Failure] = field(default_factory=dict)
    next_qid: int = 1


# A run of more seqs is cut into several records (512 KiB each at most).
_RUN_MAX = 65536

# rebuild() writes its segment in parts of about this size (a million messages need not
# be one bytes object besides the core's copies).
_REBUILD_CHUNK = 1 << 20

# An owner entry: segment << 32 | _FLYING (delivered, not answered) | the Sent's size.
_FLYING = 1 << 31
_SIZE = _FLYING - 1


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
        # The run being merged (module docstring, "Runs"): Delivered (key qid << 8) or
        # Removed (key qid << 8 | reason) records of one queue in a row, as their seqs;
        # any other record, and write(), appends it to the buffer first.
        self._run: list[int] = []
        self._run_key = -1
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
        s = self._s
        qid = s.qids.get(name)
        if qid is None:
            qid = s.qids[name] = s.next_qid
            s.next_qid += 1
            s.names[qid], s.next_seq[qid], s.owner[qid] = name, 0, {}
        s.settings[qid] = settings
        self._append(r.encode_declared(qid, name, settings, s.next_seq[qid]))

    def sent(self, queue: str, seq: int, message: bytes, failures: int = 0,
             expires: float | None = None, due: float | None = None,
             accepted: float | None = None) -> None:
        """A message entered ``queue`` (also: a dead letter entering its DLQ);
        ``accepted``: when its id entered the queue's deduplication window, if it did."""
        s = self._s
        qid = s.qids[queue]
        if self._run:
            self._end_run()
        if failures or expires is not None or due is not None:
            record = r.encode_sent(qid, seq, message, failures, expires, due,
                                   accepted=accepted)
            size = len(record)
            self._buffer += record
            if failures:
                s.failed[qid, seq] = (failures, due, None, None)
        else:  # the common case, without building the record apart
            size = r.append_sent(self._buffer, qid, seq, message, accepted)
        owners = s.owner[qid]
        if seq in owners:
            self._own(qid, seq, size)
        else:  # a new message: _own, inline
            segment = self._segments[-1]
            owners[seq] = segment.number << 32 | size
            segment.live += 1
            segment.live_bytes += size
        if seq >= s.next_seq[qid]:
            s.next_seq[qid] = seq + 1

    def delivered(self, queue: str, seq: int) -> None:
        """A delivery attempt started (a lease was granted)."""
        s = self._s
        qid = s.qids[queue]
        owners = s.owner[qid]
        entry = owners.get(seq)
        if entry is not None:
            owners[seq] = entry | _FLYING
        key = qid << 8
        if key == self._run_key and len(self._run) < _RUN_MAX:
            self._run.append(seq)
        else:
            self._start_run(key, seq)

    def failed(self, queue: str, seq: int, failures: int, due: float | None, *,
               reason: str | None = None, consumer: tuple[int, int] | None = None) -> None:
        """Nack, ack timeout or lost connection: the new failures count and due time,
        and the message's last failure (its reason text, the consumer's (pid, uid)).
        Also a release (no attempt counted: the same count and details again)."""
        qid = self._s.qids[queue]
        owners = self._s.owner[qid]
        entry = owners.get(seq)
        if entry is not None:
            owners[seq] = entry & ~_FLYING
        self._s.failed[qid, seq] = (failures, due, reason, consumer)
        self._append(r.encode_failed(qid, seq, failures, due, reason, consumer))

    def removed(self, queue: str, seq: int, reason: int) -> None:
        """Ack, reply, reject, dead-letter, TTL expiry or overflow drop (a RemovalReason)."""
        s = self._s
        qid = s.qids[queue]
        entry = s.owner[qid].pop(seq, None)
        if entry is not None:  # _disown, inline: this is every message's last record
            segment = self._by_number.get(entry >> 32)
            if segment is not None:
                segment.live -= 1
                segment.live_bytes -= entry & _SIZE
            if s.failed:
                s.failed.pop((qid, seq), None)
        key = qid << 8 | reason
        if key == self._run_key and len(self._run) < _RUN_MAX:
            self._run.append(seq)
        else:
            self._start_run(key, seq)

    def purged(self, queue: str) -> None:
        """Every message of ``queue`` not out for delivery was discarded."""
        qid = self._s.qids[queue]
        for seq, entry in list(self._s.owner[qid].items()):
            if not entry & _FLYING:
                self._disown(qid, seq)
        self._append(r.encode_purged(qid))

    def deleted(self, queue: str) -> None:
        """``queue`` and all its messages are gone."""
        s = self._s
        qid = s.qids.pop(queue)
        for seq in list(s.owner[qid]):
            self._disown(qid, seq)
        del s.names[qid], s.settings[qid], s.next_seq[qid], s.owner[qid]
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
        if self._run:
            self._end_run()
        self._buffer += record

    def _start_run(self, key: int, seq: int) -> None:
        if self._run:
            self._end_run()
        self._run_key = key
        self._run.append(seq)

    def _end_run(self) -> None:
        """Append the run being merged to the buffer: one record (a lone seq as the
        Delivered or Removed it is)."""
        run, key = self._run, self._run_key
        qid, reason = key >> 8, key & 0xFF
        if len(run) == 1:
            if reason:
                r.append_removed(self._buffer, qid, run[0], reason)
            else:
                r.append_delivered(self._buffer, qid, run[0])
        elif reason:
            self._buffer += r.encode_removed_run(qid, reason, run)
        else:
            self._buffer += r.encode_delivered_run(qid, run)
        self._run = []
        self._run_key = -1

    def _own(self, qid: int, seq: int, size: int) -> None:
        owners = self._s.owner[qid]
        flying = 0
        if seq in owners:
            flying = owners[seq] & _FLYING  # a copy: still out for delivery if it was
            self._disown(qid, seq, forget=False)
        segment = self._segments[-1]
        owners[seq] = segment.number << 32 | flying | size
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
        """Bytes appended and not yet written (a run being merged: 8 a seq)."""
        return len(self._buffer) + 8 * len(self._run)

    def statistics(self) -> JournalStats:
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
        if self._run:
            self._end_run()
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
        if not self._buffer and not self._run:  # else compaction copies may be unwritten
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
        s = self._s
        decoded = r.decode_segment(self.files.read(segment_name(segment.number)), last=False)
        copied = 0
        for _, record in decoded.records:
            if type(record) is not r.Sent:
                continue
            entry = s.owner.get(record.qid, {}).get(record.seq)
            if entry is None or entry >> 32 != segment.number:
                continue
            key = (record.qid, record.seq)
            failures, due, reason, consumer = s.failed.get(
                key, (record.failures, record.due, record.last_reason, record.last_consumer))
            # No accepted time: a copy is not an acceptance, and the window it was in
            # is in the head of every segment since (a copy read as one would move
            # its id after ids accepted later in the same turn).
            data = r.encode_sent(record.qid, record.seq, record.message, failures,
                                 record.expires, due, reason, consumer, None)
            self._own(record.qid, record.seq, len(data))
            self._append(data)
            if entry & _FLYING:
                self._append(r.encode_delivered(*key))
            copied += 1
        return copied

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
            chunk += r.encode_declared(qid, q.name, q.settings, q.next_seq)
            if q.dedup:
                chunk += r.encode_dedup_runs(qid, q.dedup)
            for m in q.messages:
                record = r.encode_sent(qid, m.seq, m.message, m.failures, m.expires, m.due,
                                       m.last_reason, m.last_consumer, None)
                chunk += record
                size = len(record)
                owners[m.seq] = number << 32 | (_FLYING if m.delivered else 0) | size
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
        self._run, self._run_key = [], -1
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
