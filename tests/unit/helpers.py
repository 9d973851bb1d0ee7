"""Drive :class:`aiobus.broker.core.BrokerCore` without sockets or a clock.

:class:`RecordingSink` is the core's real output interface (``send``, ``close``,
``set_reading``) writing into per-connection inboxes; :class:`Driver` owns a core, a
fake ``now`` and fake connections, and :class:`Client` speaks frames for one of them,
as h11's tests join two endpoints in memory (h11/tests/helpers.py). Nothing here reads a
clock: time moves only when a test calls :meth:`Driver.advance`.
"""

from __future__ import annotations

import io
import itertools
from collections import defaultdict
from typing import Any, NamedTuple

import msgpack

from aiobus.broker.core import BrokerCore
from aiobus.protocol import FrameDecoder, Op, decode_body


def wire(frame: Any) -> Any:
    """``frame`` as the broker sees it after the codec: encoded with msgpack and decoded
    by a :class:`FrameDecoder` (so ``Op`` members become plain ints, tuples lists)."""
    (decoded,) = FrameDecoder().feed(msgpack.packb(frame, use_bin_type=True))
    return decoded


def plain_message(data: bytes) -> list[Any]:
    """One encoded message array, decoded exactly (nothing may follow it)."""
    (message,) = msgpack.Unpacker(io.BytesIO(data), raw=False)
    return message  # type: ignore[no-any-return]


class RecordingSink:
    """Records everything the core asks the shell to do, per connection."""

    def __init__(self) -> None:
        self.inbox: defaultdict[int, list[list[Any]]] = defaultdict(list)
        self.closed: dict[int, tuple[str, str]] = {}
        self.close_calls: list[int] = []
        self.reading: list[tuple[int, bool]] = []

    def send(self, conn: int, frame: list[Any]) -> None:
        assert type(frame) is list and frame, frame
        self.inbox[conn].append(frame)

    def send_raw(self, conn: int, data: bytes) -> None:
        """DELIVER and EVENT frames arrive encoded: decode them as a client would, and
        check that the bytes hold exactly one frame."""
        frames = list(msgpack.Unpacker(io.BytesIO(data), raw=False))
        assert len(frames) == 1, frames
        self.send(conn, frames[0])

    def confirm(self, conn: int, rid: int) -> None:
        self.send(conn, [Op.OK, rid, None])

    def event(self, conn: int, sid: int, message: bytes, dropped: int) -> None:
        """An EVENT with its message encoded: decode it as a client would."""
        self.send(conn, [Op.EVENT, sid, plain_message(message), dropped])

    def close(self, conn: int, code: str, message: str) -> None:
        self.close_calls.append(conn)
        self.closed[conn] = (code, message)

    def set_reading(self, conn: int, reading: bool) -> None:
        self.reading.append((conn, reading))

    def take(self, conn: int, op: int | None = None) -> list[list[Any]]:
        """Remove and return ``conn``'s frames (only those of type ``op`` if given)."""
        frames = self.inbox[conn]
        taken = [f for f in frames if op is None or f[0] == op]
        self.inbox[conn] = [f for f in frames if not (op is None or f[0] == op)]
        return taken


class Delivery(NamedTuple):
    """The fields of a DELIVER frame, by name."""

    sid: int
    tag: int
    id: str
    queue: str
    body: bytes
    kind: int
    headers: dict[str, str] | None
    timestamp: float
    attempt: int
    reply_to: str | None


class Event(NamedTuple):
    """The fields of an EVENT frame, by name."""

    sid: int
    id: str
    topic: str
    body: bytes
    kind: int
    headers: dict[str, str] | None
    timestamp: float
    dropped: int

    def value(self) -> Any:
        return decode_body(self.body, self.kind)


class Driver:
    """A broker core, a recording sink, a fake clock, and fake connections."""

    def __init__(self, **core_options: Any) -> None:
        core_options.setdefault("id_prefix", "t")
        self.sink = RecordingSink()
        self.core = BrokerCore(self.sink, **core_options)
        self.now = 0.0
        self._conn_ids = itertools.count(1)
        self._pids = itertools.count(4000)

    def open(self, pid: int | None = None, uid: int = 1000, gid: int = 1000) -> int:
        """A raw connection that has not sent HELLO yet."""
        conn = next(self._conn_ids)
        self.core.connect(conn, next(self._pids) if pid is None else pid, uid, gid, self.now)
        return conn

    def client(self, name: str | None = None, *, pid: int | None = None,
               uid: int = 1000, client_id: str | None = None) -> Client:
        """A connection after a successful handshake (its WELCOME already taken); with
        ``client_id``, it may send resendable SENDs (:meth:`Client.send_once`)."""
        conn = self.open(pid=pid, uid=uid)
        options: dict[str, str] = {} if name is None else {"name": name}
        if client_id is not None:
            options["client_id"] = client_id
        self.receive(conn, [Op.HELLO, 1, options])
        welcome = self.sink.take(conn)
        assert [f[0] for f in welcome] == [Op.WELCOME], welcome
        return Client(self, conn)

    def receive(self, conn: int, frame: Any) -> None:
        """Hand one frame to the core as if it came over the wire from ``conn``."""
        self.core.receive(conn, wire(frame), self.now)

    def advance(self, seconds: float) -> None:
        """Move the fake clock and run the timers that are due."""
        self.now += seconds
        self.core.tick(self.now)

    def advance_to(self, now: float) -> None:
        self.now = now
        self.core.tick(now)

    def queue_stats(self, name: str) -> dict[str, Any]:
        return dict(self.core.stats()["queues"][name])


