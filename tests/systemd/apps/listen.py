"""The systemd guide's pattern: READY=1 only once the server listens."""
import asyncio

import aiorun


async def handle(reader, writer):
    writer.write(await reader.readline())   # echo one line
    writer.close()


async def main():
    await asyncio.sleep(2)   # a slow start-up: whatever comes before listening
    server = await asyncio.start_server(handle, "127.0.0.1", 18080)
    aiorun.notify_ready("serving on :18080")
    async with server:
        await server.serve_forever()


aiorun.run(main(), notify_ready_on_start=False)
