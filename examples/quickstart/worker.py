import asyncio

import aiobus


async def worker() -> None:
    async with aiobus.connect(name="worker") as bus:
        await bus.declare_queue("jobs", retry_delays=[1, 5, 30], max_deliveries=5)
        async for msg in bus.consume("jobs", prefetch=16):
            async with msg.process():  # ack on success, nack (retry later) on error
                print("job", msg.body, "attempt", msg.attempt)


asyncio.run(worker())
