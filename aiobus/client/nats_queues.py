"""Queues as JetStream streams: their existence, settings and administration, for the
NATS backend (``client/nats.py``).

A queue exists once its stream does. Any use (send, consume) of an unknown queue
creates its stream with the broker's defaults for that name (``QueueSettings.for_queue``:
one table of defaults) and marks it created by use; ``declare_queue`` creates it with the
settings given, or checks them against those in the stream's metadata (``QueueMismatch``),
or, for a queue created by use, updates the stream and its consumer to them (the local
broker's rule: such a queue adopts its first declaration). Each stream gets its durable
consumer when it is created, so statistics always have one to read.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from ..broker.settings import QueueSettings
from ..errors import InvalidOption, QueueNotEmpty, shown
from . import nats_map as nm
from .nats_host import NatsHost

__all__ = ["Queues"]

_ERR_STREAM_IN_USE: Final = 10058
_PURGE_WINDOW: Final = 256  # message deletes in flight during a purge with leases


class Queues(NatsHost):
    """The queue half of :class:`~aiobus.client.nats.NatsBackend` (see the module
    docstring); what it uses of the other halves is declared in ``nats_host.py``."""

    async def _queue(self, name: str) -> QueueSettings:
        """The settings of queue ``name``, creating its stream with the defaults if it
        does not exist (a queue created by use, as on the local broker)."""
        settings = self._queues.get(name)
        if settings is not None:
            return settings
        # Concurrent first sends wait for one lookup, and keep their order.
        looking = self._looking.get(name)
        if looking is None:
            looking = self._looking[name] = asyncio.ensure_future(self._look_up(name))
            looking.add_done_callback(lambda _: self._looking.pop(name, None))
        return await asyncio.shield(looking)

    async def _look_up(self, name: str) -> QueueSettings:
        info = await self._api("STREAM.INFO." + self.ns.stream(name))
        if "error" not in info:
            settings, _ = nm.settings_from_metadata(name, info["config"].get("metadata"))
        else:
            settings = QueueSettings.for_queue(name)
            await self._create(name, settings, explicit=False)
        self._queues[name] = settings
        return settings

    async def _create(self, name: str, settings: QueueSettings, *, explicit: bool) -> None:
        config = nm.stream_config(self.ns, name, settings, explicit=explicit,
                                  replicas=self._replicas)
        result = await self._api("STREAM.CREATE." + config["name"], config)
        error = result.get("error")
        if error is not None and error.get("err_code") != _ERR_STREAM_IN_USE:
            raise InvalidOption(f"NATS refused queue {shown(name)}: {error.get('description')}")
        if error is None:  # its consumer from the start: stats count ready from it
            await self._ensure_consumer(name, config["name"], settings)

    async def declare(self, queue: str, options: dict[str, Any]) -> dict[str, Any]:
        settings = QueueSettings.for_queue(queue, options)
        stream = self.ns.stream(queue)
        info = await self._api("STREAM.INFO." + stream)
        if "error" in info:
            await self._create(queue, settings, explicit=True)
            info = await self._api("STREAM.INFO." + stream)
        old, explicit = nm.settings_from_metadata(queue, info["config"].get("metadata"))
        if explicit:
            nm.check_mismatch(queue, old, settings)
        else:  # created by use: adopts its first declaration's settings
            config = nm.stream_config(self.ns, queue, settings, explicit=True,
                                      replicas=self._replicas)
            result = await self._api("STREAM.UPDATE." + stream, config)
            if "error" in result:
                raise InvalidOption(f"queue {shown(queue)} cannot take these settings on"
                                    f" NATS: {result['error'].get('description')}")
            consumer = await self._api(f"CONSUMER.INFO.{stream}.{nm.CONSUMER}")
            if "error" not in consumer:
                await self._api(f"CONSUMER.CREATE.{stream}.{nm.CONSUMER}", {
                    "stream_name": stream, "action": "update",
                    "config": nm.consumer_config(self.ns, queue, settings)})
        self._queues[queue] = settings
        await self._sweep(queue)
        return settings.as_dict()

    async def purge(self, queue: str) -> int:
        """Remove the queue's ready and delayed messages and keep the leased ones, as the
        local broker does. With nothing leased, one purge of the stream. Otherwise the
        delayed sends (their schedule subjects) in one filtered purge, and the ready
        messages, those after the shared consumer's delivered stream sequence, one
        delete each (pipelined, _PURGE_WINDOW at a time): a purge removes a range from
        the oldest, and the leased messages are the oldest. A message given back and not
        yet delivered again is kept (on NATS it is unacked, not ready)."""
        stream = self.ns.stream(queue)
        consumer = await self._api(f"CONSUMER.INFO.{stream}.{nm.CONSUMER}")
        if "error" in consumer or not int(consumer.get("num_ack_pending", 0)):
            result = await self._api("STREAM.PURGE." + stream)
            if "error" in result:
                raise nm.no_such_queue(queue)
            return int(result.get("purged", 0))
        delayed = await self._api("STREAM.PURGE." + stream,
                                  {"filter": self.ns.schedule_prefix(queue) + ">"})
        info = await self._api("STREAM.INFO." + stream)
        if "error" in info or "error" in delayed:
            raise nm.no_such_queue(queue)
        first = int(consumer["delivered"]["stream_seq"]) + 1
        last = int(info["state"].get("last_seq", 0))
        deleted = 0
        for start in range(first, last + 1, _PURGE_WINDOW):
            answers = await asyncio.gather(*(
                self._api(f"STREAM.MSG.DELETE.{stream}", {"seq": seq, "no_erase": True})
                for seq in range(start, min(start + _PURGE_WINDOW, last + 1))))
            deleted += sum(1 for answer in answers if answer.get("success"))
        return int(delayed.get("purged", 0)) + deleted

    async def delete(self, queue: str, if_empty: bool) -> int:
        stream = self.ns.stream(queue)
        info = await self._api("STREAM.INFO." + stream)
        if "error" in info:
            raise nm.no_such_queue(queue)
        count = int(info["state"].get("messages", 0))
        if if_empty and count:
            raise QueueNotEmpty(f"queue {shown(queue)} is not empty: {count} ready or"
                                " unacked; nothing was deleted")
        await self._api("STREAM.DELETE." + stream)
        self._queues.pop(queue, None)
        for pull in list(self._pulls.values()):
            if pull.queue == queue:  # in use: there again at once, empty, with defaults
                for lease in pull.leases:
                    lease.gone = True  # its message went with the stream
                await self._recreate(pull)
        return count
