"""Reference-leak check: run under a debug interpreter (scripts/debug-python tests/leaks/refleak.py).

Each scenario runs a few times to warm caches, then REFLEAK_REPS (30) more
times.  After each repetition the type cache is cleared and the garbage
collected; a scenario leaks if the total reference count or the allocated
blocks grew in every one of the repetitions (the rule of regrtest -R).
"""
import asyncio, gc, logging, os, signal, sys
logging.getLogger("aiorun").addHandler(logging.NullHandler())
logging.getLogger("aiorun").propagate = False
# The stuck-task scenarios leave a task pending on purpose.
logging.getLogger("asyncio").addHandler(logging.NullHandler())
logging.getLogger("asyncio").propagate = False
import aiorun
from aiorun import run, shutdown_waits_for

if sys.platform.startswith("linux"):
    # A child subreaper, so reap_orphans runs its timer (scenario_ordered).
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER

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
    # Bounded: under fault injection asyncio can lose a task's wake-up, and
    # a shutdown step would then wait forever (the deadline's purpose).
    run(main(), shutdown_callback=cb, executor_workers=2, timeout_task_shutdown=2,
        shutdown_deadline=5)

def scenario_unhandled():
    async def main():
        raise KeyError("k")
    try:
        run(main(), stop_on_unhandled_errors=True, shutdown_callback=lambda l: 1 / 0,
            timeout_task_shutdown=2, shutdown_deadline=5)
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
    run(main(), shutdown_deadline=5, exit_on_repeated_signal=True,
        timeout_task_shutdown=0.01)
    # The watchdog left to bound the exit, taken down by the next run().
    run(main(), shutdown_deadline=5, timeout_task_shutdown=0.01,
        deadline_covers_exit=True)

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

def scenario_cancel_awaiter(rounds=50):
    # Task.cancel() reaches the waiter as throw(CancelledError) carrying a
    # traceback: the path every cancelled awaiting task takes.
    async def main():
        for _ in range(rounds):
            t = asyncio.ensure_future(shutdown_waits_for(work(0)))
            await asyncio.sleep(0)
            t.cancel()
            try:
                await t
            except asyncio.CancelledError:
                pass
        loop = asyncio.get_running_loop()
        for _ in range(rounds):   # cancelled in the turn in which the work ends
            async def ending():
                loop.call_soon(t.cancel)
            t = loop.create_task(shutdown_waits_for(ending()))
            try:
                await t
            except asyncio.CancelledError:
                pass
        for _ in range(rounds):   # an exception that was raised has a traceback
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

def scenario_notify():
    # systemd notifications (notify.c): READY, pings on the loop,
    # notify_ready(), STOPPING and the phases, and drops once the
    # receiver's queue (never read here) is full.
    import socket
    name = f"aiorun-refleak-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        receiver.bind("\0" + name)
        os.environ.update(NOTIFY_SOCKET="@" + name, WATCHDOG_USEC="20000")
        async def main():
            aiorun.notify_ready("warm")
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(10)
        run(main(), timeout_task_shutdown=2, shutdown_deadline=5)
    finally:
        os.environ.pop("NOTIFY_SOCKET", None)
        os.environ.pop("WATCHDOG_USEC", None)
        receiver.close()

def scenario_fdstore():
    # The fd store and socket activation (fdstore.c, activation.c): fds
    # delivered, refused as full, dropped by a full queue; every argument
    # error; malformed LISTEN_* variables, which take nothing.
    import logging, socket
    logger = logging.getLogger("aiorun")
    name = f"aiorun-refleak-store-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    a, b = socket.socketpair()
    logger.disabled = True
    try:
        receiver.bind("\0" + name)
        os.environ.update(NOTIFY_SOCKET="@" + name, FDSTORE="1")
        aiorun.store_fd(a, "a", poll=False)
        aiorun.store_fd(b, "b")                  # full
        aiorun.remove_stored_fd("a")
        for _ in range(20):                      # until the queue drops them
            aiorun.store_fd(a.fileno(), "a")
            aiorun.remove_stored_fd("a")
        for args in [(a, ""), (a, "x:y"), (a, 3), ("x", "a"), (-1, "a")]:
            try:
                aiorun.store_fd(*args)
            except (TypeError, ValueError):
                pass
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="a:b")
        for env in [{"LISTEN_FDS": "x"}, {"LISTEN_FDS": "1"}]:
            os.environ.update(env)
            try:
                aiorun.listen_sockets()
            except ValueError:
                pass
    finally:
        logger.disabled = False
        for key in ("NOTIFY_SOCKET", "FDSTORE", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(key, None)
        receiver.close()
        a.close()
        b.close()

def scenario_reload():
    # SIGHUP with reload_callback (reload.c): a reload that works, one that
    # raises, SIGHUPs coalesced during a reload, and one cut short by the
    # shutdown, with notifications to a receiver nobody reads.
    import logging, socket
    logger = logging.getLogger("aiorun")
    name = f"aiorun-refleak-reload-{os.getpid()}"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    calls = []
    async def reload():
        calls.append(1)
        await asyncio.sleep(0.01)
        if len(calls) % 2 == 0:
            raise ValueError("reload fails")
    async def main():
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGHUP)
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.03)
        os.kill(os.getpid(), signal.SIGHUP)
        await asyncio.sleep(0)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(10)
    logger.disabled = True
    try:
        receiver.bind("\0" + name)
        os.environ["NOTIFY_SOCKET"] = "@" + name
        run(main(), reload_callback=reload, timeout_task_shutdown=2)
        run(main(), reload_callback=lambda: None, timeout_task_shutdown=2)
    finally:
        logger.disabled = False
        os.environ.pop("NOTIFY_SOCKET", None)
        receiver.close()

