"""What a user waits for before their code runs: from the first line of the
script, before any import, to the first line of main(); run as a child of
bench/run.py, once per sample.

    python startup.py ours|original|asyncio

ours/original: `from aiorun import run` and `run(main())` (which makes the
loop, installs the signal handlers and the default executor); asyncio:
`import asyncio` and `asyncio.run(main())`.  main() stops at once; the
shutdown is not timed.  Prints "<wall seconds> <CPU seconds>" (CPU: this
process's, which other processes on a shared machine disturb far less).
"""
import time

START_WALL, START_CPU = time.perf_counter(), time.process_time()

import sys  # noqa: E402  (already loaded by the interpreter: costs nothing)

marks = []


async def main():
    marks.append((time.perf_counter() - START_WALL, time.process_time() - START_CPU))
    if sys.argv[1] != "asyncio":
        import asyncio
        asyncio.get_running_loop().stop()


if sys.argv[1] == "asyncio":
    import asyncio
    asyncio.run(main())
else:
    from aiorun import run
    run(main())
print(*marks[0])
