"""The sans-IO codec: every frame type whole and byte by byte (h11 test_io.py, nats
split_test.go), tables of malformed input (nats parser_test.go ``TestShouldFail``), and
property tests of the decoder's one invariant: frames out, or ProtocolError."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiobus.errors import FrameTooLarge, LocalProtocolError, ProtocolError, RemoteProtocolError
from aiobus.protocol import (
    _SIGNATURES,
    DEFAULT_MAX_FRAME,
    OPTIONAL_TAIL,
    SPECS,
    BodyKind,
    FrameDecoder,
    Op,
    check_frame,
    decode_body,
    encode_body,
)

# One well-formed example of every frame type.
EXAMPLES: dict[Op, list[Any]] = {
    Op.HELLO: [Op.HELLO, 1, {"name": "svc"}],
    Op.WELCOME: [Op.WELCOME, 1, {"server": "aiobus/0.1.0", "conn": 3, "max_frame": 1024}],
    Op.OK: [Op.OK, 7, {"queues": {"jobs": {"ready": 1}}, "list": [1, 2.5, None, True]}],
    Op.OK_RANGE: [Op.OK_RANGE, 3, 9],
    Op.ERROR: [Op.ERROR, 0, "queue-full", "queue 'jobs' is full", 7],
    Op.CLOSE: [Op.CLOSE, "shutdown", "the broker is shutting down"],
    Op.PING: [Op.PING, 9],
    Op.SEND: [Op.SEND, 2, "jobs", b"\x00\xff body", 0, {"trace": "x"}, 1.5, None, 30, 7],
    Op.PUBLISH: [Op.PUBLISH, "weather.hk", b"\x93\x01\x02\x03", 1, None],
    Op.SUBSCRIBE: [Op.SUBSCRIBE, 3, 1, "weather.*", 100, "drop-oldest"],
    Op.CONSUME: [Op.CONSUME, 4, 2, "jobs", 16, True],
    Op.CANCEL: [Op.CANCEL, 5, 2],
    Op.CREDIT: [Op.CREDIT, 1, 10],
    Op.ACK: [Op.ACK, 6, 123],
    Op.NACK: [Op.NACK, 7, 123, 2.5, "boom"],
    Op.REJECT: [Op.REJECT, 8, 123, None],
    Op.EXTEND: [Op.EXTEND, 9, 123, 60],
    Op.REPLY: [Op.REPLY, 10, 123, b"\x07", 1, {}],
    Op.DECLARE: [Op.DECLARE, 11, "jobs", {"max_deliveries": 5, "retry_delays": [1, 2.5]}],
    Op.STATS: [Op.STATS, 12, {"queues": "orders.>", "limit": 100}],
    Op.ACK_MANY: [Op.ACK_MANY, [5, 6, 7]],
    Op.PURGE: [Op.PURGE, 13, "jobs"],
    Op.DELETE: [Op.DELETE, 14, "jobs", False],
    Op.PEEK: [Op.PEEK, 15, "jobs.dlq", {"offset": 0, "limit": 10, "max_body": 1024}],
    Op.DELIVER: [Op.DELIVER, 2, 123, ["b-1", "jobs", b"x", 0, None, 1.7e9], 1, "3.44"],
    Op.EVENT: [Op.EVENT, 1, ["b-2", "weather.hk", b"", 0, {"a": "b"}, 1.7e9], 3],
    Op.EVENTS: [Op.EVENTS, 1, [["b-2", "weather.hk", b"", 0, None, 1.7e9],
                               ["b-3", "weather.hk", b"x", 1, None, 1.7e9]], 0],
    Op.RESPONSE: [Op.RESPONSE, 44, b"\x07", 1, None],
}


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def feed_whole(data: bytes, **kwargs: Any) -> list[Any]:
    return FrameDecoder(**kwargs).feed(data)


def feed_bytewise(data: bytes, **kwargs: Any) -> list[Any]:
    decoder = FrameDecoder(**kwargs)
    frames: list[Any] = []
    for i in range(len(data)):
        frames += decoder.feed(data[i : i + 1])
    return frames


FEEDERS = [pytest.param(feed_whole, id="whole"), pytest.param(feed_bytewise, id="bytewise")]


def test_every_op_has_a_spec_and_an_example() -> None:
    assert set(SPECS) == set(Op) == set(EXAMPLES)


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_every_frame_type_round_trips(op: Op, feed: Any) -> None:
    frame = EXAMPLES[op]
    (decoded,) = feed(pack(frame))
    assert decoded == frame
    assert check_frame(decoded) == op
    assert type(check_frame(decoded)) is int


@pytest.mark.parametrize("feed", FEEDERS)
def test_a_stream_of_every_frame_type(feed: Any) -> None:
    frames = list(EXAMPLES.values()) * 2
    assert feed(b"".join(pack(f) for f in frames)) == frames


def test_a_frame_split_anywhere() -> None:
    data = pack(EXAMPLES[Op.SEND]) + pack(EXAMPLES[Op.DELIVER])
    for cut in range(len(data) + 1):
        decoder = FrameDecoder()
        got = decoder.feed(data[:cut]) + decoder.feed(data[cut:])
        assert got == [EXAMPLES[Op.SEND], EXAMPLES[Op.DELIVER]], cut


def test_partial_frame_yields_nothing_yet() -> None:
    decoder = FrameDecoder()
    data = pack(EXAMPLES[Op.SEND])
    assert decoder.feed(data[:-1]) == []
    assert decoder.feed(b"") == []
    assert decoder.feed(data[-1:]) == [EXAMPLES[Op.SEND]]


@pytest.mark.parametrize("feed", FEEDERS)
def test_a_frame_of_max_frame_bytes_is_accepted_one_more_is_not(feed: Any) -> None:
    overhead = len(pack([Op.SEND, 1, "jobs", b"x" * 1000, 0, None, None, None])) - 1000
    fits = [Op.SEND, 1, "jobs", b"x" * (1024 - overhead), 0, None, None, None]
    assert len(pack(fits)) == 1024
    assert feed(pack(fits) * 3, max_frame=1024) == [fits] * 3
    too_big = [Op.SEND, 1, "jobs", b"x" * (1025 - overhead), 0, None, None, None]
    with pytest.raises(FrameTooLarge):
        feed(pack(fits) + pack(too_big), max_frame=1024)


# -- malformed msgpack ---------------------------------------------------------------


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(
    ("data", "needle"),
    [
        pytest.param(b"\xc1", "FormatError", id="never-used-byte-0xc1"),
        pytest.param(b"\x92\x06\xc1", "FormatError", id="0xc1-inside-a-frame"),
        pytest.param(b"\xdd\xff\xff\xff\xff", "max_array_len", id="array32-4G-header"),
        pytest.param(b"\xdd\x00\x01\x00\x01", "max_array_len", id="array32-65537-header"),
        pytest.param(b"\xdf\xff\xff\xff\xff", "max_map_len", id="map32-4G-header"),
        pytest.param(b"\xde\xff\xff", "max_map_len", id="map16-65535-header"),
        pytest.param(b"\x91" * 5000 + b"\xc0", "StackError", id="deep-nesting"),
        pytest.param(b"\x81" * 3000 + b"\xa1k\xc0", "", id="deep-map-nesting"),
        pytest.param(b"\xd4\x01\x00", "ext", id="fixext1"),
        pytest.param(b"\xc7\x03\x05abc", "ext", id="ext8"),
        pytest.param(b"\xd6\xff\x00\x00\x00\x00", "ext", id="timestamp-ext"),
        pytest.param(b"\x81\x01\x02", "map key", id="int-map-key"),
        pytest.param(b"\x81\xc0\x02", "map key", id="nil-map-key"),
        pytest.param(b"\x81\x91\x01\x02", "map key", id="array-map-key"),
        pytest.param(b"\x92\x01\x81\x01\x02", "map key", id="int-key-in-options"),
    ],
)
def test_malformed_msgpack(feed: Any, data: bytes, needle: str) -> None:
    with pytest.raises(RemoteProtocolError, match="malformed msgpack") as info:
        feed(data)
    assert needle in str(info.value)
    assert not isinstance(info.value, FrameTooLarge)
    assert info.value.code == "protocol"


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(pack([Op.SEND, 1, "jobs", b"x" * 2000, 0, None, None, None]), id="bin"),
        pytest.param(pack([Op.SEND, 1, "j" * 2000, b"", 0, None, None, None]), id="str"),
        pytest.param(pack(b"x" * 1025), id="bare-bin"),
        pytest.param(b"\xc6\x00\x01\x00\x00" + b"x" * 65536, id="bin32-declared-64k"),
    ],
)
def test_oversize_frames(feed: Any, data: bytes) -> None:
    with pytest.raises(FrameTooLarge, match=r"max_frame \(1024 bytes\)") as info:
        feed(data, max_frame=1024)
    assert info.value.code == "frame-too-large"
    assert isinstance(info.value, ProtocolError)


@pytest.mark.parametrize(
    "bad", [b"\xc1", b"\xd4\x01\x00", pack([Op.SEND, 1, "q", b"x" * 2000, 0, None, None, None])]
)
def test_frames_before_a_bad_one_are_kept_on_the_error(bad: bytes) -> None:
    """The broker still acts on the frames that came before the bad one (say, an ACK),
    then closes the connection."""
    good = [EXAMPLES[Op.PING], EXAMPLES[Op.ACK]]
    with pytest.raises(ProtocolError) as info:
        FrameDecoder(max_frame=1024).feed(b"".join(pack(f) for f in good) + bad)
    assert info.value.frames == good  # type: ignore[attr-defined]


def test_a_huge_declared_bin_never_buffers_without_bound() -> None:
    """A bin header claiming 4 GiB: the decoder gives up within max_frame plus one
    read's slack instead of waiting for (and buffering) 4 GiB."""
    decoder = FrameDecoder(max_frame=1024)
    chunk = b"x" * 65536
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"\xc6\xff\xff\xff\xff")
        for _ in range(64):  # 4 MiB at most
            decoder.feed(chunk)


