"""The broker's state machine: connections, frame dispatch, queues, topics. No I/O, no clock.

Feed it events and read what it wants done from the :class:`Sink` it was given:

* ``connect(conn, pid, uid, gid, now)`` when a client connects (credentials from
  SO_PEERCRED), ``receive(conn, frame, now)`` for each decoded frame,
  ``disconnect(conn, now)`` when the connection is gone, ``tick(now)`` when
  ``next_deadline()`` has come.
* It calls ``sink.send(conn, frame)`` for every frame to write (``sink.send_raw(conn,
  data)`` for DELIVER frames, which it assembles from stored bytes, ``sink.event(conn,
  sid, message, dropped)`` for EVENTs and ``sink.confirm(conn, rid)`` for an OK without
  a result),
  ``sink.close(conn, code, message)`` to close a connection with a CLOSE frame, and
  ``sink.set_reading(conn, flag)`` to stop and resume reading a producer that is
  blocked on full queues.

The shell's own administration (the web dashboard, aiobus.web) calls ``peek``,
``requeue_dead_letters`` and ``purge`` directly, then flushes as after a frame.
``stats()`` builds the typed statistics (aiobus.stats.BrokerStats) from counters kept
as things happen; the ``process`` part comes from the shell's ``process_stats`` hook.

``now`` is a monotonic number of seconds; ``wall_offset`` turns it into epoch time for
timestamps and headers. The asyncio server (server.py) is a thin shell around this;
tests drive it directly (tests/unit/helpers.py, tests/unit/test_core_*.py).

Access. Every request that names a queue or topic is checked once, in ``receive``,
before its handler runs: ``ACCESS`` says, per frame type, which verb it is and which
field holds the name (SEND and PUBLISH, the per-message frames, are checked the same way
as the first thing their handlers do: ``HOT_ACCESS``), and ``_check_access`` is the only
place that checks names for the grammar, the reserved ``$`` prefix and the policy
(broker/policy.py, injected by the launcher; None lets every uid that can open the
socket do everything, as before policies). Answers are cached per connection and verb,
so a connection's next SEND to the same queue costs one dict lookup; ``set_policy``
drops every cache. Dead-lettering and REPLY are checked where their route is chosen:
DECLARE of an explicit ``dead_letter`` needs ``send`` on that queue, and a REPLY needs
``consume`` on the queue the request came from (it can only go to that request's
sender).

Connection states: HANDSHAKE (only HELLO is accepted, until ``handshake_timeout``), then
OPEN until closed by either side. A protocol violation closes only the connection that
made it; request errors (bad names, full queues, late acks) are ERROR replies and the
connection carries on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Final, Protocol

import msgpack

from ..errors import (
    BusError,
    Forbidden,
    InvalidName,
    LeaseError,
    PermissionDenied,
    QuotaExceeded,
    RemoteProtocolError,
    SubscriptionError,
    shown,
)
from ..names import check_name, check_pattern, is_reserved, matches
from ..protocol import DEFAULT_MAX_FRAME, PROTOCOL_VERSION, BodyKind, Op, check_frame
from ..stats import STATS_VERSION, BrokerStats, ConnectionStats, ProcessStats
from .browse import check_peek, peek
from .dedup import MAX_SEQ, check_client_id, check_seq
from .policy import ALL_QUEUES, Policy
from .queue_state import Consumer, QMsg, Queue, pack_message
from .queues import MAX_PREFETCH, PARK_LIMIT, JournalSink, QueueRouter
from .settings import (
    DEFAULT_DEDUP_SIZE,
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_MAX_CONNECTIONS_PER_UID,
    DEFAULT_MAX_PARKED_BYTES,
    DEFAULT_MAX_PARKED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUED_BYTES_PER_UID,
    DEFAULT_MAX_QUEUES_PER_UID,
    DEFAULT_MAX_SUBSCRIPTIONS_PER_UID,
    DEFAULT_MAX_UNACKED_PER_UID,
    DLQ_SUFFIX,
    MAX_SECONDS,
    SWEEP_INTERVAL,
    BadOption,
)
from .timers import Timers
from .topics import Subscription, TopicRouter

__all__ = ["BrokerCore", "Sink"]

VERSION = "0.1.0"
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
# Consumers one connection may hold. Concurrency within a consumer comes from prefetch;
# thousands of consumers on one connection are a leak, not a design (RabbitMQ caps a
# connection at 2,047 channels for the same reason).
DEFAULT_MAX_CONSUMERS = 4096
MAX_CLIENT_NAME = 255
TOPIC_CONNECTED = "$sys.client.connected"
TOPIC_DISCONNECTED = "$sys.client.disconnected"
# Names one connection's access cache keeps per verb; past this it starts over (a client
# cycling through names costs a policy lookup per new name, not unbounded memory).
_ACCESS_CACHE_LIMIT = 4096
# A connection's cache of a verb it has not used yet: shared, empty, and never written
# (Conn.allowed holds the real ones).
_NOT_CACHED: Final[dict[str, bool]] = {}

# The one access table: per frame type, the verb it needs and the field holding the name
# it acts on (None: STATS, which shows every queue and connection). SEND and PUBLISH,
# the per-message frames, are checked by their handlers first thing, with the same
# cache and the same _check_access (one attribute and one dict lookup instead of this
# table's walk): HOT_ACCESS says so, and a test checks the two tables cover every verb.
HOT_ACCESS: dict[int, tuple[str, int]] = {Op.SEND: ("send", 2), Op.PUBLISH: ("publish", 1)}
ACCESS: dict[int, tuple[str, int | None]] = {
    Op.CONSUME: ("consume", 3),
    Op.SUBSCRIBE: ("subscribe", 3),
    Op.DECLARE: ("declare", 2),
    Op.PURGE: ("admin", 2),
    Op.DELETE: ("admin", 2),
    Op.STATS: ("admin", None),
    Op.PEEK: ("consume", 2),  # reads messages, as consuming does; changes nothing
}
# Called with (conn, pid, uid, verb, name) for each denied request (the shell logs it).
DeniedHook = Callable[[int, int, int, str, str], None]
# Asked for the process part of STATS (memory, loop lag): what only the shell can measure.
ProcessHook = Callable[[], ProcessStats]
# STATS lists at most this many queues, subscriptions and connections each (by default,
# and at most when asked): a result stays far below a client's 2^20 map limit and a few
# MB, and costs the broker milliseconds. More: page with ``after``, filter with ``queues``.
DEFAULT_STATS_LIMIT = 10_000
MAX_STATS_LIMIT = 10_000


def _valid_headers(headers: Any) -> bool:
    """Headers are a map of str to str (the slow path names what is wrong)."""
    if type(headers) is not dict:
        return False
    for key, value in headers.items():
        if type(key) is not str or type(value) is not str:
            return False
    return True


class Sink(Protocol):
    """The broker core's outputs. The server implements it over sockets; tests record."""

    def send(self, conn: int, frame: list[Any]) -> None: ...

    def send_raw(self, conn: int, data: bytes) -> None:
        """Write an already encoded frame (deliveries and events are built from the
        stored message bytes, not re-encoded)."""

    def confirm(self, conn: int, rid: int) -> None:
        """Request ``rid`` succeeded with no result: an OK ``[3, rid, nil]``, which the
        shell may merge with the confirmations of the requests just before and after it
        into one OK_RANGE (a client pipelining confirmed sends gets one frame per run)."""

    def event(self, conn: int, sid: int, message: bytes, dropped: int) -> None:
        """An EVENT ``[31, sid, message, dropped]`` (``message`` encoded), which the shell
        may merge with the EVENTs for ``sid`` just before it into one EVENTS frame, as long
        as nothing else is written to the connection between them and ``dropped`` is 0."""

    def close(self, conn: int, code: str, message: str) -> None: ...

    def set_reading(self, conn: int, reading: bool) -> None: ...


