"""A run() on a helper thread that starts before the main one is ready and
ends while it serves: the main run() owns the service, so systemd hears
nothing from the helper (no early READY=1, no STOPPING=1 at its end)."""
import asyncio
import threading

import aiorun

helper_done = threading.Event()


def helper():
    async def work():
        await asyncio.sleep(1)
        asyncio.get_running_loop().stop()
    aiorun.run(work())
    helper_done.set()


async def main():
    threading.Thread(target=helper).start()
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, helper_done.wait)
    # A datagram after anything the helper could have sent: once systemd
    # shows this status, it has read those too.
    aiorun.notify_ready("helper done")
    await asyncio.sleep(3600)


aiorun.run(main())
