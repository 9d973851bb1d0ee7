"""The asyncio shell around :class:`BrokerCore`: a Unix socket server and write flushing.

Per connection, an ``asyncio.Protocol`` feeds received bytes to a streaming msgpack
decoder and each complete frame to the core, synchronously, in ``data_received``: no
task per connection, none per message. Frames the core wants written are packed into
the connection's output list, and one ``call_soon`` callback per loop iteration flushes
every connection that has output (redis' ``putClientInPendingWriteQueue``), so a burst of
deliveries leaves in one write.

Backpressure: when a client does not read and its transport buffer passes the
high-water mark, the broker stops reading from it until it drains; the core itself stops
reading from a producer with too many sends parked on full queues. Frames already
decoded when reading stops wait in the connection's backlog, in order.

Timers: the core schedules deadlines on its clockless heap; the shell keeps one
``loop.call_at`` armed for the earliest and calls ``core.tick`` when it fires.

Journal (durable queues, with a data directory): the core appends records to the
journal's buffer as it changes durable queues; the flush at the end of the loop turn
first writes them (one write). With ``fsync="always"`` it then holds the output of each
connection with a reply in it until an fdatasync covering that write has returned (up to
two run at once, in worker threads, while the loop goes on: group commit, commit.py), so
no confirmation leaves before its record is on disk; deliveries and events leave at once.
``"batch"`` writes the output at once and fdatasyncs every ``fsync_interval`` seconds in
a worker thread, ``"never"`` leaves it to the OS (docs/journal.md, README "Durability").
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import secrets
import socket
import stat
import struct
import sys
import time
from typing import Any, cast

import anyio
import msgpack
from anyio.abc import TaskStatus

from .._paths import check_private_directory, is_explicit, resolve_socket_path
from ..errors import BusError, ProtocolError
from ..protocol import DEFAULT_MAX_FRAME, MAX_HELLO_FRAME, FrameDecoder, Op
from ..stats import BrokerStats
from .commit import GroupCommit
from .core import DEFAULT_HANDSHAKE_TIMEOUT, DEFAULT_MAX_CONSUMERS, BrokerCore
from .journal import Journal, JournalError, OsFiles, Recovered
from .journal import repair as repair_journal
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
from .snapshot import durable_snapshot

__all__ = ["FSYNC_POLICIES", "Broker", "BrokerAlreadyRunning", "DataDirInUse"]

FSYNC_POLICIES = ("always", "batch", "never")

log = logging.getLogger(__name__)

_CRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
# SO_PEERGROUPS (Linux 4.13; the socket module has no name for it): the peer's
# supplementary groups at connect, an array of gid_t. 64 fit the first try; ERANGE asks for
# more (NGROUPS_MAX is 65,536).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59 if sys.platform == "linux" else None)
_GID = struct.Struct("I")
_SHUTDOWN_GRACE = 5.0  # seconds to let closing connections drain before aborting them
_NEVER_SYNC_EVERY = 30.0  # seconds, with fsync="never" (see Broker._sync_every)
# The listen backlog: a burst of clients connecting at once (1,000 in a test) queues here
# while the loop accepts; nginx and redis default to 511, the Linux cap
# (net.core.somaxconn) is 4,096 since 5.4. A full backlog makes a Unix-socket connect
# fail with EAGAIN, which the client retries until its connect timeout.
DEFAULT_BACKLOG = 1024
_EARLY_FLUSH = 256 * 1024  # bytes of output that are written before the loop turn ends
_EVENTS_MAX = 1024  # EVENTs merged into one EVENTS frame at most
_EVENT_HEAD = b"\x94" + msgpack.packb(int(Op.EVENT))  # [31, sid, message, dropped]
_EVENTS_HEAD = b"\x94" + msgpack.packb(int(Op.EVENTS))  # [33, sid, messages, dropped]


def _array_header(n: int) -> bytes:
    """msgpack's array header for ``n`` (< 65,536) elements."""
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


class _RateLimitedLog:
    """At most ``burst`` records per ``period`` seconds, then one line saying how many were
    suppressed (nats-server's RateLimitErrorf): a client reconnecting in a loop with bad
    frames must not flood the operator's log."""

    def __init__(self, burst: int = 10, period: float = 10.0) -> None:
        self.burst = burst
        self.period = period
        self._window_start = -period
        self._count = 0
        self._suppressed = 0

    def warning(self, now: float, msg: str, *args: object) -> None:
        self.log(logging.WARNING, now, msg, *args)

    def log(self, level: int, now: float, msg: str, *args: object,
            extra: dict[str, Any] | None = None) -> None:
        if now - self._window_start >= self.period:
            if self._suppressed:
                log.log(level, "%d similar messages suppressed in the last %.0f s",
                        self._suppressed, self.period)
            self._window_start, self._count, self._suppressed = now, 0, 0
        if self._count < self.burst:
            self._count += 1
            log.log(level, msg, *args, extra=extra)
        else:
            self._suppressed += 1


