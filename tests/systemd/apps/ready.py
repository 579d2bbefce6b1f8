"""A Type=notify service with a slow first step and a slow shutdown_callback:
READY=1 must wait for the first step, and StatusText must show the phases."""
import asyncio
import pathlib
import time

from aiorun import run


async def main():
    time.sleep(2)   # the first step, before any await: READY=1 comes after it
    pathlib.Path("/run/aiorun-ready.first-step").write_text(f"{time.time()}\n")
    await asyncio.sleep(3600)


async def slow_callback(loop):
    await asyncio.sleep(3)   # long enough to be seen in `systemctl show`


run(main(), shutdown_callback=slow_callback)
