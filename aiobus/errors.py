"""The aiobus exception tree.

Everything aiobus raises on purpose derives from :class:`BusError`. Errors the broker
reports carry the wire ``code`` (see docs/PROTOCOL.md, "Error codes"); :func:`from_code`
turns a code from an ERROR or CLOSE frame into the matching class, so a caller can
``except aiobus.QueueFull`` instead of comparing strings.

Closed-by-you differs from broken-by-peer (trio's ClosedResourceError versus
BrokenResourceError): :class:`ConnectionClosed` means this side closed the bus,
:class:`ConnectionLost` means the broker went away or closed it on us.
"""

from __future__ import annotations

import ast
import reprlib
from typing import Any

__all__ = [
    "BodyDecodeError",
    "BrokerUnavailable",
    "BusError",
    "ConnectionClosed",
    "ConnectionLost",
    "Forbidden",
    "FrameTooLarge",
    "InvalidName",
    "InvalidOption",
    "JournalError",
    "LeaseError",
    "LocalProtocolError",
    "NoSuchQueue",
    "NotARequest",
    "PermissionDenied",
    "ProtocolError",
    "QueueFull",
    "QueueMismatch",
    "QueueNotEmpty",
    "QuotaExceeded",
    "RemoteProtocolError",
    "RequestTimeout",
    "SendTimeout",
    "SubscriptionError",
    "from_code",
    "shown",
]


class BusError(Exception):
    """Base class of every error aiobus raises on purpose.

    ``code`` is the protocol's error code when the error came from (or maps to) the wire,
    else ``None``.
    """

    code: str | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class ProtocolError(BusError):
    """A frame broke the protocol. Poisons the connection it arrived on, nothing else."""

    code = "protocol"


class LocalProtocolError(ProtocolError):
    """This side was about to break the protocol (a bug in the caller or in aiobus)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that breaks the protocol: malformed msgpack, an unknown
    frame type, a field of the wrong type."""


class FrameTooLarge(ProtocolError, ValueError):
    """A frame (in practice: a message body) exceeds the broker's ``max_frame``.

    Raised locally before anything is sent when the client knows the limit; sent by the
    broker (which then closes the connection) when a peer ignores it.
    """

    code = "frame-too-large"


class InvalidName(BusError, ValueError):
    """A queue name, topic or pattern does not follow the name grammar
    (dot-separated non-empty tokens; wildcards only in subscription patterns)."""

    code = "invalid-name"


class BodyDecodeError(BusError, ValueError):
    """A received message's body is not the msgpack its kind says (a producer bug)."""

    code = "undecodable-body"


class InvalidOption(BusError, ValueError):
    """An option has the wrong type or value (a queue setting, prefetch, max_pending,
    a ttl, delay or lease extension that is not a positive number)."""

    code = "bad-option"


class Forbidden(BusError, PermissionError):
    """The operation is reserved, e.g. publishing on a ``$sys.`` topic."""

    code = "forbidden"


class PermissionDenied(Forbidden):
    """The broker's policy does not let this client do ``operation`` on ``name``.

    On the wire an ERROR ``forbidden`` whose message reads ``permission denied: <verb>
    '<name>' ...`` (docs/PROTOCOL.md, section 7); the request was not carried out and the
    connection stays open. A subclass of :class:`Forbidden`, so ``except Forbidden``
    catches both this and the reserved ``$...`` names.

    Attributes:
        operation: the verb denied (``send``, ``consume``, ``publish``, ``subscribe``,
            ``declare``, ``admin``), or None if the message did not say.
        name: the queue name, topic or pattern it was denied on, or None.
    """

    PREFIX = "permission denied: "

    def __init__(self, message: str, *, code: str | None = None,
                 operation: str | None = None, name: str | None = None) -> None:
        super().__init__(message, code=code)
        if operation is None and message.startswith(self.PREFIX):
            operation, _, rest = message[len(self.PREFIX):].partition(" ")
            quoted = rest.split(" for uid ", 1)[0]
            try:
                parsed = ast.literal_eval(quoted)
            except (ValueError, SyntaxError):
                parsed = None
            name = parsed if type(parsed) is str else None
        self.operation = operation
        self.name = name

    @classmethod
    def of(cls, operation: str, name: str, uid: int) -> PermissionDenied:
        """The broker's error for ``uid`` denied ``operation`` on ``name``."""
        return cls(f"{cls.PREFIX}{operation} {name!r} for uid {uid}", operation=operation,
                   name=name)


class QueueFull(BusError):
    """The queue is at ``max_length`` and its overflow policy is ``"reject"``."""

    code = "queue-full"


class QueueMismatch(BusError):
    """``declare_queue`` with settings different from the queue's declared ones."""

    code = "queue-mismatch"


class NoSuchQueue(BusError, LookupError):
    """``purge_queue`` or ``delete_queue`` of a queue the broker does not have (never
    used since it started, or deleted). Also what a send waiting for room in a full
    ``overflow="block"`` queue gets when the queue is deleted: it was not accepted."""

    code = "no-such-queue"


