"""The one declaration, for the type checker, of what the halves of
:class:`~aiobus.client.nats.NatsBackend` use of one another: the state its ``__init__``
sets, and the methods each half calls in another (``Producing``, ``Queues``,
``Consuming``, ``Requests`` and the backend itself). Each half derives from
:class:`NatsHost`, which is empty at run time; mypy checks every definition against the
stub here, so a changed signature fails in one place rather than drifting in four
copies.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

    from ..broker.settings import QueueSettings
    from ..errors import BusError
    from . import nats_map as nm
    from .nats_consume import _Lease, _Pull
    from .nats_topics import TopicWindow

__all__ = ["NatsHost"]

# A send held until its queue is known: body, kind, headers, ttl, its future.
Held = tuple[bytes, int, dict[str, str] | None, float | None, asyncio.Future[None]]


class NatsHost:
    """What ``NatsBackend.__init__`` sets, and the methods the halves share (see the
    module docstring)."""

    ns: nm.Namespace
    server_info: dict[str, Any]
    connected: bool
    _nc: NatsClient
    _loop: asyncio.AbstractEventLoop
    _error: BusError | None
    _async_errors: int
    _replicas: int
    _client_id: str
    _inbox: str
    _unconfirmed_inbox: str
    _waiters: dict[str, asyncio.Future[Any]]  # inbox token -> PubAck/reply
    _unconfirmed: int
    _schedules: bool
    _closing: bool
    _queues: dict[str, QueueSettings]  # queues known to exist
    _looking: dict[str, asyncio.Future[QueueSettings]]
    _pulls: dict[int, _Pull]
    _subs: dict[int, TopicWindow]
    _answered: dict[str, str | None]
    _last_acked: dict[str, str]
    _swept: set[str]
    _pid_uid: tuple[int, int]
    _releasing: set[asyncio.Future[None]]
    _sending: set[asyncio.Task[None]]
    _parked: dict[str, int]
    _held: dict[str, list[Held]]

    if TYPE_CHECKING:
        # The backend's (nats.py)
        async def _api(self, subject: str,
                       body: dict[str, Any] | None = None) -> dict[str, Any]: ...
        def _write(self, subject: str, payload: bytes, reply: str = "",
                   headers: dict[str, str] | None = None) -> None: ...
        def _token(self) -> tuple[str, asyncio.Future[Any]]: ...
        def _next_id(self) -> str: ...
        def _spawn(self, coro: Any) -> None: ...
        async def _subscribe(self, subject: str, handler: Callable[[Msg], None],
                             group: str = "") -> int: ...
        def _unsubscribe(self, sid: int, *, drain: bool = False) -> None: ...
        # Queues (nats_queues.py)
        async def _queue(self, name: str) -> QueueSettings: ...
        # Producing (nats_produce.py)
        def _puback(self, queue: str, msg: Msg) -> None: ...
        async def _bury(self, queue: str, settings: QueueSettings, stored: dict[str, Any],
                        reason: str, attempts: int | None) -> None: ...
        # Consuming (nats_consume.py)
        async def _ensure_consumer(self, queue: str, stream: str,
                                   settings: QueueSettings) -> None: ...
        async def _sweep(self, queue: str) -> None: ...
        async def _recreate(self, pull: _Pull) -> None: ...
        # Requests (nats_requests.py)
        async def _respond(self, pull: _Pull) -> None: ...
        def _give_back(self, lease: _Lease, attempt: int, delay: float) -> None: ...
