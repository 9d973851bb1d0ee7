"""The frame handlers: what the broker core does with each frame a client sends. No I/O,
no clock.

A layer of :class:`~aiobus.broker.core.BrokerCore` (core_state.py says how the layers
stack; core.py's docstring gives the event interface). ``receive`` (core.py) finds a
frame's handler in its connection's table (made here, by ``_handler_tables``), checks
access (``ACCESS``), and calls it. Each handler validates its frame: the hot ones (SEND,
PUBLISH, ACK, ACK_MANY) inline, with ``check_frame`` as the exact fallback that names the
bad field; the others call ``check_frame`` first. A handler raises a ``BusError`` for an
ERROR reply, and a ``RemoteProtocolError`` to close the connection.
"""

from __future__ import annotations

import contextlib
from typing import Any

from ..errors import (
    InvalidName,
    LeaseError,
    QuotaExceeded,
    RemoteProtocolError,
    SubscriptionError,
    shown,
)
from ..names import is_reserved
from ..protocol import PROTOCOL_VERSION, Op, check_frame
from .core_state import (
    TOPIC_CONNECTED,
    VERSION,
    Conn,
    ConnState,
    CoreState,
    Handler,
    _stats_options,
)
from .dedup import MAX_SEQ, check_client_id, check_seq
from .queue_state import Consumer, QMsg, Queue, pack_message
from .queues import MAX_PREFETCH
from .settings import DLQ_SUFFIX, MAX_SECONDS, BadOption
from .topics import Subscription

__all__ = ["FrameHandlers"]

MAX_CLIENT_NAME = 255


def _valid_headers(headers: Any) -> bool:
    """Headers are a map of str to str (the slow path names what is wrong)."""
    if type(headers) is not dict:
        return False
    for key, value in headers.items():
        if type(key) is not str or type(value) is not str:
            return False
    return True


