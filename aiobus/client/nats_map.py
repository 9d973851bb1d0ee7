"""How aiobus's model maps onto NATS and JetStream, without I/O (docs/nats.md).

The NATS backend (``client/nats.py``) is the asyncio shell; everything it decides that
does not need a socket or a clock is here, so that unit tests check it with no server:

* names: a queue ``q`` is the JetStream stream ``<ns>_q_<q escaped>`` on the subject
  ``<ns>.q.<q>`` with one durable pull consumer ``aiobus``; a topic ``t`` is the core
  subject ``<ns>.t.<t>``. ``<ns>`` is the namespace, ``aiobus`` unless the URL's path
  names another (``nats://host:4222/staging``), so deployments can share a cluster.
* settings: ``declare_queue`` options, checked and defaulted by the broker's own table
  (``broker/settings.py``: one home for defaults), become stream and consumer config;
  the settings themselves ride in the stream's metadata so a second declare is checked.
* headers: aiobus's body kind, message id and reply inbox travel as NATS headers next
  to the application's; dead letters get the ``x-dead-*`` headers the local broker
  writes.
* the retry schedule (nak delays), the ack subject's metadata, and the statistics.
"""

from __future__ import annotations

import base64
import calendar
import json
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

from ..broker.settings import MAX_SECONDS, QueueSettings
from ..errors import InvalidName, InvalidOption, NoSuchQueue, QueueMismatch, shown

__all__ = [
    "CONSUMER", "DEFAULT_NAMESPACE", "H_ATTEMPT", "H_BEFORE", "H_ID", "H_KIND", "H_REPLY",
    "H_TIME", "Namespace", "check_mismatch", "check_seconds",
    "consumer_config", "copied", "dead_letter_headers", "decode_headers", "encode_headers",
    "is_full", "is_temporary", "nak_delay", "no_such_queue", "overflow", "parse_ack_subject",
    "parse_raw_headers", "parse_url", "peeked_entry", "queue_stats", "release_headers",
    "remaining_ttl", "request_attempt", "request_headers", "schedule_headers", "scheduled",
    "settings_from_metadata", "stored_time", "stream_config", "ttl_header",
]

DEFAULT_NAMESPACE: Final = "aiobus"
CONSUMER: Final = "aiobus"  # the one durable pull consumer of each queue's stream
META_SETTINGS: Final = "aiobus.settings"  # stream metadata: the declared settings, JSON
META_EXPLICIT: Final = "aiobus.declared"  # "1": declared; "0": created by use
# aiobus's own fields as NATS headers; the application's headers travel beside them.
H_KIND: Final = "Aiobus-Kind"  # protocol.BodyKind when not raw bytes
H_ID: Final = "Aiobus-Id"  # a dead letter's original id (its Nats-Msg-Id is <stream>:<seq>)
H_REPLY: Final = "Aiobus-Reply"  # a request's reply inbox
H_ATTEMPT: Final = "Aiobus-Attempt"  # a core NATS request's attempt, when above 1
# A released message's copy (nats_consume.py): the attempts counted before it was stored,
# and the original's time stored (epoch seconds).
H_BEFORE: Final = "Aiobus-Attempts-Before"
H_TIME: Final = "Aiobus-Time"
H_MSG_ID: Final = "Nats-Msg-Id"
H_TTL: Final = "Nats-TTL"
_OURS: Final = frozenset({H_KIND, H_ID, H_REPLY, H_ATTEMPT, H_BEFORE, H_TIME, H_MSG_ID,
                          H_TTL})
# Per-message TTL is whole seconds on the server (ADR-43: at least 1 s).
MIN_TTL: Final = 1
_BAD_KEY: Final = frozenset(": \t\r\n")
_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")


def parse_url(url: str) -> tuple[str, str, int]:
    """``nats://host:port[/namespace][?replicas=N]`` -> (server URL for nats-py,
    namespace, replicas of the queues' streams this client creates: 1 by default, 3 or 5
    in a cluster).

    Raises:
        InvalidOption: not a nats:// URL, a bad namespace or replicas.
    """
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    try:
        replicas = int(query.pop("replicas", ["1"])[-1])
    except ValueError:
        replicas = 0
    if not 1 <= replicas <= 5 or query:
        raise InvalidOption(f"NATS URL {shown(url)}: the only option is replicas=1..5")
    if parts.scheme not in ("nats", "tls"):
        raise InvalidOption(f"not a NATS URL: {shown(url)}; expected nats://host:port")
    namespace = parts.path.strip("/") or DEFAULT_NAMESPACE
    if not namespace.replace("-", "").replace("_", "").isalnum():
        raise InvalidOption(f"NATS namespace {shown(namespace)} (the URL's path) must be"
                            " letters, digits, '-' or '_'")
    server = f"{parts.scheme}://{parts.netloc}"
    return server, namespace, replicas


