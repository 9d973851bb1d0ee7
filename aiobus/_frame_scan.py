"""Refuse an incomplete msgpack frame by what its headers declare, as its bytes arrive.

Theory of operation. msgpack's C unpacker checks an array or map count at its header,
but the length of a ``str``, ``bin`` or ext only once all of its bytes are buffered: a
bin 32 header announcing 4 GiB keeps a connection open until ``max_frame`` plus one read
has arrived, and a peer that sends 64 KiB and waits holds the broker's memory until the
handshake timeout. :class:`FrameScanner` walks the headers of the one incomplete frame at
the end of the stream instead, each byte once however the reads split it, and keeps a
lower bound on the frame's encoded size:

* ``used``: the bytes walked so far;
* ``skip``: the payload still to come of the value being walked (a ``str``/``bin`` body,
  the bytes of an int or float);
* ``pending``: one byte for every value the open containers still expect (the sum of
  ``stack``), since no msgpack value is shorter.

A header that lifts the bound over ``limit`` refuses the frame at once, as does anything
the unpacker would refuse at the end anyway: an ext with data, byte 0xc1, an array or map
over its count limit, a container opened inside :data:`MAX_DEPTH` others.

The bound never exceeds the size of the frame its bytes begin, so a frame that fits is
never refused. Payloads are skipped by arithmetic, so a 16 MiB body arriving over many
reads costs one step per read; headers cost a Python step each, which is why only the
broker, reading untrusted bytes, walks them (``FrameDecoder(refuse_early=True)``).
"""

from __future__ import annotations

from typing import Final

from .errors import FrameTooLarge, RemoteProtocolError

__all__ = ["MAX_DEPTH", "FrameScanner"]

# msgpack's C unpacker holds at most this many open containers (its parse stack,
# unpack_template.h); one more container header, even an empty one, raises StackError.
MAX_DEPTH: Final = 1024

# What a msgpack lead byte starts (the msgpack spec, "Formats"): (kind, width, n, name).
# ``width`` bytes after the lead byte hold a big-endian length or count; with width 0,
# ``n`` is the fixed one: the payload bytes of a scalar or fixstr, the values of a
# fixarray or fixmap, the data bytes of a fixext.
_VALUE, _ARRAY, _MAP, _EXT, _UNUSED = range(5)


def _lead_bytes() -> list[tuple[int, int, int, str]]:
    leads = [(_VALUE, 0, 0, "int")] * 0x80  # positive fixint
    leads += [(_MAP, 0, b & 0x0F, "map") for b in range(0x80, 0x90)]
    leads += [(_ARRAY, 0, b & 0x0F, "array") for b in range(0x90, 0xA0)]
    leads += [(_VALUE, 0, b & 0x1F, "str") for b in range(0xA0, 0xC0)]
    leads += [
        (_VALUE, 0, 0, "nil"), (_UNUSED, 0, 0, "byte 0xc1"), (_VALUE, 0, 0, "bool"),
        (_VALUE, 0, 0, "bool"),
        (_VALUE, 1, 0, "bin"), (_VALUE, 2, 0, "bin"), (_VALUE, 4, 0, "bin"),
        (_EXT, 1, 0, "ext"), (_EXT, 2, 0, "ext"), (_EXT, 4, 0, "ext"),
        (_VALUE, 0, 4, "float"), (_VALUE, 0, 8, "float"),
        *((_VALUE, 0, size, "int") for size in (1, 2, 4, 8, 1, 2, 4, 8)),
        *((_EXT, 0, size, "ext") for size in (1, 2, 4, 8, 16)),
        (_VALUE, 1, 0, "str"), (_VALUE, 2, 0, "str"), (_VALUE, 4, 0, "str"),
        (_ARRAY, 2, 0, "array"), (_ARRAY, 4, 0, "array"),
        (_MAP, 2, 0, "map"), (_MAP, 4, 0, "map"),
    ]
    leads += [(_VALUE, 0, 0, "int")] * 0x20  # negative fixint
    assert len(leads) == 256
    return leads


_LEADS: Final = _lead_bytes()


class FrameScanner:
    """The headers of one incomplete frame, walked as its bytes arrive (see the module).

    Args:
        limit: the most bytes the frame may have.
        max_array: the most values in one array; max_map: the most entries in one map.
    """

    __slots__ = ("head", "limit", "max_array", "max_map", "pending", "skip", "stack", "used")

    def __init__(self, limit: int, max_array: int, max_map: int) -> None:
        self.limit = limit
        self.max_array = max_array
        self.max_map = max_map
        self.used = 0  # bytes of the frame walked so far
        self.skip = 0  # payload bytes of the current value not yet walked
        self.stack = [1]  # values still expected per open container; [0] is the frame
        self.pending = 1  # sum(stack)
        self.head = b""  # a header cut by the end of the last read: at most 4 bytes

    def scan(self, data: bytes, pos: int = 0) -> None:
        """Walk ``data[pos:]``, the next bytes of the frame.

        Raises:
            FrameTooLarge: a header makes the frame larger than ``limit``; the message
                says which (the caller says which limit it is).
            RemoteProtocolError: a header the unpacker would refuse once complete.
        """
        if self.head:  # rare: only when a read ended inside a length field
            data, pos, self.head = self.head + data[pos:], 0, b""
        end = len(data)
        stack = self.stack
        used, skip, pending = self.used, self.skip, self.pending
        while True:
            if skip:
                if skip >= end - pos:
                    used += end - pos
                    skip -= end - pos
                    break
                pos += skip
                used += skip
                skip = 0
            if pos >= end:
                break
            while not stack[-1] and len(stack) > 1:  # containers with every value walked
                stack.pop()
            if not stack[-1]:
                break  # the frame is complete: the unpacker returns it, nothing to check
            kind, width, n, name = _LEADS[data[pos]]
            if width:
                if pos + width >= end:
                    self.head = data[pos:]
                    break
                n = int.from_bytes(data[pos + 1 : pos + 1 + width], "big")
            at = used
            pos += 1 + width
            used += 1 + width
            stack[-1] -= 1
            pending -= 1
            if kind == _VALUE:
                skip = n
            elif kind == _EXT:
                if n:
                    raise _malformed(f"an ext of {n} bytes at byte {at}; ext types are"
                                     " not allowed (max_ext_len 0)")
                skip = 1  # its type byte
            elif kind == _UNUSED:
                raise _malformed(f"FormatError: {name} at byte {at} is never used")
            else:
                most = self.max_array if kind == _ARRAY else self.max_map
                if n > most:
                    raise _malformed(f"the {name} at byte {at}: {n} exceeds"
                                     f" max_{name}_len({most})")
                if len(stack) > MAX_DEPTH:  # the open containers, plus the frame's slot
                    raise _malformed(f"StackError: the {name} at byte {at} is nested in"
                                     f" {MAX_DEPTH} containers already")
                if n:
                    n = n if kind == _ARRAY else 2 * n
                    stack.append(n)
                    pending += n
            if used + skip + pending > self.limit:
                raise FrameTooLarge(f"the {name} at byte {at} makes it at least"
                                    f" {used + skip + pending} bytes")
        self.used, self.skip, self.pending = used, skip, pending


def _malformed(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"malformed msgpack ({detail})", code="protocol")