class FrameHandlers(CoreState):
    """One handler per client frame (see the module docstring)."""

    def _handler_tables(self) -> tuple[dict[int, Handler], dict[int, Handler]]:
        """What each connection state accepts, by frame type: HANDSHAKE only HELLO, OPEN
        every other frame a client sends (called once, by ``__init__``)."""
        handshake: dict[int, Handler] = {Op.HELLO: self._on_hello}
        opened: dict[int, Handler] = {
            Op.PING: self._on_ping,
            Op.SEND: self._on_send,
            Op.PUBLISH: self._on_publish,
            Op.SUBSCRIBE: self._on_subscribe,
            Op.CONSUME: self._on_consume,
            Op.CANCEL: self._on_cancel,
            Op.CREDIT: self._on_credit,
            Op.ACK: self._on_ack,
            Op.NACK: self._on_nack,
            Op.REJECT: self._on_reject,
            Op.EXTEND: self._on_extend,
            Op.REPLY: self._on_reply,
            Op.DECLARE: self._on_declare,
            Op.STATS: self._on_stats,
            Op.ACK_MANY: self._on_ack_many,
            Op.PURGE: self._on_purge,
            Op.DELETE: self._on_delete,
            Op.PEEK: self._on_peek,
        }
        return handshake, opened

    # -- handlers -------------------------------------------------------------------

    def _on_hello(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        version, options = frame[1], frame[2]
        if version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                f"protocol version {shown(version)} is not supported; this broker speaks"
                f" {PROTOCOL_VERSION}",
                code="unsupported-version",
            )
        name = options.get("name")
        if name is not None and (type(name) is not str or len(name) > MAX_CLIENT_NAME):
            raise RemoteProtocolError("HELLO.options.name must be a str of at most 255 chars",
                                      code="bad-field")
        conn.name = name
        conn.client_id = client_id = check_client_id(options.get("client_id"))
        conn.id_prefix = None if client_id is None else client_id + "-"
        conn.state = ConnState.OPEN
        conn.handlers = self._handlers
        info = {
            "server": f"aiobus/{VERSION}",
            "conn": conn.id,
            "max_frame": self.max_frame,
            "pid": conn.pid,
            "uid": conn.uid,
        }
        if self.queues.dedup_size:  # a client resends only to a broker that says this
            info["dedup"] = {"window": self.queues.dedup_window,
                             "size": self.queues.dedup_size}
        self._sink.send(conn.id, [Op.WELCOME, PROTOCOL_VERSION, info])
        self._presence(TOPIC_CONNECTED, conn, self._now)

    def _on_ping(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        self.reply_ok(conn.id, frame[1])

    def _on_send(self, conn: Conn, frame: list[Any], now: float) -> None:
        size = len(frame)
        if size > 2:  # the access check first, as receive() does for other frames
            name = frame[2]  # not a str: the checks below name the bad field
            if type(name) is str and conn.allowed_send.get(name) is not True:
                self._check_access(conn, "send", name)
        if size == 8:  # without the optional delay (older clients; the usual SEND)
            _, rid, name, body, kind, headers, ttl, token = frame
            delay = seq = None
        else:
            if size == 10:  # with a seq: a resendable SEND (the Python client's)
                _, rid, name, body, kind, headers, ttl, token, delay, seq = frame
                if seq is not None and (type(seq) is not int or seq < 0):
                    check_frame(frame)
            elif size == 9:
                _, rid, name, body, kind, headers, ttl, token, delay = frame
                seq = None
            else:
                check_frame(frame)
            if delay is not None and type(delay) is not float and type(delay) is not int:
                check_frame(frame)
        if (type(rid) is not int or rid < 0 or type(name) is not str or type(body) is not bytes
                or type(kind) is not int or not 0 <= kind <= 1
                or (headers is not None and not _valid_headers(headers))
                or (ttl is not None and type(ttl) is not float and type(ttl) is not int)
                or (token is not None and (type(token) is not int or token < 0))):
            check_frame(frame)
        if ttl is not None and not 0 < ttl < MAX_SECONDS:
            raise BadOption("ttl must be a positive number of seconds, below 1e9")
        due = None
        if delay is not None:
            if not 0 <= delay < MAX_SECONDS:
                raise BadOption("delay must be a number of seconds from 0 up to 1e9")
            if delay > 0:
                due = now + delay
        mid = prefix = None
        if seq is not None:  # checked before the queue is created, as ttl and delay
            prefix = conn.id_prefix
            if prefix is None or token is not None or not 0 < seq <= MAX_SEQ:
                check_seq(seq, conn.client_id, token)  # raises: says which
                raise AssertionError("a client_id without an id prefix")
            mid = prefix + str(seq)
        queue = self.queues.queues.get(name)
        if queue is None:  # the name passed _check_access in receive()
            queue = self.queues.get_for(name, conn.uid)
        packed = pack_message(self._new_id() if mid is None else mid, name, body, kind,
                              headers or None, now + self.wall_offset)
        if ttl is None and token is None and due is None:
            self.queues.send(conn.id, rid, queue, packed, now, prefix, seq or 0)
        else:
            # A scheduled message's TTL counts from its due time (PROTOCOL.md, TTL).
            expires = None if ttl is None else (now if due is None else due) + ttl
            reply = (conn.id, token) if token is not None else None
            self.queues.send(conn.id, rid, queue, QMsg(packed, expires, reply, due), now,
                             prefix, seq or 0)

    def _on_publish(self, conn: Conn, frame: list[Any], now: float) -> None:
        if len(frame) > 1:  # the access check first, as receive() does for other frames
            topic = frame[1]
            if type(topic) is str and conn.allowed_publish.get(topic) is not True:
                self._check_access(conn, "publish", topic)
        if len(frame) != 5:
            check_frame(frame)
        _, topic, body, kind, headers = frame  # a str topic passed _check_access
        if (type(topic) is not str or type(body) is not bytes or type(kind) is not int
                or not 0 <= kind <= 1
                or (headers is not None and not _valid_headers(headers))):
            check_frame(frame)
        self.topics.publish(topic, self._packb(
            [self._new_id(), topic, body, kind, headers or None, now + self.wall_offset]))

    def _check_sid(self, conn: Conn, sid: int) -> None:
        if sid in conn.subs or sid in conn.consumers:
            raise SubscriptionError(f"subscription id {sid} is already in use on this connection",
                                    code="duplicate-subscription")

    def _on_subscribe(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, sid, pattern, max_pending, policy = frame
        self.topics.check_options(max_pending, policy)
        self._check_sid(conn, sid)
        count = self._uid_subs.get(conn.uid, 0)
        if count >= self.max_subscriptions_per_uid:
            raise QuotaExceeded(
                f"uid {conn.uid} already has max_subscriptions_per_uid="
                f"{self.max_subscriptions_per_uid} subscriptions; cancel some, or use"
                " wildcards ('orders.*') instead of one subscription per name")
        self._uid_subs[conn.uid] = count + 1
        sub = Subscription(conn.id, sid, pattern, max_pending, policy)
        conn.subs[sid] = sub
        self.topics.add(sub)
        self.reply_ok(conn.id, rid)

    def _on_consume(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        rid, sid, name, prefetch = frame[1:5]
        if not 1 <= prefetch <= MAX_PREFETCH:
            raise BadOption(f"prefetch must be between 1 and {MAX_PREFETCH}")
        self._check_sid(conn, sid)
        if len(conn.consumers) >= self.max_consumers:
            raise QuotaExceeded(
                f"this connection already has max_consumers={self.max_consumers} consumers;"
                " cancel one first, or raise prefetch instead of adding consumers"
            )
        held = self._uid_prefetch.get(conn.uid, 0)
        if held + prefetch > self.max_unacked_per_uid:
            raise QuotaExceeded(
                f"uid {conn.uid} would hold more than max_unacked_per_uid="
                f"{self.max_unacked_per_uid} unacked messages (its consumers' prefetch adds"
                f" up to {held}, this one asks for {prefetch}); cancel a consumer or lower"
                " prefetch")
        # passive (AMQP's queue.declare passive): consume only a queue that exists, so
        # reading a mistyped name says so instead of creating it.
        passive = len(frame) > 5 and frame[5]
        queue = self.queues.existing(name) if passive else self.queues.get_for(name, conn.uid)
        self._uid_prefetch[conn.uid] = held + prefetch
        consumer = Consumer(conn.id, sid, queue, prefetch, conn.pid, conn.uid)
        consumer.held = conn.congested
        conn.consumers[sid] = consumer
        self.reply_ok(conn.id, rid)  # before the first DELIVER, so the client is ready
        self.queues.add_consumer(consumer, now)

    def _on_cancel(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, sid = frame
        consumer = conn.consumers.pop(sid, None)
        if consumer is not None:
            self.queues.remove_consumers([consumer], now, failed=False)
            self._uncount(self._uid_prefetch, conn.uid, consumer.prefetch)
        else:
            sub = conn.subs.pop(sid, None)
            if sub is None:
                raise SubscriptionError(f"no subscription or consumer {sid} on this connection")
            self.topics.remove(sub)
            self._uncount(self._uid_subs, conn.uid, 1)
        self.reply_ok(conn.id, rid)

    def _on_credit(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        sub = conn.subs.get(frame[1])
        if sub is not None:  # a CREDIT racing a CANCEL is harmless
            self.topics.credit(sub, frame[2])

    def _on_ack(self, conn: Conn, frame: list[Any], now: float) -> None:
        if (len(frame) != 3 or type(frame[1]) is not int or frame[1] < 0
                or type(frame[2]) is not int or frame[2] < 0):
            check_frame(frame)
        self.queues.ack(conn.id, frame[2], now)
        self.reply_ok(conn.id, frame[1])

    def _on_ack_many(self, conn: Conn, frame: list[Any], now: float) -> None:
        if len(frame) != 2 or type(frame[1]) is not list:
            check_frame(frame)
        ack_later, pump = self.queues.ack_later, self.queues.pump
        pending: Queue | None = None  # acked in, not pumped yet (the tags' usual one queue)
        try:
            for tag in frame[1]:
                if type(tag) is not int or tag < 0:
                    check_frame(frame)
                try:
                    queue = ack_later(conn.id, tag, now)
                except LeaseError as exc:  # one late ack must not lose the others
                    self._sink.send(conn.id, [Op.ERROR, 0, exc.code or "lease-unknown",
                                              str(exc)])
                    continue
                if queue is not pending:
                    if pending is not None:
                        pump(pending, now)
                    pending = queue
        finally:  # a bad tag further on must not leave freed slots unfilled
            if pending is not None:
                pump(pending, now)

    def _on_nack(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, tag, delay, reason = frame
        self.queues.nack(conn.id, tag, delay, reason, now)
        self.reply_ok(conn.id, rid)

    def _on_reject(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, tag, reason = frame
        self.queues.reject(conn.id, tag, reason, now)
        self.reply_ok(conn.id, rid)

    def _on_extend(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, tag, seconds = frame
        self.queues.extend(conn.id, tag, seconds, now)
        self.reply_ok(conn.id, rid)

    def _on_reply(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, tag, body, kind, headers = frame
        lease = self.queues.leases.get(tag)
        if lease is not None and lease.consumer.conn == conn.id:  # else reply() says why
            self._check_access(conn, "consume", lease.consumer.queue.name)
        requester, token = self.queues.reply(conn.id, tag, now)
        if requester in self._conns:  # a requester that left gets nothing, as it asked
            self._sink.send(requester, [Op.RESPONSE, token, body, kind, headers or None])
        self.reply_ok(conn.id, rid)

    def _on_declare(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, name, options = frame
        # Dead letters go where the queue's declaration says: whoever declares the route
        # must be allowed to send there (its own "<name>.dlq" is part of the queue).
        # (Without a policy there is nothing to check; a bad name is the settings' to name.)
        target = options.get("dead_letter")
        if (self.policy is not None and type(target) is str
                and target != name + DLQ_SUFFIX and not is_reserved(target)):
            with contextlib.suppress(InvalidName):
                self._check_access(conn, "send", target)
        queue = self.queues.declare(name, options, conn.uid)
        self.reply_ok(conn.id, rid, queue.settings.as_dict())

    def _on_purge(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, name = frame
        self.reply_ok(conn.id, rid, self.queues.purge(name, now))

    def _on_delete(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        _, rid, name, if_empty = frame
        self.reply_ok(conn.id, rid, self.queues.delete(name, if_empty, now))

    def _on_peek(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        self.reply_ok(conn.id, frame[1], self.peek(frame[2], frame[3] if len(frame) > 3
                                                   else None))

    def _on_stats(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        options = frame[2] if len(frame) > 2 and frame[2] is not None else {}
        selection = _stats_options(options)
        if frame[1]:  # rid 0: no reply, so no need to build the statistics
            self.reply_ok(conn.id, frame[1], self.stats(**selection))
