"""A topic subscription's window on NATS, without I/O: what the local broker does for a
subscriber that falls behind (``broker/topics.py``), done in the client.

Core NATS pushes every matching message to the client at once; the server's own
slow-consumer handling would cut the whole connection. So the client keeps the local
broker's window: at most ``max_pending`` messages handed to the application and not yet
credited back (``Subscription`` credits in batches of ``max_pending // 2``), at most
``max_pending`` more waiting here, and beyond that the policy: ``drop-oldest`` drops the
oldest waiting message, ``drop-newest`` the new one, ``disconnect`` fails the
subscription with ``ConnectionLost`` (code ``slow-consumer``). The next message handed
over carries the number dropped just before it (``msg.dropped``), as on the broker.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from ..errors import ConnectionLost

__all__ = ["TopicWindow"]


class TopicWindow:
    """One subscription's flow control; ``offer`` a message, ``credit`` consumption."""

    def __init__(self, pattern: str, max_pending: int, policy: str,
                 target: Callable[[], Any]) -> None:
        self.pattern = pattern
        self.max_pending = max_pending
        self.policy = policy
        self.target = target  # returns the StreamTarget or None (a weakref)
        self.sid = 0
        self.in_flight = 0
        self.pending: deque[tuple[int, list[Any]]] = deque()  # (drops just before, msg)
        self.dropped = 0
        self.dropped_since = 0
        self.delivered = 0
        self.failed = False
        self.on_disconnect: Callable[[], None] = lambda: None

    def offer(self, message: list[Any]) -> None:
        """A message arrived from the server."""
        if self.failed:
            return
        if self.in_flight < self.max_pending and not self.pending:
            self._hand(message, self.dropped_since)
            self.dropped_since = 0
            return
        if len(self.pending) < self.max_pending:
            self.pending.append((self.dropped_since, message))
            self.dropped_since = 0
            return
        if self.policy == "drop-newest":
            self.dropped += 1
            self.dropped_since += 1
        elif self.policy == "drop-oldest":
            drops, _ = self.pending.popleft()
            self.dropped += 1
            if self.pending:
                head_drops, head = self.pending.popleft()
                self.pending.appendleft((head_drops + drops + 1, head))
                self.pending.append((self.dropped_since, message))
            else:
                self.pending.append((self.dropped_since + drops + 1, message))
            self.dropped_since = 0
        else:
            self.failed = True
            target = self.target()
            if target is not None:
                target._fail(ConnectionLost(
                    f"subscription {self.pattern!r} fell more than {self.max_pending}"
                    " messages behind (policy 'disconnect')", code="slow-consumer"))
            self.on_disconnect()

    def credit(self, n: int) -> None:
        """The application consumed ``n`` more: hand over what waits, up to the window."""
        self.in_flight = max(0, self.in_flight - n)
        while self.pending and self.in_flight < self.max_pending:
            drops, message = self.pending.popleft()
            self._hand(message, drops)

    def _hand(self, message: list[Any], dropped: int) -> None:
        target = self.target()
        if target is None:
            return
        self.in_flight += 1
        self.delivered += 1
        target._event(message, dropped)

    def stats(self) -> dict[str, Any]:
        """As the local broker's subscription entry in ``stats()``."""
        return {
            "conn": None,
            "sid": self.sid,
            "pattern": self.pattern,
            "policy": self.policy,
            "max_pending": self.max_pending,
            "pending": len(self.pending),
            "in_flight": self.in_flight,
            "delivered": self.delivered,
            "dropped": self.dropped,
        }
