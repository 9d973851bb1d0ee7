"""Messages as the client hands them to the application."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..errors import (
    BodyDecodeError,
    BusError,
    FrameTooLarge,
    InvalidOption,
    LeaseError,
    NotARequest,
)
from ..protocol import BodyKind, decode_body, encode_body

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["Message"]


_UNDECODED: Any = object()


def check_size(body: bytes, max_body: int) -> None:
    """Refuse a body the broker would refuse (before anything is sent)."""
    if len(body) > max_body:
        raise FrameTooLarge(
            f"message body of {len(body)} bytes exceeds the broker's max_frame of"
            f" {max_body} bytes; split it, or raise the broker's --max-frame"
        )


class Message:
    """One message received from a queue (``consume``) or a topic (``subscribe``).

    Attributes:
        body: ``bytes`` if it was sent as bytes, else the value that was sent. Decoded
            on first access; a body another client encoded badly raises
            :class:`~aiobus.BodyDecodeError` there (``raw_body`` still has the bytes), so
            one bad producer cannot take a consumer's connection down.
        raw_body: the body's bytes as they travelled.
        headers: dict of str to str (empty when none were sent). Dead letters carry
            ``x-original-queue``, ``x-dead-reason``, ``x-attempts``, ``x-dead-time`` and,
            when known, ``x-reason-text``, ``x-consumer-pid`` and ``x-consumer-uid``.
        id: unique message id, kept across redeliveries and dead-lettering.
        queue: the queue it came from (``None`` for topic messages).
        topic: the topic it was published on (``None`` for queue messages).
        attempt: 1 on the first delivery; one higher after each failed attempt (nack,
            ack timeout, consumer crash); not raised when a consumer merely stopped.
        timestamp: when the broker accepted it, seconds since the epoch.
        dropped: for topic messages, how many messages this subscription dropped just
            before this one because it fell behind (see ``subscribe``); 0 otherwise.
        gap: True for the first topic message after the bus reconnected: messages
            published while it was away were missed, and ``dropped`` cannot count them.
        reply_to: set when the message is a ``request``; answer it with :meth:`reply`.

    A queue message is a *lease*: answer it exactly once with :meth:`ack`, :meth:`nack`,
    :meth:`reject` or :meth:`reply` before the queue's ``ack_timeout`` (or
    :meth:`extend` the lease), or it is redelivered.
    """

    # A message keeps the message array it came in ([id, queue or topic, body, kind,
    # headers, timestamp]: PROTOCOL.md's message array) and reads its fields from it on
    # access: building a dozen attributes per message cost more than the rest of the
    # client's receive path (see docs/performance.md). Its lease is the backend's opaque
    # handle (None for a topic message), settled through the backend.
    __slots__ = ("_answered", "_backend", "_body", "_lease", "_m", "_n", "_reply_to")

    _m: list[Any]

    def __init__(self, backend: Backend, lease: Any, message: list[Any], n: int,
                 reply_to: str | None = None) -> None:
        """``lease`` None: a topic message, and ``n`` is how many the subscription
        dropped before it; else a queue message, and ``n`` is its attempt."""
        self._backend = backend
        self._lease = lease
        self._m = message
        self._n = n
        self._reply_to = reply_to
        self._body: Any = _UNDECODED
        self._answered = False

    @property
    def id(self) -> str:
        return str(self._m[0])

    @property
    def queue(self) -> str | None:
        return None if self._lease is None else self._m[1]

    @property
    def topic(self) -> str | None:
        return self._m[1] if self._lease is None else None

    @property
    def raw_body(self) -> bytes:
        return self._m[2]  # type: ignore[no-any-return]

    @property
    def _kind(self) -> int:
        return self._m[3]  # type: ignore[no-any-return]

    @property
    def headers(self) -> dict[str, str]:
        m = self._m
        headers = m[4]
        if headers is None:
            headers = m[4] = {}
        return headers  # type: ignore[no-any-return]

    @property
    def timestamp(self) -> float:
        return float(self._m[5])

    @property
    def attempt(self) -> int:
        return 1 if self._lease is None else self._n

    @property
    def dropped(self) -> int:
        return self._n if self._lease is None else 0

    @property
    def reply_to(self) -> str | None:
        return self._reply_to

    @property
    def gap(self) -> bool:
        return False

    @property
    def body(self) -> Any:
        body = self._body
        if body is _UNDECODED:
            raw, kind = self.raw_body, self._kind
            if kind == BodyKind.RAW:
                body = raw
            else:
                try:
                    body = decode_body(raw, kind)
                except Exception as exc:
                    raise BodyDecodeError(
                        f"message {self.id} has a body its producer did not encode correctly"
                        f" ({type(exc).__name__}: {exc}); its bytes are in msg.raw_body"
                    ) from exc
            self._body = body
        return body

    def __repr__(self) -> str:
        where = f"queue={self.queue!r}" if self.queue is not None else f"topic={self.topic!r}"
        try:
            body = repr(self.body)
        except BodyDecodeError:
            body = f"<undecodable {self.raw_body!r:.40}>"
        return f"<Message id={self.id!r} {where} attempt={self.attempt} body={body:.60}>"

    def _take_lease(self, verb: str) -> Any:
        lease = self._lease
        if lease is None:
            raise BusError(f"cannot {verb} a topic message: topics have no acknowledgements")
        if self._answered:
            raise LeaseError(f"message {self.id} was already answered; cannot {verb} it again",
                             code="lease-unknown")
        self._answered = True
        return lease

    async def ack(self, *, confirm: bool = False) -> None:
        """Acknowledge: the message is done and leaves the queue.

        By default the ack joins the connection's next ACK_MANY batch (written at the end
        of this event-loop iteration) and this returns at once, as nats-py's
        ``msg.ack()`` and aio-pika's ``message.ack()`` do: a returned ``ack()`` means
        the ack is queued on the connection, not that the broker has it. If the broker
        refuses it (the lease expired, so the message was redelivered, or it was
        answered already), the consumer logs the first refusal and counts each in
        ``Consumer.failed_answers`` and ``bus.async_errors``; your loop goes on. If the
        connection is lost before the ack is written, or the lease came on a connection
        that was lost since, the ack is dropped: the broker redelivers the message
        (at-least-once).

        Args:
            confirm: wait for the broker's confirmation, and raise if it refuses (one
                round trip per message: a fifth of the default's throughput).

        Raises:
            LeaseError: answered already on this client (``lease-unknown``, at once);
                with ``confirm``: the lease expired (``lease-expired``) or was released
                (``lease-unknown``), or (``lease-lost``) the connection it came on was
                lost, and the broker redelivers it.
            ConnectionLost: the broker went away and the bus does not reconnect.

        Example::

            async for msg in bus.consume("jobs"):
                await handle(msg.body)
                await msg.ack()
        """
        if confirm:
            await self._backend.settle(self._take_lease("ack"), "ack")
        else:
            self._backend.ack_nowait(self._take_lease("ack"))

    def ack_nowait(self) -> None:
        """Acknowledge without waiting: ``await msg.ack()`` as a plain call.

        A refusal is reported as for :meth:`ack`. Acks made in the same event-loop
        iteration travel in one ACK_MANY frame.
        """
        self._backend.ack_nowait(self._take_lease("ack"))

    async def nack(self, delay: float | None = None, reason: str | None = None, *,
                   confirm: bool = False) -> None:
        """Give the message back for another attempt; this attempt counts as failed.

        Returns once the NACK is written to the connection's buffer (no round trip),
        with the same promise and reporting as :meth:`ack`; ``confirm=True`` waits for
        the broker.

        Args:
            delay: seconds before it can be delivered again, from 0 up to 1e9; ``None``
                follows the queue's ``retry_delays`` schedule (empty schedule: at once).
            reason: kept and shown in ``x-reason-text`` if it is dead-lettered later.
            confirm: wait for the broker's confirmation, and raise if it refuses.

        Raises:
            InvalidOption: ``delay`` is out of range (before anything is sent).
            LeaseError: as for :meth:`ack`.
        """
        if delay is not None and not (type(delay) in (int, float) and 0 <= delay < 1e9):
            # The broker's rule (broker/settings.py MAX_SECONDS), checked here too because
            # an unconfirmed NACK the broker refuses would leave the lease held.
            raise InvalidOption(f"nack delay must be a number of seconds from 0 up to 1e9,"
                                f" or None; got {delay!r}")
        if confirm:
            await self._backend.settle(self._take_lease("nack"), "nack", delay, reason)
        else:
            self._backend.settle_nowait(self._take_lease("nack"), "nack", delay, reason)

    async def reject(self, reason: str | None = None, *, confirm: bool = False) -> None:
        """Send the message straight to the queue's dead-letter queue.

        Returns without waiting, as :meth:`ack` does; ``confirm=True`` waits.

        Raises:
            LeaseError: as for :meth:`ack`.
        """
        if confirm:
            await self._backend.settle(self._take_lease("reject"), "reject", None, reason)
        else:
            self._backend.settle_nowait(self._take_lease("reject"), "reject", None, reason)

    async def extend(self, seconds: float) -> None:
        """Push the lease's deadline to ``seconds`` from now, for a long job.

        Raises:
            LeaseError: the lease already expired or was answered.
        """
        if self.queue is None:
            raise BusError("cannot extend a topic message: topics have no leases")
        if self._answered:
            raise LeaseError(f"message {self.id} was already answered", code="lease-unknown")
        await self._backend.extend(self._lease, seconds)

    async def reply(self, body: Any, headers: dict[str, str] | None = None, *,
                    confirm: bool = False) -> None:
        """Answer a request: the reply goes to the requester, and the message is acked.

        Like :meth:`ack`, it returns without waiting for the broker: the reply is
        written at the end of this event-loop iteration, and a refusal (the lease
        expired, so the request went back to the queue; or it was answered already) is
        logged once per consumer and counted in ``Consumer.failed_answers`` and
        ``bus.async_errors``. If the connection is lost before it is written, the reply
        is dropped and the request redelivered (its requester's ``request()`` raises
        ``ConnectionLost`` if it was on the same broker and lost its connection too).

        Args:
            confirm: wait for the broker's confirmation, and raise if it refuses.

        Raises:
            NotARequest: the message was sent with ``send``, not ``request``.
            LeaseError: answered already on this client (at once); with ``confirm``:
                the lease expired or was released, or the connection was lost.
            TypeError: ``body`` is not msgpack-serialisable.

        Example::

            async for msg in bus.consume("rpc.add"):
                await msg.reply(sum(msg.body))
        """
        if self.reply_to is None and self.queue is not None:
            raise NotARequest(
                f"message {self.id} was sent with send(), not request(): there is nobody to"
                " reply to; ack it instead"
            )
        data, kind = encode_body(body)
        check_size(data, self._backend.max_body)
        if confirm:
            await self._backend.reply(self._take_lease("reply to"), data, kind, headers)
        else:
            self._backend.reply_nowait(self._take_lease("reply to"), data, kind, headers)

    def process(self) -> _Processing:
        """Ack when the block succeeds, nack (a failed attempt) when it raises.

        The ack or nack is written as :meth:`ack` and :meth:`nack` do by default: it
        is queued on the connection (acks of one loop iteration in one ACK_MANY) and the
        block exits without a round trip; a refusal by the broker is counted in
        ``Consumer.failed_answers`` and the first one logged. Cancellation neither acks
        nor nacks: the consumer's leases are released when its ``async for`` ends,
        without counting an attempt. If the connection was lost while the block ran, the
        broker has already given the message back for redelivery: the answer is dropped,
        and the consumer's loop goes on (an exception from the block still propagates).

        Example::

            async for msg in bus.consume("jobs"):
                async with msg.process():
                    await handle(msg.body)
        """
        return _Processing(self)


class _Processing:
    # A class rather than @asynccontextmanager: the README's worker loop enters one per
    # message, and a generator-based context manager costs ~3 µs more (docs/performance.md).
    __slots__ = ("_msg",)

    def __init__(self, msg: Message) -> None:
        self._msg = msg

    async def __aenter__(self) -> Message:
        return self._msg

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: object) -> None:
        msg = self._msg
        if msg._answered:
            return
        if exc_type is None:
            msg._backend.ack_nowait(msg._take_lease("ack"))
        elif issubclass(exc_type, Exception):
            msg._backend.settle_nowait(msg._take_lease("nack"), "nack", None,
                                       f"{exc_type.__name__}: {exc}"[:1000])


class GapMessage(Message):
    """The first topic message a subscription receives after its bus reconnected."""

    __slots__ = ()

    @property
    def gap(self) -> bool:
        return True
