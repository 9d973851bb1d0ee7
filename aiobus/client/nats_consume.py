"""Queue consumers, leases and dead letters of the NATS backend (``client/nats.py``).

Theory of operation
-------------------
Every aiobus consumer of a queue pulls from the queue's one durable JetStream consumer
(``aiobus``) through an inbox of its own (a :class:`_Pull`): it asks for at most
``prefetch - unacked - outstanding`` messages (``$JS.API.CONSUMER.MSG.NEXT``), with an
expiry; the server answers each request with messages, then a 408 status once it
expires, and the pull asks again. An inbox is not under the backend's ``_INBOX.<id>.*``:
that wildcard would keep a stopped consumer's pull requests alive (the server drops
requests whose reply subject has no interest).

A delivered message is a :class:`_Lease` on its ack subject, whose tokens give the
stream sequence, the delivery count (``attempt``) and the time stored. Answers:

* ack: ``+ACK``; confirmed, as a request (the server answers: the double ack);
* nack: ``-NAK {"delay": ns}`` with the delay the queue's ``retry_delays`` give
  (``nats_map.nak_delay``), computed here because server-side BackOff would also
  stretch explicit delays;
* reject, and a nack of the last allowed attempt: the client stores the message in the
  dead-letter queue with the local broker's ``x-dead-*`` headers, deduplicated by
  ``<stream>:<seq>``, and then terminates it (``+TERM``: a work queue drops it);
* extend: ``+WPI`` (in progress), repeated every half ``ack_timeout`` up to the time asked.

The lease's deadline is kept here, so a late answer is refused as the local broker
refuses it (``lease-expired``) and the message left to its redelivery. MaxDeliver is
``max_deliveries + 1``: when the last attempt's ack timeout runs out, the message
arrives once more and is dead-lettered on arrival. If its consumer died on that
arrival, the server gives up on it and says so in a MAX_DELIVERIES advisory: every
client that consumes or declares the queue sweeps such messages to the dead-letter
queue (the same dedup id keeps it to one copy) and deletes them from the stream.
A consumer that stops gives its unacked messages back, as on the local broker without
counting an attempt. A ``-NAK`` would count one (JetStream's delivery count only grows),
and keep the message ack-pending until it is delivered again; so a release stores a
copy of the message (``nats_map.release_headers``: the same id, time stored, what is
left of its TTL, and the attempts counted before it, which the copy's delivery count
goes on from) and terminates the original once the copy is stored. The copy is ready at
once, at the back of the queue (the local broker puts it at the front). Should the
client die between the two, the message is there twice: at least once, as ever. A queue
at its ``max_length`` refuses the copy; then the release is a ``-NAK`` after all.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import logging
import time
import weakref
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg

from ..broker.settings import QueueSettings
from ..errors import BusError, LeaseError, shown
from . import nats_map as nm
from .backend import Outcome, StreamTarget
from .nats_host import NatsHost
from .nats_topics import TopicWindow

__all__ = ["Consuming"]

log = logging.getLogger(__name__)

_API: Final = "$JS.API."
_PULL_EXPIRES: Final = 10.0  # seconds a pull request waits on the server (408 after)
_ANSWER_TIMEOUT: Final = 5.0
_PULL_RETRY: Final = 0.1  # seconds before a pull that reached no consumer (503) goes again
_PULL_RETRY_MAX: Final = 2.0
_ERR_STREAM_NOT_FOUND: Final = 10059
_ADVISORY: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES."


class _Lease:
    """One delivered queue message, as the application answers it."""

    __slots__ = ("ack", "attempt", "data", "deadline", "gone", "headers", "kind", "mid",
                 "pull", "raw", "reply", "seq", "settled", "stored")

    def __init__(self, pull: _Pull, ack: str, seq: int, attempt: int, deadline: float,
                 mid: str, data: bytes, kind: int, headers: dict[str, str] | None,
                 reply: str | None, raw: dict[str, str] | None = None,
                 stored: float = 0.0) -> None:
        self.pull = pull
        self.ack = ack
        self.seq = seq
        self.attempt = attempt
        self.deadline = deadline
        self.mid = mid
        self.data = data
        self.kind = kind
        self.headers = headers
        self.reply = reply
        self.settled = False
        self.gone = False  # its queue was deleted by this client
        self.raw = raw  # its NATS headers, as delivered
        self.stored = stored  # epoch seconds it was (first) stored


class _Pull:
    """One aiobus consumer: its inbox, its count of unacked and requested messages."""

    def __init__(self, queue: str, stream: str, settings: QueueSettings, prefetch: int,
                 target: weakref.ref[Any]) -> None:
        self.queue = queue
        self.stream = stream
        self.settings = settings
        self.prefetch = prefetch
        self.target = target
        self.inbox = ""
        self.sid = 0
        self.request_sid = 0  # its subscription to the queue's requests (nats_requests)
        self.unacked = 0
        self.outstanding = 0
        self.heard = 0.0  # monotonic time of the last request, message or status
        self.retry = _PULL_RETRY  # seconds before asking again after a 503 (no consumer)
        self.leases: set[_Lease] = set()
        self.stopped = False


class Consuming(NatsHost):
    """The consuming half of :class:`~aiobus.client.nats.NatsBackend` (see the module
    docstring); what it uses of the other halves is declared in ``nats_host.py``."""

    async def consume(self, queue: str, prefetch: int, target: StreamTarget,
                      create: bool = True) -> None:
        if not create and queue not in self._queues:
            info = await self._api("STREAM.INFO." + self.ns.stream(queue))
            if "error" in info:
                raise nm.no_such_queue(queue)
        settings = await self._queue(queue)
        stream = self.ns.stream(queue)
        await self._ensure_consumer(queue, stream, settings)
        await self._sweep(queue)
        pull = _Pull(queue, stream, settings, prefetch, weakref.ref(target))
        pull.inbox = self._nc.new_inbox()  # not under self._inbox: its .* would keep
        # interest in the pull requests of a stopped consumer, which the server honours
        pull.sid = await self._subscribe(pull.inbox, functools.partial(self._on_delivery, pull))
        self._pulls[pull.sid] = pull
        await self._respond(pull)
        target._handle = pull
        self._pull(pull)

    async def _ensure_consumer(self, queue: str, stream: str, settings: QueueSettings) -> None:
        config = nm.consumer_config(self.ns, queue, settings)
        result = await self._api(f"CONSUMER.CREATE.{stream}.{nm.CONSUMER}",
                                 {"stream_name": stream, "config": config})
        error = result.get("error")
        if error is not None and error.get("err_code") == _ERR_STREAM_NOT_FOUND:
            self._queues.pop(queue, None)
            await self._queue(queue)
            result = await self._api(f"CONSUMER.CREATE.{stream}.{nm.CONSUMER}",
                                     {"stream_name": stream, "config": config})
            error = result.get("error")
        if error is not None and "already exists" not in str(error.get("description")):
            raise BusError(f"NATS refused a consumer of queue {shown(queue)}:"
                           f" {error.get('description')}")

    def _pull(self, pull: _Pull) -> None:
        """Ask for as many messages as the consumer has room for."""
        want = pull.prefetch - pull.unacked - pull.outstanding
        if want <= 0 or pull.stopped or not self.connected:
            return
        # Ask in batches of at least half the room, so acks one by one do not each
        # cost a request (the local broker's credit works the same way).
        if pull.outstanding and want < max(1, pull.prefetch // 2):
            return
        pull.outstanding += want
        pull.heard = time.monotonic()
        self._write(f"{_API}CONSUMER.MSG.NEXT.{pull.stream}.{nm.CONSUMER}",
                    b'{"batch":%d,"expires":%d}' % (want, int(_PULL_EXPIRES * 1e9)),
                    pull.inbox)

    def _on_delivery(self, pull: _Pull, msg: Msg) -> None:
        headers = msg.headers
        if not msg.reply:
            pull.heard = time.monotonic()
            status = headers.get("Status") if headers else None
            if status in ("408", "409", "404"):
                pull.retry = _PULL_RETRY  # its consumer answers again
                pending = headers.get("Nats-Pending-Messages") if headers else None
                pull.outstanding = (max(0, pull.outstanding - int(pending))
                                    if pending is not None else 0)
                if status == "409" and "Deleted" in (headers or {}).get("Description", ""):
                    self._spawn(self._recreate(pull))
                    return
                self._pull(pull)
            elif status == "503":
                # No responders: the request reached no consumer (a server restarting,
                # its JetStream not up yet; a cluster moving the consumer's leader).
                # Nothing is outstanding: ask again shortly (backing off, up to 2 s), not
                # after the watchdog's 12 s.
                pull.outstanding = 0
                self._loop.call_later(pull.retry, self._pull, pull)
                pull.retry = min(2 * pull.retry, _PULL_RETRY_MAX)
            return
        pull.outstanding = max(0, pull.outstanding - 1)
        seq, attempt, timestamp = nm.parse_ack_subject(msg.reply)
        user, kind, mid, reply = nm.decode_headers(headers)
        if headers and nm.H_TIME in headers:  # a released message's copy
            attempt, timestamp = nm.copied(headers, attempt, timestamp)
        pull.heard = now = time.monotonic()
        if attempt > 1:
            self._superseded(pull.stream, seq)
        lease = _Lease(pull, msg.reply, seq, attempt, now + pull.settings.ack_timeout,
                       mid or f"{pull.stream}:{seq}", msg.data, kind, user, reply, headers,
                       timestamp)
        target = pull.target()
        if pull.stopped or target is None:
            self._release(lease)  # came for a consumer that has stopped
            return
        pull.unacked += 1
        pull.leases.add(lease)
        limit = pull.settings.max_deliveries
        if limit is not None and attempt > limit:
            # Its last attempt timed out: dead-letter it on this, its final arrival.
            lease.settled = True
            self._spawn(self._dead_letter(lease, "max-deliveries", limit, None))
            return
        target._deliver(lease, [lease.mid, pull.queue, msg.data, kind, user, timestamp],
                        attempt, reply)

    def _superseded(self, stream: str, seq: int) -> None:
        """Stream message ``seq`` came again: the server took back any lease this client
        still holds on it (AckWait ran out on the server's clock, which may be ahead of
        the lease's deadline here), so that lease is expired now. Without this a consumer
        that stopped right after would give the old lease back by storing a copy, beside
        the redelivery (seen as a dead-lettered message back in its queue). Only on a
        redelivery; a scan of the client's leases on that stream."""
        for other in self._pulls.values():
            if other.stream == stream:
                for lease in other.leases:
                    if lease.seq == seq and not lease.settled:
                        lease.deadline = 0.0

    async def _watch_pulls(self) -> None:
        """Ask again for a consumer whose pull request went unanswered past its expiry:
        the server that held it died (a cluster node), so no 408 will come. One task per
        backend, a look every second."""
        while True:
            await asyncio.sleep(1.0)
            limit = time.monotonic() - _PULL_EXPIRES - 2.0
            for pull in list(self._pulls.values()):
                if pull.outstanding and pull.heard < limit:
                    pull.outstanding = 0
                    self._pull(pull)

    async def _sweep(self, queue: str) -> None:
        """Dead-letter what the server gave up on (the module docstring): listen to the
        queue's MAX_DELIVERIES advisories, once per client."""
        stream = self.ns.stream(queue)
        if stream in self._swept:
            return
        self._swept.add(stream)
        await self._subscribe(f"{_ADVISORY}{stream}.{nm.CONSUMER}",
                              functools.partial(self._on_exhausted, queue))

    def _on_exhausted(self, queue: str, msg: Msg) -> None:
        try:
            seq = int(json.loads(msg.data)["stream_seq"])
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable MAX_DELIVERIES advisory for queue %r", queue)
            return
        self._spawn(self._sweep_one(queue, seq))

    async def _sweep_one(self, queue: str, seq: int) -> None:
        stream = self.ns.stream(queue)
        got = await self._api(f"STREAM.MSG.GET.{stream}", {"seq": seq})
        stored = got.get("message")
        if stored is None:
            return  # dead-lettered by its consumer meanwhile, or deleted
        settings = self._queues.get(queue) or await self._queue(queue)
        await self._bury(queue, settings, stored, "max-deliveries",
                         settings.max_deliveries or 0)

    async def _recreate(self, pull: _Pull) -> None:
        """The queue was deleted under this consumer: as with any use, it is there again."""
        self._queues.pop(pull.queue, None)
        pull.settings = await self._queue(pull.queue)
        await self._ensure_consumer(pull.queue, pull.stream, pull.settings)
        pull.outstanding = 0
        self._pull(pull)

    def cancel(self, handle: Any) -> None:
        if isinstance(handle, _Pull):
            self._stop_pull(handle)
        elif isinstance(handle, TopicWindow):
            self._subs.pop(handle.sid, None)
            self._unsubscribe(handle.sid)

    def _stop_pull(self, pull: _Pull) -> None:
        if pull.stopped:
            return
        pull.stopped = True
        self._pulls.pop(pull.sid, None)
        self._unsubscribe(pull.sid, drain=True)  # late deliveries: released (_on_delivery)
        if pull.request_sid:
            self._unsubscribe(pull.request_sid, drain=True)  # to the group (_on_request)
        if self._error is None:
            # Released, oldest first: another consumer gets them now.
            now = time.monotonic()
            for lease in sorted(pull.leases, key=_stream_order):
                if not lease.settled:
                    lease.settled = True
                    if lease.ack and now > lease.deadline:
                        pass  # its lease ran out: the server delivers it again anyway
                    elif lease.ack:
                        self._release(lease)
                    else:  # a request: to another responder, same attempt
                        self._give_back(lease, lease.attempt, 0.0)
        pull.leases.clear()

    def _release(self, lease: _Lease, delay: float = 0.0) -> None:
        """Give a message back without counting an attempt (the module docstring): store
        a copy that keeps its id, time and attempt, then terminate the original once the
        copy is stored. If the copy is refused (a queue at its max_length), a NAK: that
        counts an attempt. Callbacks, no task: ``ping()`` and ``aclose()`` wait for them.

        With a ``delay`` (a nack's), the copy counts the attempt and is a message
        schedule due then (server 2.12+), so that the message is ``delayed`` meanwhile,
        not ``unacked``; the fallback is ``-NAK`` with the delay."""
        pull = lease.pull
        ttl = nm.remaining_ttl(lease.raw, lease.stored, time.time())
        if ttl is not None and ttl <= delay:
            self._write(lease.ack, b"+TERM")  # expired by then: as JetStream would
            return
        copy_id = f"{pull.stream}:{lease.seq}:{lease.attempt}"
        attempt = lease.attempt + 1 if delay else lease.attempt
        headers = nm.release_headers(lease.headers, lease.kind, lease.mid, copy_id, ttl,
                                     attempt, lease.stored)
        subject = self.ns.queue_subject(pull.queue)
        if delay:
            due = datetime.datetime.fromtimestamp(time.time() + delay, datetime.UTC)
            headers = nm.scheduled(headers, due.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), subject,
                                   None if ttl is None else ttl - delay)
            subject = self.ns.schedule_prefix(pull.queue) + copy_id
        inbox, stored = self._token()
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._releasing.add(done)
        done.add_done_callback(self._releasing.discard)
        self._write(subject, lease.data, inbox, headers)
        fallback = self._nak(lease, delay) if delay else b"-NAK"
        stored.add_done_callback(functools.partial(self._copy_stored, lease.ack, fallback,
                                                   done))

    def _nack(self, lease: _Lease, delay: float | None) -> bytes | None:
        """A nack: the payload to write to the ack subject, or None if it is given back
        as a delayed copy (see :meth:`_release`)."""
        seconds = nm.nak_delay(lease.pull.settings, lease.attempt, delay)
        if seconds > 0 and self._schedules and lease.pull.settings.max_length is None:
            self._release(lease, seconds)
            return None
        return self._nak(lease, delay)

    async def _wait_releases(self) -> None:
        """Wait until the copies of given-back messages are stored and their originals
        ended (bounded)."""
        if self._releasing:
            await asyncio.wait(list(self._releasing), timeout=_ANSWER_TIMEOUT)

    def _copy_stored(self, ack: str, fallback: bytes, done: asyncio.Future[None],
                     stored: asyncio.Future[Any]) -> None:
        refused = (stored.cancelled() or stored.exception() is not None
                   or stored.result().data.startswith(b'{"error"'))
        if self._error is not None:
            done.set_result(None)
            return
        if refused:
            self._write(ack, fallback)
            done.set_result(None)
            return
        inbox, termed = self._token()
        self._write(ack, b"+TERM", inbox)  # answered, so ping() knows it took effect
        termed.add_done_callback(functools.partial(_finish, done))

    # -- leases ---------------------------------------------------------------------------

    def _take(self, lease: _Lease) -> None:
        """The lease is answered: free its slot, refill."""
        lease.settled = True
        pull = lease.pull
        pull.leases.discard(lease)
        pull.unacked -= 1
        self._pull(pull)

    def _expired(self, lease: _Lease) -> LeaseError | None:
        if lease.gone:
            return LeaseError(f"message {lease.mid} was deleted with its queue",
                              code="lease-unknown")
        if lease.settled and lease not in lease.pull.leases:
            return LeaseError("the lease is no longer held (answered, or the consumer"
                              " stopped)", code="lease-unknown")
        if time.monotonic() > lease.deadline:
            return LeaseError(f"the lease of message {lease.mid} expired (ack_timeout): the"
                              " message is redelivered", code="lease-expired")
        return None

    def _refused(self, lease: _Lease, error: LeaseError) -> None:
        self._async_errors += 1
        target = lease.pull.target()
        if target is not None:
            target._answer_failed(error)

    def ack_nowait(self, lease: Any) -> None:
        error = self._expired(lease)
        self._take(lease)
        if error is not None:
            self._refused(lease, error)
            return
        if not lease.ack:
            return  # a request answered without a reply: its requester times out
        self._write(lease.ack, b"+ACK")
        self._last_acked[lease.pull.stream] = lease.ack
        self._answered[lease.pull.stream] = lease.ack

    def settle_nowait(self, lease: Any, outcome: Outcome, delay: float | None = None,
                      reason: str | None = None) -> None:
        error = self._expired(lease)
        if error is not None:
            self._take(lease)
            self._refused(lease, error)
            return
        if outcome == "ack":
            self.ack_nowait(lease)
        elif not lease.ack:
            self._take(lease)
            self._settle_request(lease, outcome, delay)
        elif self._to_dead_letter(lease, outcome):
            self._take(lease)
            self._spawn(self._dead_letter(lease, _dead_reason(outcome), lease.attempt, reason))
        else:
            self._take(lease)
            payload = self._nack(lease, delay)
            if payload is not None:
                self._write(lease.ack, payload)
                self._answered[lease.pull.stream] = self._last_acked.get(lease.pull.stream)

    async def settle(self, lease: Any, outcome: Outcome, delay: float | None = None,
                     reason: str | None = None) -> None:
        error = self._expired(lease)
        if error is not None:
            self._take(lease)
            raise error
        self._take(lease)
        if not lease.ack:
            self._settle_request(lease, outcome, delay)  # nothing to confirm: no server lease
        elif outcome == "ack":
            await self._lease_request(lease, b"+ACK")
        elif self._to_dead_letter(lease, outcome):
            await self._dead_letter(lease, _dead_reason(outcome), lease.attempt, reason)
        else:
            payload = self._nack(lease, delay)
            if payload is None:
                await self._wait_releases()
            else:
                await self._lease_request(lease, payload)

    def _settle_request(self, lease: _Lease, outcome: Outcome, delay: float | None) -> None:
        """A request's nack gives it to the group again; ack and reject drop it
        (nats_requests.py)."""
        if outcome == "nack":
            self._give_back(lease, lease.attempt + 1,
                            nm.nak_delay(lease.pull.settings, lease.attempt, delay))

    def _to_dead_letter(self, lease: _Lease, outcome: Outcome) -> bool:
        if outcome == "reject":
            return True
        limit = lease.pull.settings.max_deliveries
        return limit is not None and lease.attempt >= limit

    def _nak(self, lease: _Lease, delay: float | None) -> bytes:
        seconds = nm.nak_delay(lease.pull.settings, lease.attempt, delay)
        if seconds <= 0:
            return b"-NAK"
        return b'-NAK {"delay":%d}' % int(seconds * 1e9)

    async def _lease_request(self, lease: _Lease, payload: bytes) -> None:
        """A confirmed answer: the server replies once it has it (the double ack)."""
        inbox, fut = self._token()
        self._write(lease.ack, payload, inbox)
        try:
            async with asyncio.timeout(_ANSWER_TIMEOUT):
                await fut
        except (nats.errors.NoRespondersError, TimeoutError):
            raise LeaseError(f"message {lease.mid} is not held any more (its queue was"
                             " deleted or purged)", code="lease-unknown") from None

    async def _dead_letter(self, lease: _Lease, reason: str, attempts: int,
                           text: str | None) -> None:
        """Store the message in its dead-letter queue (deduplicated by <stream>:<seq>),
        then terminate the original."""
        pull = lease.pull
        target = pull.settings.dead_letter
        if target is not None:
            await self._queue(target)
            headers = nm.dead_letter_headers(
                lease.headers, queue=pull.queue, reason=reason, attempts=attempts,
                now=time.time(), text=text, consumer=self._pid_uid)
            out = nm.encode_headers(headers, lease.kind, f"{pull.stream}:{lease.seq}", None)
            assert out is not None
            out[nm.H_ID] = lease.mid
            inbox, fut = self._token()
            self._write(self.ns.queue_subject(target), lease.data, inbox, out)
            self._puback(target, await fut)
        await self._lease_request(lease, b"+TERM")

    async def extend(self, lease: Any, seconds: float) -> None:
        nm.check_seconds("extend", seconds)
        error = self._expired(lease)
        if error is not None:
            raise error
        if not lease.ack:
            return  # a request has no server lease, and no deadline (nats_requests.py)
        lease.deadline = time.monotonic() + max(seconds, lease.pull.settings.ack_timeout)
        await self._lease_request(lease, b"+WPI")
        if seconds > lease.pull.settings.ack_timeout:
            self._spawn(self._keep_alive(lease, time.monotonic() + seconds))

    async def _keep_alive(self, lease: _Lease, until: float) -> None:
        """In-progress acks every half ack_timeout until ``until`` or an answer."""
        interval = lease.pull.settings.ack_timeout / 2
        while not lease.settled and time.monotonic() + interval < until:
            await asyncio.sleep(interval)
            if not lease.settled:
                self._write(lease.ack, b"+WPI")

    async def reply(self, lease: Any, data: bytes, kind: int,
                    headers: dict[str, str] | None) -> None:
        self.reply_nowait(lease, data, kind, headers)

    def reply_nowait(self, lease: Any, data: bytes, kind: int,
                     headers: dict[str, str] | None) -> None:
        error = self._expired(lease)
        if error is not None:
            self._take(lease)
            raise error
        self._take(lease)
        if lease.reply:
            self._write(lease.reply, data, "", nm.encode_headers(headers, kind, None, None))
        if lease.ack:  # a request from the queue's stream (an older client's)
            self._write(lease.ack, b"+ACK")


def _stream_order(lease: _Lease) -> int:
    return lease.seq


def _finish(done: asyncio.Future[None], _: object) -> None:
    if not done.done():
        done.set_result(None)


def _dead_reason(outcome: Outcome) -> str:
    return "rejected" if outcome == "reject" else "max-deliveries"

