# The first shield example of aiorun's documentation (its missing ':'
# after "except asyncio.CancelledError" is the only change).
import asyncio
from aiorun import run, shutdown_waits_for

async def corofn():
    await asyncio.sleep(60)
    print('done!')

async def main():
    try:
        await shutdown_waits_for(corofn())
    except asyncio.CancelledError:
        print('oh noes!')

run(main())
