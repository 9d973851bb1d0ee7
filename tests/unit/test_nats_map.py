"""The NATS mapping without a server (aiobus/client/nats_map.py, nats_topics.py): each row
of docs/nats.md's table that is decided in the client."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiobus.broker.settings import QueueSettings
from aiobus.client import nats_map as nm
from aiobus.client.nats_topics import TopicWindow
from aiobus.errors import ConnectionLost, InvalidName, InvalidOption, QueueMismatch

NS = nm.Namespace("aiobus")


def test_urls_and_namespaces() -> None:
    assert nm.parse_url("nats://127.0.0.1:4222") == ("nats://127.0.0.1:4222", "aiobus", 1)
    assert nm.parse_url("nats://h:1/staging?replicas=3") == ("nats://h:1", "staging", 3)
    for bad in ("http://h:1", "nats://h:1/a.b", "nats://h:1/a b", "nats://h:1?replicas=9",
                "nats://h:1?replicas=x", "nats://h:1?other=1"):
        with pytest.raises(InvalidOption):
            nm.parse_url(bad)


def test_names_map_to_subjects_and_streams() -> None:
    assert NS.queue_subject("orders.eu") == "aiobus.q.orders.eu"
    assert NS.stream("orders.eu") == "aiobus_q_orders_eu"
    assert NS.topic_subject("weather.hk") == "aiobus.t.weather.hk"
    assert NS.topic_of("aiobus.t.weather.hk") == "weather.hk"
    assert NS.queue_of("aiobus.q.orders.eu") == "orders.eu"
    # Schedules of "a" never overlap those of "a.dlq" (one token each).
    assert NS.schedule_prefix("a") == "aiobus.s.a."
    assert NS.schedule_prefix("a.dlq") == "aiobus.s.a_dlq."


@given(st.lists(st.text(alphabet="ab._-~/é", min_size=1, max_size=6), min_size=2,
                max_size=2, unique=True))
def test_stream_names_are_one_to_one_and_safe(names: list[str]) -> None:
    a, b = (NS.stream(n) for n in names)
    assert a != b
    for stream in (a, b):
        assert not set(stream) & set(" .*>/\\\t")


def test_settings_become_stream_and_consumer_config() -> None:
    settings = QueueSettings.for_queue("jobs", {"max_length": 10, "overflow": "reject",
                                                "ack_timeout": 2.5, "max_deliveries": 3,
                                                "durable": True})
    config = nm.stream_config(NS, "jobs", settings, explicit=True, replicas=3)
    assert config["subjects"] == ["aiobus.q.jobs", "aiobus.s.jobs.>"]
    assert (config["retention"], config["storage"], config["num_replicas"]) == (
        "workqueue", "file", 3)
    assert (config["max_msgs"], config["discard"]) == (10, "new")
    assert config["allow_msg_ttl"] is True and config["allow_msg_schedules"] is False
    assert nm.settings_from_metadata("jobs", config["metadata"]) == (settings, True)
    consumer = nm.consumer_config(NS, "jobs", settings)
    assert (consumer["ack_wait"], consumer["max_deliver"]) == (2_500_000_000, 4)
    assert consumer["filter_subject"] == "aiobus.q.jobs"
    defaults = QueueSettings.for_queue("jobs")
    config = nm.stream_config(NS, "jobs", defaults, explicit=False)
    assert (config["max_msgs"], config["discard"], config["storage"]) == (-1, "old", "memory")
    assert config["allow_msg_schedules"] is True
    assert nm.consumer_config(NS, "jobs.dlq", QueueSettings.for_queue("jobs.dlq"))[
        "max_deliver"] == -1
    assert nm.settings_from_metadata("jobs", None) == (defaults, False)


def test_overflow_is_the_senders_and_mismatches_are_named() -> None:
    blocking = QueueSettings.for_queue("q", {"max_length": 1})  # "block": the default
    assert nm.overflow(blocking) == "block"  # the sender waits for room
    assert nm.overflow(QueueSettings.for_queue(
        "q", {"max_length": 1, "overflow": "dead-letter"})) == "dead-letter"
    assert nm.overflow(QueueSettings.for_queue("q")) is None  # no max_length
    assert nm.overflow(QueueSettings.for_queue(
        "q", {"max_length": 1, "overflow": "reject"})) is None  # the refusal is the error
    assert nm.is_full(b'{"error":{"code":503,"err_code":10077,"description":"x"}}')
    assert not nm.is_full(b'{"stream":"s","seq":1}')
    old = QueueSettings.for_queue("q", {"max_length": 10, "overflow": "reject"})
    new = QueueSettings.for_queue("q", {"max_length": 11, "overflow": "reject"})
    nm.check_mismatch("q", old, old)
    with pytest.raises(QueueMismatch, match="max_length: 10 != 11"):
        nm.check_mismatch("q", old, new)


def test_headers_round_trip_and_reserved_names() -> None:
    out = nm.encode_headers({"trace": "t"}, 1, "id-1", 0.3, "_INBOX.x.7")
    assert out == {"trace": "t", "Aiobus-Kind": "1", "Nats-Msg-Id": "id-1", "Nats-TTL": "1",
                   "Aiobus-Reply": "_INBOX.x.7"}
    assert nm.decode_headers(out) == ({"trace": "t"}, 1, "id-1", "_INBOX.x.7")
    assert nm.encode_headers(None, 0, None, None) is None
    assert nm.decode_headers(None) == (None, 0, None, None)
    for reserved in ("Nats-TTL", "nats-expected-stream", "Aiobus-Kind", "a:b", "a b", ""):
        with pytest.raises(InvalidName):
            nm.encode_headers({reserved: "x"}, 0, None, None)
    # A dead letter's Nats-Msg-Id is <stream>:<seq>; its id is the original's.
    assert nm.decode_headers({"Nats-Msg-Id": "s:5", "Aiobus-Id": "orig"})[2] == "orig"
    # What the server adds (a schedule's stored message) is not the application's.
    assert nm.decode_headers({"Nats-Scheduler": "x", "k": "v"})[0] == {"k": "v"}


def test_ttl_is_whole_seconds_at_least_one() -> None:
    assert [nm.ttl_header(t) for t in (0.3, 1.0, 1.2, 59.9)] == ["1", "1", "2", "60"]


def test_schedule_headers() -> None:
    out = nm.schedule_headers({"k": "v"}, 0, "id-9", 2.0, "2030-01-01T00:00:00.000000Z",
                              "aiobus.q.jobs")
    assert out["Nats-Schedule"] == "@at 2030-01-01T00:00:00.000000Z"
    assert out["Nats-Schedule-Target"] == "aiobus.q.jobs"
    assert out["Nats-Schedule-TTL"] == "2s" and "Nats-TTL" not in out
    assert out["Aiobus-Id"] == out["Nats-Msg-Id"] == "id-9" and out["k"] == "v"


def test_dead_letter_headers_are_the_brokers() -> None:
    headers = nm.dead_letter_headers({"trace": "t"}, queue="jobs", reason="rejected",
                                     attempts=2, now=1700000000.5, text="bad",
                                     consumer=(42, 1000))
    assert headers == {"trace": "t", "x-original-queue": "jobs", "x-dead-reason": "rejected",
                       "x-attempts": "2", "x-dead-time": "1700000000.500000",
                       "x-reason-text": "bad", "x-consumer-pid": "42",
                       "x-consumer-uid": "1000"}
    bare = nm.dead_letter_headers(None, queue="q", reason="max-deliveries", attempts=5,
                                  now=1.0, text=None, consumer=None)
    assert set(bare) == {"x-original-queue", "x-dead-reason", "x-attempts", "x-dead-time"}


def test_nak_delays_follow_the_schedule() -> None:
    plain = QueueSettings.for_queue("q")
    scheduled = QueueSettings.for_queue("q", {"retry_delays": [1, 5, 30]})
    assert nm.nak_delay(plain, 1, None) == 0.0
    assert [nm.nak_delay(scheduled, n, None) for n in (1, 2, 3, 4, 9)] == [1, 5, 30, 30, 30]
    assert nm.nak_delay(scheduled, 1, 0.25) == 0.25  # an explicit delay wins


def test_ack_subjects() -> None:
    v1 = "$JS.ACK.aiobus_q_jobs.aiobus.3.17.40.1700000000500000000.2"
    assert nm.parse_ack_subject(v1) == (17, 3, 1700000000.5)
    v2 = "$JS.ACK.hub.ACCHASH.aiobus_q_jobs.aiobus.1.9.9.1700000000000000000.0.tok"
    assert nm.parse_ack_subject(v2) == (9, 1, 1700000000.0)
    with pytest.raises(ValueError):
        nm.parse_ack_subject("_INBOX.abc")


def test_raw_headers_of_a_stored_message() -> None:
    raw = b"NATS/1.0\r\nAiobus-Kind: 1\r\nx: a:b\r\n\r\n"
    assert nm.parse_raw_headers(raw) == {"Aiobus-Kind": "1", "x": "a:b"}
    assert nm.parse_raw_headers(b"") is None


def test_queue_stats_from_stream_and_consumer_info() -> None:
    settings = QueueSettings.for_queue("jobs")
    stream = {"state": {"messages": 6, "first_seq": 5, "last_seq": 12, "num_deleted": 2}}
    consumer = {"num_pending": 3, "num_ack_pending": 2, "num_waiting": 1,
                "delivered": {"consumer_seq": 9}}
    stats = nm.queue_stats(stream, consumer, settings)
    assert (stats["ready"], stats["unacked"], stats["delayed"], stats["consumers"]) == (
        3, 2, 1, 1)
    assert (stats["sent"], stats["delivered"], stats["acked"]) == (12, 9, 6)
    assert stats["dead_lettered"] is None and stats["settings"] == settings.as_dict()
    assert nm.queue_stats({"state": {}}, None, settings)["ready"] == 0


# -- the topic window -----------------------------------------------------------------


class Target:
    def __init__(self) -> None:
        self.got: list[tuple[Any, int]] = []
        self.error: BaseException | None = None

    def _event(self, message: list[Any], dropped: int) -> None:
        self.got.append((message[2], dropped))

    def _fail(self, error: BaseException) -> None:
        self.error = error


def window(policy: str, max_pending: int) -> tuple[TopicWindow, Target]:
    target = Target()
    return TopicWindow("t", max_pending, policy, lambda: target), target


def test_drop_oldest_keeps_the_newest_and_says_how_many_went() -> None:
    win, target = window("drop-oldest", 5)
    for i in range(100):
        win.offer([None, "t", i, 0, None, 0.0])
    assert [body for body, _ in target.got] == [0, 1, 2, 3, 4]
    assert win.stats()["pending"] == 5 and win.stats()["dropped"] == 90
    win.credit(5)
    assert target.got[5:] == [(95, 90), (96, 0), (97, 0), (98, 0), (99, 0)]


def test_drop_newest_tells_the_next_message() -> None:
    win, target = window("drop-newest", 3)
    for i in range(20):
        win.offer([None, "t", i, 0, None, 0.0])
    win.credit(3)  # the first three consumed: the three waiting are handed over
    win.credit(3)
    assert [d for _, d in target.got] == [0] * 6
    win.offer([None, "t", 20, 0, None, 0.0])
    assert target.got[-1] == (20, 14)


def test_disconnect_fails_the_subscription() -> None:
    win, target = window("disconnect", 2)
    stopped: list[bool] = []
    win.on_disconnect = lambda: stopped.append(True)
    for i in range(5):
        win.offer([None, "t", i, 0, None, 0.0])
    assert isinstance(target.error, ConnectionLost) and target.error.code == "slow-consumer"
    assert stopped == [True] and len(target.got) == 2


def test_stream_config_metadata_is_json_of_the_settings() -> None:
    settings = QueueSettings.for_queue("x", {"retry_delays": [1, 2]})
    meta = nm.stream_config(NS, "x", settings, explicit=False)["metadata"]
    assert json.loads(meta["aiobus.settings"])["retry_delays"] == [1.0, 2.0]
    assert meta["aiobus.declared"] == "0"


def test_temporary_puback_errors_are_retried_refusals_are_not() -> None:
    def err(code: int, err_code: int, text: str) -> bytes:
        return json.dumps({"error": {"code": code, "err_code": err_code,
                                     "description": text}}).encode()

    assert nm.is_temporary(err(503, 10008, "JetStream system temporarily unavailable"))
    assert not nm.is_temporary(err(503, 10077, "maximum messages exceeded"))
    assert not nm.is_temporary(b'{"stream":"s","seq":1}')


def test_a_stored_message_becomes_a_peek_entry() -> None:
    assert nm.stored_time("2026-12-06T08:46:09.123456789Z") == pytest.approx(
        1796546769.123456789)
    assert nm.stored_time("2026-12-06T08:46:09Z") == 1796546769.0
    assert nm.stored_time(None) == nm.stored_time("garbage") == 0.0
    hdrs = b"NATS/1.0\r\nNats-Msg-Id: m1\r\nAiobus-Kind: 1\r\nx-dead-reason: rejected\r\n\r\n"
    stored = {"seq": 7, "time": "2026-12-06T08:46:09Z",
              "data": base64.b64encode(b"\x92\x01\x02").decode(),
              "hdrs": base64.b64encode(hdrs).decode()}
    assert nm.peeked_entry("q", "aiobus_q_q", stored, 2) == [
        ["m1", "q", b"\x92\x01", 1, {"x-dead-reason": "rejected"}, 1796546769.0], 3]
    bare = {"seq": 8, "data": ""}  # no headers: the id is <stream>:<seq>
    assert nm.peeked_entry("q", "aiobus_q_q", bare, 10) == [
        ["aiobus_q_q:8", "q", b"", 0, {}, 0.0], 0]


def test_a_request_on_core_nats_carries_its_id_kind_and_attempt() -> None:
    assert NS.request_subject("rpc.add") == "aiobus.r.rpc.add"
    assert nm.request_headers(None, 0, None, 1) is None  # its id is its reply subject
    first = nm.request_headers({"k": "v"}, 1, "c-1", 1)
    assert first == {"k": "v", nm.H_KIND: "1", nm.H_ID: "c-1"}
    assert nm.request_attempt(first) == 1 and nm.request_attempt(None) == 1
    again = nm.request_headers({"k": "v"}, 1, "c-1", 3)
    assert nm.request_attempt(again) == 3
    assert nm.decode_headers(again) == ({"k": "v"}, 1, "c-1", None)  # ours stay ours


def test_a_released_message_copy_goes_on_counting_from_its_attempt() -> None:
    headers = nm.release_headers({"k": "v"}, 1, "m1", "s:7:3", 12.5, 3, 1000.25)
    assert headers == {"k": "v", nm.H_KIND: "1", "Nats-Msg-Id": "s:7:3", "Nats-TTL": "13",
                       nm.H_ID: "m1", nm.H_TIME: "1000.25", nm.H_BEFORE: "2"}
    assert nm.decode_headers(headers) == ({"k": "v"}, 1, "m1", None)
    # Its first delivery is attempt 3 again (a release counts none), its second 4.
    assert nm.copied(headers, 1, 2000.0) == (3, 1000.25)
    assert nm.copied(headers, 2, 2000.0) == (4, 1000.25)
    first = nm.release_headers(None, 0, "m2", "s:8:1", None, 1, 5.0)
    assert nm.H_BEFORE not in first and nm.copied(first, 1, 9.0) == (1, 5.0)
    assert nm.remaining_ttl({"Nats-TTL": "10"}, 100.0, 104.0) == 6.0
    assert nm.remaining_ttl({"Nats-TTL": "10s"}, 100.0, 111.0) == -1.0
    assert nm.remaining_ttl({"k": "v"}, 100.0, 104.0) is None


def test_a_nack_with_a_delay_is_a_schedule_of_the_copy() -> None:
    copy = nm.release_headers(None, 0, "m1", "s:7:1", 40.0, 2, 1000.0)
    due = "2026-12-06T08:46:09.500000Z"
    out = nm.scheduled(copy, due, "aiobus.q.jobs", 10.0)
    assert out["Nats-Schedule"] == "@at " + due and "Nats-TTL" not in out
    assert out["Nats-Schedule-Target"] == "aiobus.q.jobs"
    assert out["Nats-Schedule-TTL"] == "10s"
    assert nm.copied(out, 1, 2000.0) == (2, 1000.0)  # the nack counted its attempt