def _stats_options(options: Any) -> dict[str, Any]:
    """STATS's options map, checked: ``queues`` (a name pattern), ``limit`` (1 to
    MAX_STATS_LIMIT) and ``after`` (a queue name: the page after it).

    Raises:
        BadOption, InvalidName: naming the option.
    """
    result: dict[str, Any] = {}
    for key, value in options.items():
        if key == "queues":
            result[key] = check_pattern(value)
        elif key == "limit":
            if type(value) is not int or not 1 <= value <= MAX_STATS_LIMIT:
                raise BadOption(f"STATS limit must be an int from 1 to {MAX_STATS_LIMIT};"
                                f" got {shown(value)}")
            result[key] = value
        elif key == "after":
            if value is not None and type(value) is not str:
                raise BadOption(f"STATS after must be a queue name; got {shown(value)}")
            result[key] = value
        else:
            raise BadOption(f"unknown STATS option {shown(key)}; known: after, limit, queues")
    return result


class ConnState(Enum):
    HANDSHAKE = "handshake"  # connected; waiting for HELLO
    OPEN = "open"  # handshake done; any client frame accepted


class Conn:
    __slots__ = ("allowed", "allowed_publish", "allowed_send", "client_id", "congested",
                 "consumers", "gid", "gids", "handlers", "id", "id_prefix", "name", "parked",
                 "parked_bytes", "parked_queues", "pid", "reading", "state", "subs", "uid")

    def __init__(self, conn_id: int, pid: int, uid: int, gid: int,
                 gids: Iterable[int] = ()) -> None:
        self.id = conn_id
        self.pid = pid
        self.uid = uid
        self.gid = gid
        # SO_PEERCRED's and SO_PEERGROUPS' (a tuple: a frozenset was ~200 bytes more per
        # connection, and the policy only asks whether a grant names any of them)
        self.gids = (gid, *gids)
        # The access cache: per verb, names already checked and the answer; a verb's
        # dict is made at its first check (six empty dicts were ~900 bytes of every idle
        # connection). The hot verbs' caches are at hand, _NOT_CACHED until made.
        self.allowed: dict[str, dict[str, bool]] = {}
        self.allowed_send = self.allowed_publish = _NOT_CACHED
        self.name: str | None = None
        self.client_id: str | None = None  # HELLO's: the prefix of its resendable ids
        self.id_prefix: str | None = None  # client_id + "-"
        self.state = ConnState.HANDSHAKE
        self.handlers: dict[int, Handler] = {}  # what this state accepts, by frame type
        self.consumers: dict[int, Consumer] = {}
        self.subs: dict[int, Subscription] = {}
        self.parked = 0  # sends waiting for room in full queues
        self.parked_bytes = 0  # and the bytes of their messages
        self.parked_queues: set[str] | None = None  # the queues they wait in (made at
        # the first park: a set was ~200 bytes of every idle connection)
        self.reading = True
        self.congested = False  # unread output above max_pending_output (set_congested)

    def describe(self) -> dict[str, Any]:
        return {"conn": self.id, "name": self.name, "pid": self.pid, "uid": self.uid,
                "gid": self.gid}

    def stats(self) -> ConnectionStats:
        return {"conn": self.id, "name": self.name, "pid": self.pid, "uid": self.uid,
                "gid": self.gid, "consumers": len(self.consumers),
                "subscriptions": len(self.subs), "parked": self.parked,
                "parked_bytes": self.parked_bytes}