class BrokerAlreadyRunning(BusError):
    """A live broker already listens on the socket path."""

    code = "already-running"


class DataDirInUse(BusError):
    """Another broker holds the data directory (its lock file)."""

    code = "already-running"


_NOT_PAUSED: frozenset[str] = frozenset()


class _Connection(asyncio.Protocol):
    __slots__ = ("backlog", "broker", "buffered", "client_name", "close_reason", "closing",
                 "congested",
                 "decoder", "events", "events_dropped", "events_sid", "held", "id",
                 "ok_first", "ok_last", "opened", "out", "out_bytes", "paused_by", "pid",
                 "replied", "transport", "uid")

    def __init__(self, broker: Broker, conn_id: int) -> None:
        self.broker = broker
        self.id = conn_id
        # Client bytes are untrusted: refuse a frame by its headers, before buffering
        # what they announce, and hold at most MAX_HELLO_FRAME bytes before the HELLO.
        self.decoder = FrameDecoder(broker.max_frame, first_frame_limit=MAX_HELLO_FRAME,
                                    refuse_early=True)
        self.buffered = 0  # bytes of its incomplete frame, counted in Broker._uid_buffered
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.out_bytes = 0
        # Two kinds of run, at most one open, written as one frame when anything else is
        # written to the connection or at the flush (so the order of frames is kept):
        # confirmations, requests ok_first..ok_last (consecutive rids) that succeeded with
        # no result (ok_last 0: none); and the encoded messages of consecutive EVENTs for
        # subscription events_sid, events_dropped the gap before the first.
        self.ok_first = self.ok_last = 0
        self.events: list[bytes] = []
        self.events_sid = self.events_dropped = 0
        # With fsync "always" (commit.py): whether the pending output answers a request
        # (OK, a result, ERROR: it may confirm a durable change, so it waits for the
        # sync), and how many batches of its output are held for a sync (later output
        # waits behind them, in order).
        self.replied = False
        self.held = 0
        self.backlog: list[Any] = []  # decoded frames not yet fed while reading is paused
        # "core" (parked sends), "write" (client not reading); immutable, so an idle
        # connection shares the empty one (a set each was ~200 bytes of every connection)
        self.paused_by: frozenset[str] = _NOT_PAUSED
        self.closing = False
        self.congested = False  # unread output above max_pending_output (Broker._check_output)
        # For the lifecycle log lines: who the peer is, and why the connection ended.
        self.pid = self.uid = -1
        self.client_name: str | None = None  # HELLO's name, once the handshake is done
        self.opened = broker.loop.time()
        self.close_reason: str | None = None

    # -- asyncio callbacks ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        pid = uid = gid = -1
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size)
                pid, uid, gid = _CRED.unpack(raw)
        gids = _peer_groups(sock) if sock is not None else ()  # a later policy needs them
        self.broker._connection_made(self, pid, uid, gid, gids)

    def data_received(self, data: bytes) -> None:
        broker = self.broker
        try:
            frames = self.decoder.feed(data)
        except ProtocolError as exc:
            # Act on the good frames that came before the bad bytes, then close.
            self._feed(getattr(exc, "frames", []))
            broker.core.protocol_error(self.id, exc.code or "protocol", str(exc))
            broker._after_events()
            return
        if self.backlog or self.paused_by:
            self.backlog.extend(frames)
        else:
            self._feed(frames)
        if self.decoder.buffered != self.buffered:  # once per read, not per frame
            self._hold_input(self.decoder.buffered)
        broker._after_events()

    def _hold_input(self, held: int) -> None:
        """This connection now holds ``held`` bytes of an incomplete frame: count them
        for its uid, and close it if that takes the uid over max_buffered_bytes_per_uid
        (1,024 connections with a 16 MiB frame each half sent would hold 16 GiB)."""
        broker = self.broker
        totals = broker._uid_buffered
        total = totals.get(self.uid, 0) + held - self.buffered
        self.buffered = held
        if total:
            totals[self.uid] = total
        else:
            totals.pop(self.uid, None)
        if held and total > broker.max_buffered_bytes_per_uid:
            broker.core.protocol_error(
                self.id, "quota-exceeded",
                f"uid {self.uid} has {total} bytes of frames still arriving over its"
                f" connections, above max_buffered_bytes_per_uid="
                f"{broker.max_buffered_bytes_per_uid}; send large messages one at a time")

    def _feed(self, frames: list[Any]) -> None:
        core = self.broker.core
        now = self.broker.loop.time()
        for i, frame in enumerate(frames):
            core.receive(self.id, frame, now)
            if self.paused_by and i + 1 < len(frames):
                self.backlog.extend(frames[i + 1:])
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buffered:
            self._hold_input(0)
        if exc is not None and self.close_reason is None:
            self.close_reason = " ".join(str(exc).split()) or type(exc).__name__
        self.broker._connection_lost(self)

    def pause_writing(self) -> None:
        self._pause("write")

    def resume_writing(self) -> None:
        self._resume("write")
        if self.congested:  # drained to the low-water mark: deliver again
            self.congested = False
            broker = self.broker
            broker.core.set_congested(self.id, False, broker.loop.time())
            broker._after_events()

    # -- flow control ---------------------------------------------------------------

    def _pause(self, reason: str) -> None:
        if not self.paused_by and self.transport is not None and not self.closing:
            self.transport.pause_reading()
        self.paused_by = self.paused_by | {reason}

    def _resume(self, reason: str) -> None:
        self.paused_by = self.paused_by - {reason}
        if self.paused_by or self.closing or self.transport is None:
            return
        self.transport.resume_reading()
        if self.backlog:
            frames, self.backlog = self.backlog, []
            self._feed(frames)
            self.broker._after_events()

    def end_range(self) -> None:
        """Append the pending confirmations as one frame: OK for one rid, else OK_RANGE."""
        first, last = self.ok_first, self.ok_last
        self.ok_last = 0
        frame = [Op.OK, first, None] if first == last else [Op.OK_RANGE, first, last]
        data = self.broker._packb(frame)
        self.out.append(data)
        self.out_bytes += len(data)

    def end_events(self) -> None:
        """Append the pending EVENTs as one frame: EVENT for one, else EVENTS."""
        events, self.events = self.events, []
        packb = self.broker._packb
        head = [_EVENT_HEAD if len(events) == 1 else _EVENTS_HEAD, packb(self.events_sid)]
        if len(events) > 1:
            head.append(_array_header(len(events)))
        data = b"".join([*head, *events, packb(self.events_dropped)])
        self.out.append(data)
        self.out_bytes += len(data)

    def flush(self) -> None:
        """Hand the pending output to the transport (see :meth:`write_out`)."""
        self.write_out(self.take_output())

    def take_output(self) -> list[bytes]:
        """The pending output as frames, open run included; the connection has none after."""
        if self.ok_last:  # the open run, if any (see __init__)
            self.end_range()
        elif self.events:
            self.end_events()
        out, self.out = self.out, []
        self.out_bytes = 0
        self.replied = False
        return out

    def write_out(self, out: list[bytes]) -> None:
        """Hand ``out`` to the transport. Never raises: a transport that the
        peer closed in this loop turn (its EOF came with output still due to it) drops
        the output, since nobody will read it; one that fails is aborted. Either way
        only this connection is affected, and ``connection_lost`` cleans it up."""
        if not out:
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        try:
            transport.writelines(out)
        except (OSError, RuntimeError) as exc:  # uvloop: "the handler is closed"
            log.info("connection %d: write failed (%s); dropping it", self.id, exc)
            transport.abort()


