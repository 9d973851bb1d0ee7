"""The journal store's compaction, and its rebuild after a failed sync.

A layer of :class:`~.store.Journal` (appending.py says how the layers stack).

Theory of operation
-------------------
Compaction. Each live message is owned by the segment holding its Sent record
(appending.py, "The owner index"). While the journal is larger than ``2 * live bytes + 2
* segment_size`` (the bound), :meth:`compact` copies the live messages of the oldest
segments forward (a Sent with the failures, due time and last failure's details folded
in, plus a Delivered if one is outstanding); a later Sent for the same (qid, seq)
replaces the earlier one on replay, so once the copies are synced the old segment owns
nothing and goes (segments.py). See docs/journal.md for why that bounds disk use.

Rebuild. After a failed fdatasync the journal is ``damaged`` (segments.py) until
:meth:`rebuild` has written a new *base* segment from the core's memory
(``snapshot.durable_snapshot``), synced it and deleted every older segment; recovery
skips segments older than the newest base (docs/journal.md, "After a failed sync").
"""

from __future__ import annotations

from collections.abc import Iterable

from ..snapshot import QueueSnapshot
from . import decode as d
from . import records as r
from .appending import _Failure, _Segment, _State
from .errors import JournalError, os_error_name
from .files import segment_name
from .segments import JournalSegments

__all__ = ["JournalCompaction"]

# rebuild() writes its segment in parts of about this size (a million messages need not
# be one bytes object besides the core's copies).
_REBUILD_CHUNK = 1 << 20


class JournalCompaction(JournalSegments):
    """Compaction and the rebuild after a failed sync (see the module docstring)."""

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