def _escape(name: str) -> str:
    """A stream-name-safe, one-to-one spelling of a queue name: letters, digits and '-'
    stay, '.' becomes '_', anything else (including '_') ``~<hex>~``."""
    out = []
    for ch in name:
        if ch in _SAFE:
            out.append(ch)
        elif ch == ".":
            out.append("_")
        else:
            out.append(f"~{ord(ch):x}~")
    return "".join(out)


class Namespace:
    """Subjects and stream names of one namespace."""

    __slots__ = ("name", "queue_prefix", "request_prefix", "stream_prefix", "topic_prefix")

    def __init__(self, name: str = DEFAULT_NAMESPACE) -> None:
        self.name = name
        self.queue_prefix = f"{name}.q."
        self.topic_prefix = f"{name}.t."
        self.request_prefix = f"{name}.r."
        self.stream_prefix = f"{_escape(name)}_q_"

    def queue_subject(self, queue: str) -> str:
        return self.queue_prefix + queue

    def stream(self, queue: str) -> str:
        return self.stream_prefix + _escape(queue)

    def schedule_prefix(self, queue: str) -> str:
        """Where delayed sends of ``queue`` wait: ``<ns>.s.<queue escaped>.<message id>``
        (the queue as one token, so that ``a``'s never overlap ``a.dlq``'s)."""
        return f"{self.name}.s.{_escape(queue)}."

    def request_subject(self, queue: str) -> str:
        """Where requests to ``queue`` go on core NATS (``nats_requests.py``)."""
        return self.request_prefix + queue

    def topic_subject(self, topic: str) -> str:
        return self.topic_prefix + topic

    def topic_of(self, subject: str) -> str:
        return subject[len(self.topic_prefix):]

    def queue_of(self, subject: str) -> str:
        return subject[len(self.queue_prefix):]


# -- settings ----------------------------------------------------------------------------


def overflow(settings: QueueSettings) -> str | None:
    """What the sending client does when the stream refuses a send for ``max_length``
    (the stream is DiscardNew either way): "block", send again, backing off, until there
    is room; "dead-letter", move the oldest message no consumer has had to the
    dead-letter queue and send again (``nats_produce.py``); None, nothing: the refusal is
    the send's error (overflow "reject"), or the queue has no ``max_length``."""
    if settings.max_length is None or settings.overflow == "reject":
        return None
    return settings.overflow


def is_full(puback: bytes) -> bool:
    """A PubAck refusing a message because the stream holds max_msgs (10077)."""
    return puback.startswith(b'{"error"') and b'"err_code":10077' in puback


def stream_config(ns: Namespace, name: str, settings: QueueSettings, *, explicit: bool,
                  replicas: int = 1) -> dict[str, Any]:
    """The JetStream stream of queue ``name`` (``$JS.API.STREAM.CREATE`` body)."""
    config: dict[str, Any] = {
        "name": ns.stream(name),
        "subjects": [ns.queue_subject(name), ns.schedule_prefix(name) + ">"],
        "retention": "workqueue",
        "storage": "file" if settings.durable else "memory",
        "discard": "new" if settings.max_length is not None else "old",
        "max_msgs": settings.max_length if settings.max_length is not None else -1,
        "num_replicas": replicas,
        "allow_msg_ttl": True,
        # send(delay=...): server 2.12+; a stream with DiscardNew cannot have them.
        "allow_msg_schedules": settings.max_length is None,
        "duplicate_window": 120 * 10**9,  # as the local broker's dedup window
        "metadata": {META_SETTINGS: json.dumps(settings.as_dict(), sort_keys=True),
                     META_EXPLICIT: "1" if explicit else "0"},
    }
    return config


def consumer_config(ns: Namespace, name: str, settings: QueueSettings) -> dict[str, Any]:
    """The durable pull consumer shared by all of the queue's aiobus consumers. MaxDeliver
    is ``max_deliveries + 1``: the client dead-letters a message on the arrival after
    its last allowed attempt (the last attempt's ack timeout has no other hook)."""
    return {
        "durable_name": CONSUMER,
        "ack_policy": "explicit",
        "deliver_policy": "all",
        "filter_subject": ns.queue_subject(name),
        "ack_wait": int(settings.ack_timeout * 1e9),
        "max_deliver": (settings.max_deliveries + 1
                        if settings.max_deliveries is not None else -1),
        "max_ack_pending": -1,  # prefetch is per client, counted by the client
        "max_waiting": 4096,
    }


