"""The client connection's reading side, sans I/O: bytes in, frames dispatched.

The base of :class:`~aiobus.client.connection.ClientConnection` (whose docstring has the
theory of operation): :meth:`~_Dispatcher.receive_data` decodes what the shell read and
hands every frame on: answers to the waiters of the requests they answer, through the
sink; DELIVER, EVENT and EVENTS to the receivers of their streams.

Frames stay plain lists and are dispatched inline, runs of DELIVER/EVENT for one stream
looking their receiver up once: an event object per frame would cost more than the rest
of the receive path (docs/performance.md).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Final

from ..errors import BodyDecodeError, BusError, RemoteProtocolError, from_code
from ..protocol import DEFAULT_MAX_FRAME, Op, decode_body
from .session import RESTORING, Session

if TYPE_CHECKING:
    from .connection import StreamReceiver

__all__ = ["LEASE_MEMORY"]

# Tags whose stream is remembered for attributing a late answer, per generation (two
# generations are kept): answers come within a few reads of their DELIVER in any loop
# that keeps up, and 64 Ki ints cost ~5 MB at most.
LEASE_MEMORY: Final = 65536
_LEASE_ERRORS: Final = frozenset({"lease-expired", "lease-unknown"})
_DELIVERY_TAG: Final = re.compile(r"\bdelivery (\d+)\b")
_OK, _OK_RANGE, _ERROR = int(Op.OK), int(Op.OK_RANGE), int(Op.ERROR)
_DELIVER, _EVENT, _EVENTS = int(Op.DELIVER), int(Op.EVENT), int(Op.EVENTS)
_RESPONSE, _WELCOME, _CLOSE = int(Op.RESPONSE), int(Op.WELCOME), int(Op.CLOSE)


class _Dispatcher(Session):
    """What a :class:`~aiobus.client.connection.ClientConnection` does with what it
    reads (see the module docstring)."""

    # Set by ClientConnection.__init__ (connection.py):
    max_frame: int
    async_errors: int
    _seqs: Iterator[int] | None
    _lease_sids: dict[int, int]
    _old_lease_sids: dict[int, int]

    def receive_data(self, data: bytes) -> None:
        """Decode ``data`` and dispatch every frame it completes.

        Raises:
            RemoteProtocolError: the broker sent something invalid; the connection is
                poisoned (frames already dispatched stay dispatched).
        """
        try:
            frames = self._decoder.feed(data)
            streams, sink = self._streams, self._sink
            # DELIVER and EVENT, the per-message frames, inline: one read holds runs of
            # them for the same stream, which is looked up once per run.
            sid: Any = None
            receiver: StreamReceiver | None = None
            base = self._tag_base
            frames_ = self._frames  # the resend buffer: answered frames leave it
            lease_sids = self._lease_sids
            for frame in frames:
                op = frame[0]
                if op == _DELIVER:
                    if frame[1] != sid:
                        sid = frame[1]
                        ref = streams.get(sid)
                        receiver = ref() if ref is not None else None
                    if receiver is not None:
                        _, _, tag, message, attempt, reply_to = frame
                        lease_sids[tag] = sid
                        receiver._deliver(tag + base, message, attempt, reply_to)
                elif op == _EVENT or op == _EVENTS:
                    if frame[1] != sid:
                        sid = frame[1]
                        ref = streams.get(sid)
                        receiver = ref() if ref is not None else None
                    if receiver is not None:
                        if op == _EVENT:
                            receiver._event(frame[2], frame[3])
                        else:
                            receiver._events(frame[2], frame[3])
                else:
                    sid = None  # whatever that frame did, look the next stream up again
                    if op == _OK:
                        waiter = self.pending.pop(frame[1], _MISSING)
                        if waiter is not _MISSING:
                            if frames_:
                                frames_.pop(frame[1], None)
                            sink.completed(waiter, frame[2])
                    elif op == _OK_RANGE:
                        self._on_ok_range(frame)
                    elif op == _ERROR:
                        self._on_error(frame)
                    elif op == _RESPONSE:
                        self._on_response(frame)
                    elif op == _WELCOME:
                        self._on_welcome(frame)
                    elif op == _CLOSE:
                        self.close_reason = (frame[1], frame[2])
                    else:
                        raise RemoteProtocolError(f"unexpected frame type {op!r}")
        except (BusError, IndexError, TypeError, ValueError, KeyError) as exc:
            raise RemoteProtocolError(f"broker sent an invalid frame: {exc!r}") from exc
        if len(self._lease_sids) >= LEASE_MEMORY:  # once per read, not per DELIVER
            self._old_lease_sids, self._lease_sids = self._lease_sids, {}

    def _forget_leases(self) -> None:
        """A new transport: its tags start a new count."""
        self._lease_sids = {}
        self._old_lease_sids = {}

    def _on_ok_range(self, frame: list[Any]) -> None:
        _, first, last = frame
        pending = self.pending
        # Bounded by what is pending, whatever range the broker names.
        rids = (range(first, last + 1) if last - first < len(pending)
                else [rid for rid in pending if first <= rid <= last])
        pop = pending.pop
        waiters = [pop(rid, None) for rid in rids]
        if self._frames:
            forget = self._frames.pop
            for rid in rids:
                forget(rid, None)
        self._sink.completed_all(waiters)

    def _on_error(self, frame: list[Any]) -> None:
        if len(frame) == 5:  # a request's SEND refused: [4, 0, code, message, token]
            _, rid, code, message, token = frame
            waiter = self.replies.pop(token, _MISSING) if rid == 0 else _MISSING
            if waiter is not _MISSING:
                self._sink.failed(waiter, from_code(code, message))
                return
        else:
            _, rid, code, message = frame
        waiter = self.pending.pop(rid, _MISSING)
        self._frames.pop(rid, None)
        if waiter is _MISSING:
            self.async_errors += 1
            receiver = self._answered_by(code, message) if rid == 0 else None
            if receiver is not None:
                self._sink.answer_failed(receiver, from_code(code, message))
            else:
                self._sink.failed(None, from_code(code, message))
        elif waiter is RESTORING:  # a stream could not be started again
            ref = self._streams.get(self._restores.pop(rid, 0))
            receiver = ref() if ref is not None else None
            if receiver is not None:
                self._sink.stream_failed(receiver, from_code(code, message))
        else:
            self._sink.failed(waiter, from_code(code, message))

    def _answered_by(self, code: str, message: str) -> StreamReceiver | None:
        """The consumer that delivered the lease a rid-0 lease ERROR names, if known."""
        if code not in _LEASE_ERRORS:
            return None
        match = _DELIVERY_TAG.search(message)
        if match is None:
            return None
        tag = int(match.group(1))
        sid = self._lease_sids.get(tag)
        if sid is None:
            sid = self._old_lease_sids.get(tag)
        ref = self._streams.get(sid) if sid is not None else None
        return ref() if ref is not None else None

    def _on_response(self, frame: list[Any]) -> None:
        _, token, body, kind, _headers = frame
        waiter = self.replies.pop(token, _MISSING)
        if waiter is _MISSING:
            return
        try:
            value = decode_body(body, kind)
        except Exception as exc:  # the replier's bug, not this connection's
            self._sink.failed(waiter, BodyDecodeError(f"the reply's body is undecodable: {exc}"))
        else:
            self._sink.completed(waiter, value)

    def _on_welcome(self, frame: list[Any]) -> None:
        info = frame[2]
        if not self.welcomed:
            self.welcomed = True
            self.max_frame = int(info.get("max_frame", DEFAULT_MAX_FRAME))
            if self.client_id is not None and info.get("dedup") and self._seqs is None:
                self._seqs = itertools.count(1)
            self._sink.welcomed(info)


_MISSING: Any = object()