def test_default_max_frame_is_16_mib() -> None:
    assert DEFAULT_MAX_FRAME == FrameDecoder().max_frame == 16 * 1024 * 1024


# -- check_frame -------------------------------------------------------------------


def plain(frame: Any) -> Any:
    """A frame as the decoder produces it: the frame type a plain int, not an ``Op``."""
    if type(frame) is list and frame and isinstance(frame[0], Op):
        return [int(frame[0]), *frame[1:]]
    return frame


def _send(**fields: Any) -> list[Any]:
    base = {"rid": 1, "queue": "jobs", "body": b"x", "kind": 0, "headers": None, "ttl": None,
            "reply_token": None}
    base.update(fields)
    return [Op.SEND, *base.values()]


@pytest.mark.parametrize(
    ("frame", "code", "message"),
    [
        (None, "protocol", "non-empty msgpack array, got NoneType"),
        (5, "protocol", "non-empty msgpack array, got int"),
        ("HELLO", "protocol", "non-empty msgpack array, got str"),
        ({"op": 1}, "protocol", "non-empty msgpack array, got dict"),
        ((1, 1, {}), "protocol", "got tuple"),
        ([], "protocol", "non-empty msgpack array, got list"),
        ([0], "unknown-frame", "unknown frame type 0"),
        ([8], "unknown-frame", "unknown frame type 8"),
        ([99, 1], "unknown-frame", "unknown frame type 99"),
        ([-1], "unknown-frame", "unknown frame type -1"),
        (["SEND"], "unknown-frame", "unknown frame type 'SEND'"),
        ([True, 1, {}], "unknown-frame", "unknown frame type bool"),
        ([1.0, 1, {}], "unknown-frame", "unknown frame type float"),
        ([None], "unknown-frame", "unknown frame type NoneType"),
        ([b"\x01"], "unknown-frame", "unknown frame type bytes"),
        ([[1]], "unknown-frame", "unknown frame type list"),
        ([Op.HELLO], "bad-field", "HELLO frame has 0 fields, expected 2"),
        ([Op.HELLO, 1], "bad-field", "HELLO frame has 1 fields, expected 2"),
        ([Op.HELLO, 1, {}, None], "bad-field", "HELLO frame has 3 fields, expected 2"),
        ([Op.PING, 1, 2], "bad-field", "PING frame has 2 fields, expected 1"),
        ([Op.HELLO, "1", {}], "bad-field", "HELLO.version must be int, got str"),
        ([Op.HELLO, -1, {}], "bad-field", "HELLO.version must not be negative"),
        ([Op.HELLO, 1, []], "bad-field", "HELLO.options must be dict, got list"),
        ([Op.HELLO, 1, None], "bad-field", "HELLO.options must be dict, got NoneType"),
        (_send(rid="1"), "bad-field", "SEND.rid must be int, got str"),
        (_send(rid=True), "bad-field", "SEND.rid must be int, got bool"),
        (_send(rid=1.0), "bad-field", "SEND.rid must be int, got float"),
        (_send(rid=-1), "bad-field", "SEND.rid must not be negative"),
        (_send(queue=5), "bad-field", "SEND.queue must be str, got int"),
        (_send(queue=b"jobs"), "bad-field", "SEND.queue must be str, got bytes"),
        (_send(body="text"), "bad-field", "SEND.body must be bytes, got str"),
        (_send(body=None), "bad-field", "SEND.body must be bytes, got NoneType"),
        (_send(kind=2), "bad-field", "SEND.kind must be 0 (raw) or 1 (msgpack)"),
        (_send(kind=-1), "bad-field", "SEND.kind must not be negative"),
        (_send(kind=None), "bad-field", "SEND.kind must be int, got NoneType"),
        (_send(headers=[]), "bad-field", "SEND.headers must be dict or NoneType, got list"),
        (_send(headers={"k": 1}), "bad-field", "SEND.headers must map str to str"),
        (_send(headers={"k": None}), "bad-field", "SEND.headers must map str to str"),
        (_send(headers={"k": b"v"}), "bad-field", "SEND.headers must map str to str"),
        (_send(headers={1: "v"}), "bad-field", "SEND.headers must map str to str"),
        (_send(ttl="5"), "bad-field", "SEND.ttl must be int or float or NoneType, got str"),
        (_send(reply_token=-1), "bad-field", "SEND.reply_token must not be negative"),
        (_send(reply_token="t"), "bad-field", "SEND.reply_token must be int or NoneType"),
        ([*_send(), "5"], "bad-field", "SEND.delay must be int or float or NoneType, got str"),
        ([*_send(), None, "1"], "bad-field", "SEND.seq must be int or NoneType, got str"),
        ([*_send(), None, 1.0], "bad-field", "SEND.seq must be int or NoneType, got float"),
        ([*_send(), None, True], "bad-field", "SEND.seq must be int or NoneType, got bool"),
        ([*_send(), None, -1], "bad-field", "SEND.seq must not be negative"),
        ([*_send(), None, 1, None], "bad-field", "SEND frame has 10 fields, expected 7 to 9"),
        (_send()[:-1], "bad-field", "SEND frame has 6 fields, expected 7 to 9"),
        ([Op.PURGE, 1], "bad-field", "PURGE frame has 1 fields, expected 2"),
        ([Op.PURGE, 1, None], "bad-field", "PURGE.queue must be str, got NoneType"),
        ([Op.DELETE, 1, "jobs", 0], "bad-field", "DELETE.if_empty must be bool, got int"),
        ([Op.DELETE, 1, "jobs"], "bad-field", "DELETE frame has 2 fields, expected 3"),
        ([Op.PEEK, 1], "bad-field", "PEEK frame has 1 fields, expected 2 to 3"),
        ([Op.PEEK, 1, "q", []], "bad-field", "PEEK.options must be dict or NoneType"),
        ([Op.PUBLISH, "t", b"", 0, {"k": 5}], "bad-field", "PUBLISH.headers must map str"),
        ([Op.PUBLISH, "t", b"", 3, None], "bad-field", "PUBLISH.kind must be 0 (raw)"),
        ([Op.PUBLISH, None, b"", 0, None], "bad-field", "PUBLISH.topic must be str"),
        ([Op.SUBSCRIBE, 1, 1, "t", -1, "drop-oldest"], "bad-field",
         "SUBSCRIBE.max_pending must not be negative"),
        ([Op.SUBSCRIBE, 1, 1, "t", 10, None], "bad-field", "SUBSCRIBE.policy must be str"),
        ([Op.CONSUME, 1, 1, "jobs", 1.5], "bad-field", "CONSUME.prefetch must be int"),
        ([Op.CONSUME, 1, "1", "jobs", 1], "bad-field", "CONSUME.sid must be int"),
        ([Op.CONSUME, 1, 1, "jobs", 1, 1], "bad-field",
         "CONSUME.passive must be bool or NoneType, got int"),
        ([Op.CONSUME, 1, 1, "jobs", 1, True, None], "bad-field",
         "CONSUME frame has 6 fields, expected 4 to 5"),
        ([Op.CANCEL, 1, None], "bad-field", "CANCEL.sid must be int"),
        ([Op.CREDIT, 1, -3], "bad-field", "CREDIT.n must not be negative"),
        ([Op.ACK, 1, None], "bad-field", "ACK.tag must be int, got NoneType"),
        ([Op.ACK, 1, -5], "bad-field", "ACK.tag must not be negative"),
        ([Op.ACK_MANY, [1, -2]], "bad-field", "ACK_MANY.tags must be non-negative ints"),
        ([Op.ACK_MANY, [1, "2"]], "bad-field", "ACK_MANY.tags must be non-negative ints"),
        ([Op.ACK_MANY, 5], "bad-field", "ACK_MANY.tags must be list"),
        ([Op.NACK, 1, 1, "5", None], "bad-field", "NACK.delay must be int or float or NoneType"),
        ([Op.NACK, 1, 1, None, 5], "bad-field", "NACK.reason must be str or NoneType, got int"),
        ([Op.REJECT, 1, 1, b"r"], "bad-field", "REJECT.reason must be str or NoneType"),
        ([Op.EXTEND, 1, 1, None], "bad-field", "EXTEND.seconds must be int or float"),
        ([Op.REPLY, 1, 1, b"", 0, {"a": 1}], "bad-field", "REPLY.headers must map str to str"),
        ([Op.DECLARE, 1, "jobs", None], "bad-field", "DECLARE.options must be dict"),
        ([Op.STATS, "1"], "bad-field", "STATS.rid must be int"),
        ([Op.RESPONSE, 1, b"", 0, {"a": 1}], "bad-field", "RESPONSE.headers must map str"),
        ([Op.EVENT, 1, ["i", "t", b"", 0, None, 0.0], -1], "bad-field",
         "EVENT.dropped must not be negative"),
        ([Op.DELIVER, 1, 1, "message", 1, None], "bad-field",
         "DELIVER.message must be list"),
    ],
)
def test_check_frame_rejects(frame: Any, code: str, message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        check_frame(plain(frame))
    assert info.value.code == code
    assert message in str(info.value)


def test_check_frame_accepts_optional_fields() -> None:
    assert check_frame(plain(_send(headers={}, ttl=0.5, reply_token=0))) == Op.SEND
    assert check_frame(plain(_send(headers={"a": "b", "": ""}, ttl=3))) == Op.SEND
    assert check_frame([int(Op.NACK), 1, 1, 0, None]) == Op.NACK
    assert check_frame([int(Op.ACK), 0, 0]) == Op.ACK
    # SEND's delay came later: a SEND without it (older clients) is as valid as with.
    assert check_frame(plain(_send())) == Op.SEND
    assert check_frame(plain([*_send(), None])) == Op.SEND
    assert check_frame(plain([*_send(), 2.5])) == Op.SEND
    assert check_frame(plain([*_send(), -1])) == Op.SEND  # the broker's to refuse
    # ... and so did seq (resendable SENDs), after delay: 8, 9 or 10 fields.
    assert check_frame(plain([*_send(), None, 5])) == Op.SEND
    assert check_frame(plain([*_send(), 2.5, None])) == Op.SEND
    assert check_frame(plain([*_send(), None, 2**63 - 1])) == Op.SEND
    assert check_frame(plain([*_send(), None, 0])) == Op.SEND  # the broker's to refuse


def test_every_length_of_a_send_takes_the_fast_path() -> None:
    """The fast check knows the types of 8-, 9- and 10-field SENDs (a left-out optional
    field is no reason to take the slow path), and never reads past the frame's end."""
    lengths = {len(signature) for signature in _SIGNATURES[Op.SEND]}
    assert lengths == {8, 9, 10}
    for frame in (_send(), [*_send(), None], [*_send(), 1.5, 3]):
        assert tuple(map(type, plain(frame))) in _SIGNATURES[Op.SEND]
        assert check_frame(plain(frame)) == Op.SEND


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_every_field_of_every_frame_is_type_checked(op: Op) -> None:
    """Replacing any one field by a value of a type no spec accepts is rejected with a
    message that names that field."""
    spec = SPECS[op]
    for index, (field, types) in enumerate(spec, start=1):
        if types == (object,):
            continue
        frame = plain(EXAMPLES[op])
        frame[index] = msgpack.ExtType(1, b"")  # never produced by the decoder
        with pytest.raises(RemoteProtocolError, match=rf"{op.name}\.{field} must be"):
            check_frame(frame)


# -- properties -----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_give_frames_or_protocol_error(data: bytes, max_frame: int) -> None:
    for feed in (feed_whole, feed_bytewise):
        try:
            frames = feed(data, max_frame=max_frame)
        except ProtocolError:
            continue
        assert isinstance(frames, list)
        for frame in frames:
            try:
                check_frame(frame)
            except RemoteProtocolError:
                pass


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                   max_size=5),
    max_leaves=20,
)
_FIELD_STRATEGIES: dict[tuple[type, ...], st.SearchStrategy[Any]] = {
    (int,): st.integers(min_value=0, max_value=2**64 - 1),
    (int, float): st.integers(min_value=0, max_value=2**32) | st.floats(allow_nan=False),
    (int, float, type(None)): st.none() | st.integers(0, 2**32) | st.floats(allow_nan=False),
    (str,): st.text(max_size=30),
    (str, type(None)): st.none() | st.text(max_size=30),
    (bytes,): st.binary(max_size=60),
    (dict,): st.dictionaries(st.text(max_size=8), _values, max_size=4),
    (dict, type(None)): st.none() | st.dictionaries(st.text(max_size=8), st.text(max_size=8),
                                                   max_size=4),
    (int, type(None)): st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    (bool,): st.booleans(),
    (bool, type(None)): st.none() | st.booleans(),
    (object,): _values,
    (list,): st.lists(st.integers(min_value=0, max_value=2**64 - 1), max_size=8),
}


