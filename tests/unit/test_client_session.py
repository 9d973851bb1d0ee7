"""The client connection as a session that outlives its transport (reconnecting).

Sans I/O, as test_client_connection.py: frames in, frames out, no socket, loop or clock.
Each test drives one loss: ``connection_lost()``, a new HELLO, a WELCOME fed whole or
byte by byte, then ``restore()``, and reads what the session writes again.
"""

from __future__ import annotations

from typing import Any

import pytest

from aiobus.client.connection import ClientConnection, State
from aiobus.errors import ConnectionLost, LeaseError
from aiobus.protocol import Op

from .test_client_connection import Feed, Sink, Stream, message, pack, sent

TAG_SPAN = 2**40


class FailingStream(Stream):
    def __init__(self) -> None:
        super().__init__()
        self.errors: list[Any] = []


class SessionSink(Sink):
    def __init__(self) -> None:
        super().__init__()
        self.stream_errors: list[tuple[Any, Any]] = []

    def stream_failed(self, receiver: Any, error: Any) -> None:
        self.stream_errors.append((receiver, error))


@pytest.fixture
def sink() -> SessionSink:
    return SessionSink()


def open_session(sink: SessionSink, *, dedup: bool = True, hold: int = 1 << 20
                 ) -> ClientConnection:
    conn = ClientConnection(sink, client_id="c0ffee", hold_bytes=hold)
    conn.hello("t")
    assert sent(conn) == [[Op.HELLO, 1, {"name": "t", "client_id": "c0ffee"}]]
    info: dict[str, Any] = {"max_frame": 1 << 20}
    if dedup:
        info["dedup"] = True
    conn.receive_data(pack([Op.WELCOME, 1, info]))
    return conn


def reconnect(conn: ClientConnection, feed: Feed, *, dedup: bool = True) -> list[Any]:
    """A new transport: HELLO, WELCOME, restore. Returns what the session wrote."""
    conn.hello("t")
    assert sent(conn) == [[Op.HELLO, 1, {"name": "t", "client_id": "c0ffee"}]]
    assert conn.state is State.DISCONNECTED  # until restored
    info: dict[str, Any] = {"max_frame": 1 << 20}
    if dedup:
        info["dedup"] = True
    feed(conn, pack([Op.WELCOME, 1, info]))
    conn.restore()
    assert conn.state is State.OPEN
    return sent(conn)


def test_unanswered_sends_are_written_again_with_their_rid_and_seq(sink: SessionSink,
                                                                   feed: Feed) -> None:
    conn = open_session(sink)
    first = conn.send("q", b"a", 0, None, None, None, waiter="a")
    conn.send("q", b"b", 0, None, None, 2.0, waiter="b")
    conn.send("q", b"c", 0, None, None, None, waiter="c")
    frames = sent(conn)
    assert frames == [[Op.SEND, 1, "q", b"a", 0, None, None, None, None, 1],
                      [Op.SEND, 2, "q", b"b", 0, None, None, None, 2.0, 2],
                      [Op.SEND, 3, "q", b"c", 0, None, None, None, None, 3]]
    assert first == "a"
    feed(conn, pack([Op.OK, 2, None]))  # b confirmed, a and c not
    assert conn.connection_lost() == []  # nothing to fail: sends are carried over
    assert conn.state is State.DISCONNECTED
    again = reconnect(conn, feed)
    assert again == [frames[0], frames[2]]  # the same bytes: the broker deduplicates
    feed(conn, pack([Op.OK_RANGE, 1, 3]))
    assert sorted(w for w, _ in sink.completed_) == ["a", "b", "c"]
    assert conn.pending == {}


def test_sends_while_disconnected_wait_in_the_resend_buffer(sink: SessionSink,
                                                            feed: Feed) -> None:
    conn = open_session(sink)
    sent(conn)
    conn.connection_lost()
    conn.send("q", b"x", 0, None, None, None, waiter="x")
    assert conn.data_to_send() == []  # nothing to write to: held
    assert reconnect(conn, feed) == [[Op.SEND, 1, "q", b"x", 0, None, None, None, None, 1]]
    feed(conn, pack([Op.OK, 1, None]))
    assert sink.completed_ == [("x", None)]


