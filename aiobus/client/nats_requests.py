"""Request/reply of the NATS backend (``client/nats.py``) on core NATS, not JetStream.

Theory of operation
-------------------
``bus.request(queue, ...)`` publishes the request to the core subject
``<ns>.r.<queue>`` with a reply subject under the client's inbox (``_INBOX.<id>.<n>``,
the subscription PubAcks come back to), and waits for the reply there: NATS's own
request/reply, one hop each way. Every aiobus consumer of ``queue`` also subscribes to
that subject in the queue group ``aiobus``, so the server hands each request to one of
them (competing responders), and the consumer's stream yields it among the queue's
messages as a :class:`~aiobus.client.nats_consume._Lease` with no ack subject.

What a request does not get on NATS, and the local broker gives it (docs/nats.md):

* it is not stored: nothing in the queue's stream, no ``max_length``/overflow refusal,
  no statistics;
* no responder yet: the server answers at once with a 503 status (no responders);
  the requester sends it again, backing off, until one subscribes or the timeout runs
  out (``RequestTimeout``, as a request waiting in a local queue times out);
* a responder gets requests as they come, beyond its ``prefetch`` (core NATS pushes);
* no ``ack_timeout`` redelivery and no dead-lettering: a request whose responder dies
  is lost (the requester times out). ``nack`` gives it to the group again, attempt + 1,
  up to ``max_deliveries``; after that, or on ``reject``, it is dropped. A consumer that
  stops gives its unanswered requests to the group again without counting an attempt.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import TYPE_CHECKING, Any, Final

import nats.errors
from nats.aio.msg import Msg

from ..errors import BusError, RequestTimeout
from ..protocol import decode_body
from . import nats_map as nm
from .nats_consume import _Lease
from .nats_host import NatsHost

if TYPE_CHECKING:
    from .nats_consume import _Pull

__all__ = ["Requests"]

_RETRY_FIRST: Final = 0.005  # seconds before a request with no responder is sent again
_RETRY_MAX: Final = 0.25


class Requests(NatsHost):
    """The request/reply half of :class:`~aiobus.client.nats.NatsBackend` (see the
    module docstring); what it uses of the other halves is declared in ``nats_host.py``."""

    async def request(self, queue: str, data: bytes, kind: int,
                      headers: dict[str, str] | None, timeout: float) -> Any:
        nm.check_seconds("timeout", timeout)
        subject = self.ns.request_subject(queue)
        out = nm.request_headers(headers, kind, None, 1)  # its id: the reply subject
        token = ""
        delay = _RETRY_FIRST
        try:
            async with asyncio.timeout(timeout):
                while True:
                    inbox, reply = self._token()
                    token = inbox[len(self._inbox) + 1:]
                    self._write(subject, data, inbox, out)
                    try:
                        msg: Msg = await reply
                        break
                    except nats.errors.NoRespondersError:
                        await asyncio.sleep(delay)  # until a responder subscribes
                        delay = min(2 * delay, _RETRY_MAX)
        except TimeoutError:
            raise RequestTimeout(
                f"no reply from queue {queue!r} within {timeout} s; is a consumer running?"
            ) from None
        finally:
            self._waiters.pop(token, None)
        _, body_kind, _, _ = nm.decode_headers(msg.headers)
        return decode_body(msg.data, body_kind)

    async def _respond(self, pull: _Pull) -> None:
        """Make consumer ``pull`` one of the queue's competing responders."""
        pull.request_sid = await self._subscribe(
            self.ns.request_subject(pull.queue), functools.partial(self._on_request, pull),
            group=nm.CONSUMER)

    def _on_request(self, pull: _Pull, msg: Msg) -> None:
        if not msg.reply:
            return  # a publish to the subject, not a request: nobody to answer
        headers = msg.headers
        target = pull.target()
        if pull.stopped or target is None:
            self._write(msg.subject, msg.data, msg.reply, headers)  # to another responder
            return
        user, kind, mid, _ = nm.decode_headers(headers)
        attempt = nm.request_attempt(headers)
        lease = _Lease(pull, "", 0, attempt, float("inf"), mid or msg.reply, msg.data, kind,
                       user, msg.reply)
        pull.unacked += 1
        pull.leases.add(lease)
        target._deliver(lease, [lease.mid, pull.queue, msg.data, kind, user, time.time()],
                        attempt, msg.reply)

    def _give_back(self, lease: _Lease, attempt: int, delay: float) -> None:
        """Hand an unanswered request to the group again (``attempt`` is its next), after
        ``delay`` seconds; dropped beyond the queue's ``max_deliveries``."""
        limit = lease.pull.settings.max_deliveries
        if limit is not None and attempt > limit:
            return  # no dead-lettering of requests (module docstring)
        subject = self.ns.request_subject(lease.pull.queue)
        headers = nm.request_headers(lease.headers, lease.kind, lease.mid, attempt)
        assert lease.reply is not None
        if delay > 0:
            self._loop.call_later(delay, self._write_unless_closed, subject, lease.data,
                                  lease.reply, headers)
        else:
            self._write(subject, lease.data, lease.reply, headers)

    def _write_unless_closed(self, subject: str, data: bytes, reply: str,
                             headers: dict[str, str] | None) -> None:
        try:
            self._write(subject, data, reply, headers)
        except BusError:
            pass  # closed meanwhile: the requester sees its own error

