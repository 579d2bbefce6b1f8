"""A shutdown that takes about 4.5 s, longer than TimeoutStopSec=2, but moves
from phase to phase within each: the shutdown_callback (1.5 s), the
worker's clean-up (1.5 s), then the executor's job that the clean-up
started last (1.5 s), one after the other.  EXTEND_TIMEOUT_USEC lets it
finish."""
import asyncio
import logging
import time

from aiorun import run

logging.basicConfig(level=logging.INFO)   # aiorun's INFO lines, into the journal


async def worker():
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(1.5)   # clean-up after the cancel
        print("worker cleaned up", flush=True)
        # Left to the executor's phase, which waits for it.
        asyncio.get_running_loop().run_in_executor(None, time.sleep, 1.5)
        raise


async def main():
    loop = asyncio.get_running_loop()
    loop.create_task(worker())
    await asyncio.sleep(3600)


async def callback(loop):
    await asyncio.sleep(1.5)


run(main(), shutdown_callback=callback)