def test_seqs_go_on_across_transports(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    conn.send("q", b"a", 0, None, None, None, waiter="a")
    conn.connection_lost()
    reconnect(conn, feed)
    conn.send("q", b"b", 0, None, None, None, waiter="b")
    assert sent(conn)[-1][-1] == 2


def test_without_broker_dedup_sends_carry_no_seq_and_are_not_resent(sink: SessionSink,
                                                                    feed: Feed) -> None:
    conn = open_session(sink, dedup=False)
    conn.send("q", b"a", 0, None, None, None, waiter="a")
    assert sent(conn) == [[Op.SEND, 1, "q", b"a", 0, None, None, None]]
    lost = conn.connection_lost()
    assert lost == ["a"]  # a resend could duplicate: the caller hears ConnectionLost
    with pytest.raises(ConnectionLost):
        conn.send("q", b"b", 0, None, None, None, waiter="b")


def test_what_cannot_be_repeated_is_given_back(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    conn.request("rpc", b"?", 0, None, 5.0, "reply")
    conn.call([Op.PURGE, 0, "q"], "purge")
    conn.call([Op.DELETE, 0, "q", False], "delete")
    conn.settle(7, "ack", None, None, "ack")
    conn.extend(7, 10.0, "extend")
    conn.call([Op.STATS, 0], "stats", resend=True)
    conn.call([Op.PING, 0], "ping", resend=True)
    sent(conn)
    lost = conn.connection_lost()
    assert sorted(lost) == ["ack", "delete", "extend", "purge", "reply"]
    again = reconnect(conn, feed)
    assert [f[0] for f in again] == [Op.STATS, Op.PING]
    assert conn.replies == {}


def test_declared_queues_are_declared_again_first(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    conn.declared("jobs", {"durable": True})
    conn.declared("other", {})
    conn.declared("jobs", {"durable": True, "ttl": 5})  # the last declare wins
    conn.deleted("other")
    conn.send("jobs", b"a", 0, None, None, None, waiter="a")
    sent(conn)
    conn.connection_lost()
    again = reconnect(conn, feed)
    assert again[0] == [Op.DECLARE, 0, "jobs", {"durable": True, "ttl": 5}]
    assert again[1][0] == Op.SEND


def test_streams_start_again_under_their_stream_id(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    consumer, subscription = Stream(), Stream()
    sid_c = conn.consume("jobs", 8, lambda: consumer, "c-started")
    sid_s = conn.subscribe("news.>", 16, "drop-oldest", lambda: subscription, "s-started")
    feed(conn, pack([Op.OK, 1, None]))  # the consumer started; the subscription not yet
    sent(conn)
    conn.connection_lost()
    again = reconnect(conn, feed)
    assert again == [[Op.CONSUME, 3, sid_c, "jobs", 8],
                     [Op.SUBSCRIBE, 4, sid_s, "news.>", 16, "drop-oldest"]]
    # The subscription's subscribe() still waits: its waiter moved to the new rid.
    feed(conn, pack([Op.OK, 3, None], [Op.OK, 4, None]))
    assert [w for w, _ in sink.completed_ if isinstance(w, str)] == ["c-started", "s-started"]
    # Frames for the same sids reach the same receivers.
    feed(conn, pack([Op.EVENT, sid_s, message("e1"), 0]))
    assert subscription.got == [("event", "e1", 0)]


def test_a_passive_consumer_is_passive_until_it_started(sink: SessionSink,
                                                       feed: Feed) -> None:
    conn = open_session(sink)
    started, waiting = Stream(), Stream()
    sid_a = conn.consume("a", 8, lambda: started, "a-started", create=False)
    sid_b = conn.consume("b", 8, lambda: waiting, "b-started", create=False)
    assert sent(conn) == [[Op.CONSUME, 1, sid_a, "a", 8, True],
                          [Op.CONSUME, 2, sid_b, "b", 8, True]]
    feed(conn, pack([Op.OK, 1, None]))  # "a" existed; "b" not answered yet
    conn.connection_lost()
    # After a broker restart "a" may be gone: its consumer keeps it, as any consumer
    # does. "b" still waits to hear whether its queue exists: still passive.
    assert reconnect(conn, feed) == [[Op.CONSUME, 3, sid_a, "a", 8],
                                     [Op.CONSUME, 4, sid_b, "b", 8, True]]


def test_a_stream_the_broker_refuses_again_is_failed(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    consumer = Stream()
    conn.consume("jobs", 8, lambda: consumer, "started")
    feed(conn, pack([Op.OK, 1, None]))
    conn.connection_lost()
    again = reconnect(conn, feed)
    feed(conn, pack([Op.ERROR, again[0][1], "forbidden", "not you"]))
    assert [(r, e.code) for r, e in sink.stream_errors] == [(consumer, "forbidden")]


def test_a_cancelled_stream_is_not_restarted(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    sid = conn.consume("jobs", 8, Stream, "started")
    feed(conn, pack([Op.OK, 1, None]))
    conn.connection_lost()
    conn.cancel(sid)  # while disconnected: nothing to write, nothing to restart
    assert conn.data_to_send() == []
    assert reconnect(conn, feed) == []


def test_leases_of_a_lost_transport_are_refused(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    consumer = Stream()
    sid = conn.consume("jobs", 8, lambda: consumer, "started")
    feed(conn, pack([Op.OK, 1, None], [Op.DELIVER, sid, 1, message("m1"), 1, None]))
    old_lease = consumer.got[-1][1]
    assert old_lease == 1  # the first transport's tags are the broker's
    sent(conn)
    conn.connection_lost()
    with pytest.raises(LeaseError) as info:
        conn.check_lease(old_lease)
    assert info.value.code == "lease-lost"
    conn.ack_nowait(old_lease)  # dropped, counted
    assert conn.lost_acks == 1
    reconnect(conn, feed)
    # The broker numbers this transport's leases from 1 again: the same tag, a new lease.
    feed(conn, pack([Op.DELIVER, sid, 1, message("m1"), 2, None]))
    new_lease = consumer.got[-1][1]
    assert new_lease == 1 + TAG_SPAN
    with pytest.raises(LeaseError):
        conn.settle(old_lease, "ack", None, None, "late")
    conn.ack_nowait(old_lease)
    conn.ack_nowait(new_lease)
    conn.settle(new_lease, "nack", 1.0, "why", "nack")
    assert sent(conn) == [[Op.ACK_MANY, [1]], [Op.NACK, 3, 1, 1.0, "why"]]
    assert conn.lost_acks == 2


def test_publishes_are_held_up_to_the_bound_then_dropped(sink: SessionSink,
                                                         feed: Feed) -> None:
    conn = open_session(sink, hold=100)
    sid = conn.subscribe("t", 4, "drop-oldest", Stream, "s")
    feed(conn, pack([Op.OK, 1, None]))
    sent(conn)
    conn.connection_lost()
    conn.credit(sid, 3)  # a new subscription starts with full credit: dropped
    for i in range(10):
        conn.publish("t", bytes(30), 0, {"i": str(i)})
    conn.send_unconfirmed("q", b"u", 0, None, None, None)
    assert conn.data_to_send() == []
    again = reconnect(conn, feed)
    assert again[0][0] == Op.SUBSCRIBE  # streams first, then what was held, in order
    held = again[1:]
    assert [f[-1]["i"] for f in held if f[0] == Op.PUBLISH] == ["0", "1"]
    assert held[-1] == [Op.SEND, 0, "q", b"u", 0, None, None, None]
    assert conn.dropped == 8


def test_partial_frame_of_the_lost_transport_is_discarded(sink: SessionSink,
                                                          feed: Feed) -> None:
    conn = open_session(sink)
    conn.receive_data(pack([Op.OK, 99, "never finished"])[:-3])
    conn.connection_lost()
    reconnect(conn, feed)  # the WELCOME decodes cleanly
    assert conn.welcomed


def test_a_lost_dial_during_the_handshake_keeps_the_session(sink: SessionSink,
                                                            feed: Feed) -> None:
    conn = open_session(sink)
    conn.send("q", b"a", 0, None, None, None, waiter="a")
    sent(conn)
    conn.connection_lost()
    conn.hello("t")
    assert conn.connection_lost() == []  # a dial failed: lose nothing more
    again = reconnect(conn, feed)
    assert again == [[Op.SEND, 1, "q", b"a", 0, None, None, None, None, 1]]


def test_abandoned_send_is_not_written_again(sink: SessionSink, feed: Feed) -> None:
    conn = open_session(sink)
    conn.send("q", b"a", 0, None, None, None, waiter="a")
    conn.abandon(1)
    conn.connection_lost()
    assert reconnect(conn, feed) == []


def test_fail_forgets_the_session(sink: SessionSink) -> None:
    conn = open_session(sink)
    conn.send("q", b"a", 0, None, None, None, waiter="a")
    conn.connection_lost()
    conn.publish("t", b"p", 0, None)
    waiters, _ = conn.fail(ConnectionLost("gave up"))
    assert waiters == ["a"]
    with pytest.raises(ConnectionLost, match="gave up"):
        conn.publish("t", b"p", 0, None)


def test_connection_lost_needs_a_session() -> None:
    conn = ClientConnection(Sink())
    with pytest.raises(RuntimeError):
        conn.connection_lost()
