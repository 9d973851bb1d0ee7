"""The sans-IO record codecs: every input whole and byte by byte, malformed tables, and a
property test of the decoder invariant."""

from __future__ import annotations

from collections.abc import Callable
from typing import get_args

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiobus.bridges.framing import (
    FRAMINGS,
    Codec,
    Decoded,
    Framing,
    FramingError,
    LinesCodec,
    MalformedRecordError,
    MsgpackCodec,
    Oversize,
    RecordTooLargeError,
    UnencodableRecordError,
    make_codec,
)

BYTE_FRAMINGS = ["lines", "netstring", "length-prefixed"]


def feed_whole(codec: Codec, data: bytes) -> list[Decoded]:
    return codec.feed(data)


def feed_bytewise(codec: Codec, data: bytes) -> list[Decoded]:
    out: list[Decoded] = []
    for i in range(len(data)):
        out += codec.feed(data[i : i + 1])
    return out


Feeder = Callable[[Codec, bytes], list[Decoded]]
FEEDERS: list[Feeder] = [feed_whole, feed_bytewise]


def sample_records(framing: str) -> list[bytes]:
    if framing == "msgpack":
        values = [0, -1, "héllo", b"\xff\x00", [1, [2, {"k": None}]], {1: 2.5}, ""]
        return [msgpack.packb(v) for v in values]
    records = [b"", b"job", b"\xff\xfe not utf-8 \x80", b"a b\tc", b"x" * 300]
    if framing != "lines":
        records += [b"with\nnewline", b"ends in cr\r", b"\x00\x01,:"]
    return records


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("framing", list(FRAMINGS))
def test_round_trip(framing: str, feed: Feeder) -> None:
    records = sample_records(framing)
    encoder = make_codec(framing)
    stream = b"".join(encoder.encode(r) for r in records)
    assert feed(make_codec(framing), stream) == records


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"a\nb\r\n\n", [b"a", b"b", b""]),
        (b"only cr\r\r\n", [b"only cr\r"]),  # one \r stripped, not all
        (b"cr\rinside\n", [b"cr\rinside"]),
        (b"\xff\xfe\n", [b"\xff\xfe"]),  # not UTF-8: stays bytes
        (b"partial", []),
    ],
)
@pytest.mark.parametrize("feed", FEEDERS)
def test_lines(stream: bytes, expected: list[bytes], feed: Feeder) -> None:
    assert feed(LinesCodec(), stream) == expected


@pytest.mark.parametrize("feed", FEEDERS)
def test_lines_partial_record_waits_for_rest(feed: Feeder) -> None:
    codec = LinesCodec()
    assert feed(codec, b"par") == []
    assert feed(codec, b"tial\nnext") == [b"partial"]
    assert feed(codec, b"\n") == [b"next"]


OVERSIZE_CASES = {
    # framing: (stream, expected) with max_record=4, head_size=2
    "lines": (
        b"12345\nok\n123456789\r\n1234\r\nabcd\r\r\n",
        [Oversize(5, b"12"), b"ok", Oversize(9, b"12"), b"1234", Oversize(5, b"ab")],
    ),
    "netstring": (
        b"5:12345,2:ok,10:0123456789,4:1234,",
        [Oversize(5, b"12"), b"ok", Oversize(10, b"01"), b"1234"],
    ),
    "length-prefixed": (
        b"\0\0\0\x0512345\0\0\0\x02ok\0\0\0\x040123",
        [Oversize(5, b"12"), b"ok", b"0123"],
    ),
}


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("framing", BYTE_FRAMINGS)
def test_oversize_is_reported_and_skipped(framing: str, feed: Feeder) -> None:
    stream, expected = OVERSIZE_CASES[framing]
    codec = make_codec(framing, max_record=4, head_size=2)
    assert feed(codec, stream) == expected


def test_oversize_line_is_not_buffered() -> None:
    codec = LinesCodec(max_record=10, head_size=4)
    for _ in range(1000):
        assert codec.feed(b"y" * 1000) == []
    assert len(codec._buffer) == 0  # skipped, not kept
    assert codec.feed(b"\nnext\n") == [Oversize(1_000_000, b"yyyy"), b"next"]


@pytest.mark.parametrize("feed", FEEDERS)
def test_msgpack_oversize_cannot_resync(feed: Feeder) -> None:
    codec = MsgpackCodec(max_record=8, head_size=3)
    small, big = msgpack.packb(1), msgpack.packb("x" * 20)
    with pytest.raises(RecordTooLargeError) as info:
        feed(codec, small + big + small)
    assert info.value.head == big[:3]
    assert info.value.length > 8
    if feed is feed_whole:
        assert info.value.records == [small]  # what came before the error is not lost
    with pytest.raises(FramingError, match="reset"):
        codec.feed(small)
    codec.reset()
    assert codec.feed(small) == [small]


