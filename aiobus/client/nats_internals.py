"""What the NATS backend (``client/nats.py``) takes from nats-py's private parts, in
one place: the attributes it writes to (checked at connect, and by
tests/integration/test_nats_private.py), the stand-in for a subscription's pending queue
that hands messages over in nats-py's reader, and a round trip that, unlike nats-py's
``flush()``, comes after what is in nats-py's buffer. The ``nats-py<3`` pin in
pyproject.toml says why the backend writes to them (speed: W1).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from ..errors import BrokerUnavailable

__all__ = ["INTERNALS", "Bare", "Direct", "check_internals", "internals_changed",
           "round_trip"]

log = logging.getLogger(__name__)

# nats-py's private attributes the backend relies on, with their types once connected
# (tests/integration/test_nats_private.py also checks that a write reaches the server).
INTERNALS: Final = (("_pending", list), ("_pending_data_size", int),
                    ("_flush_queue", asyncio.Queue), ("_subs", dict),
                    ("_server_info", dict))


class Direct:
    """Stands in for a nats-py subscription's pending queue: ``put_nowait`` hands the
    message to ``handler`` at once, in nats-py's reader. A callback subscription would
    queue each message for a task of its own to await the callback: a task switch per
    message on every path here (deliveries, PubAcks, topic messages), none of whose
    handlers awaits anything."""

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[Msg], None]) -> None:
        self.handler = handler

    def put_nowait(self, msg: Msg) -> None:
        try:
            self.handler(msg)
        except Exception:
            # As nats-py does for a callback (its error_cb): reported, and the connection
            # goes on; raised here it would take nats-py's reader down.
            log.exception("handling a message on %s failed", msg.subject)

    def qsize(self) -> int:
        return 0

    def empty(self) -> bool:
        return True

    def task_done(self) -> None:
        pass

    async def join(self) -> None:
        pass


class Bare:
    """A :class:`Direct` whose handler nats-py calls with no wrapper in between: for
    the per-message topic path, whose handler guards itself."""

    __slots__ = ("put_nowait",)
    put_nowait: Callable[[Msg], None]

    def __init__(self, handler: Callable[[Msg], None]) -> None:
        self.put_nowait = handler

    qsize, empty, task_done, join = (Direct.qsize, Direct.empty, Direct.task_done,
                                     Direct.join)


def check_internals(nc: NatsClient) -> None:
    """Fail at connect, naming the cause, if this nats-py lacks the private parts the
    backend writes to (``_append``, ``_subscribe``), rather than later with an
    AttributeError mid-stream, or with writes that no flusher sends.

    Raises:
        BrokerUnavailable: nats-py's internals are not what this aiobus was built on.
    """
    missing = [name for name, kind in INTERNALS
               if not isinstance(getattr(nc, name, None), kind)]
    if missing:
        raise internals_changed(missing)


def internals_changed(missing: list[str]) -> BrokerUnavailable:
    from importlib.metadata import version

    return BrokerUnavailable(
        f"nats-py {version('nats-py')} does not have the internals aiobus's NATS backend"
        f" writes to ({', '.join(missing)}); install a nats-py it supports:"
        " pip install 'nats-py>=2.7,<3'")


async def round_trip(nc: NatsClient, loop: asyncio.AbstractEventLoop, timeout: float
                     ) -> None:
    """A round trip to the server after everything written so far: once it returns, the
    server has processed the connection's earlier commands.

    nats-py's ``flush()`` alone is not that: it writes its PING straight to the socket
    (``_send_ping`` in nats-py 2.16), ahead of the commands still in its buffer for the
    flusher task, so its PONG can come back before the server has a SUB or PUB made just
    before (seen under load: a consumer that joined a queue's request group and pinged,
    and a request then given to the group answered "no responders";
    tests/integration/test_nats_private.py pins the order). So the flusher writes the
    buffer first, as it would, and then the PING goes.

    Raises:
        nats.errors.FlushTimeoutError: no PONG (or no flusher) within ``timeout``.
    """
    queue = nc._flush_queue
    if nc.is_connected and nc._pending_data_size and queue is not None:
        written: asyncio.Future[None] = loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await queue.put(written)  # completed once the buffer is written
                await written
        except TimeoutError:
            raise nats.errors.FlushTimeoutError from None
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]
