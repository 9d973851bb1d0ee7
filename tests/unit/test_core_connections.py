"""Connection lifecycle in the sans-IO broker core: the handshake, its timeout, and
protocol violations that close the offending connection and nothing else."""

from __future__ import annotations

from typing import Any

import pytest

from aiobus.protocol import PROTOCOL_VERSION, Op

from .helpers import Driver


def test_handshake() -> None:
    d = Driver(max_frame=4096)
    conn = d.open(pid=321, uid=654)
    d.receive(conn, [Op.HELLO, PROTOCOL_VERSION, {"name": "svc"}])
    ((op, version, info),) = d.sink.take(conn)
    assert (op, version) == (Op.WELCOME, PROTOCOL_VERSION)
    assert (info["conn"], info["max_frame"], info["pid"], info["uid"]) == (conn, 4096, 321, 654)
    assert info["server"].startswith("aiobus/")
    (described,) = d.core.stats()["connections"]
    assert (described["name"], described["pid"], described["uid"]) == ("svc", 321, 654)


def test_handshake_without_a_name() -> None:
    d = Driver()
    conn = d.open()
    d.receive(conn, [Op.HELLO, PROTOCOL_VERSION, {}])
    assert d.sink.take(conn)[0][0] == Op.WELCOME


@pytest.mark.parametrize(
    "frame",
    [
        [Op.PING, 1],
        [Op.SEND, 1, "jobs", b"x", 0, None, None, None],
        [Op.STATS, 1],
        [Op.DELIVER, 1, 1, ["id", "q", b"", 0, None, 0.0], 1, None],
    ],
)
def test_first_frame_must_be_hello(frame: list[Any]) -> None:
    d = Driver()
    conn, other = d.open(), d.client("other")
    d.receive(conn, frame)
    assert d.sink.closed[conn][0] == "protocol"
    assert "HELLO" in d.sink.closed[conn][1]
    assert d.sink.take(conn) == []
    assert "jobs" not in d.core.stats()["queues"]
    assert other.closed is None


@pytest.mark.parametrize(
    ("options", "field"),
    [({"name": 5}, "name"), ({"name": "x" * 256}, "name")],
)
def test_hello_with_bad_options(options: dict[str, Any], field: str) -> None:
    d = Driver()
    conn = d.open()
    d.receive(conn, [Op.HELLO, PROTOCOL_VERSION, options])
    code, message = d.sink.closed[conn]
    assert code == "bad-field"
    assert field in message


@pytest.mark.parametrize("version", [0, 2, 99])
def test_unsupported_version(version: int) -> None:
    d = Driver()
    conn = d.open()
    d.receive(conn, [Op.HELLO, version, {}])
    code, message = d.sink.closed[conn]
    assert code == "unsupported-version"
    assert str(version) in message
    assert d.sink.take(conn) == []


def test_handshake_timeout() -> None:
    d = Driver(handshake_timeout=2.0)
    silent = d.open()
    d.advance_to(1.0)
    late = d.open()
    assert d.core.next_deadline() == 2.0
    d.advance_to(1.999)
    assert d.sink.closed == {}
    d.advance_to(2.0)
    assert d.sink.closed == {silent: ("handshake-timeout", d.sink.closed[silent][1])}
    assert "HELLO" in d.sink.closed[silent][1]
    d.receive(late, [Op.HELLO, PROTOCOL_VERSION, {}])  # in time: 1 s after connecting
    assert d.sink.take(late)[0][0] == Op.WELCOME
    d.advance_to(100.0)
    assert late not in d.sink.closed
    assert d.core.connection_ids() == [late]


def test_handshake_timeout_does_not_touch_a_reused_connection_id() -> None:
    d = Driver(handshake_timeout=2.0)
    d.core.connect(1, 10, 10, 10, 0.0)
    d.core.disconnect(1, 0.5)
    d.core.connect(1, 11, 11, 11, 1.0)  # the shell reuses an id
    d.receive(1, [Op.HELLO, PROTOCOL_VERSION, {}])
    d.advance_to(2.0)
    assert d.sink.closed == {}


def test_ping() -> None:
    d = Driver()
    c = d.client("c")
    assert c.call(Op.PING) == [Op.OK, 1, None]


def test_stats_request() -> None:
    d = Driver()
    c = d.client("c")
    c.send("jobs")
    result = c.ok(Op.STATS)
    assert result["queues"]["jobs"]["ready"] == 1
    assert [x["name"] for x in result["connections"]] == ["c"]


