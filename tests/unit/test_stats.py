"""The statistics model: rates from two samples, and the Prometheus text, checked with
prometheus_client's own parser (what a scraper would read)."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aiobus.metrics import render
from aiobus.stats import STATS_VERSION, Sample, compute_rates

from .helpers import Driver


def _sample(at: float, queues: dict[str, Any], published: int) -> Sample:
    return Sample(at, {"queues": queues, "topics": {"published": published}})  # type: ignore[typeddict-item]


def test_rates_from_two_samples() -> None:
    before = _sample(10.0, {"q": {"sent": 5, "acked": 1, "delivered": 2, "dead_lettered": 0}},
                     3)
    after = _sample(12.0, {"q": {"sent": 25, "acked": 11, "delivered": 12, "dead_lettered": 0},
                           "new": {"sent": 4, "acked": 0, "delivered": 0, "dead_lettered": 0}},
                    1)
    rates = compute_rates(before, after)
    assert rates is not None and rates.interval == 2.0
    assert rates.queues["q"] == {"sent": 10.0, "delivered": 5.0, "acked": 5.0,
                                 "dead_lettered": 0.0}
    assert rates.queues["new"]["sent"] == 2.0  # created between the samples
    assert rates.published is None  # the counter went down: a restarted broker
    assert compute_rates(None, after) is None
    assert compute_rates(after, after) is None  # no interval


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the exposition, by name and labels (prometheus_client parses)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def q(queue: str, **labels: str) -> frozenset[tuple[str, str]]:
    return frozenset({"queue": queue, **labels}.items())


def test_the_prometheus_text_of_a_known_workload() -> None:
    """Through the core: 3 sent, one acked, one rejected (dead-lettered), one nacked and
    redelivered, held; one publish with no subscriber."""
    d = Driver()
    c = d.client("worker")
    c.declare("jobs", max_deliveries=5)
    for i in range(3):
        c.send("jobs", f"m{i}".encode())
    c.consume("jobs", prefetch=3)
    tags = [delivery.tag for delivery in c.deliveries()]
    c.ack(tags[0])
    c.reject(tags[1], "bad")
    c.nack(tags[2], 0, "again")
    assert [delivery.attempt for delivery in c.deliveries()] == [2]
    c.publish("news")
    stats = d.core.stats()
    assert stats["stats_version"] == STATS_VERSION
    jobs = stats["queues"]["jobs"]
    assert (jobs["unacked"], jobs["redelivered"], jobs["dead_lettered_reasons"]) == (
        1, 1, {"rejected": 1})
    got = samples(render(stats))
    expected = {
        ("aiobus_queue_messages_ready", q("jobs")): 0,
        ("aiobus_queue_messages_unacked", q("jobs")): 1,
        ("aiobus_queue_messages_delayed", q("jobs")): 0,
        ("aiobus_queue_consumers", q("jobs")): 1,
        ("aiobus_queue_messages_published_total", q("jobs")): 3,
        ("aiobus_queue_messages_delivered_total", q("jobs")): 4,
        ("aiobus_queue_messages_redelivered_total", q("jobs")): 1,
        ("aiobus_queue_messages_acked_total", q("jobs")): 1,
        ("aiobus_queue_messages_dead_lettered_total", q("jobs", reason="rejected")): 1,
        ("aiobus_queue_messages_ready", q("jobs.dlq")): 1,
        ("aiobus_queue_messages_published_total", q("jobs.dlq")): 1,
        ("aiobus_queues", frozenset()): 2,
        ("aiobus_topic_messages_published_total", frozenset()): 1,
        ("aiobus_topic_messages_unrouted_total", frozenset()): 1,
        ("aiobus_connections", frozenset()): 1,
    }
    assert {key: got.get(key) for key in expected} == expected
    assert not any(name.startswith("aiobus_process") for name, _ in got)  # no shell here


@pytest.mark.parametrize("name", ['we"ird\\q', "line\nbreak"])
def test_label_values_are_escaped(name: str) -> None:
    stats: Any = {"queues": {name: {"ready": 7, "dead_lettered_reasons": {}}}}
    assert samples(render(stats))[("aiobus_queue_messages_ready", q(name))] == 7
