import asyncio

import aiobus


async def main() -> None:
    async with aiobus.connect() as bus:  # finds the broker's default socket
        await bus.declare_queue("jobs", retry_delays=[1, 5, 30], max_deliveries=5)
        for n in range(10):
            await bus.send("jobs", {"n": n})  # returns once the broker accepted it
        await bus.publish("weather.hk", {"celsius": 31})


asyncio.run(main())