def settings_from_metadata(name: str, metadata: dict[str, str] | None
                           ) -> tuple[QueueSettings, bool]:
    """The settings a stream's metadata records, and whether they were declared.
    A stream without them (made by something else) gets the defaults."""
    raw = (metadata or {}).get(META_SETTINGS)
    if raw is None:
        return QueueSettings.for_queue(name), False
    values = json.loads(raw)
    return (QueueSettings.for_queue(name, values),
            (metadata or {}).get(META_EXPLICIT) == "1")


def no_such_queue(name: str) -> NoSuchQueue:
    """The local broker's error for a queue that does not exist (its stream does not)."""
    return NoSuchQueue(f"there is no queue {shown(name)}: it was never used, or it was"
                       " deleted")


def check_mismatch(name: str, old: QueueSettings, new: QueueSettings) -> None:
    """As the local broker: QueueMismatch naming each differing setting."""
    if old == new:
        return
    a, b = old.as_dict(), new.as_dict()
    diff = ", ".join(f"{k}: {shown(a[k])} != {shown(b[k])}" for k in a if a[k] != b[k])
    raise QueueMismatch(f"queue {shown(name)} is already declared with other settings"
                        f" ({diff}); use the same settings or another queue name")


# -- headers -----------------------------------------------------------------------------


