"""Frames refused by their header (issue 12): ``FrameDecoder(refuse_early=True)`` walks
the msgpack headers of an incomplete frame (``aiobus._frame_scan``) and refuses it as
soon as what they declare cannot fit, instead of after buffering it.

Tables of headers that must be refused, and of frames that fit and must not be, each
fed whole and byte by byte (h11 test_io.py, nats split_test.go); property tests that a
frame is refused exactly when it is larger than its limit, however the reads split it,
and that any bytes give frames or a ProtocolError, nothing else."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus._frame_scan import MAX_DEPTH, FrameScanner
from aiobus.errors import FrameTooLarge, ProtocolError, RemoteProtocolError
from aiobus.protocol import MAX_HELLO_FRAME, FrameDecoder, Op

LIMIT = 1024
HELLO = msgpack.packb([Op.HELLO, 1, {"name": "svc"}])
SEND_HEAD = b"\x98\x0a\x01"  # a SEND frame's array header, op and rid: a body may follow


def be(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


def decoder(**kwargs: Any) -> FrameDecoder:
    return FrameDecoder(**{"max_frame": LIMIT, "refuse_early": True, **kwargs})


def feed_whole(data: bytes, **kwargs: Any) -> list[Any]:
    return decoder(**kwargs).feed(data)


def feed_bytewise(data: bytes, **kwargs: Any) -> list[Any]:
    dec = decoder(**kwargs)
    frames: list[Any] = []
    for i in range(len(data)):
        frames += dec.feed(data[i : i + 1])
    return frames


FEEDERS = [pytest.param(feed_whole, id="whole"), pytest.param(feed_bytewise, id="bytewise")]

# (before, header, error, needle): ``before`` are bytes of the frame that raise nothing;
# the frame is refused by the time the last byte of ``header`` has arrived, though far
# fewer bytes than it declares ever do. max_frame is LIMIT.
REFUSED = [
    ("bin32-limit-plus-1", SEND_HEAD + b"\xa1q", b"\xc6" + be(LIMIT + 1, 4),
     FrameTooLarge, "the bin at byte 5"),
    ("bin32-4GiB", b"", b"\xc6\xff\xff\xff\xff", FrameTooLarge, "at least 4294967300"),
    ("bin16-one-too-many", b"", b"\xc5" + be(LIMIT - 2, 2), FrameTooLarge, "bin"),
    ("bin8-after-a-body", b"\x92\xc5" + be(1000, 2) + b"x" * 1000, b"\xc4\x1f",
     FrameTooLarge, "the bin at byte 1004"),
    ("bin16-and-the-values-still-due", b"\x9f", b"\xc5" + be(1010, 2), FrameTooLarge,
     "at least 1028"),
    ("str8-after-a-body", b"\x92\xc5" + be(800, 2) + b"x" * 800, b"\xd9\xff",
     FrameTooLarge, "the str at byte 804"),
    ("str16-queue-name", SEND_HEAD, b"\xda" + be(2000, 2), FrameTooLarge, "str"),
    ("str32-4GiB", SEND_HEAD, b"\xdb\xff\xff\xff\xff", FrameTooLarge, "str"),
    ("fixstr-in-the-last-bytes", b"\x92\xc5" + be(LIMIT - 8, 2) + b"x" * (LIMIT - 8),
     b"\xa5", FrameTooLarge, "at least 1026"),
    ("array16-more-values-than-bytes", SEND_HEAD, b"\xdc" + be(2000, 2), FrameTooLarge,
     "array"),
    ("map16-more-entries-than-bytes", SEND_HEAD, b"\xde" + be(600, 2), FrameTooLarge,
     "map"),
    ("array32-over-max-array", SEND_HEAD, b"\xdd\xff\xff\xff\xff", RemoteProtocolError,
     "max_array_len"),
    ("map32-over-max-map", SEND_HEAD, b"\xdf\x00\x01\x00\x00", RemoteProtocolError,
     "max_map_len"),
    ("fixext1", SEND_HEAD, b"\xd4", RemoteProtocolError, "ext"),
    ("ext8-with-data", SEND_HEAD, b"\xc7\x03", RemoteProtocolError, "ext"),
    ("ext32-4GiB", b"", b"\xc9\xff\xff\xff\xff", RemoteProtocolError, "ext"),
    ("byte-0xc1", SEND_HEAD, b"\xc1", RemoteProtocolError, "FormatError"),
]


@pytest.mark.parametrize(("before", "header", "error", "needle"),
                         [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_refused_by_the_header(before: bytes, header: bytes, error: type[ProtocolError],
                               needle: str) -> None:
    whole = decoder(max_array=LIMIT * 64)
    with pytest.raises(error, match=r"frame larger than max_frame|malformed msgpack") as info:
        whole.feed(before + header)
    assert needle in str(info.value)
    assert info.value.code == ("frame-too-large" if error is FrameTooLarge else "protocol")
    bytewise = decoder(max_array=LIMIT * 64)
    for i, byte in enumerate(before + header[:-1]):
        assert bytewise.feed(bytes((byte,))) == [], f"refused early, at byte {i}"
    with pytest.raises(error):
        bytewise.feed(header[-1:])


def test_without_refuse_early_the_same_headers_wait_for_their_bytes() -> None:
    """What issue 12 measured: the header alone refuses nothing."""
    for _, before, header, error, _ in REFUSED:
        if error is FrameTooLarge:
            assert FrameDecoder(max_frame=LIMIT).feed(before + header) == []


def _exactly(limit: int, head: bytes, width: int) -> bytes:
    """A frame ``[body]`` of exactly ``limit`` bytes, its bin with a ``width``-byte length
    (non-minimal encodings included: msgpack allows them)."""
    lead = {1: b"\xc4", 2: b"\xc5", 4: b"\xc6"}[width]
    size = limit - len(head) - 1 - width
    return head + lead + be(size, width) + b"x" * size


# Frames that fit, at the very limit or at the depth limit, fed whole and byte by byte:
# nothing refuses them, and they decode as msgpack says.
FITS = [
    pytest.param(_exactly(LIMIT, b"\x91", 2), id="bin16-exactly-max-frame"),
    pytest.param(_exactly(LIMIT, b"\x91", 4), id="bin32-exactly-max-frame"),
    pytest.param(b"\x9f\xc6" + be(1004, 4) + b"x" * 1004 + b"\x00" * 14,
                 id="bin-and-14-values"),
    pytest.param(b"\xdd" + be(3, 4) + b"\xdb" + be(2, 4) + b"ok\xc0\xc3",
                 id="array32-str32-non-minimal"),
    pytest.param(b"\xdf" + be(1, 4) + b"\xa1k" + b"\xcb" + b"\x00" * 8, id="map32-float64"),
    pytest.param(b"\x92\xc7\x00\x05\x01", id="ext8-without-data"),
    pytest.param(b"\xdc" + be(LIMIT - 3, 2) + b"\x01" * (LIMIT - 3), id="array-of-1021"),
    pytest.param(b"\x94\x90\x80\xa0\xc4\x00", id="empty-everything"),
    pytest.param(b"\x96\xcc\xff\xcd\xff\xff\xce" + b"\xff" * 4 + b"\xcf" + b"\xff" * 8
                 + b"\xd3" + b"\x80" + b"\x00" * 7 + b"\xca" + b"\x00" * 4, id="every-int"),
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("data", FITS)
def test_frames_that_fit_are_never_refused(feed: Any, data: bytes) -> None:
    assert len(data) <= LIMIT
    expected = msgpack.unpackb(data, raw=False)
    assert feed(data * 2) == [expected] * 2


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("opening", "empty"), [(b"\x91", b"\x90"), (b"\x81\xa1k", b"\x80")],
                         ids=["arrays", "maps"])
def test_nesting_as_deep_as_msgpack_allows_and_no_deeper(feed: Any, opening: bytes,
                                                         empty: bytes) -> None:
    deepest = opening * MAX_DEPTH + b"\x01"
    (value,) = feed(deepest, max_frame=2**16)
    for _ in range(MAX_DEPTH):  # not ==: comparing 1024 levels overflows Python's stack
        (value,) = value if type(value) is list else value.values()
    assert value == 1
    too_deep = opening * MAX_DEPTH + empty + b"\x01"  # the tail never arrives: refused
    with pytest.raises(RemoteProtocolError, match="StackError") as info:
        feed(too_deep[:-1], max_frame=2**16)
    assert info.value.code == "protocol"


def test_a_body_over_many_reads_is_skipped_not_walked() -> None:
    """A 1 MiB body in 4 KiB reads: each read advances the scanner by arithmetic."""
    dec = FrameDecoder(max_frame=2**21, refuse_early=True)
    data = msgpack.packb([Op.SEND, 1, "q", b"x" * 2**20, 0, None, None, None])
    stop = len(data) - 5  # the body's last byte and the four fields after it
    for i in range(0, stop, 4096):
        assert dec.feed(data[i : min(i + 4096, stop)]) == []
    scanner = dec._scanner
    assert scanner is not None and (scanner.used, scanner.skip, scanner.pending) == (
        stop, 1, 4)
    assert len(dec.feed(data[stop:])) == 1
    assert dec._scanner is None and dec._unpacker is None  # an idle decoder holds neither


HELLO_SIZED = b"\x92\x01\x02"  # a complete frame before the one being cut


def test_a_length_cut_by_every_read_boundary() -> None:
    """The scanner keeps the cut header and reads it whole with the next bytes."""
    frame = SEND_HEAD + b"\xa1q\xc6" + be(LIMIT + 1, 4)
    for cut in range(len(SEND_HEAD), len(frame)):
        dec = decoder()
        assert dec.feed(HELLO_SIZED + frame[:cut]) == [[1, 2]]
        with pytest.raises(FrameTooLarge, match="the bin at byte 5"):
            dec.feed(frame[cut:])


# -- the first frame: MAX_HELLO_FRAME ------------------------------------------------


@pytest.mark.parametrize("feed", FEEDERS)
def test_the_first_frame_has_the_hello_budget(feed: Any) -> None:
    big_name = msgpack.packb([Op.HELLO, 1, {"name": "n" * MAX_HELLO_FRAME}])
    with pytest.raises(FrameTooLarge, match="first frame larger than 8192 bytes") as info:
        feed(big_name, max_frame=2**20, first_frame_limit=MAX_HELLO_FRAME)
    assert info.value.code == "frame-too-large"
    # After a HELLO the same frame is an ordinary one.
    frames = feed(HELLO + big_name, max_frame=2**20, first_frame_limit=MAX_HELLO_FRAME)
    assert len(frames) == 2 and frames[1][2]["name"] == "n" * MAX_HELLO_FRAME


def test_the_hello_budget_refuses_by_header_and_by_bytes() -> None:
    by_header = decoder(max_frame=2**20, first_frame_limit=MAX_HELLO_FRAME)
    with pytest.raises(FrameTooLarge, match="first frame"):
        by_header.feed(b"\x93\x01\x81\xa4name\xda" + be(MAX_HELLO_FRAME, 2))
    # 8,000 values fit in 8 KiB at one byte each, not at three.
    by_bytes = decoder(max_frame=2**20, first_frame_limit=MAX_HELLO_FRAME)
    assert by_bytes.feed(b"\xdc" + be(8000, 2)) == []
    with pytest.raises(FrameTooLarge, match="first frame"):
        for _ in range(8000):
            by_bytes.feed(b"\xcd\x00\x01")


def test_a_first_frame_of_exactly_the_budget_is_accepted() -> None:
    frame = _exactly(MAX_HELLO_FRAME, b"\x91", 2)
    frames = feed_bytewise(frame + frame, max_frame=2**20, first_frame_limit=MAX_HELLO_FRAME)
    assert len(frames) == 2


# -- properties ----------------------------------------------------------------------

_scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, width=32) | st.text(max_size=40) | st.binary(max_size=300)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=20)
    | st.dictionaries(st.text(max_size=6), inner, max_size=6),
    max_leaves=40,
)


def _chunks(data: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, i = [], 0, 0
    while pos < len(data):
        out.append(data[pos : pos + sizes[i % len(sizes)]])
        pos, i = pos + sizes[i % len(sizes)], i + 1
    return out


@settings(max_examples=300, deadline=None)
@given(_values, st.booleans(), st.integers(-16, 16),
       st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_a_value_is_refused_exactly_when_larger_than_the_limit(
    value: Any, single_float: bool, delta: int, sizes: list[int]
) -> None:
    data = msgpack.packb(value, use_single_float=single_float)
    limit = max(1, len(data) + delta)
    dec = FrameDecoder(max_frame=limit, refuse_early=True)
    frames: list[Any] = []
    try:
        for chunk in _chunks(data, sizes):
            frames += dec.feed(chunk)
    except FrameTooLarge:
        assert len(data) > limit
    else:
        assert len(data) <= limit
        assert frames == [msgpack.unpackb(data, raw=False)]


@settings(max_examples=200, deadline=None)
@given(st.lists(_values, min_size=1, max_size=8),
       st.lists(st.integers(1, 300), min_size=1, max_size=8))
def test_a_stream_of_values_in_any_chunking(values: list[Any], sizes: list[int]) -> None:
    """The scanner follows frame after frame, however reads split them."""
    data = b"".join(msgpack.packb(v) for v in values)
    dec = FrameDecoder(refuse_early=True, first_frame_limit=MAX_HELLO_FRAME)
    decoded: list[Any] = []
    for chunk in _chunks(data, sizes):
        decoded += dec.feed(chunk)
    assert decoded == [msgpack.unpackb(msgpack.packb(v), raw=False) for v in values]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.lists(st.sampled_from(
           [b"\x91", b"\x81", b"\xa1k", b"\xdc\x00\x03", b"\xc5\x00\x09", b"\xc7\x00",
            b"\x01", b"\xc0", b"\xd9", b"\xdb\xff", b"\xcb"]), max_size=60).map(b"".join),
       st.lists(st.integers(1, 17), min_size=1, max_size=6), st.integers(1, 512))
def test_any_bytes_give_frames_or_a_protocol_error(data: bytes, sizes: list[int],
                                                   limit: int) -> None:
    dec = FrameDecoder(max_frame=limit, max_array=64, max_map=8, refuse_early=True,
                       first_frame_limit=limit // 2 or 1)
    try:
        for chunk in _chunks(data, sizes):
            dec.feed(chunk)
    except ProtocolError as exc:
        assert exc.code in ("protocol", "frame-too-large")


def test_the_scanner_agrees_with_msgpack_on_depth() -> None:
    for depth, tail in ((MAX_DEPTH, b"\x01"), (MAX_DEPTH - 1, b"\x90"), (MAX_DEPTH, b"\x90")):
        data = b"\x91" * depth + tail
        try:
            msgpack.unpackb(data)
            unpacker_ok = True
        except msgpack.StackError:
            unpacker_ok = False
        scanner = FrameScanner(2**20, 2**16, 2**12)
        try:
            scanner.scan(data)
            scanner_ok = True
        except RemoteProtocolError:
            scanner_ok = False
        assert scanner_ok == unpacker_ok, (depth, tail)
