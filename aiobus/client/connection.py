"""The client's side of the wire protocol, sans I/O: bytes in, callbacks out; calls in,
bytes to write out. The client's counterpart of ``broker/core.py``, in h11's manner.

Theory of operation
-------------------
A :class:`ClientConnection` knows frames, never sockets, clocks or futures:

* Every method that speaks to the broker packs its frame into an outgoing buffer, which
  the shell takes with :meth:`data_to_send` and writes. The first frame written after a
  take calls ``sink.flush_wanted()`` once, so the shell can schedule one write per loop
  turn (redis's pending-write queue) without a check per frame on its side.
* The connection allocates rids, stream ids and reply tokens (counters from 1, never
  reused: docs/PROTOCOL.md §15). A request is remembered with an opaque *waiter* the
  shell passes in (the asyncio shell passes a future; tests pass anything); its OK,
  ERROR, or its part of an OK_RANGE, comes back as ``sink.completed(waiter, result)``
  or ``sink.failed(waiter, error)`` with the error class from ``errors.from_code``. An
  ERROR with an unknown rid (rid 0: a fire-and-forget frame) is counted in
  :attr:`async_errors` and reported as ``sink.failed(None, error)``, except a lease
  error for an unconfirmed answer (ACK_MANY, or ACK/NACK/REJECT with rid 0), which goes
  to the consumer the lease came from (``sink.answer_failed``). Its message names the
  tag (``delivery <tag>``: docs/PROTOCOL.md, ACK_MANY), and the connection remembers the
  stream of each tag it delivered, in two generations of ``LEASE_MEMORY`` tags (a
  dict write per DELIVER; a lease older than that is reported without its consumer).
* DELIVER, EVENT and EVENTS go straight to the receiver registered for their stream id,
  with their fields by name: the receiver never sees frame indexes. Receivers are held
  through a callable returning the receiver or None (a ``weakref.ref`` in the asyncio
  shell: a stream the application dropped must be freed so that it can CANCEL itself).
  A receiver that is gone, or a stream id that is not registered (frames written before
  a CANCEL took effect), drops the frame, as §5 asks.
* Once :attr:`error` is set (the connection failed or is closing) every method that
  would write raises it; frames received are still dispatched, so that answers to what
  was already sent arrive while the shell drains on close.

The reading side (:meth:`receive_data` and the handlers of the frames it reads) is
dispatch.py's ``_Dispatcher``, this class's base.

Reconnecting: :class:`~aiobus.client.session.Session`, which this class extends, keeps
what a new transport must be given again.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable, Iterator
from typing import Any, Final, Protocol

import msgpack

from ..errors import BusError, ConnectionLost, FrameTooLarge
from ..protocol import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, FrameDecoder, Op
from .dispatch import _Dispatcher
from .session import HOLD_BYTES

__all__ = ["HOLD_BYTES", "ClientConnection", "ConnectionSink", "State", "StreamReceiver"]

ACK_BATCH: Final = 1024  # tags per ACK_MANY frame at most
# Ask for a write at once, not at the end of the loop turn, when this much is waiting:
# bounds the buffer of a producer that never yields.
FLUSH_AT: Final = 64 * 1024
_SEND, _PUBLISH, _CREDIT = int(Op.SEND), int(Op.PUBLISH), int(Op.CREDIT)
_NACK = int(Op.NACK)
_SETTLE_OPS: Final = {"ack": int(Op.ACK), "nack": int(Op.NACK), "reject": int(Op.REJECT)}


class State(enum.Enum):
    """Where a connection stands (derived from what was sent and received)."""

    IDLE = "idle"  # nothing sent yet: HELLO comes first
    HANDSHAKE = "handshake"  # HELLO written, WELCOME not yet received
    OPEN = "open"  # WELCOME received: any frame may be written
    DISCONNECTED = "disconnected"  # the transport is gone; the session waits for the next
    DONE = "done"  # failed or closing (``error`` is set): nothing more is written


class ConnectionSink(Protocol):
    """What the connection reports to its shell."""

    def completed(self, waiter: Any, result: Any) -> None:
        """A request succeeded (OK, OK_RANGE) or a request's reply arrived (RESPONSE)."""

    def completed_all(self, waiters: list[Any]) -> None:
        """Several requests succeeded with no result (OK_RANGE), in rid order; None
        stands for a rid that was not pending (skip it)."""

    def failed(self, waiter: Any, error: BusError) -> None:
        """A request failed; ``waiter`` None: a fire-and-forget frame did."""

    def welcomed(self, info: dict[str, Any]) -> None:
        """WELCOME: the handshake is done."""

    def stream_failed(self, receiver: StreamReceiver, error: BusError) -> None:
        """A stream could not be started again on a new transport."""

    def answer_failed(self, receiver: StreamReceiver, error: BusError) -> None:
        """The broker refused an unconfirmed answer (ack, nack, reject) to a lease this
        consumer delivered: the lease had expired, or was already answered."""

    def flush_wanted(self) -> None:
        """The outgoing buffer went from empty to not empty, or holds ``flush_at`` bytes
        or more: call :meth:`ClientConnection.data_to_send` now or soon."""


