"""Usage scenarios run under both packages, this one and aiorun 2025.1.1
from PyPI, and their transcripts compared: exit code, stdout, every log
line of every logger (DEBUG and up) and the last line of an error, once
addresses, ports, task numbers and paths are taken out (test_differential).

A scenario may differ only under the names of accepted differences
(tests/differences.py, the "What differs" page); it must then
differ, so that no accepted difference is claimed without a behaviour
behind it.  Every other scenario must match line for line.
"""
import difflib
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import PRELUDE, PYPY, PYPY_GC, App
from differences import ACCEPTED
from test_differential import original_python, transcript  # noqa: F401 (fixture)

# Each scenario: its body (after the tests' PRELUDE), how it is driven
# (None: it ends by itself; else the line it prints when ready and the
# signal it then gets), and the accepted differences it shows.
SCENARIOS = {}


def scenario(name, body, ready=None, sig=signal.SIGINT, differs=()):
    assert all(d in ACCEPTED for d in differs), differs
    SCENARIOS[name] = (textwrap.dedent(body), ready and (ready, sig), tuple(differs))


scenario("sigint, tasks cancelled, their clean-up runs", """
    done = []
    async def worker(n):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            done.append(n)
            raise
    async def main():
        for n in range(3):
            asyncio.get_running_loop().create_task(worker(n))
        await asyncio.sleep(0)
        say("READY")
        await asyncio.sleep(3600)
    run(main())
    say("cleaned up", sorted(done))
""", ready="READY")

scenario("sigterm", """
    async def main():
        say("READY")
        await asyncio.sleep(3600)
    run(main())
    say("after run")
""", ready="READY", sig=signal.SIGTERM, differs=("Every shutdown ends with one INFO summary line",))

scenario("loop.stop() from main", """
    async def main():
        await asyncio.sleep(0.01)
        say("stopping")
        asyncio.get_running_loop().stop()
    run(main())
    say("after run")
""")

scenario("run() without a coroutine, stopped by a signal", """
    def ready():
        say("READY")
    loop = asyncio.new_event_loop()
    loop.call_soon(ready)
    run(loop=loop)
    say("loop closed", loop.is_closed())
    loop.close()
""", ready="READY")

scenario("run() returns the main coroutine's value", """
    async def main():
        asyncio.get_running_loop().call_soon(asyncio.get_running_loop().stop)
        return 42
    say("run returned", run(main()))
""", differs=["`run()` returns the main coroutine's return value"])

scenario("shutdown_callback: a coroutine", """
    async def bye():
        await asyncio.sleep(0.01)
        say("callback ran")
    async def main():
        say("READY")
        await asyncio.sleep(3600)
    run(main(), shutdown_callback=bye())
""", ready="READY")

scenario("shutdown_callback: a function of the loop", """
    def bye(loop):
        say("callback got the loop", isinstance(loop, asyncio.AbstractEventLoop))
    async def main():
        say("READY")
        await asyncio.sleep(3600)
    run(main(), shutdown_callback=bye)
""", ready="READY")

scenario("shutdown_waits_for: protected work finishes after the signal", """
    async def save():
        say("READY")
        await asyncio.sleep(0.2)
        say("saved")
        return "ok"
    async def main():
        try:
            say("got", await shutdown_waits_for(save()))
        except asyncio.CancelledError:
            say("main cancelled")
            raise
    run(main())
    say("after run")
""", ready="READY")

scenario("shutdown_waits_for: awaited to the end, no signal", """
    async def work(n):
        await asyncio.sleep(0.01)
        return n * 2
    async def main():
        results = [await shutdown_waits_for(work(n)) for n in range(3)]
        say("results", results)
        asyncio.get_running_loop().stop()
    run(main())
""")

scenario("shutdown_waits_for: fire and forget", """
    async def save():
        await asyncio.sleep(0.1)
        say("saved")
    async def main():
        shutdown_waits_for(save())
        say("READY")
        await asyncio.sleep(3600)
    run(main())
""", ready="READY")

scenario("shutdown_waits_for: the protected coroutine raises to its awaiter", """
    async def upload():
        await asyncio.sleep(0)
        raise ConnectionError("upload failed")
    async def main():
        try:
            await shutdown_waits_for(upload())
        except ConnectionError as e:
            say("caught", e)
        asyncio.get_running_loop().stop()
    run(main())
""")

