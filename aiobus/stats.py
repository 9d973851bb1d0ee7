"""The broker's statistics: one typed model, and the one place rates are computed.

The broker core builds a :class:`BrokerStats` (``BrokerCore.stats``); STATS carries it
as a msgpack map with exactly these keys (docs/PROTOCOL.md §11), so the model is a set
of ``TypedDict`` s: what ``bus.stats()`` returns is the decoded map itself, with no
copy into objects, and indexing it by a key that does not exist is a type error.
``aiobus stat``, ``aiobus stat --prometheus``, the broker's ``/metrics`` and its web
dashboard all read this model; :func:`compute_rates` is the only code that turns two
samples of counters into rates, and :mod:`aiobus.metrics` the only code that names
them for Prometheus.

Counters (``sent``, ``delivered``, ...) only grow while the broker runs; gauges
(``ready``, ``unacked``, ...) go up and down. Both are kept by the core as things
happen: building the statistics reads numbers, it does not count leases or messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

__all__ = [
    "RATE_COUNTERS",
    "STATS_VERSION",
    "BrokerStats",
    "ConnectionStats",
    "JournalStats",
    "ProcessStats",
    "QueueRates",
    "QueueStats",
    "Rates",
    "Sample",
    "SubscriptionStats",
    "TopicStats",
    "compute_rates",
]

# The shape of the STATS result (PROTOCOL.md §11): 2 added ``stats_version``,
# ``process`` and the queue counters ``redelivered`` and ``dead_lettered_reasons``.
# Keys are only ever added within a version; a client ignores the ones it does not know.
STATS_VERSION = 2
# The queue counters rates are computed for.
RATE_COUNTERS = ("sent", "delivered", "acked", "dead_lettered")


class QueueStats(TypedDict):
    """One queue. Gauges: ``ready``, ``unacked`` (leases held, zombies excluded),
    ``delayed``, ``parked``, ``consumers``. Counters since the queue was created:
    ``sent``, ``delivered`` (redeliveries included), ``redelivered`` (deliveries of a
    message that failed before: attempt > 1), ``acked``, ``dead_lettered`` (moved to the
    dead-letter queue) and ``dead_lettered_reasons`` (the same by ``x-dead-reason``:
    ``rejected``, ``max-deliveries``, ``expired``, ``overflow``; reasons that never
    happened are absent), ``expired``, ``discarded``, ``duplicates``."""

    ready: int
    unacked: int
    delayed: int
    parked: int
    consumers: int
    sent: int
    delivered: int
    redelivered: int
    acked: int
    dead_lettered: int
    dead_lettered_reasons: dict[str, int]
    expired: int
    discarded: int
    duplicates: int
    settings: dict[str, Any]


class SubscriptionStats(TypedDict):
    """One topic subscription: ``pending`` events wait for credit, ``in_flight`` were
    sent and not yet credited back, ``dropped`` counts what its policy dropped."""

    conn: int
    sid: int
    pattern: str
    policy: str
    max_pending: int
    pending: int
    in_flight: int
    delivered: int
    dropped: int


class ConnectionStats(TypedDict):
    """One client connection, with its peer credentials (-1 where unknown)."""

    conn: int
    name: str | None
    pid: int
    uid: int
    gid: int
    consumers: int
    subscriptions: int
    parked: int
    parked_bytes: int


class TopicStats(TypedDict):
    published: int  # PUBLISHes from clients (presence events not counted)
    unrouted: int  # of those, how many matched no subscription
    subscriptions: list[SubscriptionStats]  # at most ``limit``
    subscriptions_total: int


class JournalStats(TypedDict):
    segments: int
    bytes: int  # on disk and buffered
    live_messages: int
    live_bytes: int
    pending: int  # buffered, not yet written


class ProcessStats(TypedDict):
    """The broker process, as its shell measures it (the core has no clock and no
    I/O): ``rss_bytes`` its resident memory, ``loop_lag`` the seconds by which its
    event loop last ran a timer late (a busy or blocked loop), ``started`` when it
    started, epoch seconds."""

    pid: int
    rss_bytes: int
    loop_lag: float
    started: float


class BrokerStats(TypedDict):
    """The STATS result (docs/PROTOCOL.md §11)."""

    stats_version: int
    server: str
    time: float  # broker time, epoch seconds
    queues: dict[str, QueueStats]  # sorted by name, at most ``limit``
    queues_total: int
    queues_next: str | None
    topics: TopicStats
    connections: list[ConnectionStats]
    connections_total: int
    journal: JournalStats | None
    process: ProcessStats | None  # None: an embedded core without a shell that measures


class QueueRates(TypedDict):
    """Messages per second of one queue; None where a counter went down (a restart)."""

    sent: float | None
    delivered: float | None
    acked: float | None
    dead_lettered: float | None


@dataclass(frozen=True, slots=True)
class Sample:
    """Statistics and the monotonic time (any clock, seconds) they were taken at."""

    at: float
    stats: BrokerStats


@dataclass(frozen=True, slots=True)
class Rates:
    """Rates between two samples: ``interval`` seconds apart."""

    interval: float
    published: float | None
    queues: dict[str, QueueRates]

    def as_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "published": self.published,
                "queues": self.queues}


def _per_second(new: int | None, old: int | None, interval: float) -> float | None:
    delta = (new or 0) - (old or 0)
    return None if delta < 0 else delta / interval


def compute_rates(previous: Sample | None, current: Sample) -> Rates | None:
    """Messages per second between two samples, or None without a usable interval.

    A queue absent from ``previous`` counts from zero (it was created in between); a
    counter that went down (the broker restarted between the samples) has no rate
    rather than a negative one.

    Example::

        first = Sample(time.monotonic(), await bus.stats())
        await asyncio.sleep(1)
        rates = compute_rates(first, Sample(time.monotonic(), await bus.stats()))
    """
    if previous is None:
        return None
    interval = current.at - previous.at
    if interval <= 0:
        return None
    old_queues = previous.stats.get("queues", {})
    queues: dict[str, QueueRates] = {}
    for name, queue in current.stats.get("queues", {}).items():
        old: Any = old_queues.get(name, {})
        queues[name] = {
            "sent": _per_second(queue.get("sent"), old.get("sent"), interval),
            "delivered": _per_second(queue.get("delivered"), old.get("delivered"), interval),
            "acked": _per_second(queue.get("acked"), old.get("acked"), interval),
            "dead_lettered": _per_second(queue.get("dead_lettered"), old.get("dead_lettered"),
                                         interval),
        }
    published = _per_second(current.stats.get("topics", {}).get("published"),
                            previous.stats.get("topics", {}).get("published"), interval)
    return Rates(interval, published, queues)