@st.composite
def valid_frames(draw: st.DrawFn) -> list[Any]:
    op = draw(st.sampled_from(list(Op)))
    frame: list[Any] = [int(op)]
    for field, types in SPECS[op]:
        if field == "kind":
            frame.append(draw(st.sampled_from([0, 1])))
        elif field == "headers":
            frame.append(draw(st.none() | st.dictionaries(st.text(max_size=8),
                                                          st.text(max_size=8), max_size=4)))
        else:
            frame.append(draw(_FIELD_STRATEGIES[types]))
    return frame


@settings(max_examples=75, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.tuples(st.booleans(), valid_frames(), _values), min_size=1, max_size=6),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=10),
)
def test_stream_of_frames_decodes_in_any_chunking(
    items: list[tuple[bool, list[Any], Any]], cuts: list[int]
) -> None:
    """Valid frames interleaved with well-formed msgpack that is not a valid frame: the
    decoder returns every value, in order, in any chunking; check_frame accepts exactly
    the valid frames, and an invalid one does not disturb the rest of the stream."""
    values = [frame if valid else junk for valid, frame, junk in items]
    data = b"".join(pack(v) for v in values)
    decoder = FrameDecoder()
    decoded: list[Any] = []
    pos, i = 0, 0
    while pos < len(data):
        step = cuts[i % len(cuts)]
        decoded += decoder.feed(data[pos : pos + step])
        pos, i = pos + step, i + 1
    assert decoded == values
    for (valid, frame, _), value in zip(items, decoded, strict=True):
        if valid:
            assert check_frame(value) == frame[0]
        else:
            try:
                check_frame(value)
            except RemoteProtocolError:
                pass


