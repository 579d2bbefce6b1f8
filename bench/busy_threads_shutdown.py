"""How long the shutdown of 2000 tasks takes while four other threads keep
the CPUs busy.  On a free-threaded build this is where lock contention
shows: each task's done callback must get in while the busy threads run.

    PYTHON_GIL=0 .venvs/py3.13t/bin/python bench/busy_threads_shutdown.py
"""
import asyncio
import threading
import time

from aiorun import run

TASKS = 2000
BUSY_THREADS = 4
stop = False


def spin():
    x = 0
    while not stop:
        x += 1


async def main():
    global started
    loop = asyncio.get_running_loop()
    for _ in range(TASKS):
        loop.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0.1)
    started = time.perf_counter()
    loop.stop()


spinners = [threading.Thread(target=spin) for _ in range(BUSY_THREADS)]
for t in spinners:
    t.start()
run(main())
took = time.perf_counter() - started
stop = True
for t in spinners:
    t.join()
print(f"shutdown of {TASKS} tasks with {BUSY_THREADS} busy threads: {took:.3f} s")
