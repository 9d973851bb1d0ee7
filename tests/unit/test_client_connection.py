"""The sans-IO client connection: calls in, bytes out; bytes in, callbacks out.

Every received input is fed whole and then byte by byte (h11/tests/test_io.py, nats
server/split_test.go): the connection must behave the same however reads split frames.
Nothing here has a socket, a loop or a clock.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

from aiobus.client.connection import ACK_BATCH, ClientConnection, State
from aiobus.errors import (
    BodyDecodeError,
    BusError,
    ConnectionClosed,
    FrameTooLarge,
    LeaseError,
    QueueFull,
    RemoteProtocolError,
)
from aiobus.protocol import Op


class Sink:
    """Records what the connection reports."""

    def __init__(self) -> None:
        self.completed_: list[tuple[Any, Any]] = []
        self.failed_: list[tuple[Any, BusError]] = []
        self.welcome: list[dict[str, Any]] = []
        self.flushes = 0

    def completed(self, waiter: Any, result: Any) -> None:
        self.completed_.append((waiter, result))

    def completed_all(self, waiters: list[Any]) -> None:
        self.completed_.extend((waiter, None) for waiter in waiters if waiter is not None)

    def failed(self, waiter: Any, error: BusError) -> None:
        self.failed_.append((waiter, error))

    def welcomed(self, info: dict[str, Any]) -> None:
        self.welcome.append(info)

    def flush_wanted(self) -> None:
        self.flushes += 1

    def answer_failed(self, receiver: Any, error: BusError) -> None:
        self.failed_.append((receiver, error))


class Stream:
    """A receiver that records what it is given."""

    def __init__(self) -> None:
        self.got: list[tuple[Any, ...]] = []

    def _deliver(self, tag: int, message: list[Any], attempt: int,
                 reply_to: str | None) -> None:
        self.got.append(("deliver", tag, message[0], attempt, reply_to))

    def _event(self, message: list[Any], dropped: int) -> None:
        self.got.append(("event", message[0], dropped))

    def _events(self, messages: list[list[Any]], dropped: int) -> None:
        self.got.append(("events", [m[0] for m in messages], dropped))


def pack(*frames: list[Any]) -> bytes:
    return b"".join(msgpack.packb(f, use_bin_type=True) for f in frames)


def sent(conn: ClientConnection) -> list[list[Any]]:
    """The frames the connection wants written, decoded."""
    data = b"".join(conn.data_to_send())
    return list(msgpack.Unpacker(io.BytesIO(data), raw=False))


def message(mid: str) -> list[Any]:
    return [mid, "q", b"body", 0, None, 1.5]


Feed = Callable[[ClientConnection, bytes], None]  # the ``feed`` fixture (conftest.py)


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def conn(sink: Sink) -> ClientConnection:
    """A connection past the handshake, its HELLO taken."""
    conn = ClientConnection(sink)
    conn.hello("t")
    conn.receive_data(pack([Op.WELCOME, 1, {"max_frame": 4096}]))
    conn.data_to_send()
    sink.welcome.clear()
    return conn


def test_handshake(sink: Sink, feed: Feed) -> None:
    conn = ClientConnection(sink)
    assert conn.state is State.IDLE
    conn.hello("svc")
    assert sent(conn) == [[Op.HELLO, 1, {"name": "svc"}]]
    assert conn.state is State.HANDSHAKE
    feed(conn, pack([Op.WELCOME, 1, {"max_frame": 1000, "version": 1}]))
    assert sink.welcome == [{"max_frame": 1000, "version": 1}]
    assert conn.state is State.OPEN and conn.max_frame == 1000
    feed(conn, pack([Op.WELCOME, 1, {"max_frame": 5}]))  # a second one is ignored
    assert len(sink.welcome) == 1 and conn.max_frame == 1000


def test_rids_count_from_one_and_ok_completes_its_waiter(conn: ClientConnection, sink: Sink,
                                                         feed: Feed) -> None:
    assert conn.call([Op.PING, 0], "ping") == 1
    assert conn.call([Op.STATS, 0], "stats") == 2
    assert sent(conn) == [[Op.PING, 1], [Op.STATS, 2]]
    feed(conn, pack([Op.OK, 2, {"queues": {}}], [Op.OK, 1, None], [Op.OK, 1, None]))
    assert sink.completed_ == [("stats", {"queues": {}}), ("ping", None)]  # once each
    assert conn.pending == {}


def test_ok_range_completes_each_pending_rid(conn: ClientConnection, sink: Sink,
                                             feed: Feed) -> None:
    waiters = [conn.send("q", b"x", 0, None, None, None, f"s{i}") for i in range(5)]
    assert conn.pending == {1: "s0", 2: "s1", 3: "s2", 4: "s3", 5: "s4"} == dict(
        zip(range(1, 6), waiters, strict=True))
    feed(conn, pack([Op.OK_RANGE, 2, 4]))
    assert [w for w, _ in sink.completed_] == ["s1", "s2", "s3"]
    assert sorted(conn.pending) == [1, 5]
    # A huge range is bounded by what is pending, not by its size.
    feed(conn, pack([Op.OK_RANGE, 0, 2**40]))
    assert [w for w, _ in sink.completed_] == ["s1", "s2", "s3", "s0", "s4"]
    assert conn.pending == {}


def test_error_maps_to_its_class(conn: ClientConnection, sink: Sink, feed: Feed) -> None:
    conn.send("q", b"x", 0, None, None, None, "send")
    conn.settle(7, "ack", None, None, "ack")
    feed(conn, pack([Op.ERROR, 1, "queue-full", "full"],
                    [Op.ERROR, 2, "lease-unknown", "gone"]))
    (w1, e1), (w2, e2) = sink.failed_
    assert (w1, type(e1), e1.code, str(e1)) == ("send", QueueFull, "queue-full", "full")
    assert (w2, type(e2)) == ("ack", LeaseError)
    assert conn.async_errors == 0


def test_error_for_a_fire_and_forget_frame_is_counted(conn: ClientConnection, sink: Sink,
                                                      feed: Feed) -> None:
    conn.send_unconfirmed("q", b"x", 0, None, None, None)
    assert sent(conn)[0][1] == 0
    feed(conn, pack([Op.ERROR, 0, "queue-full", "full"]))
    assert conn.async_errors == 1
    assert [(w, type(e)) for w, e in sink.failed_] == [(None, QueueFull)]


def test_send_makes_its_waiter_when_given_none(sink: Sink) -> None:
    made = iter(["w1", "w2"])
    conn = ClientConnection(sink, new_waiter=lambda: next(made))
    assert conn.send("q", b"x", 0, None, None, None) == "w1"
    assert conn.pending == {1: "w1"}


def test_send_frame_has_a_ninth_field_only_with_a_delay(conn: ClientConnection) -> None:
    conn.send("q", b"x", 0, {"h": "v"}, 3.0, None, "a")
    conn.send("q", b"x", 1, None, None, 2.5, "b")
    assert sent(conn) == [[Op.SEND, 1, "q", b"x", 0, {"h": "v"}, 3.0, None],
                          [Op.SEND, 2, "q", b"x", 1, None, None, None, 2.5]]


def test_deliver_event_events_go_to_their_stream(conn: ClientConnection, sink: Sink,
                                                 feed: Feed) -> None:
    consumer, subscriber = Stream(), Stream()
    c = conn.consume("q", 16, lambda: consumer, "consume")
    s = conn.subscribe("t.*", 8, "drop-oldest", lambda: subscriber, "subscribe")
    assert (c, s) == (1, 2)
    assert sent(conn) == [[Op.CONSUME, 1, 1, "q", 16], [Op.SUBSCRIBE, 2, 2, "t.*", 8,
                                                        "drop-oldest"]]
    feed(conn, pack(
        [Op.OK, 1, None], [Op.OK, 2, None],
        [Op.DELIVER, c, 10, message("m1"), 1, None],
        [Op.DELIVER, c, 11, message("m2"), 3, "reply.to"],
        [Op.EVENT, s, message("e1"), 2],
        [Op.EVENTS, s, [message("e2"), message("e3")], 0],
        [Op.DELIVER, 99, 12, message("lost"), 1, None],  # unknown sid: dropped
    ))
    assert consumer.got == [("deliver", 10, "m1", 1, None), ("deliver", 11, "m2", 3, "reply.to")]
    assert subscriber.got == [("event", "e1", 2), ("events", ["e2", "e3"], 0)]


def test_frames_for_a_cancelled_or_collected_stream_are_dropped(
        conn: ClientConnection, feed: Feed) -> None:
    kept, cancelled = Stream(), Stream()
    a = conn.consume("q", 1, lambda: cancelled, None)
    b = conn.consume("q", 1, lambda: None, None)  # its receiver was garbage-collected
    c = conn.consume("q", 1, lambda: kept, None)
    sent(conn)
    conn.cancel(a)
    assert sent(conn) == [[Op.CANCEL, 0, a]]
    feed(conn, pack(*[[Op.DELIVER, sid, sid, message("m"), 1, None] for sid in (a, b, c)]))
    assert cancelled.got == [] and kept.got == [("deliver", c, "m", 1, None)]
    assert conn.consumers() == [kept]


def test_response_goes_to_the_reply_waiter(conn: ClientConnection, sink: Sink,
                                           feed: Feed) -> None:
    t1 = conn.request("rpc", b"\x01", 1, None, 5.0, "reply1")
    t2 = conn.request("rpc", b"\x02", 1, None, 5.0, "reply2")
    assert (t1, t2) == (1, 2)
    # rid 0: the broker answers a request with its RESPONSE only (no OK to wake us).
    assert sent(conn)[1] == [Op.SEND, 0, "rpc", b"\x02", 1, None, 5.0, 2]
    assert conn.pending == {}
    conn.forget_reply(t2)  # the requester gave up: a late reply is dropped
    feed(conn, pack([Op.RESPONSE, t1, msgpack.packb(42), 1, None],
                    [Op.RESPONSE, t2, b"", 0, None]))
    assert sink.completed_ == [("reply1", 42)]


def test_a_refused_request_fails_its_reply_waiter(conn: ClientConnection, sink: Sink,
                                                  feed: Feed) -> None:
    t1 = conn.request("rpc", b"", 0, None, 5.0, "reply1")
    t2 = conn.request("full", b"", 0, None, 5.0, "reply2")
    feed(conn, pack([Op.ERROR, 0, "queue-full", "queue 'full' is full", t2],
                    [Op.ERROR, 0, "queue-full", "a request given up on", 99]))
    [(waiter, error)] = sink.failed_[:1]
    assert waiter == "reply2" and isinstance(error, QueueFull)
    assert conn.replies.keys() == {t1}
    # An ERROR for a token nobody waits for (given up on) is an asynchronous error.
    assert [w for w, _ in sink.failed_[1:]] == [None] and conn.async_errors == 1


def test_an_unconfirmed_reply_is_a_rid_0_reply(conn: ClientConnection) -> None:
    sent(conn)
    conn.reply_nowait(7, b"\x2a", 1, None)
    assert sent(conn) == [[Op.REPLY, 0, 7, b"\x2a", 1, None]]


def test_an_undecodable_reply_fails_only_its_request(conn: ClientConnection, sink: Sink,
                                                     feed: Feed) -> None:
    token = conn.request("rpc", b"", 0, None, 5.0, "r")
    feed(conn, pack([Op.RESPONSE, token, b"\xc1", 1, None]))
    [(waiter, error)] = sink.failed_
    assert waiter == "r" and isinstance(error, BodyDecodeError)
    assert conn.error is None


def test_acks_batch_into_ack_many_before_the_next_frame(conn: ClientConnection,
                                                        sink: Sink) -> None:
    sink.flushes = 0
    for tag in (5, 6, 7):
        conn.ack_nowait(tag)
    assert sink.flushes == 1  # once per batch of writes, not per ack
    conn.credit(2, 10)
    conn.ack_nowait(8)
    assert sent(conn) == [[Op.ACK_MANY, [5, 6, 7]], [Op.CREDIT, 2, 10], [Op.ACK_MANY, [8]]]
    for tag in range(1, ACK_BATCH + 2):  # broker tags count from 1
        conn.ack_nowait(tag)
    frames = sent(conn)
    assert [len(f[1]) for f in frames] == [ACK_BATCH, 1]


def test_flush_is_wanted_once_per_take_and_again_past_the_threshold(sink: Sink) -> None:
    conn = ClientConnection(sink, flush_at=100)
    conn.hello(None)
    conn.publish("t", b"x", 0, None)
    assert sink.flushes == 1
    conn.publish("t", b"y" * 200, 0, None)  # past flush_at: wanted at once
    assert sink.flushes == 2
    conn.data_to_send()
    conn.publish("t", b"x", 0, None)
    assert sink.flushes == 3


def test_settle_frames(conn: ClientConnection) -> None:
    conn.settle(1, "ack", None, None, "a")
    conn.settle(2, "nack", 1.5, "why", "n")
    conn.settle(3, "reject", None, "bad", "r")
    conn.extend(4, 30.0, "e")
    conn.reply(5, b"ok", 0, None, "p")
    assert sent(conn) == [[Op.ACK, 1, 1], [Op.NACK, 2, 2, 1.5, "why"],
                          [Op.REJECT, 3, 3, "bad"], [Op.EXTEND, 4, 4, 30.0],
                          [Op.REPLY, 5, 5, b"ok", 0, None]]


def test_frame_above_max_frame_is_refused_and_nothing_is_written(
        conn: ClientConnection) -> None:
    with pytest.raises(FrameTooLarge, match="4096"):
        conn.send("q", b"x" * 5000, 0, None, None, None, "w")
    assert sent(conn) == [] and conn.pending == {}


def test_fail_returns_everything_to_fail_and_then_refuses_writes(
        conn: ClientConnection) -> None:
    stream = Stream()
    conn.consume("q", 1, lambda: stream, "consume")
    token = conn.request("rpc", b"", 0, None, 1.0, "reply")
    closed = ConnectionClosed("closed")
    waiters, receivers = conn.fail(closed)
    assert sorted(waiters) == ["consume", "reply"] and receivers == [stream]
    assert conn.state is State.DONE and token == 1
    with pytest.raises(ConnectionClosed):
        conn.publish("t", b"", 0, None)
    with pytest.raises(ConnectionClosed):
        conn.ack_nowait(1)
    conn.cancel(1)  # no CANCEL on a closed connection, and no error


def test_close_frame_is_remembered(conn: ClientConnection, feed: Feed) -> None:
    feed(conn, pack([Op.CLOSE, "slow-consumer", "too slow"]))
    assert conn.close_reason == ("slow-consumer", "too slow")


@pytest.mark.parametrize("frame", [
    [Op.OK],  # too short
    [Op.OK_RANGE, 1],
    [Op.ERROR, 1, "x"],
    [99, 1],  # unknown op
    [Op.DELIVER, 1, 2],
    [Op.HELLO, 1, {}],  # client-to-broker frame
])
def test_invalid_frames_raise_remote_protocol_error(conn: ClientConnection,
                                                    frame: list[Any]) -> None:
    stream = Stream()
    conn.consume("q", 1, lambda: stream, None)
    with pytest.raises(RemoteProtocolError, match="invalid frame"):
        conn.receive_data(pack(frame))


def test_malformed_msgpack_raises_remote_protocol_error(conn: ClientConnection) -> None:
    with pytest.raises(RemoteProtocolError):
        conn.receive_data(b"\xc1")


def test_a_partial_frame_waits_for_the_rest(conn: ClientConnection, sink: Sink) -> None:
    conn.call([Op.PING, 0], "p")
    data = pack([Op.OK, 1, "x" * 100])
    conn.receive_data(data[:50])
    assert sink.completed_ == []
    conn.receive_data(data[50:])
    assert sink.completed_ == [("p", "x" * 100)]


def test_unconfirmed_answers_batch_acks_and_write_rid_0(conn: ClientConnection) -> None:
    base = conn._tag_base
    conn.settle_nowait(base + 1, "ack")
    conn.settle_nowait(base + 2, "ack")
    conn.settle_nowait(base + 3, "nack", 1.5, "boom")
    conn.settle_nowait(base + 4, "reject", None, "bad")
    conn.settle_nowait(base + 5, "ack")
    # Acks asked for before the NACK go out before it: frame order is kept.
    assert sent(conn) == [[Op.ACK_MANY, [1, 2]], [Op.NACK, 0, 3, 1.5, "boom"],
                          [Op.REJECT, 0, 4, "bad"], [Op.ACK_MANY, [5]]]
    assert conn.pending == {}  # nothing waits for an answer


def test_a_refused_unconfirmed_answer_goes_to_its_consumer(
        conn: ClientConnection, sink: Sink, feed: Feed) -> None:
    first, second = Stream(), Stream()
    conn.consume("q", 4, lambda: first, "c1")
    conn.consume("r", 4, lambda: second, "c2")
    feed(conn, pack([Op.OK, 1, None], [Op.OK, 2, None],
                    [Op.DELIVER, 1, 41, message("a"), 1, None],
                    [Op.DELIVER, 2, 42, message("b"), 1, None]))
    conn.settle_nowait(first.got[0][1], "ack")
    conn.settle_nowait(second.got[0][1], "nack")
    sent(conn)
    # What the broker writes for a late ACK_MANY tag and a late rid-0 NACK.
    feed(conn, pack([Op.ERROR, 0, "lease-expired", "cannot ack delivery 41: its lease expired"],
                    [Op.ERROR, 0, "lease-unknown", "cannot nack delivery 42: no such lease"],
                    [Op.ERROR, 0, "lease-unknown", "cannot ack delivery 999: no such lease"],
                    [Op.ERROR, 0, "queue-full", "full"]))
    assert [(w, e.code) for w, e in sink.failed_] == [
        (first, "lease-expired"), (second, "lease-unknown"),
        (None, "lease-unknown"), (None, "queue-full")]  # unknown tag, not a lease error
    assert conn.async_errors == 4


def test_unconfirmed_answers_to_a_lost_lease_are_dropped(sink: Sink) -> None:
    conn = ClientConnection(sink, client_id="c")
    conn.hello("t")
    conn.receive_data(pack([Op.WELCOME, 1, {}]))
    stream = Stream()
    conn.consume("q", 4, lambda: stream, "c1")
    conn.receive_data(pack([Op.OK, 1, None], [Op.DELIVER, 1, 7, message("a"), 1, None],
                           [Op.DELIVER, 1, 8, message("b"), 1, None]))
    old_a, old_b = stream.got[0][1], stream.got[1][1]
    conn.data_to_send()
    conn.connection_lost()
    conn.settle_nowait(old_a, "ack")  # while down
    conn.hello("t")
    conn.receive_data(pack([Op.WELCOME, 1, {}]))
    conn.restore()
    conn.settle_nowait(old_b, "nack")  # on the new transport: never written there
    conn.settle_nowait(old_b, "reject")
    assert not any(f[0] in (Op.ACK_MANY, Op.NACK, Op.REJECT) for f in sent(conn))
    assert conn.lost_acks == 3
