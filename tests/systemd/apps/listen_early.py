"""The pitfall: the default READY=1 (after the main coroutine's first step)
goes out before the server listens."""
import asyncio

import aiorun


async def handle(reader, writer):
    writer.write(await reader.readline())
    writer.close()


async def main():
    await asyncio.sleep(2)   # the first step ends here: READY=1 goes out now
    server = await asyncio.start_server(handle, "127.0.0.1", 18081)
    async with server:
        await server.serve_forever()


aiorun.run(main())
