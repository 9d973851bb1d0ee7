import asyncio

import aiobus


async def listen() -> None:
    async with aiobus.connect() as bus:
        async for msg in bus.subscribe("weather.*"):
            print(msg.topic, msg.body)


asyncio.run(listen())
