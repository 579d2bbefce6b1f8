"""A shutdown that takes about 4.5 s, longer than TimeoutStopSec=2, but moves
from phase to phase within each: EXTEND_TIMEOUT_USEC lets it finish."""
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
        raise


async def main():
    loop = asyncio.get_running_loop()
    loop.create_task(worker())
    await asyncio.sleep(3600)


async def callback(loop):
    await asyncio.sleep(1.5)
    loop.run_in_executor(None, time.sleep, 1.5)   # the executor's shutdown waits for it


run(main(), shutdown_callback=callback)