def test_msgpack_array_of_many_small_items_is_too_large() -> None:
    codec = MsgpackCodec(max_record=100)
    with pytest.raises(RecordTooLargeError):
        codec.feed(msgpack.packb(list(range(200))))


MALFORMED = [
    # (framing, stream, error message fragment)
    ("netstring", b":", "length is empty"),
    ("netstring", b"03:abc,", "leading zero"),
    ("netstring", b"00:,", "leading zero"),
    ("netstring", b"3x:abc,", "contains b'x'"),
    ("netstring", b"-1:", "contains b'-'"),
    ("netstring", b"3:abcd", "ends with b'd', not ','"),
    ("netstring", b"0:;", "ends with b';'"),
    ("netstring", b"9" * 21 + b":", "longer than 20 digits"),
    ("msgpack", b"\xc1", "invalid msgpack"),  # 0xc1 is never used
    ("msgpack", b"\xa2\xff\xfe", "invalid msgpack"),  # str that is not UTF-8
]


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("framing", "stream", "fragment"), MALFORMED)
def test_malformed_raises_typed_error(
    framing: str, stream: bytes, fragment: str, feed: Feeder
) -> None:
    codec = make_codec(framing)
    good = codec.encode(b"" if framing != "msgpack" else msgpack.packb(7))
    with pytest.raises(MalformedRecordError, match=fragment.replace("(", r"\(")) as info:
        feed(codec, good + stream)
    if feed is feed_whole:
        assert info.value.records == [msgpack.packb(7) if framing == "msgpack" else b""]


@pytest.mark.parametrize(
    ("framing", "record", "fragment"),
    [
        ("lines", b"two\nlines", "newline at offset 3"),
        ("lines", b"cr\r", "strips"),
        ("lines", b"x" * 11, "exceeds max_record"),
        ("netstring", b"x" * 11, "exceeds max_record"),
        ("msgpack", b"\x92\x01", "incomplete"),
        ("msgpack", b"\x01\x02", "more than one"),
        ("msgpack", b"\xc1", "not valid msgpack"),
    ],
)
def test_encode_refuses_what_decode_would_not_return(
    framing: str, record: bytes, fragment: str
) -> None:
    with pytest.raises(UnencodableRecordError, match=fragment):
        make_codec(framing, max_record=10).encode(record)


def test_the_framing_type_names_every_framing() -> None:
    assert list(get_args(Framing)) == list(FRAMINGS)


def test_make_codec_rejects_unknown_names_and_limits() -> None:
    with pytest.raises(ValueError, match="unknown framing 'csv'"):
        make_codec("csv")
    with pytest.raises(ValueError, match="max_record"):
        make_codec("lines", max_record=0)


# --- properties -------------------------------------------------------------------------

chunkings = st.lists(st.integers(min_value=1, max_value=64), max_size=40)


def split(data: bytes, sizes: list[int]) -> list[bytes]:
    parts, at = [], 0
    for size in sizes:
        parts.append(data[at : at + size])
        at += size
    parts.append(data[at:])
    return parts


@settings(max_examples=150, deadline=None)
@given(framing=st.sampled_from(list(FRAMINGS)), data=st.binary(max_size=300), sizes=chunkings)
def test_decoder_yields_records_or_raises_framing_error(
    framing: str, data: bytes, sizes: list[int]
) -> None:
    codec = make_codec(framing, max_record=32, head_size=4)
    try:
        for part in split(data, sizes):
            for item in codec.feed(part):
                assert isinstance(item, bytes | Oversize)
                if isinstance(item, bytes):
                    assert len(item) <= 32
    except FramingError:
        pass


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=8,
)


@settings(max_examples=150, deadline=None)
@given(framing=st.sampled_from(list(FRAMINGS)), data=st.data(), sizes=chunkings)
def test_encode_then_decode_round_trips(
    framing: str, data: st.DataObject, sizes: list[int]
) -> None:
    if framing == "msgpack":
        values = data.draw(st.lists(msgpack_values, max_size=6))
        records = [msgpack.packb(v) for v in values]
    else:
        alphabet = st.binary(max_size=40)
        if framing == "lines":
            alphabet = alphabet.map(lambda b: b.replace(b"\n", b"").rstrip(b"\r"))
        records = data.draw(st.lists(alphabet, max_size=10))
    codec = make_codec(framing, max_record=4096)
    stream = b"".join(codec.encode(r) for r in records)
    decoded = [item for part in split(stream, sizes) for item in codec.feed(part)]
    assert decoded == records
