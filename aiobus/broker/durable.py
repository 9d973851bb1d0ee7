"""The broker shell's journal wiring: the data directory, failures, the periodic sync.

With a data directory the broker locks it (one broker at a time), replays the journal
before it serves, and keeps it open for appending; output.py's flush writes each turn's
records, and here is what happens around that:

* a write that fails (ENOSPC, EIO; output.py ``_journal_failed``) or, with
  ``fsync="always"``, a sync that fails: the connections whose confirmations that
  covered lose them and are closed with CLOSE ``journal``; sends to durable queues are
  refused with ERROR ``journal`` until the journal can be written again, retried every
  second;
* after a failed sync, what it covered may be gone from the disk for good, so the
  journal is rebuilt from the core's memory (snapshot.py) before anything durable is
  confirmed again: at once, in the loop iteration after the failure, then every second
  while that fails (docs/journal.md, "After a failed sync");
* ``"batch"`` and ``"never"``: the periodic fdatasync, outside the loop (commit.py);
* at shutdown: what is buffered is written and synced, the lock released.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import time

from ..errors import BusError
from .commit import GroupCommit
from .connection import _Connection
from .journal import Journal, JournalError, OsFiles, Recovered
from .journal import repair as repair_journal
from .logs import log
from .output import _Output
from .snapshot import durable_snapshot

__all__ = ["DataDirInUse"]

_NEVER_SYNC_EVERY = 30.0  # seconds, with fsync="never" (see _Durable._sync_every)


class DataDirInUse(BusError):
    """Another broker holds the data directory (its lock file)."""

    code = "already-running"


class _Durable(_Output):
    """The journal's side of the :class:`~.server.Broker` (a base; see output.py)."""

    def __init__(self, data_dir: str | os.PathLike[str] | None, fsync: str,
                 fsync_interval: float, repair: bool, max_pending_output: int) -> None:
        super().__init__(fsync, max_pending_output)
        self.data_dir = os.fspath(data_dir) if data_dir is not None else None
        self.fsync_interval = fsync_interval
        self.repair = repair
        self._lock_fd = -1
        self._sync_timer: asyncio.TimerHandle | None = None

    def _open_journal(self) -> Recovered:
        """Lock the data directory, replay the journal, and keep it open for appending.

        Raises:
            DataDirInUse: another broker holds the directory.
            JournalCorrupt: a damaged segment (unless ``repair``).
            JournalError: the journal cannot be read.
        """
        assert self.data_dir is not None
        try:
            os.makedirs(os.path.join(self.data_dir, "journal"), mode=0o700, exist_ok=True)
            lock = os.open(os.path.join(self.data_dir, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot use data directory {self.data_dir}: {exc.strerror}",
                               file=exc.filename, cause="open") from exc
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(lock, 32).decode(errors="replace").strip() or "?"
            os.close(lock)
            raise DataDirInUse(f"data directory {self.data_dir} is in use by another broker"
                               f" (pid {holder}); give this one its own --data-dir") from None
        os.ftruncate(lock, 0)
        os.write(lock, f"{os.getpid()}\n".encode())
        self._lock_fd = lock
        directory = os.path.join(self.data_dir, "journal")
        files = OsFiles(directory)
        try:
            while True:
                try:
                    journal, recovered = Journal.open(files)
                    break
                except JournalError as exc:
                    if not self.repair or exc.cause != "corrupt" or exc.file is None:
                        raise
                    damage = repair_journal(files, exc.file)
                    log.error("journal segment %s was damaged at %s; moved aside to %s;"
                              " messages lost (queue, seq): %s", damage.file,
                              damage.damaged, damage.moved_to, damage.lost or "none")
        except BaseException:
            self._close_journal()
            raise
        self.journal = journal
        report = recovered.report
        if report.torn is not None:
            log.warning("journal: the last record of %s was torn by a crash at offset %d;"
                        " %d bytes dropped", report.torn.file, report.torn.offset,
                        report.torn.dropped)
        log.info("journal %s: recovered %d queues, %d messages, %d bytes in %.2f s",
                 directory, report.queues, report.messages, report.bytes, report.seconds)
        return recovered

    def _close_journal(self) -> None:
        """Write and sync what is buffered, close the journal, release the lock."""
        if self._sync_timer is not None:
            self._sync_timer.cancel()
            self._sync_timer = None
        commit, self._commit = self._commit, None
        if commit is not None:
            commit.close()  # (the connections its held output was for are closed)
        journal, self.journal = self.journal, None
        if journal is not None:
            try:
                if journal.damaged:  # a sync failed: what is on disk is not to be trusted
                    journal.rebuild(durable_snapshot(self.core.queues))
                journal.write()
                journal.sync()
            except JournalError as exc:
                log.error("journal: final write failed, unsynced records may be lost: %s",
                          exc)
            journal.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _sync_failed(self, exc: JournalError, confirmed: set[int],
                     held: list[list[tuple[_Connection, list[bytes]]]]) -> None:
        """A sync outside the loop failed (commit.py). ``"always"``: the held output
        of the connections in ``confirmed`` is dropped and they are closed, the rest is
        written; else (the periodic sync) logged, rate-limited."""
        if self.fsync != "always":
            if self.journal is not None and self.journal.damaged:  # (see _rebuild_journal)
                self._journal_failed(exc, set())
            else:
                self._journal_log.warning(self.loop.time(), "journal: %s", exc)
            return
        for batch in held:
            for conn, _ in batch:
                if conn.id in confirmed:
                    conn.held -= 1  # (its output is dropped: it is closed below)
            self._release_output([(conn, out) for conn, out in batch
                                  if conn.id not in confirmed])
        self._journal_failed(exc, confirmed)

    def _release_output(self, batch: list[tuple[_Connection, list[bytes]]]) -> None:
        """Write output that waited for a sync (commit.py), in the order it was held."""
        for conn, out in batch:
            conn.held -= 1
            if not conn.closing:
                conn.write_out(out)
                if "write" in conn.paused_by:
                    self._check_output(conn)

    def _retry_journal(self) -> None:
        """While the journal cannot be written: try again every second, even when idle;
        writable again once a write and a sync have succeeded, or, after a failed sync,
        once the journal is rebuilt (:meth:`_rebuild_journal`)."""
        journal, commit, queues = self.journal, self._commit, self.core.queues
        if journal is None or commit is None or queues.journal_error is None:
            return
        if journal.damaged:
            self._rebuild_journal(commit)
        else:
            confirmed = self._write_journal() if journal.pending else set()
            if not journal.pending:
                try:
                    commit.settle(confirmed)
                except JournalError:
                    pass  # _journal_failed has closed who must not believe a confirmation
                else:
                    if queues.journal_error is not None:
                        queues.journal_error = None
                        log.warning("journal: writable again; accepting sends to durable"
                                    " queues")
                    self._flush()
        if queues.journal_error is not None:
            self.loop.call_later(1.0, self._retry_journal)

    def _rebuild_journal(self, commit: GroupCommit[list[tuple[_Connection, list[bytes]]]]
                         ) -> None:
        """After a failed sync: what it covered may be lost from the disk for good (Linux
        may mark the failed pages clean: PostgreSQL's fsyncgate), and a restart would
        stop at the hole. So the journal is written afresh from what the core holds
        (snapshot.py), synced, and the old segments go (docs/journal.md, "After a failed
        sync"). Until then nothing durable is confirmed. In the loop: it writes every
        live durable message once (a few seconds for a million), on an error path."""
        queues = self.core.queues
        started = time.perf_counter()
        try:
            commit.rebuild(durable_snapshot(queues))
        except JournalError as exc:
            self._journal_log.warning(self.loop.time(), "journal: cannot rebuild: %s", exc)
            return
        queues.journal_error = None
        stats = commit.journal.statistics()
        log.warning("journal: rebuilt from memory after a failed sync (%d messages, %d bytes"
                    " in %.2f s), older segments removed; accepting sends to durable queues",
                    stats["live_messages"], stats["bytes"], time.perf_counter() - started)
        self._flush()

    def _batch_sync(self) -> None:
        """``batch``, ``never``: the periodic sync, outside the loop (commit.py); the
        next is timed from its end."""
        commit = self._commit
        if commit is None:
            return
        if self.journal is not None and self.journal.pending:
            self._flush()  # write what this turn has so far: the sync covers it too
        if commit.running:  # (not a timed one: the timer is armed only after those)
            self._sync_timer = self.loop.call_later(self._sync_every(), self._batch_sync)
            return
        commit.sync_soon(after=self._after_batch_sync)

    def _after_batch_sync(self) -> None:
        if self.journal is None:
            return
        try:
            self.journal.compact()
        except JournalError as exc:
            self._journal_log.warning(self.loop.time(), "journal: %s", exc)
        self._sync_timer = self.loop.call_later(self._sync_every(), self._batch_sync)

    def _sync_every(self) -> float:
        """``batch``: the interval asked for. ``never`` still syncs every 30 s (the Linux
        default for writing back dirty pages), only so that segments whose messages are
        all settled can be deleted safely; confirmations never wait for it."""
        return self.fsync_interval if self.fsync == "batch" else _NEVER_SYNC_EVERY