class Broker:
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
        self.path = resolve_socket_path(path) if sock is None else None
        self._default_path = sock is None and not is_explicit(path)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.policy = policy  # None: whoever can open the socket may do everything
        self._denied_log = _RateLimitedLog()
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_consumers = max_consumers
        self.max_pending_output = max_pending_output
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
        self.data_dir = os.fspath(data_dir) if data_dir is not None else None
        self.fsync = fsync
        self.fsync_interval = fsync_interval
        self.repair = repair
        self.drain_timeout = drain_timeout
        self._drained: asyncio.Event | None = None  # while shutting down: no lease held
        self.journal: Journal | None = None
        # With a journal: its syncs, and (fsync "always") each turn's output held until
        # its records are on disk, as (connection, frames) pairs (commit.py)
        self._commit: GroupCommit[list[tuple[_Connection, list[bytes]]]] | None = None
        self._lock_fd = -1
        self._sync_timer: asyncio.TimerHandle | None = None
        self._journal_log = _RateLimitedLog(burst=3, period=60.0)
        self._sock = sock
        self._conns: dict[int, _Connection] = {}
        self._next_conn = 1
        self._dirty: list[_Connection] = []
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._server: asyncio.AbstractServer | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._closed = asyncio.Event()
        self._all_gone = asyncio.Event()
        self._packb = msgpack.Packer().pack
        self._close_log = _RateLimitedLog()
        self.core: BrokerCore
        self.loop: asyncio.AbstractEventLoop
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
            self.loop.call_later(1.0, self._retry_journal)
        queues.journal_error = exc.cause or "error"
        for conn_id in confirmed:
            conn = self._conns.get(conn_id)
            if conn is not None and not conn.closing:
                conn.out, conn.out_bytes, conn.ok_last = [], 0, 0
                conn.events = []
                self.close(conn_id, "journal", "the broker could not write its journal"
                           f" ({queues.journal_error}): its last sends were not confirmed")

    def _sync_failed(self, exc: JournalError, confirmed: set[int],
                     held: list[list[tuple[_Connection, list[bytes]]]]) -> None:
        """A sync in the worker thread failed (commit.py). ``"always"``: the held output
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
        """``batch``, ``never``: the periodic sync, in the worker thread (commit.py); the
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

    async def aclose(self) -> None:
        """Shut down gracefully.

        Stops accepting and delivering; gives the leases consumers hold up to
        ``drain_timeout`` seconds to be answered (an ack in that time counts); then sends
        every client a CLOSE frame with code ``shutdown`` (leases still held fail, one
        attempt each), closes the connections (aborting those that do not drain within
        5 s), logs per queue what it keeps (durable queues, in the journal) and what it
        discards (in-memory queues), writes and syncs the journal, and removes the
        socket file.
        """
        if self._server is None or self._closed.is_set():
            return
        self._server.close()
        self.core.drain()
        await self._wait_leases_answered()
        for conn in list(self._conns.values()):
            self.close(conn.id, "shutdown", "the broker is shutting down")
        if self._conns:
            self._all_gone.clear()
            try:
                await asyncio.wait_for(self._all_gone.wait(), _SHUTDOWN_GRACE)
            except TimeoutError:
                for conn in list(self._conns.values()):
                    if conn.transport is not None:
                        conn.transport.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), _SHUTDOWN_GRACE)
        if self._timer is not None:
            self._timer.cancel()
        self.monitor.stop()
        self._log_what_remains()
        self._remove_socket_file()
        self._close_journal()
        self._closed.set()
        log.info("aiobus broker stopped")

    async def _wait_leases_answered(self) -> None:
        """Until no lease is held, or ``drain_timeout`` has passed."""
        held = self.core.held_leases()
        if not held or self.drain_timeout <= 0:
            return
        log.info("waiting up to %.1f s for consumers to answer %d leases",
                 self.drain_timeout, held)
        self._drained = asyncio.Event()  # set by _after_events once none is held
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.drain_timeout)
        if self.core.held_leases():
            log.info("%d leases still held after %.1f s: they fail (one attempt each)",
                     self.core.held_leases(), self.drain_timeout)

    def _log_what_remains(self) -> None:
        """The honest part of a shutdown: what survives it and what does not."""
        kept: dict[str, int] = {}
        lost: dict[str, int] = {}
        for name, queue in sorted(self.core.queues.queues.items()):
            count = queue.ready_len + queue.delayed
            if count:
                (kept if queue.journal is not None else lost)[name] = count
        for what, queues in (("keeping", kept), ("discarding", lost)):
            if queues:
                where = "durable queues" if what == "keeping" else "in-memory queues"
                log.info("%s %d messages in %d %s: %s", what, sum(queues.values()),
                         len(queues), where, ", ".join(f"{n} {c}" for n, c in queues.items()))

    def _remove_socket_file(self) -> None:
        if self.path is None or self._socket_inode is None:
            return
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._socket_inode:  # still ours, not a successor's
            os.unlink(self.path)

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


def _peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups, or () where SO_PEERGROUPS is missing (then a
    policy's groups match the primary group from SO_PEERCRED only: docs/PROTOCOL.md)."""
    if _SO_PEERGROUPS is None:
        return ()
    size = 64 * _GID.size
    while size <= 65536 * _GID.size:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 16
                continue
            return ()
        return tuple(gid for (gid,) in _GID.iter_unpack(raw[:len(raw) - len(raw) % 4]))
    return ()


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
