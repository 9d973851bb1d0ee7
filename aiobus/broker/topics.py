"""Pub/sub topics: wildcard fan-out with a bounded window per subscription. No I/O.

Theory of operation
-------------------
Topics are at-most-once: a publish reaches every subscription whose pattern matches at
that moment, and is gone once handed over. The hard part is a subscriber that does not
keep up. The broker never buffers without bound for it:

* Each subscription has a *credit* window of ``max_pending`` EVENTs that may be in
  flight to the client (in socket buffers or in the client library's queue). The client
  returns credit with CREDIT frames as the application consumes events.
* With no credit left, events wait in the subscription's ``pending`` deque, at most
  ``max_pending`` of them. When that is full too, the subscription's policy decides:
  ``drop-oldest`` drops the oldest pending event, ``drop-newest`` the new one, and
  ``disconnect`` closes the subscriber's connection with code ``slow-consumer``.
* Drops are counted per subscription (``stats()``), and each EVENT carries the number
  of events dropped just before it (its ``dropped`` field), so the subscriber sees where
  the gap is. Pending events keep their own gap count for that: with ``drop-oldest`` a
  dropped head's gap (plus one) moves to the new head; with ``drop-newest`` the gap
  grows at the tail and goes with the next event queued or sent.

So a subscription costs the broker at most ``2 * max_pending`` events of memory.

Output bound. Credit is per subscription, but the bytes written for a connection add up
over all of its subscriptions (100 subscriptions matching one topic made 100 copies of a
3.1 MB event in the socket's buffer). While a connection's unread output is above the
broker's ``max_pending_output`` the shell puts it in ``congested``, and its
subscriptions then behave as if they had no credit: new events wait in ``pending``
(references to the one shared event, not copies), and the policy decides when that is
full. When the connection has read its backlog (``resume``), pending events go out as
credit allows, until it is congested again.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Protocol, get_args

from ..errors import InvalidOption, shown
from ..names import TopicIndex
from ..protocol import SubscriptionPolicy
from ..stats import SubscriptionStats

__all__ = ["POLICIES", "Subscription", "TopicRouter"]

POLICIES: tuple[str, ...] = get_args(SubscriptionPolicy)
MAX_PENDING_LIMIT = 1_000_000


BadSubscription = InvalidOption

# One published message, encoded once as the array [id, topic, body, kind, headers,
# timestamp] that every EVENT frame carries as is, and shared by every subscription.
Event = bytes


class TopicSink(Protocol):
    """What the router needs from its owner (the broker core); EVENTs go straight to the
    shell's ``event``, given to the router apart."""

    def slow_consumer(self, conn: int, message: str) -> None: ...


class Subscription:
    __slots__ = ("conn", "credit", "delivered", "dropped", "dropped_since", "max_pending",
                 "pattern", "pending", "policy", "sid")

    def __init__(self, conn: int, sid: int, pattern: str, max_pending: int, policy: str) -> None:
        self.conn = conn
        self.sid = sid
        self.pattern = pattern
        self.max_pending = max_pending
        self.policy = policy
        self.credit = max_pending
        self.pending: deque[tuple[int, Event]] = deque()  # (drops just before it, event)
        self.dropped = 0  # total drops
        self.dropped_since = 0  # drops since the last event queued or sent
        self.delivered = 0

    def stats(self) -> SubscriptionStats:
        return {
            "conn": self.conn,
            "sid": self.sid,
            "pattern": self.pattern,
            "policy": self.policy,
            "max_pending": self.max_pending,
            "pending": len(self.pending),
            "in_flight": self.max_pending - self.credit,
            "delivered": self.delivered,
            "dropped": self.dropped,
        }


class TopicRouter:
    def __init__(self, sink: TopicSink, *,
                 send_event: Callable[[int, int, Event, int], None]) -> None:
        self.index: TopicIndex[Subscription] = TopicIndex()
        self.published = 0
        self.unrouted = 0  # publishes that matched no subscription
        # Connections whose unread output is above the bound (see above), set by the shell.
        self.congested: set[int] = set()
        self._sink = sink
        self._send_event = send_event
        # Subscribers that fell too far behind with policy 'disconnect' during a fan-out:
        # closed once it is over, so that the presence event of their disconnect comes
        # after the event that caused it for every subscriber.
        self._slow: list[tuple[int, str]] = []

    @staticmethod
    def check_options(max_pending: int, policy: str) -> None:
        if not 1 <= max_pending <= MAX_PENDING_LIMIT:
            raise BadSubscription(f"max_pending must be between 1 and {MAX_PENDING_LIMIT}")
        if policy not in POLICIES:
            raise BadSubscription(f"policy must be one of {', '.join(POLICIES)};"
                                  f" got {shown(policy)}")

    def add(self, sub: Subscription) -> None:
        self.index.add(sub.pattern, sub)

    def remove(self, sub: Subscription) -> None:
        self.index.remove(sub.pattern, sub)
        sub.pending.clear()

    def publish(self, topic: str, event: Event, *, count: bool = True) -> int:
        """Fan ``event`` (published on ``topic``) out; returns how many subscriptions it
        matched. ``count=False`` keeps the broker's own events (presence) out of the
        ``published``/``unrouted`` counters, which describe what clients publish."""
        if count:
            self.published += 1
        subs = self.index.match(topic)
        if not subs:
            if count:
                self.unrouted += 1
            return 0
        send_event = self._send_event
        congested = self.congested
        for sub in subs:
            if sub.credit and not sub.pending and not (congested and sub.conn in congested):
                sub.credit -= 1
                sub.delivered += 1
                gap = sub.dropped_since
                if gap:
                    sub.dropped_since = 0
                send_event(sub.conn, sub.sid, event, gap)
            else:
                self._hold(sub, event)
        if self._slow:
            self._close_slow()
        return len(subs)

    def _close_slow(self) -> None:
        slow, self._slow = self._slow, []
        for conn, message in slow:
            self._sink.slow_consumer(conn, message)  # publishes its presence event

    def _hold(self, sub: Subscription, event: Event) -> None:
        pending = sub.pending
        if len(pending) < sub.max_pending:
            pending.append((sub.dropped_since, event))
            sub.dropped_since = 0
            return
        if sub.policy == "drop-oldest":
            gap, _ = pending.popleft()
            if pending:
                head_gap, head = pending[0]
                pending[0] = (head_gap + gap + 1, head)
            else:
                sub.dropped_since += gap + 1
            pending.append((sub.dropped_since, event))
            sub.dropped_since = 0
        elif sub.policy == "drop-newest":
            sub.dropped_since += 1
            sub.dropped += 1
            return
        else:
            self._slow.append((
                sub.conn,
                f"subscription {sub.sid} ({shown(sub.pattern)}) fell {2 * sub.max_pending} events"
                " behind with policy 'disconnect'",
            ))
            return
        sub.dropped += 1

    def credit(self, sub: Subscription, n: int) -> None:
        """The client consumed ``n`` events: send what is pending, up to the new credit."""
        sub.credit = min(sub.credit + n, sub.max_pending)
        pending = sub.pending
        send_event = self._send_event
        congested = self.congested
        while sub.credit and pending and sub.conn not in congested:
            gap, event = pending.popleft()
            sub.credit -= 1
            sub.delivered += 1
            send_event(sub.conn, sub.sid, event, gap)

    def resume(self, subs: list[Subscription]) -> None:
        """Their connection is no longer congested: send what waits, as credit allows
        (stopping where it becomes congested again)."""
        for sub in subs:
            if sub.pending:
                self.credit(sub, 0)
