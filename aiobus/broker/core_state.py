"""The broker core's state, its connections, and what its frame handlers share: the one
access check, replies, message ids and presence events, and the queries (STATS, PEEK).
No I/O, no clock.

:class:`CoreState` is the base of :class:`~aiobus.broker.core.BrokerCore`, whose module
docstring gives the event interface and says where the rest is. The core is one class
in three layers, each a subclass of the one below (mixins side by side would be multiple
inheritance, which mypyc does not compile): this state, the frame handlers
(handlers.py), and the events the shell sends in (core.py). A layer calls
the layers below it directly, so a SEND, an ACK or a PUBLISH compiles to the same direct
calls as the single class did. The two calls that go up a layer are declared at the end
of this class, so each layer type-checks on its own: ``_handler_tables``, made once at
the end of ``__init__``, and ``close`` from ``slow_consumer`` (the routers' sinks,
QueueSink and TopicSink, are this class: it passes itself to them).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any, Final, Protocol

import msgpack

from ..errors import BusError, Forbidden, PermissionDenied, QuotaExceeded, shown
from ..names import check_name, check_pattern, is_reserved, matches
from ..protocol import DEFAULT_MAX_FRAME, BodyKind, Op
from ..stats import STATS_VERSION, BrokerStats, ConnectionStats, ProcessStats
from .browse import check_peek, peek
from .policy import Policy
from .queue_state import Consumer
from .queues import PARK_LIMIT, JournalSink, QueueRouter
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
    BadOption,
)
from .timers import Timers
from .topics import Subscription, TopicRouter

__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_MAX_CONSUMERS", "Conn", "ConnState",
           "CoreState", "Sink"]

VERSION = "0.1.0"
DEFAULT_HANDSHAKE_TIMEOUT = 5.0
# Consumers one connection may hold. Concurrency within a consumer comes from prefetch;
# thousands of consumers on one connection are a leak, not a design (RabbitMQ caps a
# connection at 2,047 channels for the same reason).
DEFAULT_MAX_CONSUMERS = 4096
TOPIC_CONNECTED = "$sys.client.connected"
TOPIC_DISCONNECTED = "$sys.client.disconnected"
# Names one connection's access cache keeps per verb; past this it starts over (a client
# cycling through names costs a policy lookup per new name, not unbounded memory).
_ACCESS_CACHE_LIMIT = 4096
# A connection's cache of a verb it has not used yet: shared, empty, and never written
# (Conn.allowed holds the real ones).
_NOT_CACHED: Final[dict[str, bool]] = {}

# Called with (conn, pid, uid, verb, name) for each denied request (the shell logs it).
DeniedHook = Callable[[int, int, int, str, str], None]
# Asked for the process part of STATS (memory, loop lag): what only the shell can measure.
ProcessHook = Callable[[], ProcessStats]
# STATS lists at most this many queues, subscriptions and connections each (by default,
# and at most when asked): a result stays far below a client's 2^20 map limit and a few
# MB, and costs the broker milliseconds. More: page with ``after``, filter with ``queues``.
DEFAULT_STATS_LIMIT = 10_000
MAX_STATS_LIMIT = 10_000


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


class CoreState:
    """The broker core's state (the layers above add the frame handlers and the events
    in: see the module docstring)."""

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
        # What each connection state accepts, by frame type (handlers.py); made last.
        self._handshake_handlers, self._handlers = self._handler_tables()

    # -- connections ----------------------------------------------------------------

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

    @staticmethod
    def _uncount(counts: dict[int, int], uid: int, n: int) -> None:
        left = counts[uid] - n
        if left:
            counts[uid] = left
        else:
            del counts[uid]

    def _new_id(self) -> str:
        return self._id_prefix + str(next(self._ids))

    def _presence(self, topic: str, conn: Conn, now: float) -> None:
        body = self._packb(conn.describe())
        self.topics.publish(topic, self._packb(
            [self._new_id(), topic, body, BodyKind.PACKED, None, now + self.wall_offset]),
            count=False)

    # -- replies, and the routers' callbacks (QueueSink, TopicSink) -----------------

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

    def slow_consumer(self, conn: int, message: str) -> None:
        self.close(conn, "slow-consumer", message)

    # -- queries (STATS, PEEK; the dashboard asks them too) -------------------------

    def peek(self, name: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
        """What PEEK answers (browse.py): READY messages of ``name``, unchanged.

        Raises:
            NoSuchQueue, BadOption.
        """
        offset, limit, max_body, wanted = check_peek(options)
        return peek(self.queues.existing(name), offset, limit, max_body, wanted)

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

    # -- implemented by the layers above (see the module docstring) -----------------

    def _handler_tables(self) -> tuple[dict[int, Handler], dict[int, Handler]]:
        """handlers.py's."""
        raise NotImplementedError

    def close(self, conn_id: int, code: str, message: str) -> None:
        """core.py's."""
        raise NotImplementedError
