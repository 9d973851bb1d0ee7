"""The journal store: :class:`Journal`, and opening it: loading what recovery
(recovery.py) replayed into the store's indexes.

The store is one class built in layers, a module each (appending.py says why and how
they stack), each module with the theory of operation of its part: appending.py holds
the state, appending records, the runs of Sent, Delivered and Removed records being
merged and the owner index (``declare``, ``sent``, ``delivered``, ``failed``,
``removed``, ``_end_runs``, ``statistics``); segments.py writing, syncing (the
:class:`SyncTicket` steps), rotating and deleting segments (``write``, ``sync``,
``begin_sync``, ``end_sync``, ``_rotate``); compaction.py compaction and the rebuild
after a failed sync (``compact``, ``rebuild``); and this module :meth:`Journal.open`.
"""

from __future__ import annotations

import gc
import time

from . import records as r
from .appending import _SIZE, _Segment
from .compaction import JournalCompaction
from .files import Files, segment_name
from .recovery import (
    Recovered,
    RecoveredQueue,
    RecoveryReport,
    recovered_messages,
    replay_files,
)
from .replay import Replay
from .segments import SyncTicket

__all__ = ["DEFAULT_SEGMENT_SIZE", "Journal", "SyncTicket"]

# 16 MiB, as NATS JetStream's file store blocks are 8-16 MiB (Kafka's log segments are
# 1 GiB, but Kafka never replays them at start): rotation (two syncs) every ~100,000
# small messages is rare, and the settled data a restart may replay is bounded by the
# compaction trigger at 2 segments: 32 MiB, about a second (64 MiB segments meant 128 MiB
# of dead records to read through before serving).
DEFAULT_SEGMENT_SIZE = 16 * 1024 * 1024


class Journal(JournalCompaction):
    """An open journal: recovered state out, records in. Use :meth:`open`.

    Example::

        journal, recovered = Journal.open(OsFiles("/var/lib/aiobus/journal"))
        journal.declare("jobs", {"ttl": 60.0})
        journal.sent("jobs", 0, packed)
        journal.write(); journal.sync()   # then confirm the send
    """

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