scenario("shutdown_waits_for: fails after its awaiter gave up", """
    async def upload():
        await asyncio.sleep(0.2)
        raise ConnectionError("upload failed")
    async def main():
        try:
            await asyncio.wait_for(shutdown_waits_for(upload()), 0.05)
        except asyncio.TimeoutError:
            say("gave up")
        await asyncio.sleep(0.4)
        say("still serving")
        asyncio.get_running_loop().stop()
    run(main(), stop_on_unhandled_errors=True)
""", differs=["A protected coroutine that fails after its awaiter stopped waiting"])

scenario("shutdown_waits_for: which tasks _DO_NOT_CANCEL_COROS finds", """
    async def save():
        await asyncio.sleep(0.05)
    async def main():
        shutdown_waits_for(save())
        await asyncio.sleep(0)
        found = [t for t in asyncio.all_tasks()
                 if t.get_coro() in aiorun._DO_NOT_CANCEL_COROS]
        say("found", len(found))
        asyncio.get_running_loop().stop()
    run(main())
""")

scenario("run_in_executor work finishes during the shutdown", """
    def blocking():
        say("READY")
        time.sleep(0.2)
        say("blocking done")
    async def main():
        await asyncio.get_running_loop().run_in_executor(None, blocking)
    run(main(), executor_workers=2)
    say("after run")
""", ready="READY")

scenario("a custom executor is shut down", """
    from concurrent.futures import ThreadPoolExecutor
    class Pool(ThreadPoolExecutor):
        def shutdown(self, *args, **kwargs):
            say("pool shutdown", args, kwargs)
            super().shutdown(*args, **kwargs)
    async def main():
        await asyncio.get_running_loop().run_in_executor(None, say, "in pool")
        asyncio.get_running_loop().stop()
    run(main(), executor=Pool(max_workers=1))
""")

scenario("stop_on_unhandled_errors: a task raises", """
    async def fails():
        await asyncio.sleep(0.01)
        raise ValueError("bad value")
    async def main():
        asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(3600)
    try:
        run(main(), stop_on_unhandled_errors=True)
    except ValueError as e:
        say("run raised", repr(e))
""")

scenario("stop_on_unhandled_errors: main raises", """
    async def main():
        await asyncio.sleep(0.01)
        raise ValueError("bad main")
    try:
        run(main(), stop_on_unhandled_errors=True)
    except ValueError as e:
        say("run raised", repr(e))
""")

scenario("stop_on_unhandled_errors with a loop's own exception handler is refused", """
    async def main():
        pass
    loop = asyncio.new_event_loop()
    loop.set_exception_handler(lambda loop, context: None)
    coro = main()
    try:
        run(coro, loop=loop, stop_on_unhandled_errors=True)
    except Exception as e:
        say("refused", type(e).__name__, e)
    coro.close()
    loop.close()
""")

scenario("a custom shutdown_handler", """
    def handler(loop):
        say("handler called")
        loop.stop()
    async def main():
        say("READY")
        await asyncio.sleep(3600)
    run(main(), shutdown_handler=handler)
""", ready="READY")

scenario("a task that refuses to exit, cut off by timeout_task_shutdown", """
    async def stubborn():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            say("ignoring the cancel")
            await asyncio.sleep(3600)
    async def main():
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        say("READY")
        await asyncio.sleep(3600)
    run(main(), timeout_task_shutdown=0.2)
    say("after run")
""", ready="READY", differs=["Tasks stuck at shutdown are listed like a traceback"])

scenario("cancelled tasks' CancelledError", """
    async def main():
        try:
            say("READY")
            await asyncio.sleep(3600)
        except asyncio.CancelledError as e:
            say("cancelled with", e.args)
            raise
    run(main())
""", ready="READY", differs=["Cancelled tasks are told why."])

scenario("an async generator is closed at the end", """
    async def ticks():
        try:
            while True:
                yield 1
                await asyncio.sleep(0.01)
        finally:
            say("generator closed")
    async def main():
        agen = ticks()
        await agen.__anext__()
        say("READY")
        await asyncio.sleep(3600)
    run(main())
""", ready="READY")

