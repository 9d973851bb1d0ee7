import asyncio
import tempfile

import aiobus


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        async with aiobus.Broker(path=f"{tmp}/app.sock"):  # in this event loop
            async with aiobus.connect(f"{tmp}/app.sock") as bus:
                await bus.send("greetings", "hello from inside")
                async with bus.consume("greetings") as messages:
                    msg = await anext(messages)
                    async with msg.process():
                        print(msg.body)


asyncio.run(main())
