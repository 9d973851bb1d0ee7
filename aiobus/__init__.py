"""aiobus: an asyncio-native IPC message bus for services on one machine.

Example::

    import aiobus

    async with aiobus.connect() as bus:
        await bus.send("jobs", {"n": 1})
        async for msg in bus.consume("jobs"):
            async with msg.process():
                print(msg.body)
"""

from typing import TYPE_CHECKING, Any

from .client.backend import ConnectionState, StateChange
from .client.browse import PeekedMessage, PeekResult
from .client.bus import Bus, connect
from .client.message import Message
from .client.streams import Consumer, Subscription
from .errors import (
    BodyDecodeError,
    BrokerUnavailable,
    BusError,
    BusyError,
    ConnectionClosed,
    ConnectionLost,
    Forbidden,
    FrameTooLarge,
    InvalidName,
    InvalidOption,
    JournalError,
    LeaseError,
    LocalProtocolError,
    NoSuchQueue,
    NotARequest,
    PermissionDenied,
    ProtocolError,
    QueueFull,
    QueueMismatch,
    QueueNotEmpty,
    QuotaExceeded,
    RemoteProtocolError,
    RequestTimeout,
    SendTimeout,
    SubscriptionError,
)
from .protocol import Overflow, SubscriptionPolicy
from .stats import (
    BrokerStats,
    ConnectionStats,
    JournalStats,
    ProcessStats,
    QueueStats,
    Rates,
    SubscriptionStats,
    TopicStats,
)

if TYPE_CHECKING:
    from .broker.server import Broker, BrokerAlreadyRunning

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``aiobus.Broker`` (and ``BrokerAlreadyRunning``) on first use: the broker's
    modules take most of ``import aiobus`` (~130 of ~160 ms), which a client, and every
    ``aiobus`` command, does not need."""
    if name in ("Broker", "BrokerAlreadyRunning"):
        from .broker import server

        value = getattr(server, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'aiobus' has no attribute {name!r}")

__all__ = [
    "BodyDecodeError",
    "Broker",
    "BrokerAlreadyRunning",
    "BrokerStats",
    "BrokerUnavailable",
    "Bus",
    "BusError",
    "BusyError",
    "ConnectionClosed",
    "ConnectionLost",
    "ConnectionState",
    "ConnectionStats",
    "Consumer",
    "Forbidden",
    "FrameTooLarge",
    "InvalidName",
    "InvalidOption",
    "JournalError",
    "JournalStats",
    "LeaseError",
    "LocalProtocolError",
    "Message",
    "NoSuchQueue",
    "NotARequest",
    "Overflow",
    "PeekResult",
    "PeekedMessage",
    "PermissionDenied",
    "ProcessStats",
    "ProtocolError",
    "QueueFull",
    "QueueMismatch",
    "QueueNotEmpty",
    "QueueStats",
    "QuotaExceeded",
    "Rates",
    "RemoteProtocolError",
    "RequestTimeout",
    "SendTimeout",
    "StateChange",
    "Subscription",
    "SubscriptionError",
    "SubscriptionPolicy",
    "SubscriptionStats",
    "TopicStats",
    "__version__",
    "connect",
]
