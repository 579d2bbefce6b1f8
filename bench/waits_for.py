"""Cost of one `await shutdown_waits_for(coro)` against a bare `await coro`,
`await loop.create_task(coro)` and `await asyncio.shield(coro)`, in
microseconds per call; run as a child of bench/run.py, once per side and
loop, each in its own interpreter.

    python waits_for.py CALLS [--loop asyncio|uvloop] [--rounds 3] [WAY ...]

The awaited coroutine yields to the loop once (asyncio.sleep(0)), as any
coroutine worth protecting does.  The ways take turns within each round
(so a slow moment of a shared machine hits them alike), after one untimed
warm-up round; each way's figure is its best round, in CPU time of this
process, which other processes on the machine disturb far less than the
wall clock.  Prints one line per way: "<way> <microseconds per call>".
bench/waits_for_profile.py runs this under callgrind with --rounds 1.
"""
import argparse
import asyncio
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
    return await shutdown_waits_for(work())


# For bench/waits_for_profile.py: what one asyncio.Future costs to make and
# free (future - noop), the price of asyncio's fast path for an awaited
# future-like.
async def noop():
    return asyncio.get_running_loop()


async def future():
    return asyncio.get_running_loop().create_future()


async def main(ways, calls, rounds):
    best = dict.fromkeys(ways, float("inf"))
    for r in range(rounds + 1):
        for name in ways:
            way = globals()[name]
            start = time.process_time()
            for _ in range(calls):
                await way()
            if r > 0:
                best[name] = min(best[name], time.process_time() - start)
    for name in ways:
        print(name, best[name] / max(calls, 1) * 1e6, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("calls", type=int)
    parser.add_argument("ways", nargs="*", default=["bare", "task", "shield", "waits_for"])
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from aiorun import shutdown_waits_for
    if args.loop == "uvloop":
        import uvloop
        uvloop.run(main(args.ways, args.calls, args.rounds))
    else:
        asyncio.run(main(args.ways, args.calls, args.rounds))