@pytest.mark.parametrize(
    ("frame", "code", "needle"),
    [
        (5, "protocol", "array"),
        ({"op": 1}, "protocol", "array"),
        ([], "protocol", "array"),
        ([99, 1], "unknown-frame", "99"),
        (["SEND", 1], "unknown-frame", "SEND"),
        ([Op.SEND, "1", "jobs", b"x", 0, None, None, None], "bad-field", "SEND.rid"),
        ([Op.SEND, 1, "jobs", "x", 0, None, None, None], "bad-field", "SEND.body"),
        ([Op.SEND, 1, "jobs", b"x", 0, None, None], "bad-field", "SEND"),
        ([Op.SEND, 1, "jobs", b"x", 0, {"k": 1}, None, None], "bad-field", "headers"),
        ([Op.ACK, 1, -5], "bad-field", "ACK.tag"),
        ([Op.CONSUME, 1, 1, "jobs", 1.5], "bad-field", "CONSUME.prefetch"),
        ([Op.HELLO, PROTOCOL_VERSION, {}], "protocol", "HELLO"),
        ([Op.WELCOME, 1, {}], "unknown-frame", "WELCOME"),
        ([Op.OK, 1, None], "unknown-frame", "OK"),
        ([Op.ERROR, 1, "x", "y"], "unknown-frame", "ERROR"),
        ([Op.CLOSE, "x", "y"], "unknown-frame", "CLOSE"),
        ([Op.DELIVER, 1, 1, ["id", "q", b"", 0, None, 0.0], 1, None], "unknown-frame",
         "DELIVER"),
        ([Op.EVENT, 1, ["id", "t", b"", 0, None, 0.0], 0], "unknown-frame", "EVENT"),
        ([Op.RESPONSE, 1, b"", 0, None], "unknown-frame", "RESPONSE"),
        ([Op.OK_RANGE, 1, 2], "unknown-frame", "OK_RANGE"),
        ([Op.EVENTS, 1, [["id", "t", b"", 0, None, 0.0]] * 2, 0], "unknown-frame", "EVENTS"),
    ],
)
def test_bad_frame_closes_only_that_connection(frame: Any, code: str, needle: str) -> None:
    d = Driver()
    producer, consumer, bad = d.client("p"), d.client("c"), d.client("bad")
    consumer.consume("jobs", prefetch=2)
    producer.send("jobs", b"1")
    producer.send("jobs", b"2")
    held = consumer.deliveries()
    producer.send("jobs", b"3")
    before = d.queue_stats("jobs")
    if type(frame) is list:
        d.receive(bad.conn, frame)
    else:
        d.core.receive(bad.conn, frame, d.now)
    assert bad.closed is not None
    assert bad.closed[0] == code
    assert needle in bad.closed[1]
    assert d.sink.close_calls == [bad.conn]
    # Everyone else carries on with their queue state untouched.
    assert d.queue_stats("jobs") == before
    assert producer.closed is None and consumer.closed is None
    assert [consumer.ack(m.tag)[0] for m in held] == [Op.OK, Op.OK]
    assert consumer.delivery().body == b"3"
    assert d.core.connection_ids() == [producer.conn, consumer.conn]


def test_frames_after_close_are_ignored() -> None:
    d = Driver()
    bad = d.client("bad")
    d.receive(bad.conn, [99])
    bad.receive(Op.SEND, 1, "jobs", b"x", 0, None, None, None)
    bad.receive(Op.PING, 2)
    assert bad.take() == []
    assert d.sink.close_calls == [bad.conn]
    assert "jobs" not in d.core.stats()["queues"]
    d.core.disconnect(bad.conn, d.now)  # the shell reports the close: a no-op
    assert d.sink.close_calls == [bad.conn]


def test_protocol_error_of_a_consumer_redelivers_its_messages() -> None:
    d = Driver()
    producer, bad, good = d.client("p"), d.client("bad"), d.client("good")
    bad.consume("jobs")
    producer.send("jobs")
    first = bad.delivery()
    d.receive(bad.conn, [Op.ACK, "not a tag"])
    assert bad.closed[0] == "bad-field"
    good.consume("jobs")
    again = good.delivery()
    assert (again.id, again.attempt) == (first.id, 2)


def test_protocol_error_from_the_shell() -> None:
    d = Driver()
    bad, other = d.client("bad"), d.client("other")
    d.core.protocol_error(bad.conn, "frame-too-large", "frame larger than max_frame")
    assert bad.closed == ("frame-too-large", "frame larger than max_frame")
    assert other.closed is None
    assert d.core.connection_ids() == [other.conn]


def test_request_errors_do_not_close_the_connection() -> None:
    d = Driver()
    c = d.client("c")
    assert c.error(Op.ACK, 12345)[0] == "lease-unknown"
    assert c.send("a..b")[2] == "invalid-name"
    assert c.error(Op.CANCEL, 3)[0] == "unknown-subscription"
    assert c.call(Op.PING) is not None
    assert c.closed is None


def test_next_deadline_is_none_when_idle() -> None:
    d = Driver()
    assert d.core.next_deadline() is None
    d.client("c").send("jobs", ttl=7.0)
    assert d.core.next_deadline() == 5.0  # the handshake deadline comes first
    d.advance_to(5.0)
    assert d.core.next_deadline() == 7.0
