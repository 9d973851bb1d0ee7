"""The journal store's segments: writing the buffer out, syncing what was written (in
three steps, so that the fdatasync can run in another thread), rotating to a new
segment, and deleting the old segments that own nothing.

A layer of :class:`~.store.Journal` (appending.py says how the layers stack).

Theory of operation
-------------------
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
with its deduplication window, read from the core through ``attach_windows``),
synced, renamed and the directory synced, so a segment that has its name always has a
whole header, knows its queues and holds every id they must still refuse as duplicates
(which is what lets the older segments go once their messages are acked). The current
segment is synced before the next one is created: the window in the new head may name
ids whose Sent records are in the old segment's unsynced tail, and a crash must not keep
the names without the messages. :meth:`write` rotates to a new segment once the current
one reaches ``segment_size``.

Deleting. A prefix of sealed segments that owns no live message (appending.py, "The
owner index") is deleted on :meth:`sync` (a later segment's removal records can only
concern earlier segments, so only prefixes may go).

A failed append (ENOSPC, EIO) truncates the segment back to its last good length and
raises :class:`JournalError`; the buffer keeps its records, so the next :meth:`write`
retries them. If the truncate fails too, every write raises until it succeeds: the file
never holds a half record that later records follow.

A failed fdatasync is different: the pages it covered may be lost for good and marked
clean (PostgreSQL's fsyncgate), so the journal becomes ``damaged``: every later sync
raises, however its fdatasync went, and compaction and rotation stop, until ``rebuild``
has written the live state afresh (compaction.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from . import records as r
from .appending import JournalAppending, _Segment
from .errors import JournalError, os_error_name
from .files import segment_name

__all__ = ["JournalSegments", "SyncTicket"]


@dataclass(frozen=True, slots=True, eq=False)  # (tickets are told apart by identity)
class SyncTicket:
    """One sync begun by :meth:`~.store.Journal.begin_sync` (module docstring)."""

    handle: int  # the segment to fdatasync; -1: nothing written is unsynced
    written: int  # the journal's ``written`` when it began: what it makes durable
    drop_below: int  # segments numbered below this own nothing: delete them after it
    name: str  # the segment's file name, for an error


class JournalSegments(JournalAppending):
    """Segments: write, sync, rotate, delete (see the module docstring)."""

    def _add_segment(self, segment: _Segment) -> None:
        self._segments.append(segment)
        self._by_number[segment.number] = segment

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

    def close(self) -> None:
        """Close the current segment (write and sync first if you mean to keep the buffer)."""
        if self._handle is not None:
            self.files.close(self._handle)
            self._handle = None
        for handle in self._retired:
            self.files.close(handle)
        self._retired = []
