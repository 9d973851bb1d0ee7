"""One client connection of the broker's asyncio shell: an ``asyncio.Protocol``.

It feeds received bytes to a streaming msgpack decoder and each complete frame to the
core, synchronously, in ``data_received``: no task per connection, none per message.
What the core writes to it collects in its output list (output.py, ``_Output``), where
runs of confirmations and of EVENTs are merged into one frame each, until the flush at
the end of the loop turn hands it to the transport in one write.

Backpressure: when a client does not read and its transport buffer passes the
high-water mark, the broker stops reading from it until it drains; the core itself stops
reading from a producer with too many sends parked on full queues. Frames already
decoded when reading stops wait in the connection's backlog, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, cast

import msgpack

from ..errors import ProtocolError
from ..protocol import MAX_HELLO_FRAME, FrameDecoder, Op
from .logs import log

if TYPE_CHECKING:
    from .server import Broker

_CRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
# SO_PEERGROUPS (Linux 4.13; the socket module has no name for it): the peer's
# supplementary groups at connect, an array of gid_t. 64 fit the first try; ERANGE asks for
# more (NGROUPS_MAX is 65,536).
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59 if sys.platform == "linux" else None)
_GID = struct.Struct("I")
_EVENT_HEAD = b"\x94" + msgpack.packb(int(Op.EVENT))  # [31, sid, message, dropped]
_EVENTS_HEAD = b"\x94" + msgpack.packb(int(Op.EVENTS))  # [33, sid, messages, dropped]
# A read of more frames is fed in parts of this many (_feed_in_parts). With a window of
# 256 pipelined confirmed sends to a durable queue and `--fsync always` (bench_ack.py),
# parts of 64 ran 1.21x as fast as none, of 32 0.88x (more flushes cost more than the
# overlap gained), of 128 1.09x: docs/performance.md, session 11.
_PART = 64


def _array_header(n: int) -> bytes:
    """msgpack's array header for ``n`` (< 65,536) elements."""
    return bytes((0x90 | n,)) if n < 16 else b"\xdc" + n.to_bytes(2, "big")


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
        elif len(frames) <= _PART or not broker.confirm_in_parts:
            self._feed(frames)
        else:
            self._feed_in_parts(frames)
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

    def _feed_in_parts(self, frames: list[Any]) -> None:
        """A long read, such as a producer's window of pipelined SENDs: fed ``_PART``
        frames at a time, the broker told between parts (output.py
        ``_confirm_early``: with ``--fsync always`` the first part's confirmations need
        not wait for the last part to be handled)."""
        broker = self.broker
        for start in range(0, len(frames), _PART):
            if start:
                if self.paused_by:  # (_feed kept the rest of its part)
                    self.backlog.extend(frames[start:])
                    return
                broker._confirm_early()
            self._feed(frames[start:start + _PART])

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
