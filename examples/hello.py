# The big idea: run() runs forever; Ctrl-C (or SIGTERM) shuts down cleanly.
import asyncio
from aiorun import run

async def main():
    # Put your application code here
    await asyncio.sleep(1.0)

if __name__ == '__main__':
    run(main())