def reference_check(frame: Any) -> bool:
    """The frame rules of docs/PROTOCOL.md spelled out naively, from ``SPECS``."""
    if type(frame) is not list or not frame:
        return False
    op = frame[0]
    if type(op) is not int or op not in SPECS:
        return False
    if not len(SPECS[op]) - OPTIONAL_TAIL.get(op, 0) <= len(frame) - 1 <= len(SPECS[op]):
        return False
    for (field, types), value in zip(SPECS[op], frame[1:], strict=False):
        if types == (object,):
            continue
        if type(value) not in types:
            return False
        if type(value) is int and value < 0 and float not in types:
            return False  # ids and counts; numbers of seconds are the broker's to check
        if field == "headers" and value and not all(
            type(k) is str and type(v) is str for k, v in value.items()
        ):
            return False
        if field == "kind" and value not in (0, 1):
            return False
        if field == "tags" and not all(type(t) is int and t >= 0 for t in value):
            return False
    return True


_junk = (
    st.none() | st.booleans() | st.integers(min_value=-3, max_value=3) | st.floats()
    | st.text(max_size=3) | st.binary(max_size=3)
    | st.dictionaries(st.text(max_size=2), st.text(max_size=2) | st.integers(), max_size=2)
    | st.lists(st.integers(), max_size=2)
)


