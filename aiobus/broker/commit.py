"""Group commit: the journal's fdatasync outside the loop (in the fsync helper process, or
worker threads), and output held until it ends.

Theory of operation
-------------------
The core appends journal records as it handles frames; the shell writes them once per
loop turn (one write(2), :meth:`~.journal.Journal.write`). What happens next depends on
``--fsync``:

* ``always``: no confirmation may leave before its turn's records are on disk. The shell
  holds the output of each connection with a reply in it (OK, a result, ERROR), and
  everything after it on that connection, so that its frames keep their order;
  deliveries and events to other connections leave at once (output.py ``_flush``). It
  hands the held output to :meth:`GroupCommit.hold` with the journal's ``written``
  position, and an fdatasync runs outside the loop (:meth:`~.journal.Journal.begin_sync`,
  then the syncer, then ``end_sync``). The loop is not blocked meanwhile: it goes on
  reading, handling frames and writing records, and those turns' replies are held too.
  When a sync returns, every held batch whose position it covers is released (written
  to the sockets, oldest first). Up to ``MAX_RUNNING`` syncs run at once, each started
  as soon as held output needs bytes that no running sync covers (records nobody waits
  for, such as acks, ride along with the next sync someone needs): fdatasync makes
  durable everything written before it was called, so whichever returns covers the
  positions of those begun before it. Redis fsyncs in its main thread for ``appendfsync
  always`` (beforeSleep); this keeps its guarantee, confirmed only once on disk, and
  lets the next turns' work, and the next sync, overlap the disk's latency. A long read
  (a producer's window of pipelined sends) is flushed in parts, each part's sync begun
  before the next part is handled (output.py ``_confirm_early``).
* ``batch`` and ``never``: output leaves after the write(2); the periodic sync
  (:meth:`GroupCommit.sync_soon`) runs outside the loop too and holds nothing back.

Where a sync runs (syncers.py). For a journal on real files, in the fsync helper: a
child process (fsync_helper.py) given the segment's file descriptor over a socket, which
answers with the errno. A worker thread of the broker needs the broker's GIL to start
the fdatasync and again to report back, and while the loop handles a window of frames it
holds the GIL for up to the switch interval each time; the helper has its own, so the
sync starts when asked and its end waits only for the loop to read one message, which
it does between the parts of a long read too (:meth:`GroupCommit.poll`). If the helper
dies, the syncs it had fail (their outcome is unknown: handled as below) and syncs run in
worker threads from then on; so they do where it cannot start, and for a test double of
the files (which syncs in this process).

A connection the broker closes needs its output out first: :meth:`GroupCommit.settle`
syncs in the loop's own thread and releases everything held.

A sync that fails (EIO) is reported with the client connections that had confirmations
in any held batch: none of those may be believed, so the shell closes them (as for a
failed write, output.py ``_journal_failed``); the rest of the held output is released.
A sync still running then proves nothing when it returns (after an EIO, Linux may have
marked the lost pages clean), and none starts by itself until :meth:`rebuild` has
written the journal afresh from the core's memory (the shell does so at once, then
every second while that fails, refusing durable sends meanwhile): what the failed sync
covered may be gone from the disk for good, and no later sync of that file would say so
(docs/journal.md, "After a failed sync").
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

from .journal import Journal, JournalError, OsFiles, SyncTicket
from .logs import log
from .snapshot import QueueSnapshot
from .syncers import ProcessSyncer, ThreadSyncer

__all__ = ["GroupCommit"]

T = TypeVar("T")  # a held batch of output, as the shell makes it

# Syncs in flight at once (so many threads in the helper, or worker threads). fdatasync
# makes durable what was written before it was called, so a later one that returns first
# covers the earlier one's bytes too. Two overlap the disk's latency with the next
# turn's: measured on this project's machine (ext4 on a virtual disk), write + fdatasync
# in one thread took 3.6 ms (p50) and in each of two threads at once 0.12 ms
# (docs/journal.md).
MAX_RUNNING = 2


class GroupCommit(Generic[T]):
    """One journal's syncs. ``release(batch)`` writes held output; ``failed(error,
    confirmed, batches)`` handles a failed sync; ``done()`` runs after each sync ends
    (the shell's flush: it starts the next sync, or writes what waited)."""

    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop,
                 release: Callable[[T], None],
                 failed: Callable[[JournalError, set[int], list[T]], None],
                 done: Callable[[], None]) -> None:
        self.journal = journal
        self.loop = loop
        self._release = release
        self._failed = failed
        self._done = done
        self._running: list[SyncTicket] = []  # oldest first
        # Tickets begun before a sync failed: their success proves nothing (after an
        # EIO, Linux may have marked the lost pages clean), so it is not counted.
        self._tainted: set[int] = set()  # id() of such tickets
        self._after: dict[int, Callable[[], None]] = {}  # ticket id -> called once it ends
        # (journal position, output, connections confirmed in it), oldest first
        self._held: deque[tuple[int, T, set[int]]] = deque()
        self.syncs = 0  # fdatasyncs begun (for statistics and tests)
        self._helper_lost = False  # the fsync helper died once: threads from then on
        self._syncer: ProcessSyncer | ThreadSyncer = self._new_syncer()
        # After a failed sync, until rebuild() succeeds (the shell tries at once, then
        # every second): no sync starts by itself and no output waits (no durable send is
        # confirmed).
        self.broken = False

    def _new_syncer(self) -> ProcessSyncer | ThreadSyncer:
        """The fsync helper for a journal on real files (unless one has died: module
        docstring), else worker threads (a test double of the files syncs in process)."""
        if type(self.journal.files) is OsFiles and not self._helper_lost:
            try:
                return ProcessSyncer(self.loop, self._ended, MAX_RUNNING)
            except OSError as exc:
                log.warning("journal: cannot start the fsync helper (%s); syncing in"
                            " threads of the broker", exc)
        return ThreadSyncer(self.journal, self.loop, self._ended, MAX_RUNNING)

    @property
    def running(self) -> bool:
        return bool(self._running)

    @property
    def waiting(self) -> bool:
        """Output must wait (``always``): a sync runs, or written bytes are not synced."""
        return not self.broken and (bool(self._running) or self.journal.unsynced
                                    or bool(self._held))

    def hold(self, batch: T, confirmed: set[int]) -> None:
        """Keep ``batch`` until what the journal has written so far is on disk; start a
        sync for it unless one that covers it runs, or ``MAX_RUNNING`` do."""
        self._held.append((self.journal.written, batch, confirmed))
        self._sync_written()

    def _sync_written(self) -> None:
        """Begin a sync if held output needs one that no running sync covers (records
        nobody waits for, e.g. acks, wait for the next sync someone needs)."""
        running, held = self._running, self._held
        if not self.broken and held and len(running) < MAX_RUNNING and held[-1][0] > (
                running[-1].written if running else self.journal.synced):
            self._begin()

    def sync_soon(self, after: Callable[[], None]) -> None:
        """Start a sync of what is written, outside the loop, and call ``after`` once
        it has ended; unless one runs already (then ``after`` is not called)."""
        if not self._running:
            self._after[id(self._begin())] = after

    def _begin(self) -> SyncTicket:
        syncer = self._syncer
        if not syncer.alive:  # the helper has gone (it said so, failing its syncs)
            self._helper_lost = True  # (and reaped: ProcessSyncer._lost)
            syncer = self._syncer = self._new_syncer()
        ticket = self.journal.begin_sync()
        self._running.append(ticket)
        self.syncs += 1
        syncer.start(ticket)
        return ticket

    def poll(self) -> None:
        """Hand back the syncs that have ended, now (the loop would at its next turn):
        the shell calls this in the middle of a long read (output.py)."""
        if self._running:
            self._syncer.poll()

    def _ended(self, ticket: SyncTicket, exc: BaseException | None) -> None:
        if ticket not in self._running:  # closed meanwhile
            return
        self._running.remove(ticket)
        after = self._after.pop(id(ticket), None)
        error = exc if isinstance(exc, OSError) else None
        if exc is not None and error is None:
            raise exc  # a bug: let the loop's exception handler see it
        if id(ticket) in self._tainted:  # its outcome was handled with the failure
            self._tainted.discard(id(ticket))
            self._end_quietly(ticket)
        else:
            try:
                self.journal.end_sync(ticket, error)
            except JournalError as failure:
                self._fail(failure)
            else:
                self._release_synced()
        if after is not None:
            after()
        self._done()
        self._sync_written()

    def _release_synced(self) -> None:
        synced, held = self.journal.synced, self._held
        while held and held[0][0] <= synced:
            self._release(held.popleft()[1])

    def _fail(self, error: JournalError, confirmed: set[int] | None = None) -> None:
        self.broken = True
        self._tainted.update(id(ticket) for ticket in self._running)
        held, self._held = list(self._held), deque()
        confirmed = set() if confirmed is None else set(confirmed)
        for _, _, conns in held:
            confirmed |= conns
        self._failed(error, confirmed, [batch for _, batch, _ in held])

    def settle(self, confirmed: set[int]) -> None:
        """Sync now, in this thread, and release everything held (before a close);
        ``confirmed``: connections confirmed in what was written since the last hold.

        Raises:
            JournalError: the sync failed (then ``failed`` has had the held output).
        """
        try:
            self.journal.sync()
        except JournalError as error:
            self._fail(error, confirmed)
            raise
        self.broken = False
        self._release_synced()

    def rebuild(self, queues: Iterable[QueueSnapshot]) -> None:
        """After a failed sync: write the journal afresh from ``queues`` (the core's
        ``durable_snapshot``; :meth:`~.journal.Journal.rebuild`), which syncs it; then
        syncs start by themselves again.

        Raises:
            JournalError: the rebuild failed (the journal stays damaged; try later).
        """
        self.journal.rebuild(queues)
        self.broken = False
        self._release_synced()

    def close(self) -> None:
        """Wait for running syncs (the helper's exit, or the worker threads); drop what
        is held (the shell closes the connections it was for)."""
        self._syncer.close()
        running, self._running = self._running, []
        for ticket in running:
            self._end_quietly(ticket)
        self._held.clear()

    def _end_quietly(self, ticket: SyncTicket) -> None:
        """End ``ticket`` without counting its bytes as synced (its outcome is unknown or
        proves nothing; a later sync, or the rebuild, covers them)."""
        self.journal.abandon_sync(ticket)
