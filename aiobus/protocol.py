"""The aiobus wire protocol, sans I/O: bytes in, frames out, and back.

A connection carries a stream of msgpack values, each one frame: an array whose first
element is the frame type (:class:`Op`) and whose other elements are positional fields.
docs/PROTOCOL.md is the reference; the ``SPECS`` table below is its executable form, and
both must change together.

Frames stay plain lists on the hot path (an object per frame costs more than its
checks; see docs/performance.md). :func:`check_frame` validates a frame's arity and field
types against ``SPECS`` and raises :class:`RemoteProtocolError` naming the bad field.

Bodies travel as msgpack ``bin`` plus a ``kind`` field: ``RAW`` bytes pass through
untouched, ``PACKED`` bodies are a msgpack encoding of any other value, decoded by the
receiving client only. The broker never decodes or re-encodes a body.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any, ClassVar, Final, Literal

import msgpack

from ._frame_scan import FrameScanner
from .errors import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError, shown

__all__ = [
    "DEFAULT_MAX_FRAME",
    "MAX_HELLO_FRAME",
    "OPTIONAL_TAIL",
    "PROTOCOL_VERSION",
    "SPECS",
    "BodyKind",
    "FrameDecoder",
    "Op",
    "Overflow",
    "SubscriptionPolicy",
    "check_frame",
    "decode_body",
    "encode_body",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 16 * 1024 * 1024
# Slack above max_frame for one socket read (uvloop reads at most 256 KiB at a time)
# plus frame headers, so a legal frame arriving together with the next read still fits.
_READ_SLACK: Final = 512 * 1024
# Frames from clients are short arrays with small maps (headers, options); msgpack's C
# unpacker caps nesting itself (StackError). Clients raise these for STATS results.
_MAX_ARRAY: Final = 65536  # ACK_MANY carries up to this many tags
_MAX_MAP: Final = 4096
_POOL_LIMIT: Final = 64  # idle unpackers kept per set of limits
# Bytes a connection may send before its first frame, the HELLO, is complete. A HELLO is
# tens of bytes (a version and a name of at most 255 chars); before it, the peer is
# unknown, so it may make the broker hold little (h11 caps an incomplete request head at
# 16 KiB, nginx a header line at 8 KiB).
MAX_HELLO_FRAME: Final = 8 * 1024


class Op(IntEnum):
    """Frame types. Client→broker unless marked."""

    HELLO = 1  # first frame on a connection: protocol version and options
    WELCOME = 2  # broker→client: handshake accepted
    OK = 3  # broker→client: request ``rid`` succeeded, with a result
    ERROR = 4  # broker→client: request ``rid`` failed (never fatal)
    CLOSE = 5  # broker→client: the broker is closing this connection, and why
    PING = 6  # liveness / barrier: answered by OK in order
    OK_RANGE = 7  # broker→client: requests ``first``..``last`` all succeeded, result nil
    SEND = 10  # a message to a queue (optionally a request awaiting a RESPONSE)
    PUBLISH = 11  # a message to a topic; no reply
    SUBSCRIBE = 12  # start receiving EVENTs for a pattern
    CONSUME = 13  # start receiving DELIVERs from a queue
    CANCEL = 14  # stop a subscription or consumer; a consumer's leases are released
    CREDIT = 15  # the client consumed n EVENTs of a subscription; no reply
    ACK = 16  # lease done: remove the message
    NACK = 17  # lease failed: back to the queue (after a delay)
    REJECT = 18  # lease failed for good: to the dead-letter queue
    EXTEND = 19  # push a lease's deadline out
    REPLY = 20  # answer a request: acks the lease and sends a RESPONSE to the requester
    DECLARE = 21  # create a queue with settings, or check them
    STATS = 22  # broker statistics
    ACK_MANY = 23  # ack several leases at once, no reply (fire-and-forget acks, batched)
    PURGE = 24  # remove a queue's waiting messages (ready and delayed); result: how many
    DELETE = 25  # remove a queue, its settings and all its messages; result: how many
    PEEK = 26  # read a queue's ready messages without leasing or changing them (browse)
    DELIVER = 30  # broker→client: a queue message under a lease
    EVENT = 31  # broker→client: a topic message
    RESPONSE = 32  # broker→client: the reply to one of this connection's requests
    EVENTS = 33  # broker→client: consecutive topic messages of one subscription


class BodyKind(IntEnum):
    """How a body's bytes are to be read by the receiving client."""

    RAW = 0  # the bytes are the body
    PACKED = 1  # the bytes are a msgpack encoding of the body


