"""Where the journal's fdatasyncs run for group commit (commit.py): in the fsync helper
process (:class:`ProcessSyncer`, the journal on real files) or in worker threads of the
broker (:class:`ThreadSyncer`: a test double of the files, or no helper to be had).

Both take a :class:`~.journal.SyncTicket` with :meth:`start` and hand it back with the
outcome to ``ended(ticket, error)``, in the loop: ``error`` is the fdatasync's OSError,
or None. :meth:`poll` hands back every sync that has ended, at once; the loop calls it by
itself as well (the helper's socket is readable, or a thread calls it soon), so the shell
polls only to hear of a sync in the middle of a long read (output.py
``_confirm_early``). :meth:`close` waits for the syncs that run and forgets those not
handed back (commit.py ends them without counting their bytes).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from . import fsync_helper
from .journal import Journal, SyncTicket
from .logs import log

__all__ = ["HELPER_START_TIMEOUT", "ProcessSyncer", "ThreadSyncer"]

Ended = Callable[[SyncTicket, BaseException | None], None]

# How long the broker waits for a new helper to say it is ready (it imports only the
# standard library: ~30 ms here) before it syncs in threads instead.
HELPER_START_TIMEOUT = 10.0


class ThreadSyncer:
    """fdatasyncs in up to ``threads`` worker threads of this process (``sync_file``
    of the journal, so a test double of its files sees them)."""

    alive = True  # (a thread pool does not die)

    def __init__(self, journal: Journal, loop: asyncio.AbstractEventLoop, ended: Ended,
                 threads: int) -> None:
        self._journal = journal
        self._loop = loop
        self._ended = ended
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="aiobus-fsync")
        self._finished: deque[tuple[SyncTicket, BaseException | None]] = deque()

    def start(self, ticket: SyncTicket) -> None:
        self._executor.submit(self._sync, ticket)

    def _sync(self, ticket: SyncTicket) -> None:
        """In the worker thread: the fdatasync, then a call of :meth:`poll` in the loop
        (one hop: the held confirmations wait for the loop anyway)."""
        try:
            self._journal.sync_file(ticket)
        except BaseException as exc:  # (an OSError is the sync's; else a bug, raised there)
            error: BaseException | None = exc
        else:
            error = None
        self._finished.append((ticket, error))
        try:
            self._loop.call_soon_threadsafe(self.poll)
        except RuntimeError:  # the loop is closed: close() has ended the ticket
            pass

    def poll(self) -> None:
        finished = self._finished
        while finished:
            self._ended(*finished.popleft())

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._finished.clear()


class ProcessSyncer:
    """fdatasyncs in the fsync helper, a child process serving up to ``threads`` at
    once (fsync_helper.py says why and how). ``alive`` turns False once the helper has
    gone (it was killed, say): every sync it had is handed back failed (whether it
    reached the disk is unknown), and the caller syncs another way from then on.

    Raises (on construction):
        OSError: the helper could not be started, or did not say it was ready.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, ended: Ended, threads: int) -> None:
        self._loop = loop
        self._ended = ended
        self._keys = itertools.count(1)
        self._waiting: dict[int, SyncTicket] = {}  # key -> ticket, sent to the helper
        self._noop: deque[SyncTicket] = deque()  # tickets with nothing to sync
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-I", "-S", fsync_helper.__file__, str(theirs.fileno()),
                 str(threads)],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            ours.settimeout(HELPER_START_TIMEOUT)
            ready = ours.recv(len(fsync_helper.READY))
            if ready != fsync_helper.READY:
                raise OSError(errno.EPROTO, f"the fsync helper said {ready!r}, not ready"
                              f" (exit status {self.process.poll()})")
            ours.setblocking(False)
        except BaseException:
            ours.close()
            self._reap()
            raise
        self._sock = ours
        self.alive = True
        loop.add_reader(ours.fileno(), self.poll)

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self, ticket: SyncTicket) -> None:
        if ticket.handle < 0:  # nothing written since the last sync: nothing to do
            self._noop.append(ticket)
            self._loop.call_soon(self.poll)
            return
        key = next(self._keys)
        self._waiting[key] = ticket
        try:
            socket.send_fds(self._sock, [fsync_helper.REQUEST.pack(key)], [ticket.handle])
        except OSError as exc:  # (a helper that died: EPIPE, ECONNRESET)
            self._loop.call_soon(self._lost, exc)

    def poll(self) -> None:
        noop = self._noop
        while noop:
            self._ended(noop.popleft(), None)
        if not self.alive:
            return
        waiting = self._waiting
        while waiting:
            try:
                data = self._sock.recv(fsync_helper.REPLY.size)
            except BlockingIOError:
                return
            except OSError as exc:
                self._lost(exc)
                return
            if len(data) != fsync_helper.REPLY.size:  # b"": the helper has gone
                self._lost(None)
                return
            key, code = fsync_helper.REPLY.unpack(data)
            ticket = waiting.pop(key, None)
            if ticket is not None:
                self._ended(ticket, OSError(code, os.strerror(code)) if code else None)

    def _lost(self, exc: OSError | None) -> None:
        """The helper has gone: the syncs it had fail (their outcome is unknown)."""
        if not self.alive:
            return
        self.alive = False
        self._close_socket()
        # Its end of the socket closes as it exits (EOF, or ECONNRESET with a request
        # unread): the exit status follows at once, or nearly.
        try:
            status = self.process.wait(1.0)
        except subprocess.TimeoutExpired:  # (then its socket failed, not the process)
            status = None
        why = f"the fsync helper (pid {self.process.pid}) " + (
            f"exited with status {status}" if status is not None
            else f"stopped answering ({exc}); killed")
        if status is None:
            self.process.kill()
            self.process.wait()
        log.error("journal: %s; syncing in threads of the broker from now on", why)
        waiting, self._waiting = self._waiting, {}
        for ticket in waiting.values():
            self._ended(ticket, OSError(errno.EIO, why))

    def _close_socket(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    def _reap(self) -> int:
        """Wait for the helper to exit (killed after 5 s); its exit status."""
        try:
            return self.process.wait(5.0)
        except subprocess.TimeoutExpired:  # (it only ever waits for one fdatasync)
            self.process.kill()
            return self.process.wait()

    def close(self) -> None:
        """Close the helper's socket, which ends it, and wait for it (and so for the
        fdatasync it may be in)."""
        if self.alive:
            self.alive = False
            self._close_socket()
        self._reap()
        self._waiting.clear()
        self._noop.clear()
