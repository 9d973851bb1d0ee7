"""The broker shell's output: the core's ``Sink``, and the flush at the end of a loop turn.

Frames the core wants written are packed into the connection's output list
(connection.py), and one ``call_soon`` callback per loop iteration flushes every
connection that has output (redis' ``putClientInPendingWriteQueue``), so a burst of
deliveries leaves in one write. A connection with 256 KiB due is written before the turn
ends, and one whose client reads too slowly is reported to the core as congested.

Journal (durable queues, with a data directory): the core appends records to the
journal's buffer as it changes durable queues; the flush at the end of the loop turn
first writes them (one write). With ``fsync="always"`` it then holds the output of each
connection with a reply in it until an fdatasync covering that write has returned (up to
two run at once, in the fsync helper process, while the loop goes on: group commit,
commit.py), so no confirmation leaves before its record is on disk; deliveries and
events leave at once. A long read is flushed so in parts (``_confirm_early``).
``"batch"`` writes the output at once and fdatasyncs every ``fsync_interval`` seconds
outside the loop, ``"never"`` leaves it to the OS (docs/journal.md, README
"Durability").
A write that fails is handled here (``_journal_failed``); the rest of the journal's
wiring (opening it, failed syncs, the retry, the periodic sync) is durable.py's.

``_Output`` is the innermost of the :class:`~.server.Broker`'s bases (``Broker`` ->
``_Shutdown`` -> ``_Durable`` -> ``_Output``, one class in the end, so the hot path gains
no call and no attribute lookup).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgpack

from ..protocol import Op
from .commit import GroupCommit
from .connection import _Connection
from .core import BrokerCore
from .journal import Journal, JournalError
from .logs import _RateLimitedLog, log

__all__: list[str] = []

_EARLY_FLUSH = 256 * 1024  # bytes of output that are written before the loop turn ends
_EVENTS_MAX = 1024  # EVENTs merged into one EVENTS frame at most


class _Output:
    """What the core asks of the shell (its ``Sink``), and the end-of-turn flush."""

    # Set by Broker.start (server.py):
    core: BrokerCore
    loop: asyncio.AbstractEventLoop

    def __init__(self, fsync: str, max_pending_output: int) -> None:
        # (Here, not in Broker.__init__, so that mypyc knows them always set: no check
        # per access on the hot path.)
        self.fsync = fsync
        self.max_pending_output = max_pending_output
        self.journal: Journal | None = None
        # With a journal: its syncs, and (fsync "always") each turn's output held until
        # its records are on disk, as (connection, frames) pairs (commit.py)
        self._commit: GroupCommit[list[tuple[_Connection, list[bytes]]]] | None = None
        # A long read is fed in parts, _confirm_early between them (set with a journal
        # and fsync "always": elsewhere nothing waits for a sync, so parts gain nothing)
        self.confirm_in_parts = False
        self._journal_log = _RateLimitedLog(burst=3, period=60.0)
        self._conns: dict[int, _Connection] = {}
        self._dirty: list[_Connection] = []
        self._flush_scheduled = False
        self._packb = msgpack.Packer().pack
        self._close_log = _RateLimitedLog()

    def _retry_journal(self) -> None:
        """Try to write the journal again (durable.py's ``_Durable`` overrides this)."""
        raise NotImplementedError

    # -- the journal's write, first thing in a flush ----------------------------------

    def _write_journal(self) -> set[int]:
        """Write the turn's journal records; returns the connections that got a
        confirmation of a durable send since the last write (with ``"always"`` their
        output is held until the records are synced, see :meth:`_flush`).

        If the write fails (ENOSPC, EIO), those confirmations must not go out: see
        :meth:`_journal_failed`; the records stay buffered and are retried each turn and
        every second."""
        journal = self.journal
        assert journal is not None
        queues = self.core.queues
        confirmed, queues.journaled_confirms = queues.journaled_confirms, set()
        try:
            journal.write()
        except JournalError as exc:
            self._journal_failed(exc, confirmed)
            return set()
        if queues.journal_error is not None and not journal.damaged and (
                self.fsync != "always" or not journal.unsynced):
            log.warning("journal: writable again; accepting sends to durable queues")
            queues.journal_error = None
        return confirmed

    def _journal_failed(self, exc: JournalError, confirmed: set[int]) -> None:
        """A write or (``"always"``) a sync failed: each connection in ``confirmed`` got
        a confirmation that must not go out, so it loses its pending output and is closed
        with CLOSE ``journal`` (its client sees those sends fail). Until the journal can
        be written and synced again, sends to durable queues are refused with ERROR
        ``journal``; everything else carries on."""
        queues = self.core.queues
        if queues.journal_error is None:
            log.error("journal: %s; refusing sends to durable queues until it can be"
                      " written again", exc)
            if self.journal is not None and self.journal.damaged:
                # A failed sync: rebuild from memory at once (the next loop iteration),
                # not a second later: until the rebuild, a crash would meet the damaged
                # range at the restart. (A failed write waits: retrying a full disk at
                # once would fail again.) If it fails, the retry is every second.
                self.loop.call_soon(self._retry_journal)
            else:
                self.loop.call_later(1.0, self._retry_journal)
        queues.journal_error = exc.cause or "error"
        for conn_id in confirmed:
            conn = self._conns.get(conn_id)
            if conn is not None and not conn.closing:
                conn.out, conn.out_bytes, conn.ok_last = [], 0, 0
                conn.events = []
                self.close(conn_id, "journal", "the broker could not write its journal"
                           f" ({queues.journal_error}): its last sends were not confirmed")

    def _connected(self, conn_id: int) -> None:
        """The handshake is done (the core sends WELCOME): the client's name is known."""
        conn, peer = self._conns.get(conn_id), self.core.connection(conn_id)
        if conn is None or peer is None:
            return
        conn.client_name = peer.name
        log.debug("connection %d: client %r connected (pid %d, uid %d)", conn_id, peer.name,
                  conn.pid, conn.uid, extra=self._about(conn))

    @staticmethod
    def _about(conn: _Connection) -> dict[str, Any]:
        """A connection's fields for a log record (``--log-format json`` shows them)."""
        return {"conn": conn.id, "client": conn.client_name, "pid": conn.pid, "uid": conn.uid}

    # -- Sink: what the core asks for -----------------------------------------------

    def send(self, conn_id: int, frame: list[Any]) -> None:
        if frame[0] == Op.WELCOME:  # (not the hot path: DELIVERs and OKs go elsewhere)
            self._connected(conn_id)
        conn = self._conns.get(conn_id)
        if conn is not None:
            conn.replied = True
        self.send_raw(conn_id, self._packb(frame))

    def send_raw(self, conn_id: int, data: bytes) -> None:
        """Queue encoded bytes for ``conn_id``; all connections with output are flushed
        by one callback per loop iteration."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.closing:
            return
        if conn.ok_last or conn.events or not conn.out:  # call only when there is work
            self._make_room(conn)
        conn.out.append(data)
        conn.out_bytes += len(data)
        if conn.out_bytes >= _EARLY_FLUSH:
            # Hand it to the transport now: past its high-water mark the transport calls
            # pause_writing at once, and the frames this client pipelined after the ones
            # being answered wait in the backlog instead of growing this buffer.
            self._flush_one(conn)

    def confirm(self, conn_id: int, rid: int) -> None:
        """OK for ``rid``, merged with the confirmations just before it if their rids are
        consecutive and nothing else was written between them."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.closing:
            return
        conn.replied = True
        last = conn.ok_last
        if last and rid == last + 1:
            conn.ok_last = rid
            return
        self._make_room(conn)
        conn.ok_first = conn.ok_last = rid

    def event(self, conn_id: int, sid: int, message: bytes, dropped: int) -> None:
        """An EVENT, merged with the EVENTs just before it when they are for the same
        subscription, nothing was dropped in between and the run is not yet long."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.closing:
            return
        events = conn.events
        if events and sid == conn.events_sid and not dropped and len(events) < _EVENTS_MAX:
            events.append(message)
        else:
            self._make_room(conn)
            conn.events.append(message)
            conn.events_sid, conn.events_dropped = sid, dropped
        conn.out_bytes += len(message)
        if conn.out_bytes >= _EARLY_FLUSH:
            self._flush_one(conn)
            self._check_output(conn)

    def _check_output(self, conn: _Connection) -> None:
        """Past ``max_pending_output`` bytes unread (in the transport's buffer; this is
        called right after a flush), tell the core: it holds the connection's events
        and consumers until ``resume_writing`` says the buffer drained. Called in
        the middle of a fan-out too, so the next subscription of a 100 that match sees
        it (issue 12: one 3.1 MB publish had cost +314 MB)."""
        transport = conn.transport
        if (conn.congested or transport is None
                or transport.get_write_buffer_size() <= self.max_pending_output):
            return
        conn.congested = True
        self.core.set_congested(conn.id, True, self.loop.time())

    def _make_room(self, conn: _Connection) -> None:
        """Before a new frame or run: write the open run as its frame (the connection is
        dirty already), or mark the connection dirty if nothing waits to be written."""
        if conn.ok_last:
            conn.end_range()
        elif conn.events:
            conn.end_events()
        elif not conn.out:
            self._mark_dirty(conn)

    def _mark_dirty(self, conn: _Connection) -> None:
        """``conn`` has output from now on: flush it at the end of this loop turn."""
        self._dirty.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _flush_one(self, conn: _Connection, *, settle: bool = False) -> None:
        """Write ``conn``'s output now (before the turn ends): the journal first (unless
        it is failing: then no durable send was confirmed, see _journal_failed). With
        ``"always"``, replies wait for their sync (see :meth:`_flush`): this writes
        nothing then, unless ``settle`` (a close), which syncs in this thread first."""
        journal = self.journal
        if journal is not None:
            commit = self._commit
            failing = self.core.queues.journal_error is not None
            if self.fsync != "always" or commit is None:
                if journal.pending and not failing:
                    self._write_journal()
            elif (journal.pending and not failing) or commit.waiting:
                if settle:
                    confirmed = (self._write_journal() if journal.pending and not failing
                                 else set())
                    try:
                        commit.settle(confirmed)
                    except JournalError:
                        if conn.closing:  # closed by _journal_failed, its output dropped
                            return
                elif conn.replied or conn.held:
                    return
        conn.flush()

    def _confirm_early(self) -> None:
        """Between the parts of a long read (connection.py ``_feed_in_parts``): with
        ``"always"``, once the read has confirmed durable sends, flush now, as at the end
        of the turn (the records written, their sync started, the confirmations held
        for it), having first released what syncs ended meanwhile. A producer that
        pipelines a window of sends in one write then gets the first confirmations
        while the broker handles the rest, and refills its window, instead of the two
        taking turns a whole window at a time (docs/performance.md, "Confirming a
        window in parts"). The end-of-turn flush stays scheduled."""
        commit = self._commit
        queues = self.core.queues
        if commit is not None and self._flush_scheduled and queues.journaled_confirms:
            commit.poll()  # (a sync that ended flushes, as at the end of a turn)
            if queues.journaled_confirms:  # (else that flush wrote them)
                self._flush()
            self._flush_scheduled = True

    def _flush(self) -> None:
        """The end of a loop turn: write the journal, then the output. With ``"always"``
        the output of each connection with a reply in it (an OK may confirm a durable
        send) is held until a sync covering this write has returned (commit.py), and so
        is everything after it on that connection; connections that only receive
        deliveries and events get them now (as RabbitMQ delivers a persistent message
        before its publisher confirm: a consumer may see a message the broker has not
        confirmed, never the other way round)."""
        self._flush_scheduled = False
        commit = self._commit
        if commit is not None:
            journal = commit.journal
            confirmed = self._write_journal() if journal.pending else set()
            if self.fsync == "always" and commit.waiting:
                dirty, self._dirty = self._dirty, []
                batch = []
                for conn in dirty:
                    if conn.replied or conn.held:
                        conn.held += 1
                        batch.append((conn, conn.take_output()))
                    else:
                        conn.flush()
                        if "write" in conn.paused_by:
                            self._check_output(conn)
                if batch or (journal.unsynced and not commit.running):
                    # (records nobody waits for, acks say, get a sync of their own only
                    # when none runs: else they ride along with the next one needed)
                    commit.hold(batch, confirmed)
                try:
                    journal.compact()  # (copies, written next turn, synced after)
                except JournalError as exc:
                    self._journal_log.warning(self.loop.time(), "journal: %s", exc)
                return
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            self._flush_one(conn)
            if "write" in conn.paused_by:  # over the high-water mark: maybe over the bound
                self._check_output(conn)

    def close(self, conn_id: int, code: str, message: str) -> None:
        conn = self._conns.get(conn_id)
        if conn is None or conn.closing:
            return
        conn.close_reason = f"closed by the broker: {code}: {message}"
        if code != "shutdown":
            # A misbehaving client, not a broker fault: INFO, and rate-limited (a client
            # reconnecting in a loop with bad frames must not flood the log).
            self._close_log.log(logging.INFO, self.loop.time(),
                                "closing connection %d (client %r, pid %d, uid %d): %s: %s",
                                conn_id, conn.client_name, conn.pid, conn.uid, code, message,
                                extra=self._about(conn))
        self._make_room(conn)
        conn.out.append(self._packb([Op.CLOSE, code, message]))
        self._flush_one(conn, settle=True)
        conn.closing = True
        if conn.transport is not None:
            conn.transport.close()  # flushes what is buffered, then connection_lost
        self.core.close(conn_id, code, message)

    def set_reading(self, conn_id: int, reading: bool) -> None:
        conn = self._conns.get(conn_id)
        if conn is None:
            return
        if reading:
            conn._resume("core")
        else:
            conn._pause("core")
