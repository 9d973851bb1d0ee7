"""Sending to queues on the NATS backend (``client/nats.py``): JetStream publishes with
``Nats-Msg-Id``.

A confirmed send waits for its PubAck; a PubAck that does not come (a cluster electing a
stream leader, a lost connection) is asked for again with the same id, which the stream
deduplicates. ``send_nowait`` writes at once when the queue is known and completes its
future from the PubAck by callback; a send that must look its queue up first, or wait
for room, is a task that its future follows. ``confirm=False`` sends share one reply
token, counted so that ``ping()`` can wait for their PubAcks.

Overflow is done here (the stream is DiscardNew, so a full queue refuses the send):
"block" waits the refusal out, sending again, backing off, the send counted in
``parked``; "dead-letter" makes room as the local broker does, moving the oldest message
no consumer has had to the dead-letter queue, and sends again (docs/nats.md). Storing
a stored message in the dead-letter queue (``_bury``) is here too: overflow's, and the
MAX_DELIVERIES sweeper's (``nats_consume.py``).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
import time
from typing import Any, Final

import nats.errors
from nats.aio.msg import Msg

from ..broker.settings import QueueSettings
from ..errors import (
    BrokerUnavailable,
    BusError,
    ConnectionClosed,
    InvalidOption,
    QueueFull,
    SendTimeout,
    shown,
)
from . import nats_map as nm
from .nats_host import NatsHost

__all__ = ["Producing"]

log = logging.getLogger(__name__)

_PUBACK_TIMEOUT: Final = 2.0  # then the publish is sent again (deduplicated by its id)
_ERR_MAX_MSGS: Final = 10077  # JSStreamStoreFailedF "maximum messages exceeded"
_ERR_STREAM_NOT_FOUND: Final = 10059
# A send parked on a full queue (overflow "block") asks again after this, doubling: the
# stream does not say when room is made.
_PARK_FIRST: Final = 0.005
_PARK_MAX: Final = 0.2


class Producing(NatsHost):
    """The sending half of :class:`~aiobus.client.nats.NatsBackend` (see the module
    docstring); what it uses of the other halves is declared in ``nats_host.py``."""

    def _puback(self, queue: str, msg: Msg) -> None:
        """Raise what a PubAck's error means."""
        if not msg.data.startswith(b'{"error"'):
            return
        error = json.loads(msg.data)["error"]
        if error.get("err_code") == _ERR_MAX_MSGS:
            raise QueueFull(f"queue {shown(queue)} is full (max_length); the send was"
                            " refused (overflow 'reject')")
        raise BusError(f"NATS refused a send to queue {shown(queue)}:"
                       f" {error.get('description')}")

    def _check_send(self, ttl: float | None, delay: float | None) -> None:
        nm.check_seconds("ttl", ttl)
        if delay is not None:
            if type(delay) not in (int, float) or not 0 <= delay < 1e9:
                raise InvalidOption(f"delay must be a number of seconds from 0 up to 1e9;"
                                    f" got {shown(delay)}")
            if delay > 0 and not self._schedules:
                raise InvalidOption("send(delay=...) needs nats-server 2.12 or later"
                                    " (message schedules); this server is"
                                    f" {self.server_info.get('version')}")

    async def send(self, queue: str, data: bytes, kind: int, headers: dict[str, str] | None,
                   ttl: float | None, delay: float | None,
                   timeout: float | None = None) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._send(queue, data, kind, headers, ttl, delay)
        except TimeoutError:
            raise SendTimeout(f"a send to queue {queue!r} was not confirmed within"
                              f" {timeout} s") from None

    async def _send(self, queue: str, data: bytes, kind: int,
                    headers: dict[str, str] | None, ttl: float | None, delay: float | None
                    ) -> None:
        self._check_send(ttl, delay)
        settings = self._queues.get(queue) or await self._queue(queue)
        if ttl is None:
            ttl = settings.ttl
        if delay and settings.max_length is not None:
            raise InvalidOption(f"send(delay=...) to queue {shown(queue)}: on NATS a queue"
                                " with max_length cannot hold delayed sends (JetStream"
                                " schedules cannot use DiscardNew)")
        mid = self._next_id()
        subject = self.ns.queue_subject(queue)
        nats_headers: dict[str, str] | None
        if delay:
            due = datetime.datetime.fromtimestamp(time.time() + delay, datetime.UTC)
            nats_headers = nm.schedule_headers(
                headers, kind, mid, ttl, due.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), subject)
            subject = self.ns.schedule_prefix(queue) + mid
        else:
            nats_headers = nm.encode_headers(headers, kind, mid, ttl)
        await self._publish(queue, subject, data, nats_headers, nm.overflow(settings))

    async def _publish(self, queue: str, subject: str, data: bytes,
                       headers: dict[str, str] | None, overflow: str | None = None) -> None:
        """Publish to JetStream until a PubAck says yes or no. A PubAck that does not come
        (a cluster electing a stream leader, a lost connection) is asked for again with
        the same ``Nats-Msg-Id``: the stream keeps one copy (as the local broker's session
        resends with the same id). Bounded by the caller's timeout, or the bus closing.
        ``overflow``: what a full queue's refusal makes this client do (the module
        docstring); None, the refusal is the send's ``QueueFull``."""
        delay = 0.05
        room_wait = _PARK_FIRST
        parked = False
        try:
            while True:
                inbox, fut = self._token()
                self._write(subject, data, inbox, headers)
                try:
                    async with asyncio.timeout(_PUBACK_TIMEOUT):
                        ack = await fut
                except TimeoutError:
                    self._waiters.pop(inbox[len(self._inbox) + 1:], None)
                    continue
                except nats.errors.NoRespondersError:
                    # Nobody stores the subject: the stream was deleted (create it again,
                    # as any use does), or a cluster has no leader for it yet (wait).
                    try:
                        info = await self._api("STREAM.INFO." + self.ns.stream(queue))
                    except BrokerUnavailable:
                        info = {}  # JetStream itself is busy: wait as for a leader
                    if info.get("error", {}).get("err_code") == _ERR_STREAM_NOT_FOUND:
                        self._queues.pop(queue, None)
                        await self._queue(queue)
                    else:
                        await asyncio.sleep(delay)
                        delay = min(2 * delay, 1.0)
                    continue
                if nm.is_temporary(ack.data):
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 1.0)
                    continue
                if overflow == "dead-letter" and nm.is_full(ack.data):
                    if await self._make_room(queue, data, headers):
                        return  # the new message was the one to go
                    continue
                if overflow == "block" and nm.is_full(ack.data):
                    if not parked:
                        parked = True
                        self._parked[queue] = self._parked.get(queue, 0) + 1
                    await asyncio.sleep(room_wait)
                    room_wait = min(2 * room_wait, _PARK_MAX)
                    if self._closing:
                        raise ConnectionClosed(f"the bus was closed while a send waited for"
                                               f" room in queue {shown(queue)}")
                    continue
                self._puback(queue, ack)
                return
        finally:
            if parked:
                self._parked[queue] -= 1

    async def _make_room(self, queue: str, data: bytes, headers: dict[str, str] | None
                         ) -> bool:
        """Overflow "dead-letter" on a full queue, as the local broker's ``_drop_oldest``:
        the oldest message no consumer has had goes to the dead-letter queue (``x-dead-
        reason: overflow``), and the send is sent again; if consumers have had every
        message in the queue, the new one is dead-lettered instead, and this returns True.

        The oldest not had is the first stored after the last one the queue's consumer
        delivered (its ``delivered.stream_seq``: a pull consumer delivers in stream
        order). Messages delivered and given back by a nack stay (the local broker would
        take the oldest of those first). A consumer's pull may take the message between
        this look and its removal: then it is delivered and also dead-lettered, at least
        once as ever. Two clients making room at once move it once (the dead letter's
        dedup id), and each sends again."""
        settings = self._queues.get(queue) or await self._queue(queue)
        stream = self.ns.stream(queue)
        info = await self._api(f"CONSUMER.INFO.{stream}.{nm.CONSUMER}")
        delivered = int((info.get("delivered") or {}).get("stream_seq") or 0)
        got = await self._api(f"STREAM.MSG.GET.{stream}",
                              {"seq": delivered + 1,
                               "next_by_subj": self.ns.queue_subject(queue)})
        stored = got.get("message")
        if stored is not None:
            await self._bury(queue, settings, stored, "overflow", None)
            return False
        mid = (headers or {}).get(nm.H_MSG_ID) or self._next_id()
        await self._store_dead(queue, settings, headers, data, mid, "overflow", 0)
        return True

    async def _bury(self, queue: str, settings: QueueSettings, stored: dict[str, Any],
                    reason: str, attempts: int | None) -> None:
        """Move a stored message (as ``STREAM.MSG.GET`` gives it) to the queue's
        dead-letter queue, then delete it from the stream: the MAX_DELIVERIES sweeper's
        and overflow "dead-letter"'s (``nats_produce.py``). ``attempts`` None: those
        counted before it (a released message's copy), else none."""
        stream, seq = self.ns.stream(queue), int(stored["seq"])
        headers = nm.parse_raw_headers(base64.b64decode(stored.get("hdrs") or ""))
        if attempts is None:
            attempts = nm.copied(headers or {}, 0, 0.0)[0]
        data = base64.b64decode(stored.get("data") or "")
        await self._store_dead(queue, settings, headers, data, f"{stream}:{seq}", reason,
                               attempts)
        await self._api(f"STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True})

    async def _store_dead(self, queue: str, settings: QueueSettings,
                          headers: dict[str, str] | None, data: bytes, dedup: str,
                          reason: str, attempts: int) -> None:
        """Store a dead letter of ``queue`` (a message with its NATS ``headers``) in its
        dead-letter queue with the local broker's ``x-dead-*`` headers, deduplicated by
        ``dedup`` (so two clients moving the same message store one copy), sent again
        until its PubAck comes; nothing without a dead-letter queue (the local broker
        discards the message then)."""
        target = settings.dead_letter
        if target is None:
            return
        user, kind, mid, _ = nm.decode_headers(headers)
        dead = nm.dead_letter_headers(user, queue=queue, reason=reason, attempts=attempts,
                                      now=time.time(), text=None, consumer=None)
        out = nm.encode_headers(dead, kind, dedup, None) or {}
        out[nm.H_ID] = mid or dedup
        await self._queue(target)
        await self._publish(target, self.ns.queue_subject(target), data, out)

    def send_nowait(self, queue: str, data: bytes, kind: int,
                    headers: dict[str, str] | None, ttl: float | None,
                    delay: float | None) -> asyncio.Future[None]:
        self._check_send(ttl, delay)
        if self._error is not None:
            raise self._error
        settings = self._queues.get(queue)
        if delay or (settings is not None and nm.overflow(settings)):
            return self._send_soon(self._send(queue, data, kind, headers, ttl, delay))
        result: asyncio.Future[None] = self._loop.create_future()
        if settings is None:
            # The queue is looked up (or created) once; its sends wait in order, and are
            # written when it is known: no task per send (20,000 at once in `aiobus dlq
            # requeue`).
            held = self._held.get(queue)
            if held is None:
                held = self._held[queue] = []
                self._send_soon(self._write_held(queue))
            held.append((data, kind, headers, ttl, result))
            return result
        self._send_now(queue, settings, data, kind, headers, ttl, result)
        return result

    def _send_now(self, queue: str, settings: QueueSettings, data: bytes, kind: int,
                  headers: dict[str, str] | None, ttl: float | None,
                  result: asyncio.Future[None]) -> None:
        """Write a send to a known queue; its PubAck settles ``result``."""
        inbox, fut = self._token()
        self._write(self.ns.queue_subject(queue), data, inbox,
                    nm.encode_headers(headers, kind, self._next_id(),
                                      ttl if ttl else settings.ttl))

        def done(f: asyncio.Future[Any]) -> None:
            if result.done():
                return
            if f.exception() is not None:
                result.set_exception(f.exception())  # type: ignore[arg-type]
                return
            try:
                self._puback(queue, f.result())
            except BusError as exc:
                result.set_exception(exc)
            else:
                result.set_result(None)

        fut.add_done_callback(done)

    async def _write_held(self, queue: str) -> None:
        """Look ``queue`` up, then write the sends held for it, in order."""
        try:
            settings = await self._queue(queue)
        except BaseException as exc:
            for *_, result in self._held.pop(queue, []):
                if not result.done():
                    result.set_exception(exc if isinstance(exc, Exception)
                                         else ConnectionClosed("the bus was closed"))
            if not isinstance(exc, Exception):
                raise  # cancelled: the bus is closing
            return  # the error is each send's
        for data, kind, headers, ttl, result in self._held.pop(queue, []):
            if nm.overflow(settings):
                self._follow(self._send_soon(self._send(queue, data, kind, headers, ttl,
                                                        None)), result)
            else:
                self._send_now(queue, settings, data, kind, headers, ttl, result)

    @staticmethod
    def _follow(source: asyncio.Future[None], result: asyncio.Future[None]) -> None:
        def done(f: asyncio.Future[None]) -> None:
            if result.done():
                return
            if f.cancelled():
                result.cancel()
            elif f.exception() is not None:
                result.set_exception(f.exception())  # type: ignore[arg-type]
            else:
                result.set_result(None)

        source.add_done_callback(done)

    def _send_soon(self, send: Any) -> asyncio.Future[None]:
        """A send that must look its queue up first, as a task the returned future
        follows. Cancelling the future does not cancel the send (on the Unix socket a
        send_nowait is written at once; here it is on its way), and aclose() waits for
        it, as it waits for PubAcks already due."""
        task = self._loop.create_task(send)
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        result: asyncio.Future[None] = self._loop.create_future()

        def done(t: asyncio.Task[None]) -> None:
            error = None if t.cancelled() else t.exception()
            if result.done():
                return  # cancelled by its caller: the outcome is nobody's
            if t.cancelled():
                result.cancel()
            elif error is not None:
                result.set_exception(error)
            else:
                result.set_result(None)

        task.add_done_callback(done)
        return result

    def send_unconfirmed(self, queue: str, data: bytes, kind: int,
                         headers: dict[str, str] | None, ttl: float | None,
                         delay: float | None) -> None:
        self._check_send(ttl, delay)
        settings = self._queues.get(queue)
        if settings is None or delay or nm.overflow(settings):
            self._spawn(self._send(queue, data, kind, headers, ttl, delay))
            return
        mid = self._next_id()
        # The PubAck comes back to one shared token: counted, so that ping() can wait
        # for all of them, and a refusal counts in async_errors.
        self._unconfirmed += 1
        self._write(self.ns.queue_subject(queue), data, self._unconfirmed_inbox,
                    nm.encode_headers(headers, kind, mid, ttl if ttl else settings.ttl))
