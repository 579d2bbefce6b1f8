"""The app bench/health.py measures: a line server (each "ping\\n" is
answered "pong\\n") under aiorun, with or without the health endpoint.  On
stdin, "hold" calls a C function that keeps the GIL for 10 s (ctypes.PyDLL),
"sleep" calls time.sleep(10) on the loop.

    python health_app.py PORT HEALTH   (HEALTH: an address, or "off")
"""
import asyncio
import ctypes
import sys
import time

import aiorun

port, health = int(sys.argv[1]), sys.argv[2]


async def serve(reader, writer):
    try:
        while await reader.readline():
            writer.write(b"pong\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main():
    loop = asyncio.get_running_loop()
    await asyncio.start_server(serve, "127.0.0.1", port, backlog=1024)
    print("SERVING", flush=True)
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if line == "hold":
            print("HOLDING", flush=True)
            ctypes.PyDLL(None).usleep(10_000_000)   # the GIL stays held
            print("DONE", flush=True)
        elif line == "sleep":
            print("SLEEPING", flush=True)
            time.sleep(10)
            print("DONE", flush=True)
        elif not line:
            return


aiorun.run(main(), **({} if health == "off" else
                      {"health": health, "liveness_timeout": 2}))
