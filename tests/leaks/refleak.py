"""Reference-leak check: run under a debug interpreter (scripts/refleak).

Each scenario runs a few times to warm caches, then 30 more times; the total
reference count must not grow with the repetitions (a leak shows up as at
least one reference per repetition).  Allocated blocks are printed too:
they plateau as thread-pool and logging caches fill, rather than growing.
"""
import asyncio, gc, logging, os, signal, sys
logging.getLogger("aiorun").addHandler(logging.NullHandler())
logging.getLogger("aiorun").propagate = False
import aiorun
from aiorun import run, shutdown_waits_for

async def work(x):
    await asyncio.sleep(0)
    return x

async def bad():
    raise ValueError("x")

def scenario_run_stop():
    async def main():
        loop = asyncio.get_running_loop()
        loop.create_task(asyncio.sleep(10))
        assert await shutdown_waits_for(work(1)) == 1
        await loop.create_task(shutdown_waits_for(work(2)))
        shutdown_waits_for(work(3))
        try:
            await shutdown_waits_for(bad())
        except ValueError:
            pass
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await asyncio.sleep(10)
    async def cb(loop):
        await asyncio.sleep(0)
    run(main(), shutdown_callback=cb, executor_workers=2)

def scenario_unhandled():
    async def main():
        raise KeyError("k")
    try:
        run(main(), stop_on_unhandled_errors=True, shutdown_callback=lambda l: 1 / 0)
    except KeyError:
        pass

def scenario_stuck():
    async def naughty():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(10)   # refuses the first cancellation
    async def main():
        asyncio.get_running_loop().create_task(naughty())
        await asyncio.sleep(0)
        asyncio.get_running_loop().stop()
    loop = asyncio.new_event_loop()
    run(main(), loop=loop, timeout_task_shutdown=0.01)
    stuck = asyncio.all_tasks(loop)
    for t in stuck:
        t.cancel()
    loop.run_until_complete(asyncio.wait(stuck))
    loop.close()

def scenario_watchdog():
    # run() with the watchdog thread on, a signal, and a stuck-task warning
    # (its stacks go through stacks.c); the deadline is never reached.
    async def naughty():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)
    async def main():
        asyncio.get_running_loop().create_task(naughty())
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(10)
    run(main(), shutdown_deadline=30, exit_on_repeated_signal=True,
        timeout_task_shutdown=0.01)

def scenario_waiters():
    async def main():
        for i in range(1000):
            assert await shutdown_waits_for(work(i)) == i
        w = shutdown_waits_for(work(0))
        w.send(None)
        try:
            w.throw(KeyError("t"))
        except KeyError:
            pass
        await asyncio.sleep(0.01)
    asyncio.run(main())

def scenario_cancel_awaiter():
    # Task.cancel() reaches the waiter as throw(CancelledError) carrying a
    # traceback: the path every cancelled awaiting task takes.
    async def main():
        for _ in range(50):
            t = asyncio.ensure_future(shutdown_waits_for(work(0)))
            await asyncio.sleep(0)
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
        for _ in range(50):   # an exception that was raised has a traceback
            try:
                raise KeyError("raised")
            except KeyError as e:
                err = e
            w = shutdown_waits_for(work(0))
            w.send(None)
            try:
                w.throw(err)
            except KeyError:
                pass
            del err
        await asyncio.sleep(0.01)
    asyncio.run(main())

def scenario_waiters_10k():
    async def main():
        for i in range(10_000):
            await shutdown_waits_for(work(i))
    asyncio.run(main())

def scenario_thread_and_nested():
    # run() off the main thread (no signal handling), and run() refused
    # inside a running loop.
    import threading
    async def stop_soon():
        asyncio.get_running_loop().stop()
    t = threading.Thread(target=run, args=(stop_soon(),))
    t.start()
    t.join()
    async def nested():
        coro = stop_soon()
        try:
            run(coro)
        except RuntimeError:
            pass
        coro.close()
    asyncio.run(nested())

def scenario_bad_args():
    bad_kwargs = [dict(loop=1), dict(shutdown_handler=1), dict(shutdown_callback=1),
                  dict(executor_workers="1"), dict(executor_workers=0),
                  dict(executor=1), dict(use_uvloop="x"), dict(timeout_task_shutdown=-1),
                  dict(stop_on_unhandled_errors=None), dict(bogus=1),
                  dict(shutdown_deadline=0), dict(shutdown_deadline="1"),
                  dict(exit_on_repeated_signal="1")]
    for kw in bad_kwargs:
        try:
            run(**kw)
        except (TypeError, ValueError):
            pass
    try:
        run(5)
    except TypeError:
        pass
    for args in [(5,), ()]:
        try:
            shutdown_waits_for(*args)
        except TypeError:
            pass
    loop = asyncio.new_event_loop()
    try:
        run(loop=loop, use_uvloop=True)
    except Exception:
        pass
    loop.set_exception_handler(lambda l, c: None)
    try:
        run(loop=loop, stop_on_unhandled_errors=True)
    except Exception:
        pass
    loop.close()

def measure(fn, warm=5, reps=30):
    for _ in range(warm):
        fn()
    gc.collect()
    r0, b0 = sys.gettotalrefcount(), sys.getallocatedblocks()
    for _ in range(reps):
        fn()
    gc.collect()
    r1, b1 = sys.gettotalrefcount(), sys.getallocatedblocks()
    print(f"{fn.__name__:22s} reps={reps} refs delta={r1 - r0:+d} blocks delta={b1 - b0:+d}",
          flush=True)
    return r1 - r0, b1 - b0

if __name__ == "__main__":
    leaked = False
    reps = int(os.environ.get("REFLEAK_REPS", "30"))
    for fn in [scenario_cancel_awaiter, scenario_run_stop, scenario_unhandled, scenario_stuck,
               scenario_watchdog, scenario_waiters, scenario_waiters_10k,
               scenario_thread_and_nested, scenario_bad_args]:
        n = max(reps // 6, 3) if fn is scenario_waiters_10k else reps
        refs, blocks = measure(fn, reps=n)
        # Refs: at least one per repetition is a leak.  Blocks are shown
        # only: caches (thread pools, logging) still fill at these counts.
        leaked |= refs >= n
    sys.exit(1 if leaked else 0)
