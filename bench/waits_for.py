"""Cost of one `await shutdown_waits_for(coro)` against a bare `await coro`
and `await asyncio.shield(coro)`, in microseconds per call; run as a child
of bench/run.py, once per side, each in its own interpreter.

    python waits_for.py CALLS

The awaited coroutine yields to the loop once (asyncio.sleep(0)), as any
coroutine worth protecting does.  Prints one line per way:
"<way> <microseconds per call>".
"""
import asyncio
import sys
import time


async def work():
    await asyncio.sleep(0)
    return 1


async def bare():
    return await work()


async def task():
    return await asyncio.get_running_loop().create_task(work())


async def shield():
    return await asyncio.shield(work())


async def waits_for():
    from aiorun import shutdown_waits_for
    return await shutdown_waits_for(work())


async def measure(way, calls):
    # A warm-up round first, untimed, then the best of three rounds.
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        for _ in range(calls):
            await way()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


async def main(ways, calls):
    for name in ways:
        print(name, await measure(globals()[name], calls), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[2:] or ["bare", "task", "shield", "waits_for"], int(sys.argv[1])))
