"""Queue settings: the options of DECLARE, their checks and their defaults. No I/O."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from ..errors import InvalidName, InvalidOption, shown
from ..names import check_name, is_reserved
from ..protocol import Overflow

__all__ = [
    "DEFAULT_DEDUP_SIZE",
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_MAX_BUFFERED_BYTES_PER_UID",
    "DEFAULT_MAX_CONNECTIONS_PER_UID",
    "DEFAULT_MAX_PARKED_BYTES",
    "DEFAULT_MAX_PARKED_BYTES_PER_UID",
    "DEFAULT_MAX_PENDING_OUTPUT",
    "DEFAULT_MAX_QUEUED_BYTES_PER_UID",
    "DEFAULT_MAX_QUEUES_PER_UID",
    "DEFAULT_MAX_SUBSCRIPTIONS_PER_UID",
    "DEFAULT_MAX_UNACKED_PER_UID",
    "DLQ_SUFFIX",
    "MAX_DEDUP_SIZE",
    "MAX_RETRY_DELAYS",
    "MAX_SECONDS",
    "OVERFLOW_POLICIES",
    "SWEEP_INTERVAL",
    "BadOption",
    "QueueSettings",
    "check_dedup",
]

DLQ_SUFFIX = ".dlq"
OVERFLOW_POLICIES: tuple[str, ...] = get_args(Overflow)
# Upper bounds, one home for all: every number of seconds a client gives (SEND ttl and
# delay, queue ttl and ack_timeout, retry delays, NACK delay, EXTEND) is below MAX_SECONDS
# (~31 years: longer is a mistake, and would overflow a deadline's use as a timer), and a
# retry schedule has at most MAX_RETRY_DELAYS steps (the attempt past the last reuses it).
MAX_SECONDS = 1e9
MAX_RETRY_DELAYS = 64
# The deduplication window of resent SENDs (broker/dedup.py), per queue: ids accepted in
# the last DEFAULT_DEDUP_WINDOW seconds (NATS JetStream's default duplicate_window is
# 2 minutes), at most DEFAULT_DEDUP_SIZE of them (~15 MB per queue when full, see
# docs/performance.md); 0 for either turns deduplication off. Broker-wide settings
# (--dedup-window, --dedup-size), not DECLARE options.
DEFAULT_DEDUP_WINDOW = 120.0
DEFAULT_DEDUP_SIZE = 100_000
MAX_DEDUP_SIZE = 10_000_000


# Per-connection memory bounds (broker-wide settings, README "Defaults"). Output: bytes
# written to a connection and not read by it yet, over all its subscriptions and
# consumers; above it events are dropped and deliveries wait (redis'
# client-output-buffer-limit for pubsub is 32 MiB hard, 8 MiB soft; a few MiB is plenty
# for a client that reads).
DEFAULT_MAX_PENDING_OUTPUT = 4 * 1024 * 1024
# Parked sends (SENDs to a full "block" queue): bytes of their messages per connection,
# at which it is no longer read. Two maximal frames: one big producer still gets one send
# parked while the next is read.
DEFAULT_MAX_PARKED_BYTES = 32 * 1024 * 1024
# The same over all connections of one uid: a SEND that would park past it is refused
# with QuotaExceeded instead (1,024 connections at 32 MiB each would be 32 GiB).
DEFAULT_MAX_PARKED_BYTES_PER_UID = 256 * 1024 * 1024
# Frames still arriving: the bytes the broker buffers for the incomplete frame of each
# connection, over all connections of one uid. A read that takes the uid past it closes
# that connection with quota-exceeded (the shell counts; the core never sees a partial
# frame). 1 GiB: 64 frames of the largest size arriving at once.
DEFAULT_MAX_BUFFERED_BYTES_PER_UID = 1024**3
# Per uid (the peer credentials of its connections): what one user's clients may hold
# at once, so that one misbehaving client cannot exhaust the broker. A queue costs ~3 KB
# (1.05M DECLAREs had left 3 GB), a short pattern subscription ~1 KB: 10,000 of each is
# ~30 MB and ~10 MB. 1,024 connections: a burst of 1,000 clients connecting at once (as a
# test does) fits. One more of anything is refused with QuotaExceeded naming the quota.
DEFAULT_MAX_CONNECTIONS_PER_UID = 1024
DEFAULT_MAX_QUEUES_PER_UID = 10_000
DEFAULT_MAX_SUBSCRIPTIONS_PER_UID = 10_000
# Unacked messages: what the consumers of one uid may hold, counted as the sum of their
# prefetch (a consumer never holds more than its prefetch, so the bound is exact and
# checked once, at CONSUME, not per delivery). A lease costs ~300 bytes besides its
# message: a uid at 1,000,000 holds ~300 MB of them. 1,000 workers with prefetch 1,000
# fit.
DEFAULT_MAX_UNACKED_PER_UID = 1_000_000
# Queued bytes: what the messages in the queues one uid's clients created may hold,
# ready, delayed and leased, each counted as its encoded size plus ~64 bytes of the
# broker's own (queue_state.MESSAGE_OVERHEAD). A SEND past it is refused with
# QuotaExceeded (a dead letter never is: it was accepted once). 4 GiB: one user's
# backlog cannot take a 24 GiB machine's broker down.
DEFAULT_MAX_QUEUED_BYTES_PER_UID = 4 * 1024**3
# Queues created by use (SEND, CONSUME) and never declared are removed once they are
# empty, unused (no consumer, no parked send, no message sent, delivered or acked) and
# have no id left in their deduplication window, for a whole sweep interval: a sweep
# every SWEEP_INTERVAL seconds marks them, the next removes those still untouched.
SWEEP_INTERVAL = 60.0


BadOption = InvalidOption  # the broker's name for it


def check_dedup(window: float, size: int) -> tuple[float, int]:
    """The broker's deduplication settings, checked: ``0 <= window < 1e9`` seconds and
    ``0 <= size <= 10,000,000`` ids.

    Raises:
        BadOption: naming the setting.
    """
    if type(window) not in (int, float) or not 0 <= window < MAX_SECONDS:
        raise BadOption(f"dedup_window must be a number of seconds from 0 up to 1e9 (0: off);"
                        f" got {shown(window)}")
    if type(size) is not int or not 0 <= size <= MAX_DEDUP_SIZE:
        raise BadOption(f"dedup_size must be an int from 0 to {MAX_DEDUP_SIZE} (0: off);"
                        f" got {shown(size)}")
    return float(window), size


@dataclass(frozen=True, slots=True)
class QueueSettings:
    """A queue's declared behaviour. See README "Defaults" for the reasoning."""

    max_deliveries: int | None = 5  # None: unlimited attempts
    ack_timeout: float = 30.0
    retry_delays: tuple[float, ...] = ()
    dead_letter: str | None = None  # resolved to "<name>.dlq" by for_queue()
    ttl: float | None = None
    max_length: int | None = None
    overflow: str = "block"
    durable: bool = False  # journaled: survives a broker restart (needs a data dir)

    @classmethod
    def for_queue(cls, name: str, options: dict[str, Any] | None = None) -> QueueSettings:
        """Defaults for ``name`` overridden by ``options`` (a DECLARE options map).

        Dead-letter queues (names ending in ``.dlq``) default to unlimited deliveries and
        no dead-letter queue of their own, so dead letters never chain.

        Raises:
            BadOption: naming the option and what it accepts.
        """
        is_dlq = name.endswith(DLQ_SUFFIX)
        values: dict[str, Any] = {
            "max_deliveries": None if is_dlq else 5,
            "dead_letter": None if is_dlq else name + DLQ_SUFFIX,
        }
        for key, value in (options or {}).items():
            if key not in _OPTION_CHECKS:
                raise BadOption(f"unknown queue option {shown(key)};"
                                f" known: {sorted(_OPTION_CHECKS)}")
            values[key] = _OPTION_CHECKS[key](value)
        if values.get("dead_letter") == name:
            raise BadOption(f"queue {shown(name)} cannot be its own dead-letter queue")
        return cls(**values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_deliveries": self.max_deliveries,
            "ack_timeout": self.ack_timeout,
            "retry_delays": list(self.retry_delays),
            "dead_letter": self.dead_letter,
            "ttl": self.ttl,
            "max_length": self.max_length,
            "overflow": self.overflow,
            "durable": self.durable,
        }


