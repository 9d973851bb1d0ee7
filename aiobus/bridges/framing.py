"""Record framing for the byte-stream bridges, sans I/O: bytes in, records out, and back.

Theory of operation
-------------------
A codec has a decoder half, :meth:`Codec.feed`, and an encoder half, :meth:`Codec.encode`.
``feed`` appends bytes to the codec's buffer and returns every record completed so far; a
partial record stays buffered until later bytes complete it, so a record may arrive split
at any byte (and, through a FIFO, across several writers). Records are ``bytes``: bytes that
are not UTF-8 stay as they are, and the caller decides what a record means.

Four framings, named as the CLI spells them (:data:`FRAMINGS`):

``lines``
    ``record\\n``; a ``\\r`` before the newline is stripped, so CRLF input works.
``netstring``
    ``<len>:<bytes>,`` as in D. J. Bernstein's spec: ``len`` is ASCII decimal without
    leading zeros.
``length-prefixed``
    a 4-byte big-endian length, then that many bytes.
``msgpack``
    each record is one msgpack object; the record is that object's encoding.

A record longer than ``max_record`` is neither truncated nor buffered whole: the decoder
keeps its first ``head_size`` bytes, skips the rest, and returns an :class:`Oversize` in the
record's place, then resumes with the next record (lines skip to the next newline;
netstring and length-prefixed skip the declared length). msgpack has no outer length to
skip by, so there an oversize object raises :class:`RecordTooLargeError`.

Errors are typed (:class:`FramingError`). A decoder error is fatal, as in h11: the decoder
refuses further input until :meth:`Codec.reset`. The records completed before the bad
bytes in the same ``feed`` call travel on the exception (``exc.records``), so nothing
decoded is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Final, Literal, TypeAlias

import msgpack

from ..errors import BusError

__all__ = [
    "DEFAULT_HEAD_SIZE",
    "DEFAULT_MAX_RECORD",
    "FRAMINGS",
    "Codec",
    "Decoded",
    "Framing",
    "FramingError",
    "LengthPrefixedCodec",
    "LinesCodec",
    "MalformedRecordError",
    "MsgpackCodec",
    "NetstringCodec",
    "Oversize",
    "RecordTooLargeError",
    "UnencodableRecordError",
    "make_codec",
]

# 1 MiB: well under the broker's 16 MiB frame limit, so a record always fits in a message.
DEFAULT_MAX_RECORD: Final = 1024 * 1024
# Enough to recognise a record in a dead-letter queue; the DLQ body is this head.
DEFAULT_HEAD_SIZE: Final = 256
# 20 digits hold any 64-bit length; longer is garbage, not a big record.
_MAX_NETSTRING_DIGITS: Final = 20


@dataclass(frozen=True, slots=True)
class Oversize:
    """A record longer than ``max_record``, reported in its place instead of the record.

    ``length`` is the record's full length in bytes (for ``lines`` without the newline and
    the stripped ``\\r``); ``head`` is its first ``head_size`` bytes.
    """

    length: int
    head: bytes


Decoded: TypeAlias = bytes | Oversize


class FramingError(BusError, ValueError):
    """Base of the framing errors.

    ``records`` holds what the failing ``feed`` call decoded before the bad bytes.
    """

    code = "framing"

    def __init__(self, message: str, *, records: Sequence[Decoded] = ()) -> None:
        super().__init__(message)
        self.records: list[Decoded] = list(records)


class MalformedRecordError(FramingError):
    """The input breaks the framing (a bad netstring length, a missing comma, bad msgpack)."""


class RecordTooLargeError(FramingError):
    """A record over ``max_record`` in a framing that cannot skip it (msgpack).

    ``length`` is how many bytes of the record were seen (a lower bound of its size) and
    ``head`` its first ``head_size`` bytes.
    """

    def __init__(self, message: str, *, length: int, head: bytes) -> None:
        super().__init__(message)
        self.length = length
        self.head = head


class UnencodableRecordError(FramingError):
    """:meth:`Codec.encode` was given a record the framing cannot carry intact."""


class Codec:
    """One framing's decoder and encoder. Subclasses implement ``_feed`` and ``encode``.

    Args:
        max_record: largest record in bytes; longer ones are reported as :class:`Oversize`.
        head_size: how many leading bytes of an oversize record to keep.

    Raises:
        ValueError: ``max_record`` or ``head_size`` is not positive.

    Example:
        >>> codec = make_codec("lines")
        >>> codec.feed(b"one\\ntw")
        [b'one']
        >>> codec.feed(b"o\\r\\n")
        [b'two']
        >>> codec.encode(b"three")
        b'three\\n'
    """

    name: str = ""

    def __init__(
        self, *, max_record: int = DEFAULT_MAX_RECORD, head_size: int = DEFAULT_HEAD_SIZE
    ) -> None:
        if max_record < 1:
            raise ValueError(f"max_record must be at least 1, got {max_record}")
        if head_size < 1:
            raise ValueError(f"head_size must be at least 1, got {head_size}")
        self.max_record = max_record
        self.head_size = head_size
        self._failure: FramingError | None = None
        self.reset()

    def reset(self) -> None:
        """Drop buffered input and any earlier error; the next byte starts a record."""
        self._failure = None

    def feed(self, data: bytes) -> list[Decoded]:
        """Add ``data``; return the records (and :class:`Oversize` reports) it completes.

        Args:
            data: the next bytes of the stream, any amount, split anywhere.

        Returns:
            Completed records in stream order; empty while a record is still partial.

        Raises:
            MalformedRecordError: the input breaks the framing.
            RecordTooLargeError: an oversize record the framing cannot skip (msgpack).
            FramingError: the decoder already failed and was not :meth:`reset`.
        """
        if self._failure is not None:
            raise FramingError(f"{self.name} decoder failed earlier ({self._failure}); reset it")
        out: list[Decoded] = []
        try:
            self._feed(data, out)
        except FramingError as exc:
            self._failure = exc
            exc.records = out
            raise
        return out

    def encode(self, record: bytes) -> bytes:
        """Frame one record for the stream.

        Args:
            record: the record's bytes, at most ``max_record`` long.

        Returns:
            The bytes to write; decoding them gives back ``record``.

        Raises:
            UnencodableRecordError: the framing cannot carry ``record`` intact.
        """
        raise NotImplementedError

    def _feed(self, data: bytes, out: list[Decoded]) -> None:
        raise NotImplementedError

    def _check_size(self, record: bytes) -> None:
        if len(record) > self.max_record:
            raise UnencodableRecordError(
                f"record of {len(record)} bytes exceeds max_record ({self.max_record})"
            )


class LinesCodec(Codec):
    """Newline-terminated records; a trailing ``\\r`` is stripped. See :class:`Codec`."""

    name = "lines"

    def reset(self) -> None:
        super().reset()
        self._buffer = bytearray()  # the current line so far, at most max_record + 1 bytes
        self._skipped: int | None = None  # bytes of an oversize line so far; None: not skipping
        self._skip_head = b""
        self._skip_cr = False  # the last skipped byte was \r (stripped from the length)

    def _feed(self, data: bytes, out: list[Decoded]) -> None:
        start, end = 0, len(data)
        limit = self.max_record + 1  # +1: a trailing \r does not count
        while start < end:
            newline = data.find(b"\n", start)
            stop = end if newline < 0 else newline
            if self._skipped is not None:
                if stop > start:
                    self._skipped += stop - start
                    self._skip_cr = data[stop - 1] == 0x0D
            elif len(self._buffer) + stop - start > limit:
                line = bytes(self._buffer) + data[start:stop]
                self._buffer.clear()
                self._skipped, self._skip_head = len(line), line[: self.head_size]
                self._skip_cr = line.endswith(b"\r")
            elif newline < 0:
                self._buffer += data[start:stop]
            if newline < 0:
                return
            if self._skipped is not None:
                out.append(Oversize(self._skipped - self._skip_cr, self._skip_head))
                self._skipped, self._skip_head, self._skip_cr = None, b"", False
            else:
                if self._buffer:
                    self._buffer += data[start:stop]
                    line = bytes(self._buffer)
                    self._buffer.clear()
                else:
                    line = data[start:stop]  # fast path: the whole line is in this chunk
                if line.endswith(b"\r"):
                    line = line[:-1]
                out.append(
                    line
                    if len(line) <= self.max_record
                    else Oversize(len(line), line[: self.head_size])
                )
            start = newline + 1

    def encode(self, record: bytes) -> bytes:
        self._check_size(record)
        at = record.find(b"\n")
        if at >= 0:
            raise UnencodableRecordError(f"record contains a newline at offset {at}")
        if record.endswith(b"\r"):
            raise UnencodableRecordError("record ends with '\\r', which the decoder strips")
        return bytes(record) + b"\n"


class _Stage(Enum):
    HEADER = "header"  # reading the length (netstring digits, or the 4-byte prefix)
    PAYLOAD = "payload"  # collecting a record of at most max_record bytes
    SKIP = "skip"  # passing over an oversize record, keeping its head
    COMMA = "comma"  # netstring only: expecting the closing ','


class _LengthFramed(Codec):
    """Shared payload/skip stages of the netstring and length-prefixed codecs."""

    def reset(self) -> None:
        super().reset()
        self._stage = _Stage.HEADER
        self._header = bytearray()
        self._length = 0  # declared length of the current record
        self._need = 0  # payload bytes still to come
        self._payload = bytearray()  # the payload so far; in SKIP, just its head

    def _begin(self, length: int) -> None:
        self._length = self._need = length
        self._stage = _Stage.PAYLOAD if length <= self.max_record else _Stage.SKIP

    def _take(self, data: bytes, at: int) -> int:
        """Consume payload bytes from ``data[at:]``; return the new position."""
        take = min(self._need, len(data) - at)
        if self._stage is _Stage.PAYLOAD:
            self._payload += data[at : at + take]
        elif len(self._payload) < self.head_size:
            self._payload += data[at : at + min(take, self.head_size - len(self._payload))]
        self._need -= take
        return at + take

    def _finish(self, out: list[Decoded]) -> None:
        if self._length > self.max_record:
            out.append(Oversize(self._length, bytes(self._payload)))
        else:
            out.append(bytes(self._payload))
        self._payload.clear()
        self._header.clear()
        self._stage = _Stage.HEADER


class NetstringCodec(_LengthFramed):
    """``<len>:<bytes>,`` records (D. J. Bernstein's netstrings). See :class:`Codec`."""

    name = "netstring"

    def _feed(self, data: bytes, out: list[Decoded]) -> None:
        at, end = 0, len(data)
        while at < end:
            if self._stage is _Stage.HEADER:
                byte = data[at]
                at += 1
                if byte == 0x3A:  # ':'
                    if not self._header:
                        raise MalformedRecordError("netstring length is empty")
                    self._begin(int(self._header))
                    if self._need == 0:
                        self._stage = _Stage.COMMA
                elif 0x30 <= byte <= 0x39:
                    if self._header == b"0":
                        raise MalformedRecordError("netstring length has a leading zero")
                    if len(self._header) == _MAX_NETSTRING_DIGITS:
                        raise MalformedRecordError(
                            f"netstring length is longer than {_MAX_NETSTRING_DIGITS} digits"
                        )
                    self._header.append(byte)
                else:
                    raise MalformedRecordError(
                        f"netstring length contains {bytes([byte])!r}; expected a digit or ':'"
                    )
            elif self._stage is _Stage.COMMA:
                byte = data[at]
                at += 1
                if byte != 0x2C:  # ','
                    raise MalformedRecordError(
                        f"netstring of {self._length} bytes ends with {bytes([byte])!r}, not ','"
                    )
                self._finish(out)
            else:
                at = self._take(data, at)
                if self._need == 0:
                    self._stage = _Stage.COMMA

    def encode(self, record: bytes) -> bytes:
        self._check_size(record)
        return b"%d:%b," % (len(record), record)


class LengthPrefixedCodec(_LengthFramed):
    """A 4-byte big-endian length, then the record. See :class:`Codec`."""

    name = "length-prefixed"

    def _feed(self, data: bytes, out: list[Decoded]) -> None:
        at, end = 0, len(data)
        while at < end:
            if self._stage is _Stage.HEADER:
                take = min(4 - len(self._header), end - at)
                self._header += data[at : at + take]
                at += take
                if len(self._header) == 4:
                    self._begin(int.from_bytes(self._header, "big"))
            else:
                at = self._take(data, at)
            if self._stage is not _Stage.HEADER and self._need == 0:
                self._finish(out)

    def encode(self, record: bytes) -> bytes:
        self._check_size(record)
        if len(record) > 0xFFFFFFFF:
            raise UnencodableRecordError(f"record of {len(record)} bytes needs a 5-byte length")
        return len(record).to_bytes(4, "big") + record


class MsgpackCodec(Codec):
    """Records that are msgpack objects; ``max_record`` bounds an object's encoding.

    ``feed`` checks each object (valid msgpack, UTF-8 strings, hashable map keys) and
    returns its encoding as the record. See :class:`Codec`.
    """

    name = "msgpack"

    def reset(self) -> None:
        super().reset()
        self._unpacker = self._new_unpacker()
        self._pending = bytearray()  # our copy of the bytes the unpacker holds unconsumed
        self._base = 0  # unpacker.tell() at the start of _pending

    def _new_unpacker(self) -> msgpack.Unpacker:
        # Explicit limits (msgpack >= 1.2.4 also stops preallocating on huge headers):
        # every element takes at least one byte, every map entry two.
        limit = self.max_record
        return msgpack.Unpacker(
            raw=False,
            strict_map_key=False,
            max_buffer_size=limit + 1,
            max_str_len=limit,
            max_bin_len=limit,
            max_ext_len=limit,
            max_array_len=limit,
            max_map_len=limit // 2,
        )

    def _feed(self, data: bytes, out: list[Decoded]) -> None:
        view = memoryview(data)
        while view:
            # Feed no more than the limit allows, so the buffer stays within max_record + 1.
            room = self.max_record + 1 - len(self._pending)
            chunk, view = view[:room], view[room:]
            self._pending += chunk
            self._unpacker.feed(chunk)
            start = 0
            try:
                for _ in self._unpacker:
                    end = self._unpacker.tell() - self._base
                    out.append(bytes(self._pending[start:end]))
                    start = end
            except ValueError as exc:  # FormatError, StackError, UnicodeDecodeError
                if "exceeds max" in str(exc):
                    raise self._too_large(start) from exc
                raise MalformedRecordError(f"invalid msgpack: {exc}") from exc
            except TypeError as exc:  # an unhashable map key
                raise MalformedRecordError(f"invalid msgpack map key: {exc}") from exc
            except msgpack.UnpackException as exc:  # BufferFull: over the limit
                raise self._too_large(start) from exc
            del self._pending[:start]
            self._base += start
            if len(self._pending) > self.max_record:
                raise self._too_large(0)

    def _too_large(self, start: int) -> RecordTooLargeError:
        seen = len(self._pending) - start
        return RecordTooLargeError(
            f"msgpack object larger than max_record ({self.max_record}); "
            "msgpack cannot skip it, so the stream cannot be resynchronised",
            length=seen,
            head=bytes(self._pending[start : start + self.head_size]),
        )

    def encode(self, record: bytes) -> bytes:
        self._check_size(record)
        unpacker = self._new_unpacker()
        unpacker.feed(record)
        try:
            next(unpacker)
            end = unpacker.tell()
        except StopIteration:
            raise UnencodableRecordError("record is an incomplete msgpack object") from None
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise UnencodableRecordError(f"record is not valid msgpack: {exc}") from exc
        if end != len(record):
            raise UnencodableRecordError(
                f"record holds more than one msgpack object ({len(record) - end} extra bytes)"
            )
        return bytes(record)


# The framing names as a type, so mypy refuses ``framing="line"``.
Framing = Literal["lines", "netstring", "length-prefixed", "msgpack"]

FRAMINGS: Final[dict[str, type[Codec]]] = {
    "lines": LinesCodec,
    "netstring": NetstringCodec,
    "length-prefixed": LengthPrefixedCodec,
    "msgpack": MsgpackCodec,
}


def make_codec(
    framing: str, *, max_record: int = DEFAULT_MAX_RECORD, head_size: int = DEFAULT_HEAD_SIZE
) -> Codec:
    """Build a fresh codec for the framing named ``framing``.

    Args:
        framing: one of ``"lines"``, ``"netstring"``, ``"length-prefixed"``, ``"msgpack"``.
        max_record: largest record in bytes (default 1 MiB).
        head_size: leading bytes kept from an oversize record (default 256).

    Returns:
        A new :class:`Codec` with empty buffers.

    Raises:
        ValueError: unknown framing name, or a limit that is not positive.

    Example:
        >>> make_codec("netstring").feed(b"5:hello,")
        [b'hello']
    """
    try:
        cls = FRAMINGS[framing]
    except KeyError:
        known = ", ".join(FRAMINGS)
        raise ValueError(f"unknown framing {framing!r}; expected one of: {known}") from None
    return cls(max_record=max_record, head_size=head_size)
