"""Run as `python -m aiorun jobs:main`: an executor job is still running
when the service is stopped, and the shutdown waits for it."""
import asyncio
import logging
import time

logging.basicConfig(level=logging.INFO)   # aiorun's INFO lines, into the journal


def job():
    print("job started", flush=True)
    time.sleep(3)
    print("job done", flush=True)


async def main():
    asyncio.get_running_loop().run_in_executor(None, job)
    await asyncio.sleep(3600)