def ttl_header(ttl: float) -> str:
    """``Nats-TTL`` for ``ttl`` seconds: whole seconds, rounded up, at least 1."""
    seconds = int(-(-ttl // 1))
    return str(max(MIN_TTL, seconds))


def check_seconds(what: str, value: float | None) -> None:
    if value is not None and (type(value) not in (int, float) or not 0 < value < MAX_SECONDS):
        raise InvalidOption(f"{what} must be a positive number of seconds below 1e9;"
                            f" got {shown(value)}")


def encode_headers(headers: dict[str, str] | None, kind: int, msg_id: str | None,
                   ttl: float | None, reply: str | None = None) -> dict[str, str] | None:
    """NATS headers for a message: the application's, then aiobus's."""
    if not (headers or kind or msg_id or ttl or reply):
        return None
    out: dict[str, str] = {}
    if headers:
        for key in headers:
            if key in _OURS or key.lower().startswith("nats-"):
                raise InvalidName(f"header {shown(key)} is reserved on NATS")
            if not key or not _BAD_KEY.isdisjoint(key):
                raise InvalidName(f"header {shown(key)}: NATS header names cannot be empty"
                                  " or contain ':' or whitespace")
        out.update(headers)
    if kind:
        out[H_KIND] = str(kind)
    if msg_id is not None:
        out[H_MSG_ID] = msg_id
    if ttl is not None:
        out[H_TTL] = ttl_header(ttl)
    if reply is not None:
        out[H_REPLY] = reply
    return out


def release_headers(headers: dict[str, str] | None, kind: int, msg_id: str, copy_id: str,
                    ttl: float | None, attempt: int, stored: float) -> dict[str, str]:
    """Headers of the copy that gives a released message back (``nats_consume.py``):
    stored under ``copy_id`` (deduplicated if sent again), keeping the message's id and
    time, and counting the attempts before it (``attempt - 1``: a release counts none),
    with what is left of its TTL."""
    out = encode_headers(headers, kind, copy_id, ttl) or {}
    out[H_ID] = msg_id
    out[H_TIME] = repr(stored)
    if attempt > 1:
        out[H_BEFORE] = str(attempt - 1)
    return out


def scheduled(headers: dict[str, str], due: str, target: str, ttl: float | None
              ) -> dict[str, str]:
    """``headers`` (a release copy's) made a message schedule (ADR-51) that stores the
    message on ``target`` at ``due`` (RFC 3339, UTC), with ``ttl`` from then."""
    out = {k: v for k, v in headers.items() if k != H_TTL}
    out["Nats-Schedule"] = "@at " + due
    out["Nats-Schedule-Target"] = target
    if ttl is not None:
        out["Nats-Schedule-TTL"] = ttl_header(ttl) + "s"
    return out


def copied(headers: dict[str, str], delivered: int, stored: float) -> tuple[int, float]:
    """(attempt, time stored) of a delivered message, a released message's copy or not:
    the copy's delivery count goes on from the attempts before it."""
    before = headers.get(H_BEFORE)
    attempt = delivered + int(before) if before and before.isdigit() else delivered
    original = headers.get(H_TIME)
    try:
        return attempt, float(original) if original else stored
    except ValueError:
        return attempt, stored


def remaining_ttl(headers: dict[str, str] | None, stored: float, now: float) -> float | None:
    """Seconds left of a stored message's ``Nats-TTL`` at ``now`` (None: no TTL; at most
    0: expired)."""
    value = headers.get(H_TTL) if headers else None
    if not value:
        return None
    seconds = float(value[:-1]) if value[-1:] == "s" else float(value)
    return seconds - (now - stored)


def request_headers(headers: dict[str, str] | None, kind: int, msg_id: str | None,
                    attempt: int) -> dict[str, str] | None:
    """Headers of a request on core NATS: the application's, the body kind, the id and,
    given to a responder again, the attempt; None when there is none of these (a first
    request's id is its reply subject, unique: no header block to write or parse)."""
    out = encode_headers(headers, kind, None, None) or {}
    if msg_id is not None:
        out[H_ID] = msg_id
    if attempt > 1:
        out[H_ATTEMPT] = str(attempt)
    return out or None


def request_attempt(headers: dict[str, str] | None) -> int:
    """A request's attempt (1 unless given to a responder again)."""
    value = headers.get(H_ATTEMPT) if headers else None
    return int(value) if value and value.isdigit() else 1


def schedule_headers(headers: dict[str, str] | None, kind: int, msg_id: str,
                     ttl: float | None, due: str, target: str) -> dict[str, str]:
    """Headers of a delayed send: a NATS 2.12 schedule (ADR-51) that stores the message
    on ``target`` at ``due`` (RFC 3339, UTC), its TTL counted from then. The stored
    message does not keep ``Nats-Msg-Id``, so the id also travels as ``Aiobus-Id``."""
    out = encode_headers(headers, kind, msg_id, None) or {}
    out[H_ID] = msg_id
    out["Nats-Schedule"] = "@at " + due
    out["Nats-Schedule-Target"] = target
    if ttl is not None:
        out["Nats-Schedule-TTL"] = ttl_header(ttl) + "s"
    return out


def parse_raw_headers(raw: bytes) -> dict[str, str] | None:
    """A NATS header block (``NATS/1.0\\r\\nKey: value\\r\\n...``), as a stored message
    from ``STREAM.MSG.GET`` has it, as a dict (the last value of a repeated key)."""
    if not raw:
        return None
    lines = raw.decode(errors="replace").split("\r\n")
    out: dict[str, str] = {}
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep and key:
            out[key.strip()] = value.strip()
    return out or None


def decode_headers(headers: dict[str, str] | None
                   ) -> tuple[dict[str, str] | None, int, str | None, str | None]:
    """(application headers or None, body kind, message id, reply inbox)."""
    if not headers:
        return None, 0, None, None
    user = {k: v for k, v in headers.items()
            if k not in _OURS and not k.startswith("Nats-")}
    kind = int(headers.get(H_KIND, 0))
    msg_id = headers.get(H_ID) or headers.get(H_MSG_ID)
    return user or None, kind, msg_id, headers.get(H_REPLY)


def dead_letter_headers(headers: dict[str, str] | None, *, queue: str, reason: str,
                        attempts: int, now: float, text: str | None,
                        consumer: tuple[int, int] | None) -> dict[str, str]:
    """The ``x-dead-*`` headers, as the local broker's ``QueueManager.dead_letter``."""
    out = dict(headers) if headers else {}
    out["x-original-queue"] = queue
    out["x-dead-reason"] = reason
    out["x-attempts"] = str(attempts)
    out["x-dead-time"] = f"{now:.6f}"
    if text is not None:
        out["x-reason-text"] = text
    if consumer is not None:
        out["x-consumer-pid"] = str(consumer[0])
        out["x-consumer-uid"] = str(consumer[1])
    return out


def stored_time(value: str | None) -> float:
    """Epoch seconds of a stored message's ``time`` (RFC 3339 with nanoseconds, as
    ``STREAM.MSG.GET`` gives it); 0.0 if absent or unreadable."""
    if not value:
        return 0.0
    head, dot, rest = value.rstrip("Z").partition(".")
    try:
        day, _, clock = head.partition("T")
        fields = [int(part) for part in (*day.split("-"), *clock.split(":"))]
        whole = calendar.timegm((*fields, 0, 0, 0))
    except (ValueError, TypeError):
        return 0.0
    digits = "".join(ch for ch in rest if ch.isdigit())
    return whole + (int(digits[:9].ljust(9, "0")) / 1e9 if dot and digits else 0)


def peeked_entry(queue: str, stream: str, stored: dict[str, Any], max_body: int
                 ) -> list[Any]:
    """A PEEK entry, ``[[id, queue, body cut to max_body, kind, headers, timestamp],
    size]`` (the local broker's, ``broker/browse.py``), from a ``STREAM.MSG.GET``
    answer's ``message`` (base64 ``data`` and ``hdrs``)."""
    data = base64.b64decode(stored.get("data") or "")
    headers = parse_raw_headers(base64.b64decode(stored.get("hdrs") or ""))
    user, kind, mid, _ = decode_headers(headers)
    message = [mid or f"{stream}:{stored.get('seq')}", queue, data[:max_body], kind,
               user or {}, stored_time(stored.get("time"))]
    return [message, len(data)]


def is_temporary(puback: bytes) -> bool:
    """A PubAck error worth retrying: JetStream is electing a leader or catching up
    (10008, "temporarily unavailable"), not a refusal of the message (a full stream's
    10077 is a 503 too)."""
    if not puback.startswith(b'{"error"'):
        return False
    error = json.loads(puback)["error"]
    return bool(error.get("err_code") == 10008 or "temporarily unavailable"
                in str(error.get("description", "")).lower())


# -- consuming ---------------------------------------------------------------------------


def nak_delay(settings: QueueSettings, attempt: int, delay: float | None) -> float:
    """Seconds before a nacked message's next attempt: ``delay`` if given, else the
    queue's ``retry_delays`` schedule (the n-th retry waits ``retry_delays[min(n,
    len)-1]``), else 0. Computed by the client: server-side BackOff would also stretch
    explicit nak delays."""
    if delay is not None:
        return float(delay)
    schedule = settings.retry_delays
    if not schedule:
        return 0.0
    return float(schedule[min(attempt, len(schedule)) - 1])


def parse_ack_subject(reply: str) -> tuple[int, int, float]:
    """(stream sequence, delivery count, timestamp in epoch seconds) from a JetStream
    ack subject: ``$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ns>.<pending>``
    (v1) or with ``<domain>.<account hash>`` after ``ACK`` and a token at the end (v2).

    Raises:
        ValueError: not an ack subject.
    """
    tokens = reply.split(".")
    if len(tokens) == 9:
        base = 2
    elif len(tokens) >= 11:
        base = 4
    else:
        raise ValueError(f"not a JetStream ack subject: {reply!r}")
    delivered = int(tokens[base + 2])
    stream_seq = int(tokens[base + 3])
    timestamp = int(tokens[base + 5]) / 1e9
    return stream_seq, delivered, timestamp


# -- statistics --------------------------------------------------------------------------


def queue_stats(stream: dict[str, Any], consumer: dict[str, Any] | None,
                settings: QueueSettings) -> dict[str, Any]:
    """A queue's entry in ``bus.stats()["queues"]``, in the local broker's shape, from
    JetStream stream and consumer info. ``delayed`` counts delayed sends (schedules);
    a message given back (nack, release, expired lease) stays ``unacked`` until it is
    delivered again, as JetStream keeps it ack-pending. What JetStream does not count
    is None: the lifetime counters ``dead_lettered``, ``expired``, ``discarded`` and ``duplicates``.
    ``consumers`` counts pull requests waiting (one per idle aiobus consumer), and
    ``acked`` every message that left the stream (acked, dead-lettered or expired)."""
    state = stream.get("state", {})
    msgs = int(state.get("messages", 0))
    if consumer is None:
        ready, unacked, delivered, waiting = msgs - int(state.get("delayed", 0)), 0, 0, 0
    else:
        ready = int(consumer.get("num_pending", 0))
        unacked = int(consumer.get("num_ack_pending", 0))
        delivered = int(consumer.get("delivered", {}).get("consumer_seq", 0))
        waiting = int(consumer.get("num_waiting", 0))
    last_seq = int(state.get("last_seq", 0))
    first_seq = int(state.get("first_seq", 0))
    # Sequences below first_seq left by ack or purge; num_deleted are interior gaps.
    gone = max(0, first_seq - 1) + int(state.get("num_deleted", 0)) if last_seq else 0
    return {
        "ready": ready,
        "unacked": unacked,
        "delayed": max(0, msgs - ready - unacked),
        "parked": 0,
        "consumers": waiting,
        "sent": last_seq,
        "delivered": delivered,
        "acked": gone,
        "dead_lettered": None,
        "expired": None,
        "discarded": None,
        "duplicates": None,
        "settings": settings.as_dict(),
    }