scenario("use_uvloop", """
    async def main():
        say("loop", type(asyncio.get_running_loop()).__module__.split(".")[0])
        say("READY")
        await asyncio.sleep(3600)
    run(main(), use_uvloop=True)
""", ready="READY", sig=signal.SIGTERM)

scenario("a supplied loop stays open", """
    loop = asyncio.new_event_loop()
    async def main():
        asyncio.get_running_loop().stop()
    run(main(), loop=loop)
    say("closed", loop.is_closed())
    loop.close()
""")

scenario("a streams server and a client at the signal", """
    async def handle(reader, writer):
        try:
            await reader.read()
        finally:
            writer.close()
    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"hello")
        await writer.drain()
        say("READY")
        async with server:
            await server.serve_forever()
    run(main())
    say("after run")
""", ready="READY")

scenario("a subprocess is cancelled with its task", """
    async def child():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import time; time.sleep(30)")
        try:
            await proc.wait()
        except asyncio.CancelledError:
            proc.kill()
            await proc.wait()
            say("child killed", proc.returncode)
            raise
    async def main():
        asyncio.get_running_loop().create_task(child())
        await asyncio.sleep(0.1)
        say("READY")
        await asyncio.sleep(3600)
    run(main())
""", ready="READY", sig=signal.SIGTERM)

scenario("a queue worker pool drains", """
    handled = []
    async def worker(q):
        while True:
            item = await q.get()
            handled.append(item)
            q.task_done()
    async def main():
        q = asyncio.Queue()
        for n in range(3):
            asyncio.get_running_loop().create_task(worker(q))
        for item in range(10):
            q.put_nowait(item)
        await q.join()
        say("READY")
        await asyncio.sleep(3600)
    run(main())
    say("handled", sorted(handled))
""", ready="READY")

scenario("KeyboardInterrupt raised by the main coroutine", """
    async def main():
        await asyncio.sleep(0.01)
        raise KeyboardInterrupt
    run(main())
    say("after run")
""", differs=["The main task's `KeyboardInterrupt` is not logged a second time."])

scenario("run() inside a running loop", """
    async def inner():
        pass
    async def outer():
        try:
            run(inner())
        except RuntimeError as e:
            say("refused", e)
    asyncio.run(outer())
""", differs=["Inside a running loop"])

scenario("run() off the main thread", """
    async def main():
        asyncio.get_running_loop().stop()
    def target():
        try:
            run(main())
            say("ran in a thread")
        except Exception as e:
            say("failed", type(e).__name__)
    t = threading.Thread(target=target)
    t.start()
    t.join()
""", differs=["Off the main thread"])

scenario("the signal handlers after run()", """
    async def main():
        asyncio.get_running_loop().stop()
    run(main())
    say("SIGINT handler", signal.getsignal(signal.SIGINT))
""", differs=["The previous handlers are back"])

scenario("the signal handlers after a signal's shutdown", """
    async def main():
        say("READY")
        await asyncio.sleep(3600)
    run(main())
    say("ignored after run():", [signal.getsignal(s) is signal.SIG_IGN
                                 for s in (signal.SIGINT, signal.SIGTERM)])
""", ready="READY", sig=signal.SIGTERM, differs=["The previous handlers are back"])

scenario("a bad argument", """
    async def main():
        pass
    coro = main()
    try:
        run(coro, executor_workers="2")
    except Exception as e:
        say("raised", type(e).__name__)
    coro.close()
""", differs=["Bad arguments fail fast"])

scenario("an unexpected keyword argument", """
    try:
        run(foo=1)
    except TypeError as e:
        say("raised", e)
""")

scenario("sys.exit() in a task", """
    async def quits():
        await asyncio.sleep(0.01)
        sys.exit(3)
    async def main():
        asyncio.get_running_loop().create_task(quits())
        await asyncio.sleep(3600)
    run(main())
""", differs=["A `SystemExit` (or any `BaseException` that is not an `Exception`) "
              "escaping the loop starts the shutdown"])