class StreamReceiver(Protocol):
    """A consumer or subscription, as the connection feeds it."""

    def _deliver(self, tag: int, message: list[Any], attempt: int,
                 reply_to: str | None) -> None: ...

    def _event(self, message: list[Any], dropped: int) -> None: ...

    def _events(self, messages: list[list[Any]], dropped: int) -> None: ...


class ClientConnection(_Dispatcher):
    """One client connection's protocol state. See the module docstring."""

    def __init__(self, sink: ConnectionSink, *, new_waiter: Callable[[], Any] = object,
                 max_frame: int = DEFAULT_MAX_FRAME, flush_at: int = FLUSH_AT,
                 client_id: str | None = None, hold_bytes: int = HOLD_BYTES) -> None:
        super().__init__(sink)
        # Makes the waiter of a SEND the caller passes none for (the asyncio shell:
        # loop.create_future), so that send_nowait is one call deep.
        self._new_waiter = new_waiter
        self._flush_at = flush_at
        self._decoder = self._new_decoder()
        self.max_frame = max_frame  # the broker's, from WELCOME
        self.error: BusError | None = None  # set once nothing more may be written
        # True while nothing may be written to a transport: ``error`` is set, or the
        # session is between transports (DISCONNECTED). One check on the hot paths.
        self._blocked = False
        self._down = False  # between transports (connection_lost .. restore)
        self.welcomed = False
        self._hello_sent = False
        self.close_reason: tuple[str, str] | None = None  # the broker's CLOSE, if any
        self.async_errors = 0  # ERRORs for fire-and-forget frames
        self.out_bytes = 0
        self._out: list[bytes] = []
        self._acks: list[int] = []  # ack_nowait tags waiting for the next data_to_send
        self._flush_wanted = False
        self._packb = msgpack.Packer().pack
        self._rids = itertools.count(1)
        self._sids = itertools.count(1)
        self._tokens = itertools.count(1)
        # rid -> waiter, token -> waiter.
        self.pending: dict[int, Any] = {}
        self.replies: dict[int, Any] = {}
        self._streams: dict[int, Callable[[], StreamReceiver | None]] = {}
        self._consumers: set[int] = set()  # the stream ids that are consumers
        # -- the session (see "Sessions outlive transports") --
        self.client_id = client_id
        self._seqs: Iterator[int] | None = None  # set once a broker says it deduplicates
        self._frames: dict[int, bytes] = {}  # rid -> packed frame to write again if lost
        self._stream_frames: dict[int, list[Any]] = {}  # sid -> its CONSUME or SUBSCRIBE
        self._starts: dict[int, int] = {}  # rid -> sid of a CONSUME/SUBSCRIBE (may be stale)
        self._restores: dict[int, int] = {}  # rid -> sid of a restoring CONSUME/SUBSCRIBE
        self._declared: dict[str, dict[str, Any]] = {}  # queue -> options, to declare again
        self._held: list[bytes] = []  # PUBLISH and rid-0 SEND frames while DISCONNECTED
        self._held_bytes = 0
        self._hold_limit = hold_bytes
        self.dropped = 0  # frames dropped while DISCONNECTED because the hold was full
        self._tag_base = 0  # added to this transport's lease tags (see the docstring)
        # tag -> sid of this transport's deliveries, newer and older generation.
        self._lease_sids: dict[int, int] = {}
        self._old_lease_sids: dict[int, int] = {}

    def _new_decoder(self) -> FrameDecoder:
        # The broker bounds what it sends by its own max_frame, unknown until WELCOME;
        # the client trusts its broker (it checked its owner), so only sanity limits.
        return FrameDecoder(2**31 - 1, max_array=2**20, max_map=2**20)

    @property
    def state(self) -> State:
        if self.error is not None:
            return State.DONE
        if self._down:
            return State.DISCONNECTED
        if self.welcomed:
            return State.OPEN
        return State.HANDSHAKE if self._hello_sent else State.IDLE

    # -- writing --------------------------------------------------------------------------

    def data_to_send(self) -> list[bytes]:
        """Take everything written so far (ACK_MANY of pending acks last)."""
        if self._acks:
            self._write_acks()
        out, self._out = self._out, []
        self.out_bytes = 0
        self._flush_wanted = False
        return out

    def _write_acks(self) -> None:
        acks, self._acks = self._acks, []
        data = self._packb([Op.ACK_MANY, acks])
        self._out.append(data)
        self.out_bytes += len(data)

    def _raise_blocked(self) -> None:
        if self.error is not None:
            raise self.error
        raise ConnectionLost("the connection to the broker is down; reconnecting")

    def _write(self, frame: list[Any]) -> None:
        if self._blocked:
            self._raise_blocked()
        self._append(frame)

    def _append(self, frame: list[Any]) -> None:
        if self._acks:  # keep frame order: acks asked for earlier go out first
            self._write_acks()
        data = self._packb(frame)
        if len(data) > self.max_frame:
            self._too_large(data)
        self._out.append(data)
        self.out_bytes += len(data)
        if not self._flush_wanted or self.out_bytes >= self._flush_at:
            self._flush_wanted = True
            self._sink.flush_wanted()

    def _too_large(self, packed: bytes) -> None:
        # Exact: the broker bounds whole frames.
        raise FrameTooLarge(
            f"a frame of {len(packed)} bytes exceeds the broker's max_frame of"
            f" {self.max_frame} bytes; send a smaller body or fewer headers"
        )

    def _request(self, frame: list[Any], waiter: Any) -> int:
        """Write a request frame (rid at index 1) and remember ``waiter`` for its answer."""
        rid = next(self._rids)
        frame[1] = rid
        self._write(frame)
        self.pending[rid] = waiter
        return rid

    def hello(self, name: str | None) -> None:
        """Write HELLO: the first frame on each transport (``_down`` or not)."""
        options: dict[str, Any] = {"name": name} if name is not None else {}
        if self.client_id is not None:
            options["client_id"] = self.client_id
        if self.error is not None:
            raise self.error
        self._append([Op.HELLO, PROTOCOL_VERSION, options])
        self._hello_sent = True

    # SEND and PUBLISH, the per-message writes, each in one flat call (the benchmarks
    # decide: a helper call per message costs ~5% of the producer's path).

    def send(self, queue: str, data: bytes, kind: int, headers: dict[str, str] | None,
             ttl: float | None, delay: float | None, waiter: Any = None) -> Any:
        """A confirmed SEND: ``waiter`` (default: a new one from ``new_waiter``) gets its
        OK or ERROR. Returns the waiter. With a session, the SEND carries a seq and its
        frame stays in the resend buffer until answered; while DISCONNECTED it goes
        there only."""
        if waiter is None:
            waiter = self._new_waiter()
        if self._acks:  # keep frame order: acks asked for earlier go out first
            self._write_acks()
        rid = next(self._rids)
        seqs = self._seqs
        if seqs is not None:
            frame = [_SEND, rid, queue, data, kind, headers, ttl, None, delay, next(seqs)]
        elif delay is not None:
            frame = [_SEND, rid, queue, data, kind, headers, ttl, None, delay]
        else:  # the 8-field SEND every broker version understands
            frame = [_SEND, rid, queue, data, kind, headers, ttl, None]
        packed = self._packb(frame)
        if len(packed) > self.max_frame:
            self._too_large(packed)
        if self._blocked:
            if self.error is not None or seqs is None:
                self._raise_blocked()
        else:
            self._out.append(packed)
            self.out_bytes += len(packed)
            if not self._flush_wanted or self.out_bytes >= self._flush_at:
                self._flush_wanted = True
                self._sink.flush_wanted()
        self.pending[rid] = waiter
        if seqs is not None:
            self._frames[rid] = packed
        return waiter

    def send_unconfirmed(self, queue: str, data: bytes, kind: int,
                         headers: dict[str, str] | None, ttl: float | None,
                         delay: float | None) -> None:
        """A SEND with rid 0: no answer unless it fails (then counted in async_errors)."""
        if self._acks:
            self._write_acks()
        frame = [_SEND, 0, queue, data, kind, headers, ttl, None]
        if delay is not None:
            frame.append(delay)
        packed = self._packb(frame)
        if len(packed) > self.max_frame:
            self._too_large(packed)
        if self._blocked:
            self._hold(packed)
            return
        self._out.append(packed)
        self.out_bytes += len(packed)
        if not self._flush_wanted or self.out_bytes >= self._flush_at:
            self._flush_wanted = True
            self._sink.flush_wanted()

    def publish(self, topic: str, data: bytes, kind: int,
                headers: dict[str, str] | None) -> None:
        if self._acks:
            self._write_acks()
        packed = self._packb([_PUBLISH, topic, data, kind, headers])
        if len(packed) > self.max_frame:
            self._too_large(packed)
        if self._blocked:
            self._hold(packed)
            return
        self._out.append(packed)
        self.out_bytes += len(packed)
        if not self._flush_wanted or self.out_bytes >= self._flush_at:
            self._flush_wanted = True
            self._sink.flush_wanted()

    def request(self, queue: str, data: bytes, kind: int, headers: dict[str, str] | None,
                timeout: float, reply_waiter: Any) -> int:
        """A SEND awaiting a RESPONSE: ``reply_waiter`` gets the reply's decoded body, or
        the error if the broker refuses the SEND. Returns the reply token (for
        :meth:`forget_reply`). Never resent.

        The SEND goes with rid 0, so the broker writes nothing back until the RESPONSE
        (an OK would wake this process once more per request); a refusal is an ERROR
        with rid 0 that names the token (PROTOCOL.md, request/reply)."""
        token = next(self._tokens)
        self._write([_SEND, 0, queue, data, kind, headers, timeout, token])
        self.replies[token] = reply_waiter
        return token

    def forget_reply(self, token: int) -> None:
        """The requester stopped waiting: a late RESPONSE is dropped."""
        self.replies.pop(token, None)

    def consume(self, queue: str, prefetch: int, receiver: Callable[[], StreamReceiver | None],
                waiter: Any, *, create: bool = True) -> int:
        """Register a consumer and write CONSUME (while DISCONNECTED: at restore); with
        ``create`` False it is passive (the queue must exist). Returns its stream id."""
        sid = self._register(receiver)
        self._consumers.add(sid)
        frame = [Op.CONSUME, 0, sid, queue, prefetch]
        if not create:
            frame.append(True)
        self._start_stream(frame, sid, waiter)
        return sid

    def subscribe(self, pattern: str, max_pending: int, policy: str,
                  receiver: Callable[[], StreamReceiver | None], waiter: Any) -> int:
        """Register a subscription and write SUBSCRIBE. Returns its stream id."""
        sid = self._register(receiver)
        self._start_stream([Op.SUBSCRIBE, 0, sid, pattern, max_pending, policy], sid, waiter)
        return sid

    def _register(self, receiver: Callable[[], StreamReceiver | None]) -> int:
        if self.error is not None:
            raise self.error
        sid = next(self._sids)
        self._streams[sid] = receiver
        return sid

    def _start_stream(self, frame: list[Any], sid: int, waiter: Any) -> None:
        if self.client_id is not None:
            self._stream_frames[sid] = frame
        if self._down:  # written by restore(), which hands it this waiter
            rid = next(self._rids)
            frame[1] = rid
            self.pending[rid] = waiter
        else:
            try:
                rid = self._request(frame, waiter)
            except BaseException:
                self.unregister(sid)
                raise
        if self.client_id is not None:
            starts = self._starts
            if len(starts) > 2 * len(self._streams) + 16:  # drop the answered ones
                self._starts = starts = {r: s for r, s in starts.items() if r in self.pending}
            starts[rid] = sid

    def unregister(self, sid: int) -> None:
        """Forget a stream the broker does not know (its SUBSCRIBE/CONSUME failed)."""
        self._streams.pop(sid, None)
        self._consumers.discard(sid)
        self._stream_frames.pop(sid, None)

    def cancel(self, sid: int) -> None:
        """Forget a stream and, if the connection is usable, write CANCEL for it (rid 0:
        nobody waits; this runs from ``__del__`` too). Frames for it are dropped."""
        self.unregister(sid)
        if not self._blocked:
            self._write([Op.CANCEL, 0, sid])

    def credit(self, sid: int, n: int) -> None:
        if self._blocked:  # a resubscribed stream starts with full credit
            if self.error is not None:
                raise self.error
            return
        self._write([_CREDIT, sid, n])

    def consumers(self) -> list[StreamReceiver]:
        """The live consumers' receivers."""
        found = (self._streams[sid]() for sid in self._consumers if sid in self._streams)
        return [receiver for receiver in found if receiver is not None]

    def receivers(self) -> list[StreamReceiver]:
        found = (ref() for ref in self._streams.values())
        return [receiver for receiver in found if receiver is not None]

    def settle(self, lease: int, outcome: str, delay: float | None, reason: str | None,
               waiter: Any) -> int:
        """ACK, NACK or REJECT a lease (``outcome``: ``"ack"``, ``"nack"``, ``"reject"``)."""
        tag = lease - self._tag_base if lease > self._tag_base else self._tag(lease)
        op = _SETTLE_OPS[outcome]
        if op == Op.ACK:
            return self._request([op, 0, tag], waiter)
        if op == Op.NACK:
            return self._request([op, 0, tag, delay, reason], waiter)
        return self._request([op, 0, tag, reason], waiter)

    def ack_nowait(self, lease: int) -> None:
        """Queue an ack for the next ACK_MANY (no answer unless it fails). The ack of a
        lease from an earlier transport is dropped: its message is redelivered."""
        if self._blocked:
            if self.error is not None:
                raise self.error
            self.lost_acks += 1
            return
        base = self._tag_base
        if lease <= base:
            self.lost_acks += 1
            return
        acks = self._acks
        acks.append(lease - base)
        if len(acks) >= ACK_BATCH:
            self._write_acks()
        if not self._flush_wanted:
            self._flush_wanted = True
            self._sink.flush_wanted()

    lost_acks = 0  # unconfirmed answers (acks, nacks, rejects, replies) dropped: lease lost

    def settle_nowait(self, lease: int, outcome: str, delay: float | None = None,
                      reason: str | None = None) -> None:
        """Answer a lease without waiting (``outcome`` as :meth:`settle`): an ack joins
        the next ACK_MANY, a NACK or REJECT is written with rid 0. A refusal comes back
        as ``sink.answer_failed``. The answer to a lease from an earlier transport is
        dropped and counted in :attr:`lost_acks`: its message is redelivered."""
        if outcome == "ack":
            self.ack_nowait(lease)
            return
        tag = self._nowait_tag(lease)
        if not tag:
            return
        if outcome == "nack":
            self._append([_NACK, 0, tag, delay, reason])
        else:
            self._append([_SETTLE_OPS[outcome], 0, tag, reason])

    def _nowait_tag(self, lease: int) -> int:
        """The broker's tag for an unconfirmed answer to ``lease``, or 0: the lease came
        on an earlier transport (or this one is down), so the answer is dropped and
        counted in :attr:`lost_acks` (the broker redelivers the message)."""
        if self._blocked:
            if self.error is not None:
                raise self.error
            self.lost_acks += 1
            return 0
        base = self._tag_base
        if lease <= base:
            self.lost_acks += 1
            return 0
        return lease - base

    def extend(self, lease: int, seconds: float, waiter: Any) -> int:
        return self._request([Op.EXTEND, 0, self._tag(lease), seconds], waiter)

    def reply(self, lease: int, data: bytes, kind: int, headers: dict[str, str] | None,
              waiter: Any) -> int:
        return self._request([Op.REPLY, 0, self._tag(lease), data, kind, headers], waiter)

    def reply_nowait(self, lease: int, data: bytes, kind: int,
                     headers: dict[str, str] | None) -> None:
        """REPLY with rid 0: a refusal comes back as ``sink.answer_failed`` (its ERROR
        names the tag), a reply to a lease from an earlier transport is dropped and
        counted in :attr:`lost_acks` (the request is redelivered)."""
        tag = self._nowait_tag(lease)
        if tag:
            self._append([Op.REPLY, 0, tag, data, kind, headers])

    def call(self, frame: list[Any], waiter: Any, *, resend: bool = False) -> int:
        """Any request frame with its rid at index 1 (DECLARE, PURGE, DELETE, STATS, PING,
        or a raw frame a test writes). ``resend``: idempotent, so a session writes it
        again on the next transport if it was not answered."""
        rid = self._request(frame, waiter)
        if resend and self.client_id is not None:
            self._frames[rid] = self._out[-1]
        return rid