def scenario_health():
    # The health endpoint (health.c): start, probes answered while the loop
    # runs, ready turned by notify_ready(), bad addresses and a port in use
    # refused, and a run() in sequence with a unix socket.
    import logging, socket, tempfile
    logger = logging.getLogger("aiorun")
    async def ask(where, family, path):
        # On the loop, not in the executor: a thread pool that fault
        # injection breaks (a lock left held) would hang CPython's side.
        if family == socket.AF_UNIX:
            reader, writer = await asyncio.open_unix_connection(where)
        else:
            reader, writer = await asyncio.open_connection(*where)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\n\r\n".encode())
            await reader.read()
        finally:
            writer.close()
    async def main(where_box, family):
        loop = asyncio.get_running_loop()
        try:   # stops even when an ask fails (fault injection)
            for path in ("/readyz", "/livez", "/nope"):
                await ask(where_box[0], family, path)
            aiorun.notify_ready()
        finally:
            loop.stop()
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    logger.disabled = True
    try:
        box = []
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        box.append(("127.0.0.1", port))
        # A bounded wait for the tasks: fault injection can leave one that
        # never ends (a callback of asyncio's lost).
        run(main(box, socket.AF_INET), health=f"127.0.0.1:{port}", liveness_timeout=0.5,
            timeout_task_shutdown=1)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "h.sock")
            run(main([path], socket.AF_UNIX), health=path, timeout_task_shutdown=1)
        for bad in ("nowhere", 1.5, 70000, f"127.0.0.1:{busy.getsockname()[1]}"):
            try:
                run(main(box, socket.AF_INET), health=bad)
            except (ValueError, TypeError, OSError):
                pass
    finally:
        logger.disabled = False
        busy.close()

def scenario_report():
    # The shutdown report (report.c): the summary line and the JSON of a
    # shutdown with a refused task, protected work and an error, and a path
    # that cannot be written.
    import logging, tempfile
    logger = logging.getLogger("aiorun")
    async def stubborn():
        for _ in range(3):
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
    async def saved():
        await asyncio.sleep(0.01)
    async def main():
        asyncio.ensure_future(stubborn())
        asyncio.ensure_future(shutdown_waits_for(saved()))
        await asyncio.sleep(0)
        raise ValueError("boom")
    logger.disabled = True
    try:
        with tempfile.TemporaryDirectory() as d:
            try:
                run(main(), stop_on_unhandled_errors=True, timeout_task_shutdown=0.05,
                    shutdown_report=os.path.join(d, "r.json"))
            except ValueError:
                pass
            run(stop_soon(), shutdown_report=os.path.join(d, "no", "r.json"))
    finally:
        logger.disabled = False

async def stop_soon():
    asyncio.get_running_loop().stop()

async def cli_target():
    asyncio.get_running_loop().stop()

def scenario_cli():
    # python -m aiorun's logic (cli.c): a good command line and every kind
    # of usage error, which argparse reports on stderr with SystemExit(2).
    import contextlib, io
    argv = sys.argv
    bad = [[], ["nosuch_module_x:main"], ["refleak:nosuch"], ["refleak"],
           ["refleak:SCENARIOS"], ["--shutdown-deadline", "0", "refleak:cli_target"],
           ["--executor-workers", "x", "refleak:cli_target"]]
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            for args in bad:
                try:
                    aiorun._aiorun._main(args)
                except SystemExit:
                    pass
        aiorun._aiorun._main(["--timeout-task-shutdown", "1", "--executor-workers", "2",
                              "refleak:cli_target", "--app-flag"])
    finally:
        sys.argv = argv

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
                  dict(exit_on_repeated_signal="1"), dict(notify_ready_on_start=None),
                  dict(drain_delay=-1), dict(cancel_main_first="x"),
                  dict(task_dump_signal=signal.SIGKILL), dict(task_dump_signal=32),
                  dict(task_dump_signal="x"), dict(reap_orphans="x")]
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
    for exc in [5, ValueError(), asyncio.CancelledError("aiorun shutdown: SIGTERM")]:
        try:
            aiorun.cancelled_by_shutdown(exc)
        except TypeError:
            pass
    try:
        aiorun.shutdown_event()
    except RuntimeError:
        pass
    for status in [5, "two\nlines"]:
        try:
            aiorun.notify_ready(status)
        except (TypeError, ValueError):
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