def _positive_number(key: str, allow_none: bool) -> Callable[[Any], float | None]:
    def check(value: Any) -> float | None:
        if value is None and allow_none:
            return None
        if type(value) not in (int, float) or not 0 < value < MAX_SECONDS:
            raise BadOption(f"{key} must be a positive number of seconds below 1e9"
                            f"{' or None' if allow_none else ''}; got {shown(value)}")
        return float(value)

    return check


def _positive_int(key: str) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if value is None:
            return None
        if type(value) is not int or value <= 0:
            raise BadOption(f"{key} must be a positive int or None")
        return value

    return check


def _retry_delays(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list | tuple) or not all(
        type(v) in (int, float) and 0 <= v < MAX_SECONDS for v in value
    ):
        raise BadOption("retry_delays must be a list of numbers of seconds from 0 up to 1e9")
    if len(value) > MAX_RETRY_DELAYS:
        raise BadOption(f"retry_delays has {len(value)} steps; at most {MAX_RETRY_DELAYS}"
                        " (the last one repeats for every later retry)")
    return tuple(float(v) for v in value)


def _dead_letter(value: Any) -> str | None:
    if value is None:
        return None
    try:
        name = str(check_name(value, "dead_letter"))
    except InvalidName as exc:
        raise BadOption(str(exc)) from None
    if is_reserved(name):
        raise BadOption(f"dead_letter {shown(name)}: names starting with '$' are reserved")
    return name


def _bool(key: str) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        if type(value) is not bool:
            raise BadOption(f"{key} must be true or false")
        return value

    return check


def _overflow(value: Any) -> str:
    if value not in OVERFLOW_POLICIES:
        raise BadOption(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)};"
                        f" got {shown(value)}")
    return str(value)


_OPTION_CHECKS: dict[str, Callable[[Any], Any]] = {
    "max_deliveries": _positive_int("max_deliveries"),
    "ack_timeout": _positive_number("ack_timeout", allow_none=False),
    "retry_delays": _retry_delays,
    "dead_letter": _dead_letter,
    "ttl": _positive_number("ttl", allow_none=True),
    "max_length": _positive_int("max_length"),
    "overflow": _overflow,
    "durable": _bool("durable"),
}
