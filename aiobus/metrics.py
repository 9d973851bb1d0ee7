"""The broker's statistics in the Prometheus text exposition format (version 0.0.4).

One function, :func:`render`, turns a :class:`aiobus.stats.BrokerStats` into the text
that the broker's ``/metrics`` serves and ``aiobus stat --prometheus`` prints (for
node_exporter's textfile collector). Pure: no I/O, no clock, no dependency.

Names and labels follow rabbitmq_prometheus where it has an equivalent
(``rabbitmq_queue_messages_ready{queue=...}`` becomes ``aiobus_queue_messages_ready``):
gauges are what is there now, counters end in ``_total`` and only grow while the broker
runs (a restart starts them again at 0, which Prometheus' ``rate()`` handles). A queue's
``dead_lettered`` counter is split by the ``reason`` label, the ``x-dead-reason`` header
of the dead letters (``rejected``, ``max-deliveries``, ``expired``, ``overflow``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .stats import BrokerStats

__all__ = ["CONTENT_TYPE", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric, type, help, the QueueStats key it reads)
_QUEUE_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("aiobus_queue_messages_ready", "gauge", "Messages ready for delivery", "ready"),
    ("aiobus_queue_messages_unacked", "gauge",
     "Messages delivered and not yet acknowledged (leases held)", "unacked"),
    ("aiobus_queue_messages_delayed", "gauge",
     "Messages waiting for a retry delay or a scheduled delivery time", "delayed"),
    ("aiobus_queue_messages_parked", "gauge",
     "Sends waiting for room in a full queue with overflow=block", "parked"),
    ("aiobus_queue_consumers", "gauge", "Consumers of the queue", "consumers"),
    ("aiobus_queue_messages_published_total", "counter",
     "Messages accepted into the queue (dead letters arriving included)", "sent"),
    ("aiobus_queue_messages_delivered_total", "counter",
     "Messages delivered to consumers (redeliveries included)", "delivered"),
    ("aiobus_queue_messages_redelivered_total", "counter",
     "Deliveries of messages that had failed before (attempt > 1)", "redelivered"),
    ("aiobus_queue_messages_acked_total", "counter",
     "Messages acknowledged (ack or reply)", "acked"),
    ("aiobus_queue_messages_expired_total", "counter", "Messages whose TTL passed",
     "expired"),
    ("aiobus_queue_messages_discarded_total", "counter",
     "Messages dropped: dead letters of a queue without a dead-letter queue, and"
     " expired requests", "discarded"),
    ("aiobus_queue_messages_duplicates_total", "counter",
     "Resent messages confirmed without being queued again", "duplicates"),
)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{key}="{_escape(str(value))}"'
                          for key, value in labels.items()) + "}"


def _number(value: float | None) -> str:
    if value is None:
        return "NaN"
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str,
               samples: Iterable[tuple[str, float | None]]) -> None:
        """One metric family: its HELP and TYPE lines, then ``(labels, value)`` samples."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        self.lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    def single(self, name: str, kind: str, help_text: str, value: float | None) -> None:
        self.family(name, kind, help_text, [("", value)])


def render(stats: BrokerStats) -> str:
    """The statistics as Prometheus text (ends with a newline).

    Example::

        text = aiobus.metrics.render(await bus.stats())
    """
    out = _Writer()
    queues = stats.get("queues", {})
    for name, kind, help_text, key in _QUEUE_METRICS:
        out.family(name, kind, help_text,
                   [(_labels(queue=queue), counts.get(key, 0))  # type: ignore[misc]
                    for queue, counts in queues.items()])
    out.family("aiobus_queue_messages_dead_lettered_total", "counter",
               "Messages moved to the dead-letter queue, by reason", [
        (_labels(queue=name, reason=reason), count)
        for name, queue in queues.items()
        for reason, count in sorted(queue.get("dead_lettered_reasons", {}).items())])
    out.single("aiobus_queues", "gauge", "Queues on the broker",
               stats.get("queues_total", len(queues)))
    topics = stats.get("topics", {})
    out.single("aiobus_topic_messages_published_total", "counter",
               "Messages published to topics by clients", topics.get("published", 0))
    out.single("aiobus_topic_messages_unrouted_total", "counter",
               "Published messages that matched no subscription", topics.get("unrouted", 0))
    subs = topics.get("subscriptions", [])
    out.single("aiobus_subscriptions", "gauge", "Topic subscriptions",
               topics.get("subscriptions_total", len(subs)))

    def sub_labels(sub: Any) -> str:
        return _labels(conn=sub.get("conn"), sid=sub.get("sid"), pattern=sub.get("pattern"))

    out.family("aiobus_subscription_messages_pending", "gauge",
               "Events waiting for flow-control credit",
               [(sub_labels(s), s.get("pending", 0)) for s in subs])
    out.family("aiobus_subscription_messages_delivered_total", "counter",
               "Events sent to the subscriber", [(sub_labels(s), s.get("delivered", 0))
                                                 for s in subs])
    out.family("aiobus_subscription_messages_dropped_total", "counter",
               "Events dropped by the subscription's policy",
               [(sub_labels(s), s.get("dropped", 0)) for s in subs])
    out.single("aiobus_connections", "gauge", "Client connections",
               stats.get("connections_total", len(stats.get("connections", []))))
    journal = stats.get("journal")
    if journal is not None:
        out.single("aiobus_journal_bytes", "gauge", "Bytes in the journal (on disk and"
                   " buffered)", journal.get("bytes", 0))
        out.single("aiobus_journal_segments", "gauge", "Journal segment files",
                   journal.get("segments", 0))
        out.single("aiobus_journal_messages_live", "gauge",
                   "Durable messages the journal holds", journal.get("live_messages", 0))
    process = stats.get("process")
    if process is not None:
        out.single("aiobus_process_resident_memory_bytes", "gauge",
                   "Resident memory of the broker process", process.get("rss_bytes", 0))
        out.single("aiobus_event_loop_lag_seconds", "gauge",
                   "How late the broker's event loop last ran a timer (busy or blocked)",
                   process.get("loop_lag", 0.0))
        out.single("aiobus_process_start_time_seconds", "gauge",
                   "When the broker started, epoch seconds", process.get("started", 0.0))
    return "\n".join(out.lines) + "\n"