_INT = (int,)
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_STR = (str,)
_OPT_STR = (str, type(None))
_BIN = (bytes,)
_MAP = (dict,)
_OPT_MAP = (dict, type(None))
_OPT_INT = (int, type(None))
_BOOL = (bool,)
_OPT_BOOL = (bool, type(None))
# Compared by identity (``is _ANY``): typed as a variable-length tuple so that a mypyc
# build keeps it one boxed object rather than a value copied at each use.
_ANY: tuple[type, ...] = (object,)

# Field names and accepted Python types per frame (after msgpack decoding). Field names
# here are the ones docs/PROTOCOL.md uses and the ones error messages name.
SPECS: Final[dict[int, tuple[tuple[str, tuple[type, ...]], ...]]] = {
    Op.HELLO: (("version", _INT), ("options", _MAP)),
    Op.WELCOME: (("version", _INT), ("info", _MAP)),
    Op.OK: (("rid", _INT), ("result", _ANY)),
    Op.ERROR: (("rid", _INT), ("code", _STR), ("message", _STR), ("token", _INT)),
    Op.OK_RANGE: (("first", _INT), ("last", _INT)),
    Op.CLOSE: (("code", _STR), ("message", _STR)),
    Op.PING: (("rid", _INT),),
    Op.SEND: (
        ("rid", _INT), ("queue", _STR), ("body", _BIN), ("kind", _INT),
        ("headers", _OPT_MAP), ("ttl", _OPT_NUM), ("reply_token", _OPT_INT),
        ("delay", _OPT_NUM), ("seq", _OPT_INT),
    ),
    Op.PUBLISH: (("topic", _STR), ("body", _BIN), ("kind", _INT), ("headers", _OPT_MAP)),
    Op.SUBSCRIBE: (
        ("rid", _INT), ("sid", _INT), ("pattern", _STR), ("max_pending", _INT),
        ("policy", _STR),
    ),
    Op.CONSUME: (
        ("rid", _INT), ("sid", _INT), ("queue", _STR), ("prefetch", _INT), ("passive", _OPT_BOOL),
    ),
    Op.CANCEL: (("rid", _INT), ("sid", _INT)),
    Op.CREDIT: (("sid", _INT), ("n", _INT)),
    Op.ACK: (("rid", _INT), ("tag", _INT)),
    Op.NACK: (("rid", _INT), ("tag", _INT), ("delay", _OPT_NUM), ("reason", _OPT_STR)),
    Op.REJECT: (("rid", _INT), ("tag", _INT), ("reason", _OPT_STR)),
    Op.EXTEND: (("rid", _INT), ("tag", _INT), ("seconds", _NUM)),
    Op.REPLY: (
        ("rid", _INT), ("tag", _INT), ("body", _BIN), ("kind", _INT), ("headers", _OPT_MAP),
    ),
    Op.DECLARE: (("rid", _INT), ("queue", _STR), ("options", _MAP)),
    Op.STATS: (("rid", _INT), ("options", _OPT_MAP)),
    Op.ACK_MANY: (("tags", (list,)),),
    Op.PURGE: (("rid", _INT), ("queue", _STR)),
    Op.DELETE: (("rid", _INT), ("queue", _STR), ("if_empty", _BOOL)),
    Op.PEEK: (("rid", _INT), ("queue", _STR), ("options", _OPT_MAP)),
    # message: the message array [id, queue or topic, body, kind, headers, timestamp]
    # (PROTOCOL.md §4); the broker stores a queued message in exactly this encoding.
    Op.DELIVER: (
        ("sid", _INT), ("tag", _INT), ("message", (list,)), ("attempt", _INT),
        ("reply_to", _OPT_STR),
    ),
    Op.EVENT: (("sid", _INT), ("message", (list,)), ("dropped", _INT)),
    Op.EVENTS: (("sid", _INT), ("messages", (list,)), ("dropped", _INT)),
    Op.RESPONSE: (("token", _INT), ("body", _BIN), ("kind", _INT), ("headers", _OPT_MAP)),
}

# Trailing fields a frame may leave out, per op: fields added after the frame first
# shipped, so that older clients' shorter frames stay valid. A left-out field means nil.
# SEND's ``delay`` (scheduled delivery) and ``seq`` (resendable SENDs), STATS's and
# PEEK's ``options`` (which queues or messages, how many), CONSUME's ``passive`` (do
# not create) and ERROR's ``token`` (the request an unconfirmed SEND's ERROR is for).
OPTIONAL_TAIL: Final[dict[int, int]] = {Op.SEND: 2, Op.STATS: 1, Op.CONSUME: 1, Op.PEEK: 1,
                                        Op.ERROR: 1}

