"""The NATS :class:`~aiobus.client.backend.Backend`: the same ``Bus`` on core NATS and
JetStream (``aiobus.connect("nats://host:4222")``; docs/nats.md).

Theory of operation
-------------------
One nats-py connection carries everything. The mapping itself (names, settings,
headers, dead letters, statistics) is sans-IO in ``nats_map.py``; this shell moves
messages:

* Writes on the per-message path (publish, unconfirmed and confirmed sends, acks) are
  appended to nats-py's outgoing buffer by :meth:`NatsBackend._write`, a plain call
  that kicks nats-py's flusher once per loop turn, as its own ``publish`` does, but
  without a coroutine per message (the Backend protocol's rule: what cannot block is a
  plain ``def``). It reaches into nats-py's private buffer (``_pending``,
  ``_flush_queue``), as the version range in pyproject pins. Confirmed sends carry a
  reply subject under this client's inbox; the PubAcks come back to one subscription
  and complete futures by token.
* A queue is a JetStream stream (``nats_queues.py``) with one durable pull consumer
  shared by every aiobus consumer; pulls, leases and dead letters are in
  ``nats_consume.py``.
* Sends (``nats_produce.py``): a confirmed send whose PubAck does not come (a cluster
  electing a leader) is sent again with the same ``Nats-Msg-Id``, which the stream
  deduplicates.
* Requests travel on core NATS, to the queue's consumers as a queue group
  (``nats_requests.py``).
* Topics are core subjects; a subscription's window (``max_pending`` in flight to the
  application plus ``max_pending`` waiting, the policy beyond) is kept in the client
  (``nats_topics.py``), credited by the stream as the local broker credits its
  subscriptions.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import os
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import nats
import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.protocol import command as prot

from ..broker.settings import QueueSettings
from ..errors import (
    BrokerUnavailable,
    BusError,
    ConnectionClosed,
    ConnectionLost,
)
from . import nats_map as nm
from .backend import (
    ConnectionState,
    StateChange,
    StreamTarget,
    emit_state,
    state_change_stream,
    wait_until_connected,
)
from .nats_consume import Consuming, _Pull
from .nats_internals import Bare, Direct, check_internals, internals_changed, round_trip
from .nats_produce import Producing
from .nats_queues import Queues
from .nats_requests import Requests
from .nats_topics import TopicWindow

__all__ = ["NatsBackend"]

log = logging.getLogger(__name__)

_API: Final = "$JS.API."
_API_TIMEOUT: Final = 5.0
_CLOSE_TIMEOUT: Final = 5.0  # aclose() waits this long for answers still due
_NO_NEWLINES: Final = str.maketrans("\r\n", "  ")
_HIGH_WATER: Final = 1024 * 1024  # nats-py buffer bytes above which writers wait


class NatsBackend(Producing, Queues, Consuming, Requests):
    """A connection to NATS. Open with :meth:`open`."""

    def __init__(self, url: str, name: str | None, *, reconnect: bool = True,
                 reconnect_delay: float = 0.05, max_reconnect_delay: float = 2.0,
                 max_reconnect_time: float | None = None,
                 publish_buffer: int = 1024 * 1024) -> None:
        self.path = url
        self._server, namespace, self._replicas = nm.parse_url(url)
        self.ns = nm.Namespace(namespace)
        self.name = name
        self.server_info: dict[str, Any] = {}
        self._loop = asyncio.get_running_loop()
        self._nc: NatsClient = NatsClient()
        self._reconnect = reconnect
        self._reconnect_delay = max(reconnect_delay, 0.05)
        self._max_reconnect_time = max_reconnect_time
        self._publish_buffer = publish_buffer
        self.max_body = 1024 * 1024
        self.writable = True
        self.connected = False
        self.reconnects = 0
        self._dropped = 0
        self._async_errors = 0
        self._error: BusError | None = None
        self._client_id = secrets.token_hex(8)
        self._seq = itertools.count(1)
        self._inbox = ""
        self._waiters: dict[str, asyncio.Future[Any]] = {}  # inbox token -> PubAck/reply
        self._queues: dict[str, QueueSettings] = {}  # queues known to exist
        self._looking: dict[str, asyncio.Future[QueueSettings]] = {}
        self._pulls: dict[int, _Pull] = {}
        self._subs: dict[int, TopicWindow] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._published = 0
        self._unconfirmed = 0  # unconfirmed sends whose PubAck has not come back
        self._drained: asyncio.Event | None = None
        self._unconfirmed_inbox = ""
        # stream -> the ack subject of its last plainly acked lease, while plain answers
        # to it were written since the last ping(): see ping().
        self._answered: dict[str, str | None] = {}
        self._last_acked: dict[str, str] = {}
        self._stream_info_cache: dict[str, Any] = {}  # for nats_stats
        self._changed = asyncio.Event()
        self._listeners: list[collections.deque[StateChange]] = []
        self._pid_uid = (os.getpid(), os.getuid())
        self._schedules = False  # the server has message schedules (2.12+)
        self._jetstream = False  # JetStream has answered an API request of this client
        self._watchdog: asyncio.Task[None] | None = None
        self._swept: set[str] = set()  # streams whose MAX_DELIVERIES advisories we sweep
        self._releasing: set[asyncio.Future[None]] = set()  # releases not yet complete
        self._sending: set[asyncio.Task[None]] = set()  # send_nowait()s looking up a queue
        self._pub_starts: dict[str, bytes] = {}  # topic -> b"PUB <subject> "
        self._parked: dict[str, int] = {}  # queue -> this client's sends waiting for room
        self._held: dict[str, list[Any]] = {}  # queue being looked up -> send_nowait()s
        self._closing = False

    # -- connection lifecycle -------------------------------------------------------------

    async def open(self) -> None:
        attempts = -1 if self._reconnect else 0
        if self._reconnect and self._max_reconnect_time is not None:
            attempts = max(1, int(self._max_reconnect_time / self._reconnect_delay))
        try:
            await self._nc.connect(
                servers=[self._server], name=self.name or "aiobus",
                allow_reconnect=self._reconnect, max_reconnect_attempts=attempts,
                # nats-py annotates seconds as int; it takes a float.
                reconnect_time_wait=self._reconnect_delay,  # type: ignore[arg-type]
                connect_timeout=5,
                pending_size=self._publish_buffer,
                disconnected_cb=self._on_disconnected, reconnected_cb=self._on_reconnected,
                closed_cb=self._on_closed, error_cb=self._on_error)
        except (OSError, nats.errors.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot connect to NATS at {self._server}: {exc}") from exc
        try:
            check_internals(self._nc)
        except BrokerUnavailable:
            await self._nc.close()
            raise
        info = self._nc._server_info
        self.server_info = {"server": f"nats-server/{info.get('version')}", **info}
        self.max_body = int(info.get("max_payload", self.max_body))
        version = tuple(int(p) for p in str(info.get("version", "0.0")).split("-")[0]
                        .split(".")[:2])
        self._schedules = version >= (2, 12)
        self._inbox = f"_INBOX.{secrets.token_hex(11)}"
        self._unconfirmed_inbox = self._inbox + ".u"
        await self._subscribe(self._inbox + ".*", self._on_inbox)
        self.connected = True
        self._watchdog = self._loop.create_task(self._watch_pulls())

    async def _on_disconnected(self) -> None:
        if self._error is not None or not self.connected:
            return
        self.connected = False
        error = ConnectionLost(f"connection to NATS at {self._server} was lost")
        for pull in self._pulls.values():
            pull.outstanding = 0  # their pull requests died with the connection
        # Leases survive on NATS (an ack subject is answered from any connection), so
        # consumers keep theirs. Subscriptions miss what is published meanwhile: marked
        # as a gap, with a fresh window (as the local broker's new subscription).
        for window in self._subs.values():
            target = window.target()
            if target is not None:
                target._reset()
            window.in_flight = 0
        self._emit(StateChange(ConnectionState.DISCONNECTED, error))

    async def _on_reconnected(self) -> None:
        self.connected = True
        self.reconnects += 1
        self._emit(StateChange(ConnectionState.RECONNECTED, None, None, 1))
        for pull in list(self._pulls.values()):
            pull.outstanding = 0
            self._pull(pull)

    async def _on_closed(self) -> None:
        if self._error is None:
            self._fail_all(ConnectionLost(f"connection to NATS at {self._server} closed"))

    async def _on_error(self, exc: Exception) -> None:
        log.debug("nats error: %s", exc)

    def _fail_all(self, error: BusError) -> None:
        self._error = error
        if self._watchdog is not None:
            self._watchdog.cancel()
        self.connected = False
        self.writable = True
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()
        for pull in list(self._pulls.values()):
            target = pull.target()
            if target is not None:
                target._fail(error)
        for window in list(self._subs.values()):
            target = window.target()
            if target is not None:
                target._fail(error)
        self._emit(StateChange(ConnectionState.CLOSED, error))

    async def aclose(self) -> None:
        if self._error is not None:
            return
        self._closing = True  # parked sends give up (ConnectionClosed), as locally
        # Sends on their way and dead letters being stored: let them finish (bounded).
        if self._tasks or self._sending:
            await asyncio.wait([*self._tasks, *self._sending], timeout=_CLOSE_TIMEOUT)
        if self._pulls:
            for pull in list(self._pulls.values()):
                target = pull.target()
                if target is not None:
                    target._stop()
                else:
                    self._stop_pull(pull)
            # What the server sent them before it had their UNSUBs arrives meanwhile and
            # is given back (_unsubscribe's drain).
            try:
                await self._flush(_CLOSE_TIMEOUT)
            except Exception:
                pass  # closing anyway
        pending = [fut for fut in self._waiters.values() if not fut.done()]
        if pending:
            await asyncio.wait(pending, timeout=_CLOSE_TIMEOUT)
        if self._releasing:  # released messages: their copies stored, originals ended
            await asyncio.wait(list(self._releasing), timeout=_CLOSE_TIMEOUT)
            try:
                await self._flush(_CLOSE_TIMEOUT)
            except Exception:
                pass  # closing anyway
        error = ConnectionClosed("the bus was closed")
        self._fail_all(error)
        if self._watchdog is not None:
            await asyncio.gather(self._watchdog, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._nc.close()
        except Exception:  # closing anyway
            pass

    @property
    def closed(self) -> bool:
        return self._error is not None

    @property
    def async_errors(self) -> int:
        return self._async_errors

    @property
    def dropped(self) -> int:
        return self._dropped

    def _emit(self, change: StateChange) -> None:
        self._changed = emit_state(self._listeners, self._changed, change)

    async def wait_connected(self) -> None:
        await wait_until_connected(lambda: self.connected, lambda: self._changed,
                                   lambda: self._error)

    def state_changes(self) -> AsyncIterator[StateChange]:
        return state_change_stream(self._listeners, lambda: self._changed,
                                   lambda: self._error)

    def _spawn(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._async_errors += 1
            exc = task.exception()
            log.warning("a background NATS operation failed: %s: %s",
                        type(exc).__name__, exc)

    # -- writing --------------------------------------------------------------------------

    def _write(self, subject: str, payload: bytes, reply: str = "",
               headers: dict[str, str] | None = None) -> None:
        """Append one PUB/HPUB to nats-py's buffer and kick its flusher (see above)."""
        if headers is None:
            cmd = prot.pub_cmd(subject, reply, payload)
        else:
            # NATS header values end at a line break: one inside a value becomes a space.
            hdr = "NATS/1.0\r\n" + "".join(
                f"{key}: {value.translate(_NO_NEWLINES)}\r\n" for key, value in headers.items())
            cmd = prot.hpub_cmd(subject, reply, (hdr + "\r\n").encode(), payload)
        self._append(cmd)

    def _append(self, cmd: bytes) -> None:
        """Put a protocol command in nats-py's outgoing buffer (the private ``_pending``,
        ``_pending_data_size`` and ``_flush_queue``: tests/integration/test_nats_private.py
        fails loudly if a nats-py release renames them)."""
        if self._error is not None:
            raise self._error
        nc = self._nc
        if not nc.is_connected:
            if nc._pending_data_size + len(cmd) > self._publish_buffer:
                self._dropped += 1
                return
            nc._pending.append(cmd)
            nc._pending_data_size += len(cmd)
            return
        nc._pending.append(cmd)
        nc._pending_data_size += len(cmd)
        queue = nc._flush_queue
        if queue is not None and queue.empty():
            queue.put_nowait(self._loop.create_future())
        if nc._pending_data_size > _HIGH_WATER:
            self.writable = False

    async def wait_writable(self) -> None:
        if self._error is not None:
            return
        try:
            await self._flush(30.0)
        except Exception:
            pass
        self.writable = True

    async def _flush(self, timeout: float) -> None:
        """A round trip to the server after everything written so far (not nats-py's
        bare ``flush()``: see :func:`~aiobus.client.nats_internals.round_trip`)."""
        await round_trip(self._nc, self._loop, timeout)

    async def _api(self, subject: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JetStream API request; returns the decoded response (with ``error``)."""
        if self._error is not None:
            raise self._error
        payload = json.dumps(body).encode() if body is not None else b""
        deadline = self._loop.time() + _API_TIMEOUT
        delay = 0.05
        while True:
            try:
                msg = await self._nc.request(_API + subject, payload, timeout=_API_TIMEOUT)
                break
            except nats.errors.NoRespondersError as exc:
                # Nobody took the request, so it may go again: JetStream that answered
                # this client before is not up yet (a server restarting), for a while.
                if not self._jetstream or self._loop.time() + delay > deadline:
                    raise BrokerUnavailable(
                        "JetStream is not enabled on this NATS server" if not self._jetstream
                        else f"JetStream did not come back within {_API_TIMEOUT} s to"
                             f" answer {subject}") from exc
                await asyncio.sleep(delay)
                delay *= 2
            except nats.errors.TimeoutError as exc:
                raise BrokerUnavailable(f"JetStream did not answer {subject}") from exc
        self._jetstream = True
        result: dict[str, Any] = json.loads(msg.data)
        return result

    async def _subscribe(self, subject: str, handler: Callable[[Msg], None],
                         group: str = "", *, guarded: bool = True) -> int:
        """Subscribe with ``handler`` called in nats-py's reader (see ``nats_internals.Direct``),
        in queue group ``group`` if given; ``guarded=False``: a handler that catches its
        own errors, called without a wrapper. Returns the subscription id."""
        sub = await self._nc.subscribe(subject, queue=group, pending_bytes_limit=0)
        if not isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue):
            await sub.unsubscribe()
            raise internals_changed(["Subscription._pending_queue"])
        direct: Direct | Bare = Direct(handler) if guarded else Bare(handler)
        sub._pending_queue = direct  # type: ignore[assignment]
        return int(sub._id)

    def _unsubscribe(self, sid: int, *, drain: bool = False) -> None:
        """Write UNSUB for subscription ``sid``. ``drain``: its handler still gets what
        the server sent before it had the UNSUB (until a round trip says it has), instead
        of nats-py dropping it: a consumer's pull that the server was answering as the
        consumer stopped, which would otherwise stay leased to nobody until its ack
        timeout (seen: ``aiobus consume --count 2`` leaving the third message unacked),
        is given back; a request is handed to the group again."""
        nc = self._nc
        if sid in nc._subs and self._error is None and not nc.is_closed:
            if drain:
                self._spawn(self._forget(sid))
            else:
                nc._subs.pop(sid)._stop_processing()
            cmd = prot.unsub_cmd(sid, 0)
            nc._pending.append(cmd)
            nc._pending_data_size += len(cmd)
            queue = nc._flush_queue
            if nc.is_connected and queue is not None and queue.empty():
                queue.put_nowait(self._loop.create_future())

    async def _forget(self, sid: int) -> None:
        """Drop subscription ``sid`` from nats-py once the server has its UNSUB (written
        just before this runs)."""
        try:
            await self._flush(_API_TIMEOUT)
        except Exception:
            pass  # closed or lost: nothing more arrives for it either way
        finally:
            sub = self._nc._subs.pop(sid, None)
            if sub is not None:
                sub._stop_processing()

    # -- the inbox: PubAcks and replies ---------------------------------------------------

    def _next_id(self) -> str:
        """A message id unique to this client's sends and requests."""
        return f"{self._client_id}-{next(self._seq)}"

    def _token(self) -> tuple[str, asyncio.Future[Any]]:
        token = f"{next(self._seq)}"
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._waiters[token] = fut
        return f"{self._inbox}.{token}", fut

    def _on_inbox(self, msg: Msg) -> None:
        token = msg.subject[len(self._inbox) + 1:]
        if token == "u":
            self._unconfirmed -= 1
            if msg.data.startswith(b'{"error"') or (msg.headers or {}).get("Status"):
                self._async_errors += 1
                log.warning("NATS refused an unconfirmed send: %s",
                            msg.data[:200] or msg.headers)
            if self._unconfirmed <= 0 and self._drained is not None:
                self._drained.set()
            return
        fut = self._waiters.pop(token, None)
        if fut is None or fut.done():
            return
        headers = msg.headers
        if headers and headers.get("Status") == "503":
            fut.set_exception(nats.errors.NoRespondersError())
            return
        fut.set_result(msg)

    def publish(self, topic: str, data: bytes, kind: int,
                headers: dict[str, str] | None) -> None:
        self._published += 1
        if headers or kind:
            self._write(self.ns.topic_prefix + topic, data, "",
                        nm.encode_headers(headers, kind, None, None))
            return
        # The per-message path: a raw body without headers, one bytes formatting with
        # the command's start kept per topic (as Bus keeps checked names, bounded).
        start = self._pub_starts.get(topic)
        if start is None:
            start = f"PUB {self.ns.topic_prefix}{topic} ".encode()
            if len(self._pub_starts) < 10_000:
                self._pub_starts[topic] = start
        self._append(b"%b%d\r\n%b\r\n" % (start, len(data), data))

    # -- receiving: topics ----------------------------------------------------------------

    async def subscribe(self, pattern: str, max_pending: int, policy: str,
                        target: StreamTarget) -> None:
        window = TopicWindow(pattern, max_pending, policy, weakref.ref(target))
        prefix_len = len(self.ns.topic_prefix)

        offer, now, target_of = window.offer, time.time, window.target
        pending, max_pending = window.pending, max_pending
        decode = nm.decode_headers

        def on_message(msg: Msg) -> None:
            # Called by nats-py's reader for every message, unwrapped (Bare): the
            # window's common case (room in flight, nothing waiting) inline, the rest in
            # TopicWindow.offer; errors caught as Direct would.
            try:
                headers = msg.headers
                if headers:
                    user, kind, _, _ = decode(headers)
                else:
                    user, kind = None, 0
                # No id on core NATS, and no broker clock: the receiving client's time.
                message = ["", msg.subject[prefix_len:], msg.data, kind, user, now()]
                if window.in_flight < max_pending and not pending and not window.failed:
                    target = target_of()
                    if target is not None:
                        window.in_flight += 1
                        window.delivered += 1
                        dropped = window.dropped_since
                        if dropped:
                            window.dropped_since = 0
                        target._event(message, dropped)
                    return
                offer(message)
            except Exception:
                log.exception("handling a message on %s failed", msg.subject)

        window.sid = await self._subscribe(self.ns.topic_prefix + pattern, on_message,
                                           guarded=False)
        self._subs[window.sid] = window
        target._handle = window
        window.on_disconnect = lambda: self.cancel(window)
        # Registered once the server has the SUB (as the local broker's OK): a round trip.
        await self._flush(_API_TIMEOUT)

    def credit(self, handle: Any, n: int) -> None:
        handle.credit(n)

    # -- administration -------------------------------------------------------------------

    async def stats(self, options: dict[str, Any] | None = None) -> dict[str, Any]:
        from .nats_stats import collect

        await self.ping()  # this client's writes first, as on the local broker's socket
        return await collect(self, options or {})

    async def peek(self, queue: str, options: dict[str, Any]) -> dict[str, Any]:
        from .nats_stats import peek

        return await peek(self, queue, options)

    async def ping(self) -> None:
        """A round trip to the server, after which what this client wrote before has
        taken effect: unconfirmed sends are stored (their PubAcks are back), and plain
        acks and naks are processed (a double ack of an already acked message of the
        same consumer answers after them: the server handles a consumer's acks in
        order)."""
        if self._error is not None:
            raise self._error
        await self._flush(_API_TIMEOUT)
        await self._wait_releases()
        if self._unconfirmed > 0:
            self._drained = asyncio.Event()
            try:
                async with asyncio.timeout(_API_TIMEOUT):
                    await self._drained.wait()
            except TimeoutError:
                pass  # counted: some never came back
            finally:
                self._drained = None
        answered, self._answered = self._answered, {}
        for subject in answered.values():
            if subject is not None:
                inbox, fut = self._token()
                self._write(subject, b"+ACK", inbox)
                try:
                    async with asyncio.timeout(_API_TIMEOUT):
                        await fut
                except (TimeoutError, nats.errors.NoRespondersError):
                    pass  # the queue was deleted: nothing to wait for
