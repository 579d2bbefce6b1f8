"""A shutdown that hangs: the shutdown_callback blocks for good.  With
AIORUN_SHUTDOWN_DEADLINE set, aiorun ends it with code 124 and its
diagnosis before systemd's SIGKILL."""
import asyncio
import time

from aiorun import run


async def main():
    await asyncio.sleep(3600)


def hang(loop):
    time.sleep(3600)   # NEVER RETURNS


run(main(), shutdown_callback=hang)
