"""The aiohttp twin of web.py: GET answers the pid and the greeting of the
last reload, on the socket systemd passes (aiorun-aiohttp.socket, "web"), or
on a port of its own (aiorun-aiohttp-bound.service, the baseline).  On
SIGTERM it stops accepting and finishes the requests in flight."""
import asyncio
import os
import socket
import sys

from aiohttp import web

import aiorun

GREETING_FILE = "/run/aiorun-web.greeting"
greeting = ["hello"]


async def reload():
    with open(GREETING_FILE) as f:
        new = f.read().strip()
    if new == "fail":
        raise ValueError("the greeting file says fail")
    greeting[0] = new


async def hello(request):
    return web.Response(text=f"{os.getpid()} {greeting[0]}\n")


async def main():
    passed = aiorun.listen_sockets().get("web")
    if passed:
        sock = passed[0]
    else:
        sock = socket.create_server(("127.0.0.1", int(sys.argv[1])),
                                    backlog=socket.SOMAXCONN)
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=socket.SOMAXCONN)
    await site.start()
    aiorun.notify_ready("serving")
    await aiorun.shutdown_event().wait()
    await site.stop()        # accept no more; the socket stays systemd's
    # runner.cleanup() closes the connections that have not sent a request
    # yet, among them those accepted just before the stop: wait until every
    # connection is done (bounded), polling aiohttp's list of them.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        await asyncio.sleep(0.05)
        if not runner.server.connections or loop.time() > deadline:
            break
    await runner.cleanup()


aiorun.run(main(), notify_ready_on_start=False, drain_delay=10, reload_callback=reload)