scenario("a report without an exception after an error", """
    async def main():
        loop = asyncio.get_running_loop()
        loop.call_exception_handler({"message": "a", "exception": ValueError("1")})
        loop.call_exception_handler({"message": "just a note"})
    try:
        run(main(), stop_on_unhandled_errors=True)
        say("run returned")
    except ValueError as e:
        say("run raised", repr(e))
""", differs=["The error that stopped the loop is the one `run()` raises."])


scenario("protected work that gathers tasks of its own", """
    async def step(name):
        await asyncio.sleep(0.3)
        say("step", name, "finished")
    async def save():
        try:
            await asyncio.gather(step("a"), step("b"))
            say("save finished")
        except asyncio.CancelledError:
            say("save cancelled")
            raise
    async def main():
        waiter = shutdown_waits_for(save())
        await asyncio.sleep(0.05)
        say("READY")
        await asyncio.sleep(3600)
    run(main())
""", ready="READY", sig=signal.SIGTERM,
   differs=["Work that protected work starts is protected with it."])


scenario("loop.stop() in the shutdown_callback", """
    async def bye():
        asyncio.get_running_loop().stop()
        await asyncio.sleep(0.05)
        say("callback finished")
    async def main():
        say("READY")
        await asyncio.sleep(3600)
    try:
        run(main(), shutdown_callback=bye())
    except RuntimeError as e:
        say("run raised", e)
""", ready="READY", differs=["The shutdown runs to its end, whatever user code does in it."])

scenario("a non-exception context['exception'] under stop_on_unhandled_errors", """
    async def main():
        asyncio.get_running_loop().call_exception_handler(
            {"message": "library bug", "exception": "not an exception"})
        await asyncio.sleep(3600)
    try:
        run(main(), stop_on_unhandled_errors=True)
    except TypeError as e:
        say("run raised", e)
""")

scenario("the event-loop policy after use_uvloop", """
    async def main():
        asyncio.get_running_loop().stop()
    run(main(), use_uvloop=True)
    say("policy", type(asyncio.get_event_loop_policy()).__module__.split(".")[0])
""", differs=["No event-loop policy is ever installed."])

scenario("a misspelt keyword", """
    try:
        run(lop=None)
    except TypeError as e:
        say("raised", e)
""", differs=["Argument errors read as Python's own"] if sys.version_info >= (3, 13) else [])

scenario("the collector while the tasks drain", """
    import gc
    seen = []
    async def worker():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append(gc.isenabled())
            raise
    async def main():
        asyncio.get_running_loop().create_task(worker())
        await asyncio.sleep(0)
        say("READY")
        await asyncio.sleep(3600)
    run(main())
    say("collector enabled in the drain", seen, "after", gc.isenabled())
""", ready="READY", differs=["The collector is paused while the tasks drain"])

scenario("what a cancelled task held, against the end of run()", """
    class Held:
        def __del__(self):   # logged: its place among aiorun's lines shows
            logging.getLogger("app").info("held object finalized")
    async def worker():
        held = Held()
        await asyncio.sleep(3600)
    async def main():
        asyncio.get_running_loop().create_task(worker())
        await asyncio.sleep(0)
        say("READY")
        await asyncio.sleep(3600)
    run(main())
    say("run returned")
    import gc
    gc.collect()
""", ready="READY", differs=["The shutdown frees what the tasks held before `run()` returns."])

scenario("what shutdown_waits_for() returns", """
    import inspect
    async def work():
        pass
    async def main():
        waiter = shutdown_waits_for(work())
        say("iscoroutine", asyncio.iscoroutine(waiter), inspect.iscoroutine(waiter))
        await waiter
        asyncio.get_running_loop().stop()
    run(main())
""", differs=["What `shutdown_waits_for()` returns is a C object, not a Python coroutine."])

scenario("what a task awaiting shutdown_waits_for() waits on", """
    async def work():
        await asyncio.sleep(0.05)
    async def awaiting():
        await shutdown_waits_for(work())
    async def main():
        task = asyncio.get_running_loop().create_task(awaiting())
        await asyncio.sleep(0.01)
        waiting_on = task._fut_waiter
        say("waits on a future of", type(waiting_on).__name__,
            "isfuture", asyncio.isfuture(waiting_on))
        await task
        asyncio.get_running_loop().stop()
    run(main())
""", differs=["A task awaiting `shutdown_waits_for()` waits on the protected task itself"])

