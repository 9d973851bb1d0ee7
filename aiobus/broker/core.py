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
as the first thing their handlers do: ``HOT_ACCESS``), and ``_check_access`` (in
core_state.py) is the only place that checks names for the grammar, the reserved ``$``
prefix and the policy (broker/policy.py, injected by the launcher; None lets every uid
that can open the socket do everything, as before policies). Answers are cached per
connection and verb, so a connection's next SEND to the same queue costs one dict
lookup; ``set_policy`` drops every cache. Dead-lettering and REPLY are checked where
their route is chosen: DECLARE of an explicit ``dead_letter`` needs ``send`` on that
queue, and a REPLY needs ``consume`` on the queue the request came from (it can only go
to that request's sender).

Connection states: HANDSHAKE (only HELLO is accepted, until ``handshake_timeout``), then
OPEN until closed by either side. A protocol violation closes only the connection that
made it; request errors (bad names, full queues, late acks) are ERROR replies and the
connection carries on.

Where the code is. :class:`BrokerCore` is one class in three layers, each a subclass of
the one below and a module of its own (core_state.py says why): core_state.py holds the
state and the constructor, the connections (``Conn``, ``ConnState``), the one access
check (``_check_access``), replies and the routers' callbacks (``reply_ok``,
``set_parked``, ``slow_consumer``), and the queries (``stats``, ``peek``); handlers.py
the frame handlers (``_on_hello``, ``_on_send``, ...) and their table per connection
state; and this module the events in (``connect``, ``receive``, ``disconnect``,
``close``, ``tick``, ``set_congested``, ...) and the shell's administration.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import BusError, RemoteProtocolError
from ..protocol import Op, check_frame
from .core_state import (
    _NOT_CACHED,
    DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_MAX_CONSUMERS,
    TOPIC_DISCONNECTED,
    Conn,
    ConnState,
    Sink,
)
from .handlers import FrameHandlers
from .policy import ALL_QUEUES
from .settings import SWEEP_INTERVAL

# BrokerCore and its Sink, and (from core_state.py, imported from here before the core
# was split) the defaults the shell and the CLI show and the connection states.
__all__ = ["DEFAULT_HANDSHAKE_TIMEOUT", "DEFAULT_MAX_CONSUMERS", "BrokerCore", "Conn",
           "ConnState", "Sink"]

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


class BrokerCore(FrameHandlers):
    """All broker state. See the module docstring for the event interface (the
    constructor and the state: core_state.py's ``CoreState``)."""

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

    def _on_sweep(self, _: None, now: float) -> None:
        self.queues.sweep(now)
        self.timers.call_at(now + SWEEP_INTERVAL, self._on_sweep, None)

    def _on_handshake_deadline(self, conn_id: int, now: float) -> None:
        conn = self._conns.get(conn_id)
        if conn is not None and conn.state is ConnState.HANDSHAKE:
            self.close(conn_id, "handshake-timeout",
                       f"no HELLO within {self.handshake_timeout} seconds")

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

    # -- administration from the shell (the broker's web dashboard) -----------------

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

    def connection_ids(self) -> list[int]:
        return list(self._conns)

    def connection(self, conn_id: int) -> Conn | None:
        """The live connection ``conn_id`` (its name, pid, uid), if there is one."""
        return self._conns.get(conn_id)