class Client:
    """Frames in and out for one connection of a :class:`Driver`."""

    def __init__(self, driver: Driver, conn: int) -> None:
        self.driver = driver
        self.conn = conn
        self._rids = itertools.count(1)
        self._sids = itertools.count(1)

    # -- raw ------------------------------------------------------------------------

    def receive(self, *frame: Any) -> None:
        """Hand one frame from this client to the core."""
        self.driver.receive(self.conn, list(frame))

    def take(self, op: int | None = None) -> list[list[Any]]:
        return self.driver.sink.take(self.conn, op)

    def call(self, op: int, *fields: Any) -> list[Any] | None:
        """Send a request frame with a fresh rid; return its OK or ERROR reply, or None
        when the broker has not answered (yet). Other frames stay in the inbox."""
        rid = next(self._rids)
        self.receive(op, rid, *fields)
        inbox = self.driver.sink.inbox[self.conn]
        replies = [f for f in inbox if f[0] in (Op.OK, Op.ERROR) and f[1] == rid]
        assert len(replies) <= 1, replies
        for reply in replies:
            inbox.remove(reply)
        return replies[0] if replies else None

    def ok(self, op: int, *fields: Any) -> Any:
        """A request that must succeed; returns the OK result."""
        reply = self.call(op, *fields)
        assert reply is not None and reply[0] == Op.OK, reply
        return reply[2]

    def error(self, op: int, *fields: Any) -> tuple[str, str]:
        """A request that must fail; returns the ERROR's (code, message)."""
        reply = self.call(op, *fields)
        assert reply is not None and reply[0] == Op.ERROR, reply
        return reply[2], reply[3]

    @property
    def closed(self) -> tuple[str, str] | None:
        return self.driver.sink.closed.get(self.conn)

    # -- queues ---------------------------------------------------------------------

    def send(self, queue: str, body: bytes = b"m", *, headers: dict[str, str] | None = None,
             ttl: float | None = None, token: int | None = None) -> list[Any] | None:
        return self.call(Op.SEND, queue, body, 0, headers, ttl, token)

    def send_once(self, queue: str, seq: int | None, body: bytes = b"m", *,
                  delay: float | None = None, ttl: float | None = None,
                  token: int | None = None) -> list[Any] | None:
        """A resendable SEND: the 10-field frame, with ``seq``."""
        return self.call(Op.SEND, queue, body, 0, None, ttl, token, delay, seq)

    def declare(self, queue: str, **options: Any) -> Any:
        return self.call(Op.DECLARE, queue, options)

    def consume(self, queue: str, prefetch: int = 1) -> int:
        sid = next(self._sids)
        self.ok(Op.CONSUME, sid, queue, prefetch)
        return sid

    def cancel(self, sid: int) -> None:
        self.ok(Op.CANCEL, sid)

    def deliveries(self) -> list[Delivery]:
        # DELIVER [30, sid, tag, message, attempt, reply_to], flattened by name.
        return [Delivery(f[1], f[2], *f[3], f[4], f[5]) for f in self.take(Op.DELIVER)]

    def delivery(self) -> Delivery:
        """Exactly one DELIVER is waiting: take it."""
        got = self.deliveries()
        assert len(got) == 1, got
        return got[0]

    def ack(self, tag: int) -> list[Any] | None:
        return self.call(Op.ACK, tag)

    def nack(self, tag: int, delay: float | None = None,
             reason: str | None = None) -> list[Any] | None:
        return self.call(Op.NACK, tag, delay, reason)

    def reject(self, tag: int, reason: str | None = None) -> list[Any] | None:
        return self.call(Op.REJECT, tag, reason)

    def extend(self, tag: int, seconds: float) -> list[Any] | None:
        return self.call(Op.EXTEND, tag, seconds)

    # -- topics ---------------------------------------------------------------------

    def subscribe(self, pattern: str, max_pending: int = 100,
                  policy: str = "drop-oldest") -> int:
        sid = next(self._sids)
        self.ok(Op.SUBSCRIBE, sid, pattern, max_pending, policy)
        return sid

    def publish(self, topic: str, body: bytes = b"e",
                headers: dict[str, str] | None = None) -> None:
        self.receive(Op.PUBLISH, topic, body, 0, headers)

    def credit(self, sid: int, n: int) -> None:
        self.receive(Op.CREDIT, sid, n)

    def events(self) -> list[Event]:
        # EVENT [31, sid, message, dropped], flattened by name.
        return [Event(f[1], *f[2], f[3]) for f in self.take(Op.EVENT)]
