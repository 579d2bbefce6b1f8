"""An aiohttp app run by aiorun the way a load balancer wants it: it serves
until its main task is cancelled, which aiorun does only after drain_delay;
the health endpoint's /readyz has turned 503 from the first moment of the
shutdown, so the balancer stops sending new requests meanwhile.

    python app.py NAME HTTP_PORT HEALTH_PORT DRAIN_DELAY
"""
import asyncio
import socket
import sys

from aiohttp import web

import aiorun

name, http_port, health_port, drain_delay = sys.argv[1:5]


async def hello(request):
    return web.Response(text=f"{name}\n")


async def main():
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(http_port), backlog=socket.SOMAXCONN)
    await site.start()
    print("SERVING", flush=True)
    try:
        await asyncio.Event().wait()      # serve until cancelled
    finally:
        await site.stop()                 # accept no more
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10       # let requests in flight finish
        while runner.server.connections and loop.time() < deadline:
            await asyncio.sleep(0.05)
        await runner.cleanup()


aiorun.run(main(), health=f"127.0.0.1:{health_port}", drain_delay=float(drain_delay))
