"""Pings systemd's watchdog from its loop; once /run/aiorun-block exists,
a stray time.sleep() blocks the loop, so the pings stop."""
import asyncio
import os
import time

from aiorun import run

BLOCK = "/run/aiorun-block"


async def main():
    while True:
        if os.path.exists(BLOCK):
            os.remove(BLOCK)    # once: the restarted service runs healthy
            print("blocking the loop", flush=True)
            time.sleep(3600)
        await asyncio.sleep(0.1)


run(main())