@st.composite
def mutated_frames(draw: st.DrawFn) -> list[Any]:
    """Mostly well-formed frames with some fields replaced, dropped or added."""
    frame = draw(valid_frames())
    for i in range(1, len(frame)):
        if draw(st.integers(0, 3)) == 0:
            frame[i] = draw(_junk)
    if draw(st.integers(0, 9)) == 0:
        frame[0] = draw(st.integers(min_value=-1, max_value=40) | _junk)
    if draw(st.integers(0, 9)) == 0:
        del frame[draw(st.integers(0, len(frame) - 1)):]
    if draw(st.integers(0, 9)) == 0:
        frame.append(draw(_junk))
    return frame


@settings(max_examples=200, deadline=None)
@given(mutated_frames())
def test_check_frame_agrees_with_the_reference(frame: list[Any]) -> None:
    if reference_check(frame):
        assert check_frame(frame) == frame[0]
    else:
        with pytest.raises(RemoteProtocolError):
            check_frame(frame)


# -- bodies ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"\x00\xff", "", "text \u2603", 0, -1, 2**64 - 1, -(2**63), 1.5, float("inf"),
     True, False, None, [], [1, "a", None], {}, {"a": [1, {"b": b"x"}]}, {1: "int keys"},
     {"nested": {"deep": [[[]]]}}],
)
def test_body_round_trip(body: Any) -> None:
    data, kind = encode_body(body)
    assert type(data) is bytes
    assert kind == (BodyKind.RAW if type(body) is bytes else BodyKind.PACKED)
    assert decode_body(data, kind) == body
    assert type(decode_body(data, kind)) is type(body)