# The option strings the broker accepts, as types: mypy then refuses
# ``overflow="blok"`` before the broker would (ERROR bad-option). The broker's checks take
# their lists from here (typing.get_args).
Overflow = Literal["block", "reject", "dead-letter"]  # DECLARE ``overflow``
SubscriptionPolicy = Literal["drop-oldest", "drop-newest", "disconnect"]  # SUBSCRIBE ``policy``

_OP_NAMES: Final = {int(op): op.name for op in Op}
_BODY_KINDS: Final = frozenset(int(k) for k in BodyKind)


def _signatures() -> dict[int, frozenset[tuple[type, ...]]]:
    """Every tuple of field types a frame of each op may have (for the fast path)."""
    result: dict[int, frozenset[tuple[type, ...]]] = {}
    for op, spec in SPECS.items():
        if any(types is _ANY or list in types for _, types in spec):
            continue  # OK's result and ACK_MANY's tags need a look inside: slow path
        combos: list[tuple[type, ...]] = [(int,)]
        shorter: list[tuple[type, ...]] = []  # the combos leaving out some of the tail
        for i, (_, types) in enumerate(spec):
            if i >= len(spec) - OPTIONAL_TAIL.get(op, 0):
                shorter += combos
            combos = [(*c, t) for c in combos for t in types]
        result[op] = frozenset(combos + shorter)
    return result


_SIGNATURES: Final = _signatures()
# Per op: indexes of int fields (must not be negative), of the headers map, of the kind.
_INT_INDEXES: Final = {
    op: tuple(i for i, (_, types) in enumerate(spec, 1) if types in (_INT, _OPT_INT))
    for op, spec in SPECS.items()
}
_HEADERS_INDEX: Final = {
    op: next((i for i, (f, _) in enumerate(spec, 1) if f == "headers"), 0)
    for op, spec in SPECS.items()
}
_KIND_INDEX: Final = {
    op: next((i for i, (f, _) in enumerate(spec, 1) if f == "kind"), 0)
    for op, spec in SPECS.items()
}


def check_frame(frame: object) -> int:
    """Validate a decoded frame against ``SPECS`` and return its op.

    A frame has every field of its spec, in order, except the ``OPTIONAL_TAIL`` fields
    a frame may leave out at its end (SEND's ``delay``). Header maps must hold str keys
    and str values. Integer fields (ids, counts, kinds) must be non-negative; numbers of
    seconds are checked by the broker, as request errors.

    Raises:
        RemoteProtocolError: naming the frame type and the field that is wrong.
    """
    # Fast path, one C-level pass for the common frame: the tuple of field types must be
    # one the op allows. Anything unusual falls through to the exact, slower check below,
    # which also produces the error message.
    if type(frame) is list and frame:
        op = frame[0]
        valid = _SIGNATURES.get(op) if type(op) is int else None
        if valid is not None and tuple(map(type, frame)) in valid:
            size = len(frame)
            for i in _INT_INDEXES[op]:
                value = frame[i] if i < size else None  # (an optional tail left out)
                if value is not None and value < 0:
                    break
            else:
                hi, ki = _HEADERS_INDEX[op], _KIND_INDEX[op]
                if (not hi or not frame[hi]) and (not ki or frame[ki] in _BODY_KINDS):
                    return op  # type: ignore[no-any-return]
    return _check_frame_slow(frame)