scenario("the log, all of it, with cancelled tasks", """
    async def worker():
        await asyncio.sleep(3600)
    async def main():
        asyncio.get_running_loop().create_task(worker())
        await asyncio.sleep(0)
        say("READY")
        await asyncio.sleep(3600)
    run(main())
""", ready="READY", differs=["A DEBUG line per cancelled task"])

# Accepted differences that no scenario of this file can show (a race, a
# signal taken by another thread, when the collector runs), and the test
# that shows each one.
SHOWN_ELSEWHERE = {
    "Signals are taken over at once, through the `signal` module.":
        "test_signals.py::test_signal_in_the_start_up_window_is_not_lost",
    "The main task's exception reaches the exception handler immediately":
        "test_unhandled.py::test_exception_from_main_is_reported_while_the_task_is_still_referenced",
    "A signal always wakes the loop.":
        "test_signals.py::test_a_signal_taken_by_another_thread_still_wakes_the_loop",
}


def run_scenario(python, body, drive, tmp_path, side, raw, summary):
    # The same path on both sides (one after the other): it shows in
    # tracebacks and in reprs that reprlib cuts in the middle.
    script = tmp_path / "app.py"
    script.write_text(PRELUDE + body)
    app = App([python, str(script)], cwd=str(tmp_path),
              env={"PYTHONPATH": None} if side == "original" else None)
    if drive:
        line, sig = drive
        app.wait_line(line)
        app.send(sig)
    return transcript(app.finish(), raw=raw, summary=summary)


PYPY_GC_SCENARIOS = {
    "stop_on_unhandled_errors: a task raises",
    "stop_on_unhandled_errors: main raises",
    "KeyboardInterrupt raised by the main coroutine",
    "what a cancelled task held, against the end of run()",
}
assert PYPY_GC_SCENARIOS <= set(SCENARIOS), PYPY_GC_SCENARIOS - set(SCENARIOS)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario_against_the_original(original_python, tmp_path, name):  # noqa: F811
    body, drive, differs = SCENARIOS[name]
    if "uvloop" in body:
        pytest.importorskip("uvloop")
    # On PyPy the original runs on PyPy too, where what it leaves to the
    # garbage collector comes late or never.
    if PYPY and name in PYPY_GC_SCENARIOS:
        pytest.skip(PYPY_GC)
    if PYPY and name == "a non-exception context['exception'] under stop_on_unhandled_errors":
        pytest.skip("PyPy words the TypeError of raising a class that is not an "
                    "exception its own way (', not type') in pure Python only")
    # The DEBUG "Cancelling task:" lines are an accepted difference of their
    # own: left out, except where a scenario shows that difference.
    raw = "A DEBUG line per cancelled task" in differs
    summary = "Every shutdown ends with one INFO summary line" in differs
    original = run_scenario(original_python, body, drive, tmp_path, "original", raw, summary)
    ours = run_scenario(sys.executable, body, drive, tmp_path, "ours", raw, summary)
    if differs:
        assert ours != original, f"accepted difference {differs} not shown: {ours}"
    else:
        assert ours == original, "\n" + "\n".join(difflib.unified_diff(
            lines(original), lines(ours), "original", "ours", lineterm=""))


def lines(result):
    return [f"{key}: {item}" for key, value in result.items()
            for item in (value if isinstance(value, list) else [value])]


def test_every_accepted_difference_is_shown_by_a_test():
    # Each entry of tests/differences.py is shown by a scenario here, or by
    # the named test of another file, and never by both.
    shown = {d for _, _, differs in SCENARIOS.values() for d in differs}
    if sys.version_info < (3, 13):   # the 'Did you mean' hint is 3.13's
        shown.add("Argument errors read as Python's own")
    assert not shown & set(SHOWN_ELSEWHERE)
    assert sorted(shown | set(SHOWN_ELSEWHERE)) == sorted(ACCEPTED)
    for where in SHOWN_ELSEWHERE.values():
        path, name = where.split("::")
        assert f"def {name}(" in (Path(__file__).parent / path).read_text(), where