def test_raw_bodies_pass_through_untouched() -> None:
    assert encode_body(b"abc") == (b"abc", BodyKind.RAW)
    assert encode_body(bytearray(b"abc")) == (b"abc", BodyKind.RAW)
    assert encode_body(memoryview(b"abc")) == (b"abc", BodyKind.RAW)
    assert type(encode_body(bytearray(b"abc"))[0]) is bytes


def test_tuples_arrive_as_lists() -> None:
    assert decode_body(*encode_body((1, 2))) == [1, 2]


@pytest.mark.parametrize(
    "body",
    [object(), {1, 2}, frozenset(), 2**64, -(2**63) - 1, {"k": object()}, [1, {2}],
     Op, lambda: None, 1j],
    ids=["object", "set", "frozenset", "int-too-big", "int-too-small", "nested-object",
         "nested-set", "class", "lambda", "complex"],
)
def test_unserialisable_bodies_raise_type_error(body: Any) -> None:
    with pytest.raises(TypeError, match="not msgpack-serialisable"):
        encode_body(body)


def test_decode_body_with_an_unknown_kind() -> None:
    with pytest.raises(LocalProtocolError, match="kind 7"):
        decode_body(b"", 7)


@settings(max_examples=100, deadline=None)
@given(_values)
def test_body_round_trip_property(body: Any) -> None:
    assert decode_body(*encode_body(body)) == body


def test_decoder_holds_an_unpacker_only_while_a_frame_is_incomplete() -> None:
    """An idle connection must not keep msgpack's ~40 KiB unpacker (W6: bytes per idle
    connection); a partial frame must survive the hand-back all the same."""
    decoder = FrameDecoder()
    frame = pack([Op.PING, 7])
    assert decoder.feed(frame) == [[Op.PING, 7]]
    assert decoder._unpacker is None
    big = pack([Op.SEND, 1, "q", b"x" * 1000, 0, None, None, None])
    assert decoder.feed(big[:10]) == []
    assert decoder._unpacker is not None  # holding the partial frame
    other = FrameDecoder()  # meanwhile another connection decodes with a pooled one
    assert other.feed(frame + frame) == [[Op.PING, 7], [Op.PING, 7]]
    assert decoder.feed(big[10:] + frame) == [
        [Op.SEND, 1, "q", b"x" * 1000, 0, None, None, None], [Op.PING, 7]]
    assert decoder._unpacker is None and other._unpacker is None