def _check_frame_slow(frame: object) -> int:
    if type(frame) is not list or not frame:
        raise RemoteProtocolError(
            f"a frame must be a non-empty msgpack array, got {type(frame).__name__}",
            code="protocol",
        )
    op = frame[0]
    spec = SPECS.get(op) if type(op) is int else None
    if spec is None:
        what = shown(op) if type(op) in (int, str) else type(op).__name__
        raise RemoteProtocolError(f"unknown frame type {what}", code="unknown-frame")
    name = _OP_NAMES[op]
    fewest = len(spec) - OPTIONAL_TAIL.get(op, 0)
    if not fewest <= len(frame) - 1 <= len(spec):
        expected = f"{fewest} to {len(spec)}" if fewest < len(spec) else str(len(spec))
        raise RemoteProtocolError(
            f"{name} frame has {len(frame) - 1} fields, expected {expected}", code="bad-field"
        )
    for (field, types), value in zip(spec, frame[1:], strict=False):
        vtype = type(value)
        if vtype not in types and types is not _ANY:
            raise RemoteProtocolError(
                f"{name}.{field} must be {' or '.join(t.__name__ for t in types)},"
                f" got {vtype.__name__}",
                code="bad-field",
            )
        if vtype is int and value < 0 and types in (_INT, _OPT_INT):
            raise RemoteProtocolError(f"{name}.{field} must not be negative", code="bad-field")
        if field == "tags" and not all(type(t) is int and t >= 0 for t in value):
            raise RemoteProtocolError(f"{name}.tags must be non-negative ints",
                                      code="bad-field")
        if field == "headers" and value:
            check_headers(value, f"{name}.headers")
        elif field == "kind" and value not in _BODY_KINDS:
            raise RemoteProtocolError(f"{name}.kind must be 0 (raw) or 1 (msgpack)",
                                      code="bad-field")
    return int(op)


def check_headers(headers: dict[Any, Any], where: str = "headers") -> None:
    """Headers are a map of str to str; ``where`` names them in the error."""
    for key, value in headers.items():
        if type(key) is not str or type(value) is not str:
            raise RemoteProtocolError(
                f"{where} must map str to str; got {shown(key)}: {type(value).__name__}",
                code="bad-field",
            )


