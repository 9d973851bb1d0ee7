"""What lets a :class:`~aiobus.client.connection.ClientConnection` outlive its transport.

With a ``client_id`` (the shell gives one when it reconnects), the connection is a
*session* that can move from one transport to the next:

* :meth:`connection_lost` keeps what can be done again and gives back what cannot. Kept:
  unanswered confirmed SENDs (their packed frames, in ``_frames`` by rid: the resend
  buffer), DECLAREs, STATS and PINGs, and every registered stream with its CONSUME or
  SUBSCRIBE frame. Given back, to fail with ConnectionLost: requests (never resent: they
  may not be idempotent), PURGE, DELETE, and lease operations (their leases died with the
  transport). Leases are numbered per transport by the broker, so the connection adds a
  per-transport base to every tag it hands out (``_tag_base``, which moves up by 2**40 on
  each loss): a lease from an earlier transport is below the base and is refused with
  ``LeaseError`` code ``lease-lost``, never confused with a new lease of the same tag.
* While DISCONNECTED, confirmed sends go to the resend buffer only; PUBLISHes and
  unconfirmed SENDs are held up to ``hold_bytes`` (beyond that they are dropped and
  counted in :attr:`dropped`); credit and acks for old leases are dropped.
* After the next WELCOME, :meth:`restore` writes, in this order: the queues declared so
  far (rid 0), the resend buffer with the frames' original rids and seqs (the broker
  keeps a window of recent message ids per queue and answers a SEND it already accepted
  with OK without queueing it again: PROTOCOL.md §8), each stream's CONSUME or SUBSCRIBE
  under its old stream id, then what was held.

A SEND carries a ``seq`` (message id ``<client_id>-<seq>`` at the broker) only when the
broker's WELCOME says it deduplicates (``info.dedup``); to an older broker a resend could
duplicate, and the connection does not resend to one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Final

from ..errors import BusError, LeaseError
from ..protocol import Op

if TYPE_CHECKING:
    from ..protocol import FrameDecoder
    from .connection import ConnectionSink, StreamReceiver

__all__ = ["HOLD_BYTES", "RESTORING", "TAG_SPAN", "Session"]

# What a session holds of PUBLISHes and unconfirmed SENDs while DISCONNECTED (nats.py's
# pending buffer is 2 MiB; the bound keeps a publisher that ignores the outage from
# growing without limit). Beyond it they are dropped and counted.
HOLD_BYTES: Final = 1024 * 1024
TAG_SPAN: Final = 2**40  # lease numbers per transport


class _Restoring:
    """The waiter of a CONSUME or SUBSCRIBE that :meth:`Session.restore` wrote: nobody
    awaits it (``done()`` is true, so a shell skips it); its ERROR fails the stream
    through ``sink.stream_failed``."""

    __slots__ = ()

    def done(self) -> bool:
        return True


RESTORING: Any = _Restoring()


class Session:
    """The session half of :class:`~aiobus.client.connection.ClientConnection` (see the
    module docstring); the connection's ``__init__`` sets these attributes."""

    _decoder: FrameDecoder
    error: BusError | None
    _blocked: bool
    _down: bool
    welcomed: bool
    _hello_sent: bool
    close_reason: tuple[str, str] | None
    out_bytes: int
    _out: list[bytes]
    _acks: list[int]
    _flush_wanted: bool
    _rids: Iterator[int]
    pending: dict[int, Any]
    replies: dict[int, Any]
    _streams: dict[int, Callable[[], StreamReceiver | None]]
    client_id: str | None
    _frames: dict[int, bytes]
    _stream_frames: dict[int, list[Any]]
    _starts: dict[int, int]
    _restores: dict[int, int]
    _declared: dict[str, dict[str, Any]]
    _held: list[bytes]
    _held_bytes: int
    _hold_limit: int
    dropped: int
    _tag_base: int

    def __init__(self, sink: ConnectionSink) -> None:
        # (Set here, in the class that declares it, so that mypyc knows it always set:
        # no check per access in this class and the connection's reading and writing.)
        self._sink = sink

    # What ClientConnection provides (real methods, not TYPE_CHECKING stubs: the compiled
    # build compiles this class, and mypyc takes no conditional class body).
    def _new_decoder(self) -> FrameDecoder:
        raise NotImplementedError

    def _append(self, frame: list[Any]) -> None:
        raise NotImplementedError

    def receivers(self) -> list[StreamReceiver]:
        raise NotImplementedError

    def _forget_leases(self) -> None:
        raise NotImplementedError

    def _hold(self, packed: bytes) -> None:
        """A fire-and-forget frame while DISCONNECTED: hold it (bounded) for restore."""
        if self.error is not None:
            raise self.error
        if self._held_bytes + len(packed) > self._hold_limit:
            self.dropped += 1
            return
        self._held.append(packed)
        self._held_bytes += len(packed)

    def _tag(self, lease: int) -> int:
        """This transport's tag for ``lease``; LeaseError if it is from an earlier one."""
        tag = lease - self._tag_base
        if tag <= 0:
            raise LeaseError(
                "the connection to the broker was lost after this message was delivered:"
                " the broker gives it to a consumer again (at-least-once), so it must not"
                " be answered now", code="lease-lost")
        return tag

    def check_lease(self, lease: int) -> None:
        """Raise LeaseError (``lease-lost``) if ``lease`` is from an earlier transport."""
        self._tag(lease)

    def abandon(self, rid: int) -> None:
        """Stop waiting for request ``rid`` and never write it again (a send that timed
        out). If it was written, the broker may still act on it."""
        self.pending.pop(rid, None)
        self._frames.pop(rid, None)

    def declared(self, queue: str, options: dict[str, Any]) -> None:
        """``queue`` was declared with ``options``: a session declares it again on each
        new transport (so a broker that lost it, or restarted, has it before any send)."""
        if self.client_id is not None:
            self._declared.pop(queue, None)
            self._declared[queue] = options

    def deleted(self, queue: str) -> None:
        self._declared.pop(queue, None)

    def close(self, error: BusError) -> None:
        """Nothing new may be written (the shell is closing); answers still arrive."""
        self.error = error
        self._blocked = True

    def fail(self, error: BusError) -> tuple[list[Any], list[StreamReceiver]]:
        """Nothing more may be written; return the waiters and receivers to fail, and
        forget them."""
        self.error = error
        self._blocked = True
        waiters = [w for w in (*self.pending.values(), *self.replies.values())
                   if w is not RESTORING]
        self.pending.clear()
        self.replies.clear()
        self._frames.clear()
        self._held.clear()
        self._held_bytes = 0
        return waiters, self.receivers()

    def connection_lost(self) -> list[Any]:
        """The transport is gone; the session waits for the next (DISCONNECTED). Returns
        the waiters that cannot be carried over (fail them with ConnectionLost); the
        receivers (:meth:`receivers`) should forget what the old transport gave them."""
        if self.client_id is None:
            raise RuntimeError("connection_lost needs a session (a client_id)")
        self._down = self._blocked = True
        self.welcomed = self._hello_sent = False
        self.close_reason = None
        self._decoder = self._new_decoder()  # a partial frame of the old transport goes
        self._out.clear()
        self._acks.clear()
        self.out_bytes = 0
        self._flush_wanted = False
        self._tag_base += TAG_SPAN
        self._forget_leases()
        keep = self._frames.keys() | {rid for rid, sid in self._starts.items()
                                      if sid in self._streams}
        lost: list[Any] = []
        for rid, waiter in list(self.pending.items()):
            if rid not in keep:
                del self.pending[rid]
                if waiter is not RESTORING:
                    lost.append(waiter)
        self._restores.clear()
        lost.extend(self.replies.values())
        self.replies.clear()
        return lost

    def restore(self) -> None:
        """After the new transport's WELCOME: write the session again (see the module
        docstring) and leave DISCONNECTED."""
        if not self.welcomed or not self._down:
            raise RuntimeError("restore() belongs after a new transport's WELCOME")
        self._down = False
        self._blocked = self.error is not None
        if self._blocked:
            return
        for queue, options in self._declared.items():
            self._append([Op.DECLARE, 0, queue, options])
        out = self._out
        for packed in self._frames.values():
            out.append(packed)
            self.out_bytes += len(packed)
        starts, self._starts = self._starts, {}
        waiting = {sid: rid for rid, sid in starts.items() if rid in self.pending}
        for sid, frame in self._stream_frames.items():
            if sid not in self._streams:
                continue
            rid = next(self._rids)
            frame[1] = rid
            old = waiting.get(sid)
            if old is None and frame[0] == Op.CONSUME:
                # A started consumer keeps its queue, as any consumer does (after a
                # restart the broker may not have it): no longer passive.
                del frame[5:]
            self._append(frame)
            if old is not None:  # its consume()/subscribe() still waits for the answer
                self.pending[rid] = self.pending.pop(old)
                self._starts[rid] = sid
            else:
                self.pending[rid] = RESTORING
                self._restores[rid] = sid
        out.extend(self._held)
        self.out_bytes += self._held_bytes
        self._held.clear()
        self._held_bytes = 0
        if out and not self._flush_wanted:
            self._flush_wanted = True
            self._sink.flush_wanted()