class QueueNotEmpty(BusError):
    """``delete_queue(..., if_empty=True)`` of a queue that still holds messages (ready,
    delayed, leased or waiting for room); the message says how many. Nothing changed."""

    code = "queue-not-empty"


class QuotaExceeded(BusError):
    """A per-connection limit was reached (e.g. consumers on one connection); the message
    names the limit and its value. Nothing was changed."""

    code = "quota-exceeded"


class LeaseError(BusError):
    """An ack, nack, reject, extend or reply for a lease this consumer no longer holds:
    it expired (``code == "lease-expired"``; the message went back to the queue), was
    released when the consumer stopped, or was already answered (``"lease-unknown"``), or
    the connection it came on was lost (``"lease-lost"``: the broker redelivers it; a
    reconnecting client raises this for leases of the connection before)."""

    code = "lease-unknown"


class NotARequest(BusError):
    """``Message.reply`` on a message that was sent with ``send``, not ``request``."""

    code = "not-a-request"


class BusyError(BusError, RuntimeError):
    """Two tasks iterate the same stream at once (as trio's BusyResourceError)."""

    code = "busy"


class SubscriptionError(BusError):
    """A subscription or consumer id the broker does not know, or one already in use."""

    code = "unknown-subscription"


class BusConnectionError(BusError, ConnectionError):
    """Base of the errors about the connection itself."""


class BrokerUnavailable(BusConnectionError):
    """No broker listens on the socket path (or the handshake failed)."""

    code = "unavailable"


class ConnectionLost(BusConnectionError):
    """The broker closed the connection, or the connection broke. ``code`` tells why
    when the broker said so (``"shutdown"``, ``"slow-consumer"``, ...)."""

    code = "connection-lost"


class ConnectionClosed(BusConnectionError):
    """This bus was closed by its owner; it cannot be used any more."""

    code = "closed"


class JournalError(BusError):
    """The broker's journal could not be written or read, so a send to a durable queue
    was not accepted (``cause`` names why, e.g. ``"ENOSPC"``; ``file`` which file, when
    known). The broker keeps serving everything else and accepts durable sends again by
    itself once the journal is writable."""

    code = "journal"

    def __init__(self, message: str, *, code: str | None = None, file: str | None = None,
                 cause: str | None = None) -> None:
        super().__init__(message, code=code)
        self.file = file
        self.cause = cause


class RequestTimeout(BusError, TimeoutError):
    """``request`` got no reply within its timeout."""

    code = "timeout"


class SendTimeout(BusError, TimeoutError):
    """``send(..., timeout=)`` was not confirmed in time (the broker was away, or the
    queue stayed full). If the message had been written before the connection dropped,
    the broker may still hold it; it is not sent again after the timeout."""

    code = "send-timeout"


_BY_CODE: dict[str, type[BusError]] = {
    "protocol": RemoteProtocolError,
    "bad-field": RemoteProtocolError,
    "unknown-frame": RemoteProtocolError,
    "unsupported-version": RemoteProtocolError,
    "handshake-timeout": RemoteProtocolError,
    "frame-too-large": FrameTooLarge,
    "invalid-name": InvalidName,
    "forbidden": PermissionDenied,  # a Forbidden; operation None for a '$' name
    "queue-full": QueueFull,
    "queue-mismatch": QueueMismatch,
    "journal": JournalError,
    "no-such-queue": NoSuchQueue,
    "queue-not-empty": QueueNotEmpty,
    "quota-exceeded": QuotaExceeded,
    "bad-option": InvalidOption,
    "lease-expired": LeaseError,
    "lease-unknown": LeaseError,
    "not-a-request": NotARequest,
    "unknown-subscription": SubscriptionError,
    "duplicate-subscription": SubscriptionError,
}


def from_code(code: str, message: str) -> BusError:
    """Build the exception for a broker error ``code`` (unknown codes give BusError)."""
    cls = _BY_CODE.get(code, BusError)
    return cls(message, code=code)


# Error messages quote what a client sent, and a client can send 16 MiB where a name
# belongs: a value is quoted cut short (reprlib, as the debugger and asyncio do), with
# its length when it was cut, so an ERROR is never bigger than its cause's first bytes.
MAX_QUOTED = 64
_repr = reprlib.Repr()
_repr.maxlevel = 2
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 4
_repr.maxstring = _repr.maxother = _repr.maxlong = MAX_QUOTED


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, at most about 64 characters: a longer str,
    bytes or container is cut and its length added (``'aaaa...aaa' (15000000 chars)``)."""
    text = _repr.repr(value)
    kind = type(value)
    if kind is str and len(value) > MAX_QUOTED:
        return f"{text} ({len(value)} chars)"
    if kind is bytes and len(value) > MAX_QUOTED:
        return f"{text} ({len(value)} bytes)"
    if kind in (list, tuple, dict) and len(value) > _repr.maxlist:
        return f"{text} ({len(value)} items)"
    return text