def scenario_ordered():
    # drain_delay, cancel_main_first, shutdown_event(), the cancel messages,
    # a task dump on SIGUSR1, the main coroutine's result, a reaper timer
    # (this process is a subreaper, see the top), and a stuck main task.
    async def worker():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as e:
            assert aiorun.cancelled_by_shutdown(e)
            raise
    async def main():
        loop = asyncio.get_running_loop()
        loop.create_task(worker())
        event = aiorun.shutdown_event()
        os.kill(os.getpid(), signal.SIGUSR1)
        await asyncio.sleep(0.01)
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        await event.wait()
        return "result"
    assert run(main(), drain_delay=0.05, cancel_main_first=True, task_dump_signal=True,
               reap_orphans=True, timeout_task_shutdown=2, shutdown_deadline=5) == "result"
    async def stuck_main():
        loop = asyncio.get_running_loop()
        loop.create_task(worker())
        loop.call_soon(loop.stop)
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
    run(stuck_main(), cancel_main_first=True, timeout_task_shutdown=0.01)

_int_pool = {n: n for n in range(-1000, 1000)}

def _pooled(n):
    # The deltas are stored without creating a new int each time, so the
    # bookkeeping itself adds no reference (regrtest's trick).
    return _int_pool.setdefault(n, n)

def _settle():
    # Drop what caches hold on to between repetitions, as regrtest -R does.
    sys._clear_type_cache()
    gc.collect()

def measure(fn, warm=5, reps=30, report=True):
    """Per-repetition deltas of refs and allocated blocks after warm-up.

    A leak is a delta of at least 1 in every repetition (regrtest's rule:
    a cache that fills shows up as a few early positives, then zeros).
    The warm-up runs through the same loop, so its bookkeeping is warm too.
    """
    refs, blocks = [0] * (warm + reps), [0] * (warm + reps)
    _settle()
    r0, b0 = sys.gettotalrefcount(), sys.getallocatedblocks()
    for i in range(warm + reps):
        fn()
        _settle()
        r1, b1 = sys.gettotalrefcount(), sys.getallocatedblocks()
        refs[i], blocks[i] = _pooled(r1 - r0), _pooled(b1 - b0)
        r0, b0 = r1, b1
    refs, blocks = refs[warm:], blocks[warm:]
    leak = all(d >= 1 for d in refs) or all(d >= 1 for d in blocks)
    if not report:
        return leak
    print(f"{fn.__name__:26s} reps={reps:3d} refs delta={sum(refs):+d} "
          f"blocks delta={sum(blocks):+d} {'LEAK' if leak else 'ok'}", flush=True)
    if leak or os.environ.get("REFLEAK_VERBOSE"):
        print(f"    refs per rep {refs}\n    blocks per rep {blocks}", flush=True)
    return leak

SCENARIOS = ["scenario_cancel_awaiter", "scenario_run_stop", "scenario_unhandled",
             "scenario_stuck", "scenario_watchdog", "scenario_waiters", "scenario_waiters_10k",
             "scenario_thread_and_nested", "scenario_bad_args", "scenario_notify", "scenario_cli",
             "scenario_ordered", "scenario_fdstore", "scenario_reload",
             "scenario_health", "scenario_report"]
_kept = []

def canary_leaks_one_object_per_rep():
    _kept.append(object())

if __name__ == "__main__":
    # The check must be able to fail: a known leak has to be reported.
    if not measure(canary_leaks_one_object_per_rep, warm=2, reps=5, report=False):
        sys.exit("refleak: the canary leak was not detected; the check is broken")
    print("canary: a leak of one object per repetition is detected", flush=True)
    _kept.clear()
    leaked = False
    reps = int(os.environ.get("REFLEAK_REPS", "30"))
    for fn in [globals()[name] for name in SCENARIOS]:
        n = max(reps // 6, 3) if fn is scenario_waiters_10k else reps
        leaked |= measure(fn, reps=n)
    sys.exit(1 if leaked else 0)