Handler = Callable[[Conn, list[Any], float], None]


class BrokerCore:
    """All broker state. See the module docstring for the event interface."""

    def __init__(
        self,
        sink: Sink,
        *,
        id_prefix: str,
        wall_offset: float = 0.0,
        max_frame: int = DEFAULT_MAX_FRAME,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        max_consumers: int = DEFAULT_MAX_CONSUMERS,
        max_parked_bytes: int = DEFAULT_MAX_PARKED_BYTES,
        max_connections_per_uid: int = DEFAULT_MAX_CONNECTIONS_PER_UID,
        max_queues_per_uid: int = DEFAULT_MAX_QUEUES_PER_UID,
        max_queued_bytes_per_uid: int = DEFAULT_MAX_QUEUED_BYTES_PER_UID,
        max_subscriptions_per_uid: int = DEFAULT_MAX_SUBSCRIPTIONS_PER_UID,
        max_unacked_per_uid: int = DEFAULT_MAX_UNACKED_PER_UID,
        max_parked_bytes_per_uid: int = DEFAULT_MAX_PARKED_BYTES_PER_UID,
        journal: JournalSink | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        dedup_size: int = DEFAULT_DEDUP_SIZE,
        policy: Policy | None = None,
        on_denied: DeniedHook | None = None,
        process_stats: ProcessHook | None = None,
    ) -> None:
        self._sink = sink
        self._process_stats = process_stats
        self.policy = policy
        self._on_denied = on_denied
        self._packb = msgpack.Packer().pack
        self._conns: dict[int, Conn] = {}
        self.timers = Timers()
        # The routers write deliveries straight to the shell's send_raw: one call less
        # per message than going through this class.
        self.queues = QueueRouter(self, self.timers, wall_offset, send_raw=sink.send_raw,
                                  journal=journal, dedup_window=dedup_window,
                                  dedup_size=dedup_size,
                                  max_queues_per_uid=max_queues_per_uid,
                                  max_queued_bytes_per_uid=max_queued_bytes_per_uid)
        self.journal = journal
        self.topics = TopicRouter(self, send_event=sink.event)
        self._id_prefix = id_prefix + "-"
        self._ids = itertools.count(1)
        self.wall_offset = wall_offset
        self.max_frame = max_frame
        self.handshake_timeout = handshake_timeout
        self.max_consumers = max_consumers
        self.max_parked_bytes = max_parked_bytes
        # Per-uid quotas (settings.py): connections, subscriptions and the prefetch of
        # consumers (their unacked messages) counted here, queues by the QueueRouter.
        # Entries go when they reach 0.
        self.max_connections_per_uid = max_connections_per_uid
        self.max_subscriptions_per_uid = max_subscriptions_per_uid
        self.max_unacked_per_uid = max_unacked_per_uid
        self._uid_conns: dict[int, int] = {}
        self._uid_subs: dict[int, int] = {}
        self._uid_prefetch: dict[int, int] = {}
        self.max_parked_bytes_per_uid = max_parked_bytes_per_uid
        self._uid_parked: dict[int, int] = {}  # bytes of parked SENDs
        self._sweep_armed = False
        self._now = 0.0
        self._handshake_handlers: dict[int, Handler] = {Op.HELLO: self._on_hello}
        self._handlers: dict[int, Handler] = {
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

    # -- events in ------------------------------------------------------------------

    def connect(self, conn_id: int, pid: int, uid: int, gid: int, now: float,
                gids: Iterable[int] = ()) -> None:
        """A client connected; it has ``handshake_timeout`` seconds to send HELLO.
        ``gids`` are its supplementary groups (SO_PEERGROUPS), where known."""
        self._now = now
        conn = self._conns[conn_id] = Conn(conn_id, pid, uid, gid, gids)
        conn.handlers = self._handshake_handlers
        count = self._uid_conns[uid] = self._uid_conns.get(uid, 0) + 1
        if not self._sweep_armed:
            self._sweep_armed = True
            self.timers.call_at(now + SWEEP_INTERVAL, self._on_sweep, None)
        if count > self.max_connections_per_uid:
            self.close(conn_id, "quota-exceeded",
                       f"uid {uid} already has max_connections_per_uid="
                       f"{self.max_connections_per_uid} connections")
            return
        self.timers.call_at(now + self.handshake_timeout, self._on_handshake_deadline, conn_id)

    def receive(self, conn_id: int, frame: Any, now: float) -> None:
        """One decoded frame from ``conn_id``."""
        self._now = now
        conn = self._conns.get(conn_id)
        if conn is None:
            return  # closed by us earlier in this batch; the rest of its frames are moot
        # Each handler validates its frame: the hot ones (SEND, PUBLISH, ACK) inline, with
        # check_frame as the exact fallback that names the bad field; the others call
        # check_frame first. The connection's table holds only what its state accepts.
        try:
            op = frame[0] if type(frame) is list and frame else None
            handler = conn.handlers.get(op) if type(op) is int else None
            if handler is None:
                self._refuse(conn, frame)
            else:
                access = ACCESS.get(frame[0])  # op: an int, as it has a handler
                if access is not None:
                    verb, field = access
                    if field is None:
                        self._check_access(conn, verb, ALL_QUEUES, checked=True)
                    elif len(frame) > field:
                        name = frame[field]  # not a str: the handler names the bad field
                        if type(name) is str and conn.allowed.get(
                                verb, _NOT_CACHED).get(name) is not True:
                            self._check_access(conn, verb, name)
                handler(conn, frame, now)
        except RemoteProtocolError as exc:
            self.close(conn_id, exc.code or "protocol", str(exc))
        except BusError as exc:
            op = frame[0]
            rid = frame[1] if op not in (Op.PUBLISH, Op.CREDIT) else 0
            error = [Op.ERROR, rid, exc.code or "error", str(exc)]
            if rid == 0 and op == Op.SEND and len(frame) > 7 and type(frame[7]) is int:
                error.append(frame[7])  # an unconfirmed request: its token says which
            self._sink.send(conn_id, error)

    @staticmethod
    def _refuse(conn: Conn, frame: Any) -> None:
        """A frame the connection's state has no handler for: say precisely why."""
        op = check_frame(frame)  # malformed or unknown frames raise here
        if conn.state is ConnState.HANDSHAKE:
            raise RemoteProtocolError("the first frame must be HELLO", code="protocol")
        if op == Op.HELLO:
            raise RemoteProtocolError("HELLO was already received on this connection",
                                      code="protocol")
        raise RemoteProtocolError(f"frame type {Op(op).name} is not sent by clients",
                                  code="unknown-frame")

    def _check_access(self, conn: Conn, verb: str, name: str, *,
                      checked: bool = False) -> None:
        """The one access check: may ``conn`` do ``verb`` on ``name``? Asks the policy
        once per (connection, verb, name) and caches the answer on the connection.

        Raises:
            InvalidName: not a name (or for ``subscribe`` a pattern) at all.
            Forbidden: a ``$`` name, the broker's whatever the policy says.
            PermissionDenied: the policy does not grant it.
        """
        cache = conn.allowed.get(verb)
        if cache is None:
            cache = conn.allowed[verb] = {}
            if verb == "send":
                conn.allowed_send = cache
            elif verb == "publish":
                conn.allowed_publish = cache
        ok = cache.get(name)
        if ok is None:
            if verb == "subscribe":
                check_pattern(name)  # subscribing to $sys. topics is how presence works
            elif verb == "publish":
                if is_reserved(name):  # forbidden, whatever else is wrong with the name
                    raise Forbidden(f"topic {shown(name)}: topics starting with '$' are the"
                                    " broker's")
                check_name(name, "topic")
            elif not checked:
                check_name(name, "queue name")
                if is_reserved(name):
                    raise Forbidden(f"queue name {shown(name)}: names starting with '$' are"
                                    " reserved")
            policy = self.policy
            ok = policy is None or policy.allow(conn.uid, conn.gids, verb, name)
            if len(cache) >= _ACCESS_CACHE_LIMIT:
                cache.clear()
            cache[name] = ok
        if not ok:
            if self._on_denied is not None:
                self._on_denied(conn.id, conn.pid, conn.uid, verb, name)
            raise PermissionDenied.of(verb, name, conn.uid)

    def set_policy(self, policy: Policy | None) -> None:
        """Use ``policy`` from now on (a reload): every cached answer is dropped, so the
        next request of each kind asks the new policy. Consumers and subscriptions made
        under the old policy stay; connections are not dropped."""
        self.policy = policy
        for conn in self._conns.values():
            for cache in conn.allowed.values():
                cache.clear()

    def protocol_error(self, conn_id: int, code: str, message: str) -> None:
        """The shell could not decode this connection's bytes: close it."""
        self.close(conn_id, code, message)

    def disconnect(self, conn_id: int, now: float) -> None:
        """The connection is gone (closed by the peer, broken, or closed by us)."""
        self._now = now
        conn = self._conns.pop(conn_id, None)
        if conn is None:
            return
        # Its parked sends go first: leases failed below free room that must not admit
        # them. Then every consumer at once, so each held lease counts one attempt.
        if conn.parked:
            self.queues.drop_parked(conn_id, conn.parked_queues or set())
            self._uncount(self._uid_parked, conn.uid, conn.parked_bytes)
        if conn.consumers:
            self.queues.remove_consumers(list(conn.consumers.values()), now, failed=True)
            self._uncount(self._uid_prefetch, conn.uid,
                          sum(consumer.prefetch for consumer in conn.consumers.values()))
        for sub in conn.subs.values():
            self.topics.remove(sub)
        if conn.subs:
            self._uncount(self._uid_subs, conn.uid, len(conn.subs))
        self._uncount(self._uid_conns, conn.uid, 1)
        self.topics.congested.discard(conn_id)
        conn.consumers.clear()
        conn.subs.clear()
        if conn.state is ConnState.OPEN:
            self._presence(TOPIC_DISCONNECTED, conn, now)

    @staticmethod
    def _uncount(counts: dict[int, int], uid: int, n: int) -> None:
        left = counts[uid] - n
        if left:
            counts[uid] = left
        else:
            del counts[uid]

    def _on_sweep(self, _: None, now: float) -> None:
        self.queues.sweep(now)
        self.timers.call_at(now + SWEEP_INTERVAL, self._on_sweep, None)

    def close(self, conn_id: int, code: str, message: str) -> None:
        """Close a connection from the broker's side, releasing its state now."""
        if conn_id not in self._conns:
            return
        self.disconnect(conn_id, self._now)
        self._sink.close(conn_id, code, message)

    def restore(self, recovered: Any, now: float) -> None:
        """Load the durable queues the journal recovered (before any client connects)."""
        self._now = now
        self.queues.restore(recovered, now)

    def drain(self) -> None:
        """Stop delivering (a shutdown): held leases may still be answered."""
        self.queues.pause()

    def held_leases(self) -> int:
        """Leases held and not expired, over all queues."""
        return self.queues.held()

    def tick(self, now: float) -> None:
        """Run the timers that are due (lease expiry, delays, TTL, handshake deadlines)."""
        self._now = now
        self.timers.run_due(now)

    def next_deadline(self) -> float | None:
        return self.timers.next_deadline()

    # -- sink side of the routers ---------------------------------------------------

    def reply_ok(self, conn: int, rid: int, result: Any = None) -> None:
        """OK for request ``rid`` (with ``result``, unless None); rid 0 asked for no
        reply."""
        if rid:
            if result is None:
                self._sink.confirm(conn, rid)
            else:
                self._sink.send(conn, [Op.OK, rid, result])

    def reply_error(self, conn: int, rid: int, error: BusError) -> None:
        """ERROR for request ``rid`` (0 included: failures are always reported)."""
        self._sink.send(conn, [Op.ERROR, rid, error.code or "error", str(error)])

    def set_parked(self, conn_id: int, delta: int, size: int, queue: str | None = None) -> None:
        """A connection's parked sends changed by ``delta`` sends and ``size`` bytes.
        At PARK_LIMIT sends or ``max_parked_bytes`` bytes it is no longer read
        (backpressure, not an error: its producer waits, as RabbitMQ blocks a publishing
        connection); at half of both it is read again. Counting bytes matters: 100 parked
        8 MiB sends had cost 832 MB, and the count alone allowed 4 GiB (issue 12)."""
        conn = self._conns[conn_id]
        parked = self._uid_parked.get(conn.uid, 0)
        if size > 0 and parked + size > self.max_parked_bytes_per_uid:
            raise QuotaExceeded(
                f"uid {conn.uid} already has {parked} bytes of sends waiting for room in"
                f" full queues, and max_parked_bytes_per_uid={self.max_parked_bytes_per_uid};"
                f" queue {shown(queue)} is full: retry later")
        if parked + size:
            self._uid_parked[conn.uid] = parked + size
        else:
            del self._uid_parked[conn.uid]
        conn.parked += delta
        conn.parked_bytes += size
        if queue is not None:
            if conn.parked_queues is None:
                conn.parked_queues = set()
            conn.parked_queues.add(queue)
        if conn.reading:
            if conn.parked >= PARK_LIMIT or conn.parked_bytes >= self.max_parked_bytes:
                conn.reading = False
                self._sink.set_reading(conn_id, False)
        elif conn.parked <= PARK_LIMIT // 2 and conn.parked_bytes <= self.max_parked_bytes // 2:
            conn.reading = True
            self._sink.set_reading(conn_id, True)

    def set_congested(self, conn_id: int, congested: bool, now: float) -> None:
        """The shell says whether ``conn_id``'s unread output is above the broker's
        ``max_pending_output``. While it is, events for its subscriptions wait as if
        they had no credit (topics.py, "Output bound") and its consumers get no new
        deliveries; afterwards both flow again. Called from within a fan-out, so
        congesting only flips flags (resuming sends and pumps)."""
        conn = self._conns.get(conn_id)
        if conn is None or conn.congested is congested:
            return
        conn.congested = congested
        if congested:
            self.topics.congested.add(conn_id)
            self.queues.set_consumers_held(list(conn.consumers.values()), True, now)
            return
        self.topics.congested.discard(conn_id)
        self.topics.resume(list(conn.subs.values()))
        if not conn.congested:  # sending what waited may have congested it again
            self.queues.set_consumers_held(list(conn.consumers.values()), False, now)

    def slow_consumer(self, conn: int, message: str) -> None:
        self.close(conn, "slow-consumer", message)

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

    def _on_handshake_deadline(self, conn_id: int, now: float) -> None:
        conn = self._conns.get(conn_id)
        if conn is not None and conn.state is ConnState.HANDSHAKE:
            self.close(conn_id, "handshake-timeout",
                       f"no HELLO within {self.handshake_timeout} seconds")

    def _on_ping(self, conn: Conn, frame: list[Any], now: float) -> None:
        check_frame(frame)
        self.reply_ok(conn.id, frame[1])

    def _new_id(self) -> str:
        return self._id_prefix + str(next(self._ids))

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

    def _presence(self, topic: str, conn: Conn, now: float) -> None:
        body = self._packb(conn.describe())
        self.topics.publish(topic, self._packb(
            [self._new_id(), topic, body, BodyKind.PACKED, None, now + self.wall_offset]),
            count=False)

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

    # -- administration from the shell (the broker's web dashboard) ---------------------

    def peek(self, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """What PEEK answers (browse.py): READY messages of ``name``, unchanged.

        Raises:
            NoSuchQueue, BadOption.
        """
        offset, limit, max_body, wanted = check_peek(options)
        return peek(self.queues.existing(name), offset, limit, max_body, wanted)

    def requeue_dead_letters(self, name: str, ids: Iterable[str] | None, now: float) -> int:
        """Send dead letters of ``name`` back to their queues (``QueueRouter.
        requeue_dead_letters``); returns how many.

        Raises:
            NoSuchQueue.
        """
        self._now = now
        return self.queues.requeue_dead_letters(name, None if ids is None else set(ids), now)

    def purge(self, name: str, now: float) -> int:
        """What PURGE does; returns how many messages were removed.

        Raises:
            NoSuchQueue.
        """
        self._now = now
        return self.queues.purge(name, now)

    # -- introspection --------------------------------------------------------------

    def stats(self, queues: str | None = None, limit: int = DEFAULT_STATS_LIMIT,
              after: str | None = None) -> BrokerStats:
        """Counters and gauges of queues, subscriptions and connections: at most
        ``limit`` of each (STATS used to list everything: with a million queues it took
        8 s and broke every client's 2^20 map limit). Queues are those whose names match
        the pattern ``queues`` (all without it) and sort after ``after``, the first
        ``limit`` by name; ``queues_total`` counts every match and ``queues_next`` is the
        ``after`` of the next page (None: this is the last)."""
        names = self.queues.queues
        if queues is not None or after is not None:
            selected = [name for name in names
                        if (after is None or name > after)
                        and (queues is None or matches(queues, name))]
        else:
            selected = list(names)
        total = len(selected)
        page = sorted(selected) if total <= limit else heapq.nsmallest(limit, selected)
        if after is not None:
            total += sum(1 for name in names if name <= after
                         and (queues is None or matches(queues, name)))
        subs = list(itertools.islice(
            (sub for conn in self._conns.values() for sub in conn.subs.values()), limit))
        return {
            "stats_version": STATS_VERSION,
            "server": f"aiobus/{VERSION}",
            "time": self._now + self.wall_offset,
            "queues": {name: names[name].stats() for name in page},
            "queues_total": total,
            "queues_next": page[-1] if page and len(selected) > limit else None,
            "topics": {
                "published": self.topics.published,
                "unrouted": self.topics.unrouted,
                "subscriptions": [sub.stats() for sub in subs],
                "subscriptions_total": sum(self._uid_subs.values()),
            },
            "connections": [c.stats() for c in itertools.islice(self._conns.values(), limit)],
            "connections_total": len(self._conns),
            "journal": self.journal.statistics() if self.journal is not None else None,
            "process": self._process_stats() if self._process_stats is not None else None,
        }

    def connection_ids(self) -> list[int]:
        return list(self._conns)

    def connection(self, conn_id: int) -> Conn | None:
        """The live connection ``conn_id`` (its name, pid, uid), if there is one."""
        return self._conns.get(conn_id)
