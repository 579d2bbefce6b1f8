"""Many run() calls at once, each on a thread of its own with its own loop.

Every run protects coroutines with shutdown_waits_for(), leaves other tasks
to be cancelled by its shutdown, and stops its loop itself.  Meanwhile a
hammer thread asks every run for its shutdown_event() from outside (the
runs registry and each Run's critical section under contention) and reads
the ShutdownWaiters and ShutdownWaitFutures of the other loops.

What a user would check, for every round of every thread:
- run() returned what the main coroutine returned;
- every protected coroutine ran to its end, though its awaiter was cancelled;
- every other task was cancelled, with aiorun's shutdown message;
- the shutdown_event() of the run was set;
and at the end: no thread raised, the collector is on, and on a
free-threaded build the GIL stayed off.

    python tests/reliability/threads_stress.py --threads 16 --rounds 20
Exit code 0 when every check held; 1 with the failures listed.
"""
import argparse
import asyncio
import gc
import logging
import sys
import sysconfig
import threading
import traceback

import aiorun
from aiorun import run, shutdown_waits_for


def one_run(tid, rnd, tasks_per_run, live_loops, live_waits, lock):
    finished = []

    async def protected(k):
        for _ in range(3):
            await asyncio.sleep(0)
        if k >= tasks_per_run // 2:
            # The second half outlasts the loop: the shutdown waits for it.
            await aiorun.shutdown_event().wait()
        await asyncio.sleep(0.001)
        finished.append(k)
        return k

    async def awaiter(waiter):
        return await waiter

    cut_short = []

    async def sleeper():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError as exc:
            # Here, in the task: 3.9's task.result() drops the message.
            cut_short.append(aiorun.cancelled_by_shutdown(exc))
            raise

    async def main():
        loop = asyncio.get_running_loop()
        event = aiorun.shutdown_event()
        waiters = [shutdown_waits_for(protected(k)) for k in range(tasks_per_run)]
        awaiters = [loop.create_task(awaiter(w)) for w in waiters]
        sleepers = [loop.create_task(sleeper()) for _ in range(tasks_per_run)]
        await asyncio.sleep(0)
        with lock:
            live_loops[tid] = loop
            live_waits[tid] = waiters
        # Half the awaiters are seen through; the rest are cancelled by the
        # shutdown while their protected coroutines run on.
        got = await asyncio.gather(*awaiters[: tasks_per_run // 2])
        assert got == list(range(tasks_per_run // 2)), got
        loop.call_soon(loop.stop)
        return (tid, rnd, event, awaiters, sleepers)

    result = run(main(), timeout_task_shutdown=30)
    with lock:
        live_loops.pop(tid, None)
        live_waits.pop(tid, None)
    problems = []
    got_tid, got_rnd, event, awaiters, sleepers = result
    where = f"thread {tid} round {rnd}"
    if (got_tid, got_rnd) != (tid, rnd):
        problems.append(f"{where}: run() returned {result[:2]}")
    if sorted(finished) != list(range(tasks_per_run)):
        problems.append(f"{where}: protected coroutines that did not finish: "
                        f"{sorted(set(range(tasks_per_run)) - set(finished))}")
    cancelled = [t for t in awaiters[tasks_per_run // 2:] if t.cancelled()]
    if len(cancelled) != tasks_per_run - tasks_per_run // 2:
        problems.append(f"{where}: {len(cancelled)} awaiters cancelled, expected "
                        f"{tasks_per_run - tasks_per_run // 2}")
    if not all(task.cancelled() for task in sleepers):
        problems.append(f"{where}: a sleeper was not cancelled")
    if cut_short != [True] * tasks_per_run:
        problems.append(f"{where}: sleepers cut short by the shutdown: {cut_short}")
    if not event.is_set():
        problems.append(f"{where}: the shutdown_event() was not set")
    return problems


def hammer(stop, live_loops, live_waits, lock, counts):
    """Reaches into the other threads' runs while they go on."""
    while not stop.is_set():
        with lock:
            loops = list(live_loops.values())
            waiters = [w for ws in live_waits.values() for w in ws]
        for loop in loops:
            try:
                aiorun.shutdown_event(loop=loop)
                counts["events"] += 1
            except RuntimeError:
                counts["ended"] += 1   # that run() ended meanwhile
        for waiter in waiters:
            # What a ShutdownWaiter awaits (a ShutdownWaitFuture, or None),
            # and that wait's state, read from here while its loop runs.
            # Only aiorun's objects: asyncio's and CPython's coroutines are
            # not made to be read from another thread while they run.
            wait = waiter.cr_await
            if wait is not None:
                wait.cancelled()
                wait._asyncio_future_blocking
                counts["waits"] += 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=20, help="protected tasks per run")
    args = parser.parse_args()
    # Every run() off the main thread warns that it leaves the signals alone.
    logging.getLogger("aiorun").setLevel(logging.ERROR)

    lock = threading.Lock()
    live_loops, live_waits = {}, {}
    problems, errors = [], []
    counts = {"events": 0, "ended": 0, "waits": 0}

    def worker(tid):
        try:
            for rnd in range(args.rounds):
                found = one_run(tid, rnd, args.tasks, live_loops, live_waits, lock)
                with lock:
                    problems.extend(found)
        except BaseException as exc:  # noqa: BLE001 - reported below
            where = traceback.extract_tb(exc.__traceback__)[-1]
            with lock:
                errors.append(f"thread {tid}: {type(exc).__name__}: {exc} "
                              f"(at {where.filename}:{where.lineno} in {where.name})")

    stop = threading.Event()
    hammering = threading.Thread(target=hammer, args=(stop, live_loops, live_waits, lock,
                                                      counts))
    hammering.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    hammering.join()

    if not gc.isenabled():
        problems.append("the garbage collector was left off")
    free_threaded = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
    gil = sys._is_gil_enabled() if hasattr(sys, "_is_gil_enabled") else True
    if free_threaded and gil:
        problems.append("the GIL is on in a free-threaded build")
    runs = args.threads * args.rounds
    print(f"{runs} runs on {args.threads} threads, {runs * args.tasks} protected "
          f"coroutines; from outside: {counts['events']} shutdown_event() calls "
          f"({counts['ended']} on a run that had ended), {counts['waits']} waits read; "
          f"GIL {'on' if gil else 'off'}")
    for line in errors + problems:
        print("FAILED:", line)
    return 1 if errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
