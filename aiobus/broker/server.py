"""The asyncio shell around :class:`BrokerCore`: the :class:`Broker` serving a Unix socket.

The shell is in six modules, one class in the end (``Broker`` -> ``_Shutdown`` ->
``_Durable`` -> ``_Output``, so the hot path gains no call layer):

* connection.py: a client's ``asyncio.Protocol``; it feeds received frames to the core
  synchronously in ``data_received`` (no task per connection, none per message) and
  stops reading for backpressure;
* output.py: what the core writes, merged and flushed once per loop turn, after the
  turn's journal records (a failed write closes who it confirmed; with
  ``fsync="always"``, replies are held for their sync);
* durable.py: the journal: the data directory's lock, replay, failed syncs and the
  rebuild after one, the retry, the periodic sync;
* shutdown.py: ``aclose``, the graceful shutdown and its drain;
* logs.py: the one logger name all of them log under, and its rate limit;
* here: the Broker's lifecycle (binding the socket, recovering the journal before
  serving, ``serve``), its connections and timers.

Timers: the core schedules deadlines on its clockless heap; the shell keeps one
``loop.call_at`` armed for the earliest and calls ``core.tick`` when it fires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import stat
import time

import anyio
from anyio.abc import TaskStatus

from .._paths import check_private_directory, is_explicit, resolve_socket_path
from ..errors import BusError
from ..protocol import DEFAULT_MAX_FRAME
from ..stats import BrokerStats
from .commit import GroupCommit
from .connection import _Connection
from .core import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONSUMERS, BrokerCore
from .durable import DataDirInUse
from .logs import _RateLimitedLog, log
from .monitor import LoopLagMonitor
from .policy import Policy
from .settings import (
    DEFAULT_DEDUP_SIZE,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_BUFFERED_BYTES_PER_UID,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_MAX_PARKED_BYTES,
    DEFAULT_MAX_PARKED_BYTES_PER_UID,
    DEFAULT_MAX_PENDING_OUTPUT,
    DEFAULT_MAX_QUEUED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUES_PER_UID,
    DEFAULT_MAX_SUBSCRIPTIONS_PER_UID,
    DEFAULT_MAX_UNACKED_PER_UID,
    check_dedup,
)
from .shutdown import _Shutdown

__all__ = ["FSYNC_POLICIES", "Broker", "BrokerAlreadyRunning", "DataDirInUse"]

FSYNC_POLICIES = ("always", "batch", "never")

# The listen backlog: a burst of clients connecting at once (1,000 in a test) queues here
# while the loop accepts; nginx and redis default to 511, the Linux cap
# (net.core.somaxconn) is 4,096 since 5.4. A full backlog makes a Unix-socket connect
# fail with EAGAIN, which the client retries until its connect timeout.
DEFAULT_BACKLOG = 1024


class BrokerAlreadyRunning(BusError):
    """A live broker already listens on the socket path."""

    code = "already-running"


class Broker(_Shutdown):
    """An aiobus broker serving a Unix socket from the running event loop.

    The ``aiobus-broker`` daemon runs exactly this; applications and tests embed it.

    Args:
        path: socket path; default ``$AIOBUS_SOCKET``, else
            ``$XDG_RUNTIME_DIR/aiobus.sock``, else ``/tmp/aiobus-<uid>/aiobus.sock``. A
            default path's directory must be private to this user (created 0700 if
            missing), else ``start`` raises PermissionError.
        socket_mode: permission bits of the socket file (default owner-only, 0o600).
        max_frame: largest frame accepted, in bytes (default 16 MiB).
        handshake_timeout: seconds a new connection has to send HELLO.
        max_consumers: consumers one connection may hold (default 4,096); one more is
            refused with ``QuotaExceeded``.
        max_pending_output: bytes written to a connection and not yet read by it, over
            all its subscriptions and consumers, above which its subscriptions act as if
            out of credit (events wait, then their policy applies) and its consumers get
            nothing new, until it has read its backlog (default 4 MiB).
        max_parked_bytes: bytes of a connection's SENDs parked on full ``block`` queues
            at which the broker stops reading it until half are admitted (default
            32 MiB; 256 parked SENDs do the same).
        max_connections_per_uid, max_queues_per_uid, max_subscriptions_per_uid: what the
            clients of one uid (their peer credentials) may hold at once (defaults 1,024,
            10,000 and 10,000): one more connection is closed with CLOSE
            ``quota-exceeded``, one more queue or subscription is refused with
            ``QuotaExceeded``. Queues created by use that stay empty and unused are
            removed by a sweep every 60 s (README "Defaults").
        max_unacked_per_uid: unacked messages the consumers of one uid may hold, counted
            as the sum of their prefetch (default 1,000,000): a CONSUME past it is refused
            with ``QuotaExceeded``.
        max_queued_bytes_per_uid: bytes the messages in the queues one uid's clients
            created may hold (ready, delayed and leased; each its encoded size plus 64),
            default 4 GiB: a SEND past it is refused with ``QuotaExceeded``.
        max_parked_bytes_per_uid: ``max_parked_bytes`` over all the connections of one
            uid (default 256 MiB): a SEND that would park past it is refused with
            ``QuotaExceeded``.
        max_buffered_bytes_per_uid: bytes of incomplete frames (still arriving) the
            broker holds for the connections of one uid (default 1 GiB); a read past it
            closes that connection with CLOSE ``quota-exceeded``.
        backlog: the listening socket's backlog (default 1,024; Linux caps it at
            ``net.core.somaxconn``).
        data_dir: where durable queues are journaled (created 0700; one broker at a
            time, guarded by a lock file); None (default): no journal, and declaring a
            queue ``durable=True`` is refused. The ``aiobus-broker`` daemon always has
            one (``--data-dir``).
        fsync: ``"always"`` (a durable send is confirmed once its record is on disk),
            ``"batch"`` (fdatasync every ``fsync_interval`` seconds; confirmed once
            written) or ``"never"`` (written; the OS syncs when it likes).
        repair: on a damaged journal segment, move it aside, log which messages
            were lost and start, instead of refusing to start.
        drain_timeout: seconds :meth:`aclose` gives consumers to answer the leases they
            hold before it closes their connections (default 5).
        dedup_window, dedup_size: each queue's deduplication window of resent SENDs
            (PROTOCOL.md §8 "Resends and deduplication"): ids accepted in the last
            ``dedup_window`` seconds (default 120), at most ``dedup_size`` of them
            (default 100,000); 0 for either turns it off.
        sock: an already listening Unix socket to serve instead of binding ``path``
            (systemd socket activation); the broker then does not remove any file.
        http: ``"HOST:PORT"`` (or ``"PORT"``: on 127.0.0.1) for :meth:`serve` to serve
            ``/metrics`` (Prometheus) and the web dashboard on, with an admin token
            written to ``<socket>.token`` (mode 0600); None (default): no HTTP. Needs the
            optional extra ``aiobus-ipc[web]`` (README "Metrics and dashboard").

    Raises (from ``start`` / ``async with``):
        BrokerAlreadyRunning: a live broker answers on ``path``.
        OSError: the path cannot be bound (missing directory, permissions).

    Example::

        async with aiobus.Broker(path="/tmp/demo.sock"):
            async with aiobus.connect("/tmp/demo.sock") as bus:
                await bus.send("jobs", b"hello")
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        socket_mode: int = 0o600,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_consumers: int = DEFAULT_MAX_CONSUMERS,
        max_pending_output: int = DEFAULT_MAX_PENDING_OUTPUT,
        max_parked_bytes: int = DEFAULT_MAX_PARKED_BYTES,
        max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID,
        max_queues_per_uid: int = DEFAULT_MAX_QUEUES_PER_UID,
        max_subscriptions_per_uid: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_UID,
        max_unacked_per_uid: int = DEFAULT_MAX_UNACKED_PER_UID,
        max_queued_bytes_per_uid: int = DEFAULT_MAX_QUEUED_BYTES_PER_UID,
        max_parked_bytes_per_uid: int = DEFAULT_MAX_PARKED_BYTES_PER_UID,
        max_buffered_bytes_per_uid: int = DEFAULT_MAX_BUFFERED_BYTES_PER_UID,
        backlog: int = DEFAULT_BACKLOG,
        sock: socket.socket | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        fsync: str = "always",
        fsync_interval: float = 0.1,
        repair: bool = False,
        drain_timeout: float = 5.0,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        dedup_size: int = DEFAULT_DEDUP_SIZE,
        policy: Policy | None = None,
        socket_group: int | None = None,
        http: str | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        self.dedup_window, self.dedup_size = check_dedup(dedup_window, dedup_size)
        super().__init__(data_dir, fsync, fsync_interval, repair, max_pending_output)
        self.path = resolve_socket_path(path) if sock is None else None
        self._default_path = sock is None and not is_explicit(path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.policy = policy  # None: whoever can open the socket may do everything
        self._denied_log = _RateLimitedLog()
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_consumers = max_consumers
        self.max_parked_bytes = max_parked_bytes
        self.max_connections_per_uid = max_connections_per_uid
        self.max_queues_per_uid = max_queues_per_uid
        self.max_subscriptions_per_uid = max_subscriptions_per_uid
        self.max_unacked_per_uid = max_unacked_per_uid
        self.max_queued_bytes_per_uid = max_queued_bytes_per_uid
        self.max_parked_bytes_per_uid = max_parked_bytes_per_uid
        self.max_buffered_bytes_per_uid = max_buffered_bytes_per_uid
        self._uid_buffered: dict[int, int] = {}  # bytes of incomplete frames, per uid
        self.backlog = backlog
        self.drain_timeout = drain_timeout
        self._drained: asyncio.Event | None = None  # while shutting down: no lease held
        self._sock = sock
        self._next_conn = 1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: asyncio.AbstractServer | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._closed = asyncio.Event()
        self._all_gone = asyncio.Event()
        self.monitor = LoopLagMonitor()
        # The HTTP listener's address (metrics and dashboard, aiobus.web; run by serve())
        # and once it listens, its URL and the file holding its admin token.
        self.http = http
        self.http_url: str | None = None
        self.token_path: str | None = None

    # -- lifecycle ------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the socket and start serving. Returns once clients can connect."""
        self.loop = asyncio.get_running_loop()
        if self.path is not None and self._default_path:
            # A default path must be in a directory nobody else can write to: else
            # another user could bind it first, or replace this broker's socket later.
            check_private_directory(os.path.dirname(self.path), create=True)
        if self.path is not None:
            _remove_stale_socket(self.path)  # a live broker there: say so before the journal
        recovered = self._open_journal() if self.data_dir is not None else None
        self.core = BrokerCore(
            self,
            id_prefix=secrets.token_hex(4),
            wall_offset=time.time() - self.loop.time(),
            max_frame=self.max_frame,
            handshake_timeout=self.handshake_timeout,
            max_consumers=self.max_consumers,
            max_parked_bytes=self.max_parked_bytes,
            max_connections_per_uid=self.max_connections_per_uid,
            max_queues_per_uid=self.max_queues_per_uid,
            max_subscriptions_per_uid=self.max_subscriptions_per_uid,
            max_unacked_per_uid=self.max_unacked_per_uid,
            max_queued_bytes_per_uid=self.max_queued_bytes_per_uid,
            max_parked_bytes_per_uid=self.max_parked_bytes_per_uid,
            journal=self.journal,
            dedup_window=self.dedup_window,
            dedup_size=self.dedup_size,
            policy=self.policy,
            on_denied=self._log_denied,
            process_stats=self.monitor.process_stats,
        )
        self.monitor.start(self.loop)
        if recovered is not None:  # replay, then serve: no client sees a half-loaded queue
            assert self.journal is not None
            self._commit = GroupCommit(self.journal, self.loop, self._release_output,
                                       self._sync_failed, self._flush)
            self.confirm_in_parts = self.fsync == "always"
            self.core.restore(recovered, self.loop.time())
            self._after_events()
            if self.fsync != "always":
                self._sync_timer = self.loop.call_later(self._sync_every(), self._batch_sync)
        try:
            sock = self._sock if self._sock is not None else self._bind()
        except BaseException:
            self._close_journal()
            raise
        self._server = await self.loop.create_unix_server(self._new_connection, sock=sock,
                                                          backlog=self.backlog)
        log.info("aiobus broker listening on %s (pid %d)", self.path or "inherited socket",
                 os.getpid())

    def _bind(self) -> socket.socket:
        assert self.path is not None
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the file is born owner-only; no window of 0o777
        try:
            sock.bind(self.path)
        except OSError:
            sock.close()
            raise
        finally:
            os.umask(old_umask)
        if self.socket_group is not None:  # before the mode opens it to that group
            os.chown(self.path, -1, self.socket_group)
        if self.socket_mode != 0o600:
            os.chmod(self.path, self.socket_mode)
        st = os.stat(self.path)
        self._socket_inode = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        return sock

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start, then serve until :meth:`aclose` has finished (cancelling this closes the
        broker too), with the broker's background services in a task group it owns: the
        HTTP listener for ``/metrics`` and the dashboard when ``http`` is set
        (:mod:`aiobus.web`, the optional extra ``aiobus-ipc[web]``). Reports readiness to
        ``task_group.start`` once clients can connect and the HTTP side listens.

        Raises:
            BusError: ``http`` is set and the ``web`` extra is not installed.
            (and what :meth:`start` raises)

        Example::

            broker = aiobus.Broker("/tmp/demo.sock", http="127.0.0.1:9180")
            async with anyio.create_task_group() as tg:
                await tg.start(broker.serve)
                ...
                await broker.aclose()  # serve() returns
        """
        serve_http = None
        if self.http is not None:
            from ..web import require  # fails here, naming the extra, before binding

            serve_http = require()
        await self.start()
        try:
            async with anyio.create_task_group() as services:
                if serve_http is not None:
                    await services.start(serve_http, self)
                task_status.started()
                await self.wait_closed()
                services.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def __aenter__(self) -> Broker:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def wait_closed(self) -> None:
        """Wait until :meth:`aclose` has finished."""
        await self._closed.wait()

    def stats(self) -> BrokerStats:
        """The same statistics a client gets from ``bus.stats()``."""
        return self.core.stats()

    def set_policy(self, policy: Policy | None) -> None:
        """Check requests against ``policy`` from now on (None: no checks beyond the
        socket's mode). Open connections stay; their cached answers are dropped."""
        self.policy = policy
        self.core.set_policy(policy)

    def _log_denied(self, conn: int, pid: int, uid: int, verb: str, name: str) -> None:
        self._denied_log.log(logging.INFO, self.loop.time(),
                             "connection %d (pid %d, uid %d): permission denied: %s %r",
                             conn, pid, uid, verb, name)

    # -- connections ----------------------------------------------------------------

    def _new_connection(self) -> _Connection:
        conn = _Connection(self, self._next_conn)
        self._next_conn += 1
        return conn

    def _connection_made(self, conn: _Connection, pid: int, uid: int, gid: int,
                         gids: tuple[int, ...] = ()) -> None:
        self._conns[conn.id] = conn
        conn.pid, conn.uid = pid, uid
        log.debug("connection %d opened by pid %d, uid %d", conn.id, pid, uid,
                  extra={"conn": conn.id, "pid": pid, "uid": uid})
        self.core.connect(conn.id, pid, uid, gid, self.loop.time(), gids)
        self._after_events()

    def _connection_lost(self, conn: _Connection) -> None:
        log.debug("connection %d: client %r disconnected (pid %d, uid %d) after %.1f s: %s",
                  conn.id, conn.client_name, conn.pid, conn.uid,
                  self.loop.time() - conn.opened, conn.close_reason or "closed by the client",
                  extra=self._about(conn))
        self._conns.pop(conn.id, None)
        self.core.disconnect(conn.id, self.loop.time())
        self._after_events()
        if not self._conns:
            self._all_gone.set()

    def _after_events(self) -> None:
        """Re-arm the timer if the core's earliest deadline moved; make sure journal
        records of this turn are written even when it wrote nothing to a client."""
        if self._drained is not None and not self.core.held_leases():
            self._drained.set()
        journal = self.journal
        if journal is not None and journal.pending and not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)
        deadline = self.core.next_deadline()
        if deadline is None or deadline == self._timer_at:
            return
        if self._timer_at is not None and self._timer_at <= deadline:
            return  # the armed timer fires first and re-arms
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = self._timer_at = None
        self.core.tick(self.loop.time())
        self._after_events()



def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead broker; refuse to replace a live one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise BusError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise BusError(f"cannot probe existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise BrokerAlreadyRunning(
        f"another broker is already listening on {path}; stop it first or use --socket"
    )
