import asyncio

import aiobus


async def adder(bus: aiobus.Bus) -> None:
    async for msg in bus.consume("rpc.add"):
        await msg.reply(sum(msg.body))  # also acks the request


async def main() -> None:
    async with aiobus.connect() as bus, asyncio.TaskGroup() as tasks:
        service = tasks.create_task(adder(bus))
        print(await bus.request("rpc.add", [2, 5], timeout=5.0))  # 7
        service.cancel()


asyncio.run(main())
