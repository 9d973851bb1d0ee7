"""aiobus: an asyncio-native IPC message bus for services on one machine.

Example::

    import aiobus

    async with aiobus.connect() as bus:
        await bus.send("jobs", {"n": 1})
        async for msg in bus.consume("jobs"):
            async with msg.process():
                print(msg.body)
"""

from .broker.server import Broker, BrokerAlreadyRunning
from .client.backend import ConnectionState, StateChange
from .client.browse import PeekedMessage, PeekResult
from .client.bus import Bus, connect
from .client.message import Message
from .client.streams import BusyError, Consumer, Subscription
from .errors import (
    BodyDecodeError,
    BrokerUnavailable,
    BusError,
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

__version__ = "0.1.0"

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
