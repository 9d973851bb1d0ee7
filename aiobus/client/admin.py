"""The :class:`~aiobus.client.bus.Bus`'s administration: declaring, purging, deleting and
browsing queues, the broker's statistics, ping; and the name check every call makes.

``_BusAdmin`` is the base of ``Bus`` (one class in the end, so the per-message path in
bus.py gains no call layer): it holds the backend and the cache of names already
checked, which that path reads too.
"""

from __future__ import annotations

import enum
from typing import Any, Final, cast

from ..errors import Forbidden
from ..names import check_name, is_reserved
from ..protocol import Overflow
from ..stats import BrokerStats
from .backend import Backend
from .browse import PeekResult

__all__ = ["DEFAULT"]


class _Default(enum.Enum):
    """The type of :data:`DEFAULT`."""

    DEFAULT = "DEFAULT"


# "Not given: the broker's default applies." Queue defaults live in one table, the
# broker's (aiobus/broker/settings.py); the client never restates them.
DEFAULT: Final = _Default.DEFAULT


class _BusAdmin:
    """What a :class:`~aiobus.client.bus.Bus` asks the broker besides messages."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._names: set[str] = set()  # names already checked (hot-path cache)

    def _check_name(self, name: str, what: str) -> None:
        if name not in self._names:
            check_name(name, what)
            if is_reserved(name):
                raise Forbidden(f"{what} {name!r}: names starting with '$' are reserved")
            if len(self._names) < 10_000:
                self._names.add(name)

    async def declare_queue(
        self,
        queue: str,
        *,
        max_deliveries: int | _Default | None = DEFAULT,
        ack_timeout: float | _Default = DEFAULT,
        retry_delays: tuple[float, ...] | list[float] | _Default = DEFAULT,
        dead_letter: str | _Default | None = DEFAULT,
        ttl: float | _Default | None = DEFAULT,
        max_length: int | _Default | None = DEFAULT,
        overflow: Overflow | _Default = DEFAULT,
        durable: bool | _Default = DEFAULT,
    ) -> dict[str, Any]:
        """Create a queue with settings, or check that it has them.

        Only the settings passed are sent; the others take the broker's defaults for
        this queue's name (README "Defaults"; a ``*.dlq`` queue has its own), which is
        also what a queue created by use gets.

        Args:
            max_deliveries: attempts before a message is dead-lettered (None: no limit;
                default 5, for a ``*.dlq`` queue None).
            ack_timeout: seconds a consumer may hold a message before it is redelivered
                (default 30).
            retry_delays: the n-th retry of a failed message waits
                ``retry_delays[min(n, len)-1]`` seconds; empty (the default): at once.
            dead_letter: dead-letter queue; default ``"<queue>.dlq"`` (for a ``*.dlq``
                queue None); None: discard.
            ttl: seconds a message may wait before it expires to the dead-letter queue.
            max_length: most messages waiting (ready or delayed); None: no limit.
            overflow: when full, ``"block"`` senders (the default), ``"reject"`` them
                with QueueFull, or ``"dead-letter"`` the oldest message.
            durable: journal the queue and its messages so they survive a broker restart
                or crash (default False: in memory only). Its settings are journaled too,
                and its dead-letter queue becomes durable with it unless already in use.
                Must be given before the queue is first used.

        Returns:
            The queue's settings as the broker holds them, every key present.

        Raises:
            QueueMismatch: the queue was declared before with other settings.
            InvalidOption: a setting is invalid (the message names it).

        Example::

            await bus.declare_queue("jobs", retry_delays=[1, 5, 30], max_deliveries=5)
        """
        self._check_name(queue, "queue name")
        given = {
            "max_deliveries": max_deliveries, "ack_timeout": ack_timeout,
            "retry_delays": retry_delays, "dead_letter": dead_letter, "ttl": ttl,
            "max_length": max_length, "overflow": overflow, "durable": durable,
        }
        options = {key: value for key, value in given.items() if value is not DEFAULT}
        if "retry_delays" in options:
            options["retry_delays"] = list(retry_delays)  # type: ignore[arg-type]
        return await self._backend.declare(queue, options)

    async def purge_queue(self, queue: str) -> int:
        """Remove every message waiting in a queue: ready and delayed ones. Messages
        consumers hold (leased) stay and are answered as usual, as RabbitMQ's purge.
        A durable queue stays purged across a broker restart.

        Returns:
            How many messages were removed.

        Raises:
            NoSuchQueue: the broker has no such queue.
            InvalidName, Forbidden: a bad or reserved (``$...``) name.

        Example::

            removed = await bus.purge_queue("jobs")
        """
        self._check_name(queue, "queue name")
        return await self._backend.purge(queue)

    async def delete_queue(self, queue: str, *, if_empty: bool = False) -> int:
        """Remove a queue: its settings and all its messages, leased ones included. A
        durable queue stays deleted across a broker restart.

        Leases on it end: a consumer's later ``ack()`` (or nack, ...) of such a message
        raises ``LeaseError`` (``lease-unknown``). Its consumers stay registered, and as
        with any use of a queue name, the queue exists again at once, empty and with the
        default settings; so do sends to it, and ``declare_queue`` may give it new
        settings. Sends waiting for room in it fail with ``NoSuchQueue``.

        Args:
            if_empty: refuse (``QueueNotEmpty``) if it holds any message, ready,
                delayed or leased, or a send waits for room in it.

        Returns:
            How many messages were removed.

        Raises:
            NoSuchQueue: the broker has no such queue.
            QueueNotEmpty: ``if_empty`` and the queue is not empty; nothing changed.
            InvalidName, Forbidden: a bad or reserved (``$...``) name.

        Example::

            await bus.delete_queue("scratch", if_empty=True)
        """
        self._check_name(queue, "queue name")
        return await self._backend.delete(queue, bool(if_empty))

    async def stats(self, *, queues: str | None = None, limit: int | None = None,
                    after: str | None = None) -> BrokerStats:
        """Broker statistics: per queue ``ready``, ``unacked``, ``delayed``,
        ``consumers``, ``dead_lettered`` and counters; topic subscriptions with their
        drops; connections with name, pid and uid; the broker process's memory and
        event-loop lag. The result is the typed model of :mod:`aiobus.stats`
        (:class:`aiobus.BrokerStats`, a ``TypedDict``: the decoded STATS map itself).

        At most ``limit`` queues (and subscriptions, and connections) are listed, 10,000
        by default and at most; ``queues_total`` says how many queues matched.

        Args:
            queues: only queues whose names match this pattern (``*`` one token, a last
                ``>`` the rest), e.g. ``"orders.>"``.
            limit: list at most this many queues, subscriptions and connections.
            after: only queues whose names sort after this one: the next page is
                ``after=result["queues_next"]`` (None once there is no more).

        Raises:
            InvalidOption, InvalidName: a bad option (from the broker).

        Example::

            page = await bus.stats(queues="orders.>", limit=100)
            while page["queues_next"] is not None:
                page = await bus.stats(queues="orders.>", limit=100,
                                       after=page["queues_next"])
        """
        options: dict[str, Any] = {}
        if queues is not None:
            options["queues"] = queues
        if limit is not None:
            options["limit"] = limit
        if after is not None:
            options["after"] = after
        return cast(BrokerStats, await self._backend.stats(options))

    async def peek(self, queue: str, *, offset: int = 0, limit: int = 100,
                   max_body: int = 64 * 1024, id: str | None = None) -> PeekResult:
        """Read a queue's ready messages without consuming them: nothing is leased,
        counted or changed (``aiobus dlq list`` browses dead letters this way).

        Args:
            offset: skip this many ready messages (oldest first).
            limit: return at most this many (1 to 1,000).
            max_body: cut each body to this many bytes (``size`` keeps the length).
            id: only the ready message with this id (``messages`` empty if none).

        Returns:
            A :class:`PeekResult`: ``messages`` and how many are ``ready`` in all.

        Raises:
            NoSuchQueue: the queue does not exist (peeking never creates one).
            InvalidOption: a bad option. InvalidName, Forbidden, PermissionDenied: as
                for consume (peeking needs the right to consume the queue).

        Example::

            page = await bus.peek("jobs.dlq", limit=10)
            for msg in page.messages:
                print(msg.id, msg.headers.get("x-dead-reason"), msg.body)
        """
        self._check_name(queue, "queue name")
        options: dict[str, Any] = {"offset": offset, "limit": limit, "max_body": max_body}
        if id is not None:
            options["id"] = id
        return PeekResult.from_wire(await self._backend.peek(queue, options))

    async def ping(self) -> None:
        """Round trip to the broker; returns once every earlier frame was processed."""
        await self._backend.ping()
