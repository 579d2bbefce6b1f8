# aiorun's documentation elides main() ("<snip>"); this one says which
# loop it runs on.
import asyncio
from aiorun import run

async def main():
    print('Running on', type(asyncio.get_running_loop()).__module__)
    await asyncio.sleep(3600)

if __name__ == '__main__':
    run(main(), use_uvloop=True)