class FrameDecoder:
    """Streaming decoder: ``feed(bytes)`` returns the complete frames received so far.

    Frames come back as lists and are not validated (call :func:`check_frame`). Partial
    frames are buffered. Once it has raised, the stream is poisoned: close the
    connection, as there is no way to resynchronise a msgpack stream.

    Memory: a ``msgpack.Unpacker`` is about 40 KiB (its parse stack is fixed), ten times
    what an idle connection should cost. So a decoder holds one only while a frame is
    incomplete; between frames the unpacker goes back to a pool shared by decoders with
    the same limits, and an idle connection holds none.

    Args:
        max_frame: largest frame, in bytes, from its first byte to its last.
        max_array: most values in one array; max_map: most entries in one map.
        first_frame_limit: a smaller limit for the first frame only (the broker's
            HELLO, :data:`MAX_HELLO_FRAME`); None: ``max_frame``.
        refuse_early: refuse a frame as soon as its headers declare more than fits
            (``aiobus._frame_scan``), walking the headers of each frame left
            incomplete by a read. Without it, an oversized ``str`` or ``bin`` is refused
            only once ``max_frame`` bytes of it are buffered. Off by default: a client
            decoding the broker's EVENTS frames (thousands of values, most of them
            split across reads) would pay a Python step per value.

    Raises (from ``feed``):
        FrameTooLarge: a frame exceeds its limit.
        RemoteProtocolError: the bytes are not valid msgpack, or nest too deep.
    """

    __slots__ = ("_fed", "_limit", "_limits", "_pool", "_refuse_early", "_scanner", "_start",
                 "_unpacker", "max_frame")

    # Idle, empty unpackers by limits. ClassVar: mypyc refuses a class attribute that
    # looks like an instance one.
    _pools: ClassVar[dict[tuple[int, int, int], list[Any]]] = {}

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        *,
        max_array: int = _MAX_ARRAY,
        max_map: int = _MAX_MAP,
        first_frame_limit: int | None = None,
        refuse_early: bool = False,
    ) -> None:
        self.max_frame = max_frame
        self._limits = (max_frame, max_array, max_map)
        self._pool = FrameDecoder._pools.setdefault(self._limits, [])
        self._unpacker: Any = None  # held only while a frame is incomplete
        self._start = 0  # the unpacker's offset where the next frame starts
        self._fed = 0  # the unpacker's offset after the last byte fed
        # The limit of the next frame: first_frame_limit until a frame is complete.
        self._limit = min(max_frame, first_frame_limit or max_frame)
        self._refuse_early = refuse_early
        self._scanner: FrameScanner | None = None  # the incomplete frame's, if any

    def _new_unpacker(self) -> Any:
        max_frame, max_array, max_map = self._limits
        return msgpack.Unpacker(
            max_buffer_size=max_frame + _READ_SLACK,
            max_bin_len=max_frame,
            max_str_len=max_frame,
            max_ext_len=0,
            max_array_len=max_array,
            max_map_len=max_map,
            strict_map_key=True,
        )

    @property
    def buffered(self) -> int:
        """Bytes held for the frame not yet complete (0 when every frame was)."""
        return 0 if self._unpacker is None else self._fed - self._start

    def feed(self, data: bytes) -> list[Any]:
        """Add bytes; return the frames they completed.

        On error, the exception's ``frames`` attribute holds the frames decoded before
        the bad one, so the caller can still act on them before closing.
        """
        unpacker = self._unpacker
        if unpacker is None:
            pool = self._pool
            unpacker = self._unpacker = pool.pop() if pool else self._new_unpacker()
            self._start = self._fed = unpacker.tell()  # a pooled unpacker is empty
        frames: list[Any] = []
        first = self._fed  # the offset of data[0]
        limit = self._limit
        start = self._start
        try:
            unpacker.feed(data)
            fed = self._fed = self._fed + len(data)
            max_frame = self.max_frame
            # unpack() until the bytes fed are used up, not `for frame in unpacker`:
            # that ends each read by raising (and catching) OutOfData inside msgpack,
            # ~0.8 us a read, which was most of a one-frame read's decoding cost. It
            # is raised only when the read ends inside a frame.
            while start != fed:
                frame = unpacker.unpack()
                end = unpacker.tell()
                if end - start > limit:
                    raise msgpack.BufferFull
                frames.append(frame)
                start = end
                limit = max_frame
        except msgpack.OutOfData:
            pass  # the rest of a frame is still to come
        except msgpack.BufferFull:
            raise self._error(FrameTooLarge(self._too_large(limit)), frames) from None
        except ValueError as exc:  # FormatError, StackError, ExtraData, limits exceeded
            if "exceeds max_bin_len" in str(exc) or "exceeds max_str_len" in str(exc):
                raise self._error(FrameTooLarge(self._too_large(limit)), frames) from None
            raise self._error(RemoteProtocolError(
                f"malformed msgpack ({type(exc).__name__}: {exc})", code="protocol"), frames
            ) from None
        except Exception as exc:  # msgpack raises TypeError for e.g. unhashable map keys
            raise self._error(RemoteProtocolError(
                f"malformed msgpack ({type(exc).__name__}: {exc})", code="protocol"), frames
            ) from None
        self._start = start
        self._limit = limit
        if start == self._fed:  # nothing incomplete: give the unpacker back
            self._unpacker = self._scanner = None
            if len(self._pool) < _POOL_LIMIT:
                self._pool.append(unpacker)
        elif self._refuse_early:
            # A frame is incomplete: walk its headers, from its start if it began in
            # this read, else from where the last read left off.
            scanner = self._scanner
            if start >= first:
                _, max_array, max_map = self._limits
                scanner = self._scanner = FrameScanner(limit, max_array, max_map)
            assert scanner is not None  # made by the read that left this frame incomplete
            try:
                scanner.scan(data, max(start - first, 0))
            except FrameTooLarge as exc:
                raise self._error(FrameTooLarge(f"{self._too_large(scanner.limit)}: {exc}"),
                                  frames) from None
            except ProtocolError as exc:
                raise self._error(exc, frames) from None
        return frames

    def _too_large(self, limit: int) -> str:
        """How a refusal for size begins: the limit, and which one it is."""
        if limit < self.max_frame:
            return f"first frame larger than {limit} bytes (all a HELLO may take)"
        return f"frame larger than max_frame ({limit} bytes)"

    def _error(self, exc: ProtocolError, frames: list[Any]) -> ProtocolError:
        self._unpacker = self._scanner = None  # poisoned: never pooled
        exc.frames = frames  # type: ignore[attr-defined]
        return exc


def encode_body(body: object) -> tuple[bytes, int]:
    """Turn a user body into ``(bytes, kind)`` for the wire.

    Raises:
        TypeError: ``body`` cannot be encoded with msgpack (nothing is sent).
    """
    if type(body) is bytes:
        return body, BodyKind.RAW
    if isinstance(body, bytearray | memoryview):
        return bytes(body), BodyKind.RAW
    try:
        return msgpack.packb(body, use_bin_type=True), BodyKind.PACKED
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"message body of type {type(body).__name__} is not msgpack-serialisable"
            f" ({exc}); send bytes, str, int, float, bool, None, list or dict"
        ) from None


def decode_body(data: bytes, kind: int) -> Any:
    """Inverse of :func:`encode_body` on the receiving side."""
    if kind == BodyKind.RAW:
        return data
    if kind == BodyKind.PACKED:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    raise LocalProtocolError(f"unknown body kind {kind}")
