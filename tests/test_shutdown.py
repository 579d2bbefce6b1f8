"""SPEC steps 6, 8, 9 and 10: what happens when the loop stops."""
import signal
import textwrap

import pytest

from conftest import SHUTDOWN_TAIL, line_of, run_app, subsequence


def test_loop_stop_from_inside_starts_the_shutdown(app):
    r = run_app(app, """
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("worker cancelled")
                raise

        async def main():
            asyncio.get_running_loop().create_task(worker())
            await asyncio.sleep(0)
            asyncio.get_running_loop().stop()
            say("main still runs after stop()")
            await asyncio.sleep(3600)

        run(main())
        say("run returned")
    """)
    assert r.returncode == 0, r
    assert r.stdout[0] == "main still runs after stop()"
    assert sorted(r.stdout[1:2]) == ["worker cancelled"]
    assert r.stdout[-1] == "run returned"
    assert r.messages == SHUTDOWN_TAIL
    cancelled = [l for l in r.log if l.startswith("DEBUG:Cancelling task:")]
    assert len(cancelled) == 2  # main and worker


def test_loop_keeps_running_after_main_returns(app):
    a = app("""
        async def main():
            return 42

        def later():
            say("loop still running")
        loop = asyncio.new_event_loop()
        loop.call_later(0.05, later)
        run(main(), loop=loop)
        say("run returned")
    """)
    a.wait_line("loop still running")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["loop still running", "run returned"]


def test_cancelled_error_escaping_main_is_swallowed(app):
    r = run_app(app, """
        async def main():
            asyncio.get_running_loop().call_soon(asyncio.current_task().cancel)
            await asyncio.sleep(3600)

        loop = asyncio.new_event_loop()
        loop.call_later(0.1, loop.stop)
        run(main(), loop=loop, stop_on_unhandled_errors=True)
        say("run returned")
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["run returned"]
    assert "Traceback" not in r.stderr_text
    assert not any(l.startswith("ERROR:") for l in r.log)


def test_own_loop_is_closed_and_unset(app):
    r = run_app(app, """
        async def main():
            global the_loop
            the_loop = asyncio.get_running_loop()
            the_loop.stop()
        run(main())
        say("closed:", the_loop.is_closed())
        say("still current:", asyncio.get_event_loop_policy()._local._loop is the_loop)
    """)
    assert r.stdout == ["closed: True", "still current: False"]
    assert subsequence(["Shutting down async generators", "Closing the loop."], r.messages)


def test_supplied_loop_is_left_open(app):
    r = run_app(app, """
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        async def main():
            loop.stop()
        run(main(), loop=loop)
        say("closed:", loop.is_closed())
        say("usable:", loop.run_until_complete(asyncio.sleep(0, "yes")))
        loop.close()
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["closed: False", "usable: yes"]
    assert "Closing the loop." not in r.messages
    assert "Shutting down async generators" not in r.messages
    assert r.messages[-1] == "Leaving. Bye!"


def test_async_generators_are_finalized(app):
    r = run_app(app, """
        async def gen():
            try:
                yield 1
                yield 2
            finally:
                say("generator finalized")

        async def main():
            global g
            g = gen()
            await g.__anext__()
            asyncio.get_running_loop().stop()

        run(main())
        say("run returned")
    """)
    assert r.stdout == ["generator finalized", "run returned"]


def test_supplied_executor_is_used_and_waited_for(app):
    a = app("""
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mine")
        release = threading.Event()

        def job():
            say("job on", threading.current_thread().name.split("_")[0])
            release.wait()
            time.sleep(0.2)
            say("job finished")

        async def main():
            asyncio.get_running_loop().run_in_executor(None, job)
            await asyncio.sleep(3600)

        def on_shutdown(loop):
            release.set()

        run(main(), executor=pool, shutdown_callback=on_shutdown)
        say("run returned")
        try:
            pool.submit(print)
        except RuntimeError:
            say("pool was shut down")
    """)
    a.wait_line("job on mine")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["job on mine", "job finished", "run returned", "pool was shut down"]
    assert "DEBUG:Creating default executor" not in r.log


@pytest.mark.parametrize("workers,outcome", [(3, "all met"), (2, "broken")])
def test_executor_workers_sets_the_pool_size(app, workers, outcome):
    # Three jobs meet at a barrier of three: only possible with 3 workers.
    r = run_app(app, f"""
        barrier = threading.Barrier(3, timeout=1.0)
        def job():
            barrier.wait()
        async def main():
            loop = asyncio.get_running_loop()
            try:
                await asyncio.gather(*[loop.run_in_executor(None, job) for _ in range(3)])
                say("all met")
            except threading.BrokenBarrierError:
                say("broken")
            loop.stop()
        run(main(), executor_workers={workers})
    """)
    assert r.returncode == 0, r
    assert r.stdout[0] == outcome


CALLBACK_KINDS = {
    "coroutine object": ("cb()", """
        async def cb():
            await asyncio.sleep(0.01)
            say("callback ran; worker alive:", not worker_task.done())
    """),
    "coroutine function": ("cb", """
        async def cb(loop):
            await asyncio.sleep(0.01)
            say("callback ran; worker alive:", not worker_task.done())
            say("got the loop:", loop is worker_task.get_loop())
    """),
    "plain function": ("cb", """
        def cb(loop):
            say("callback ran; worker alive:", not worker_task.done())
            say("got the loop:", loop is worker_task.get_loop())
    """),
    "function returning a coroutine": ("cb", """
        async def later(loop):
            await asyncio.sleep(0.01)
            say("callback ran; worker alive:", not worker_task.done())
            say("got the loop:", loop is worker_task.get_loop())
        cb = lambda loop: later(loop)
    """),
    "awaitable object": ("Awaitable()", """
        class Awaitable:
            def __await__(self):
                yield from asyncio.sleep(0.01).__await__()
                say("callback ran; worker alive:", not worker_task.done())
    """),
}


@pytest.mark.parametrize("kind", list(CALLBACK_KINDS))
def test_shutdown_callback_kinds(app, kind):
    arg, definition = CALLBACK_KINDS[kind]
    a = app(textwrap.dedent(definition) + f"""
async def worker():
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        say("worker cancelled")
        raise

async def main():
    global worker_task
    worker_task = asyncio.get_running_loop().create_task(worker())
    say("READY")

run(main(), shutdown_callback={arg})
say("run returned")
""")
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    # The callback runs before any task is cancelled.
    assert r.stdout[1] == "callback ran; worker alive: True"
    assert r.stdout[-2:] == ["worker cancelled", "run returned"]
    if kind not in ("coroutine object", "awaitable object"):
        assert r.stdout[2] == "got the loop: True"
    assert r.messages[:4] == ["Stopping the loop", "Entering shutdown phase.",
                              "Executing provided shutdown_callback.",
                              "Cancelling pending tasks."]


def test_shutdown_callback_error_is_reraised_after_the_shutdown(app):
    r = run_app(app, """
        def cb(loop):
            raise RuntimeError("callback failed")
        async def main():
            asyncio.get_running_loop().stop()
        run(main(), shutdown_callback=cb)
        say("not reached")
    """)
    assert r.returncode == 1, r
    assert r.stdout == []
    assert r.messages[-2:] == ["Leaving. Bye!", "Reraising unhandled exception"]
    assert r.stderr[-1] == "RuntimeError: callback failed"
    assert 'raise RuntimeError("callback failed")' in r.stderr_text


def test_shutdown_callback_error_after_an_unhandled_one_is_logged(app):
    r = run_app(app, """
        async def cb():
            raise RuntimeError("callback failed")
        async def main():
            raise ValueError("first")
        run(main(), shutdown_callback=cb(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "ValueError: first"
    errors = [l for l in r.log if l.startswith("ERROR:")]
    assert errors[0] == "ERROR:Unhandled exception; stopping loop: " \
                        "'Task exception was never retrieved'"
    assert "shutdown_callback() raised an error" in errors[1]
    assert "RuntimeError: callback failed" in r.stderr_text


def test_keyboard_interrupt_from_a_callback_means_shutdown(app):
    r = run_app(app, """
        def interrupt():
            raise KeyboardInterrupt
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("worker cancelled")
                raise
        async def main():
            loop = asyncio.get_running_loop()
            loop.create_task(worker())
            loop.call_later(0.01, interrupt)
        run(main())
        say("run returned")
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["worker cancelled", "run returned"]
    assert r.messages[:2] == ["Got KeyboardInterrupt", "Entering shutdown phase."]
    assert r.messages[-1] == "Leaving. Bye!"


def test_system_exit_escapes_run_with_handlers_restored(app):
    r = run_app(app, """
        async def main():
            raise SystemExit(3)
        try:
            run(main())
        finally:
            say("SIGINT restored:",
                signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """)
    assert r.returncode == 3, r
    assert r.stdout == ["SIGINT restored: True"]


def test_task_that_refuses_to_exit_is_named_with_its_place(app):
    a = app("""
        async def naughty():
            while True:
                try:
                    await asyncio.sleep(3600)  # STUCK HERE
                except asyncio.CancelledError:
                    say("naughty ignores cancel")

        async def main():
            asyncio.get_running_loop().create_task(naughty())
            say("READY")

        run(main(), timeout_task_shutdown=0.5)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "naughty ignores cancel", "run returned"]
    warnings = [l for l in r.log if l.startswith("WARNING:During shutdown")]
    assert warnings == ["WARNING:During shutdown, the following tasks refused to exit "
                        "after 0.5 seconds:"]
    text = r.stderr_text
    assert "coro=<naughty()" in text
    line = line_of(a.script, "# STUCK HERE")
    assert f'File "{a.script}", line {line}, in naughty' in text
    assert subsequence(["Running pending tasks till complete",
                        "Waiting for executor shutdown.", "Leaving. Bye!"], r.messages)


def test_tasks_that_finish_in_time_produce_no_warning(app):
    a = app("""
        async def slow_cleanup():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.2)
                say("cleanup done")
                raise

        async def main():
            asyncio.get_running_loop().create_task(slow_cleanup())
            say("READY")

        run(main(), timeout_task_shutdown=30)
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "cleanup done"]
    assert not any("refused to exit" in l for l in r.log)


@pytest.mark.parametrize("before", ["enabled", "disabled"])
def test_the_collector_is_paused_only_while_the_tasks_drain(app, before):
    r = run_app(app, f"""
        import gc
        if "{before}" == "disabled":
            gc.disable()

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("while draining:", gc.isenabled())
                raise

        def callback(loop):
            say("in shutdown_callback:", gc.isenabled())

        async def main():
            asyncio.get_running_loop().create_task(worker())
            await asyncio.sleep(0)
            say("while running:", gc.isenabled())
            asyncio.get_running_loop().stop()

        run(main(), shutdown_callback=callback)
        say("after run:", gc.isenabled())
    """)
    assert r.returncode == 0, r
    on = str(before == "enabled")
    assert r.stdout == [f"while running: {on}", f"in shutdown_callback: {on}",
                        "while draining: False", f"after run: {on}"]


def test_every_task_is_freed_after_run_even_past_the_seen_sets_first_size(app):
    # 100 tasks, more than the shutdown's seen-set holds before it grows:
    # what each held is freed once run() has returned.
    a = app("""
        import gc, weakref
        class Held:
            pass
        refs = []
        async def worker():
            held = Held()
            refs.append(weakref.ref(held))
            await asyncio.sleep(3600)
        async def main():
            loop = asyncio.get_running_loop()
            for _ in range(100):
                loop.create_task(worker())
            await asyncio.sleep(0)
            say("READY", len(refs))
            await asyncio.sleep(3600)
        run(main())
        gc.collect()
        gc.collect()   # PyPy's C API layer frees in a second pass
        say("alive", sum(r() is not None for r in refs))
    """)
    a.wait_line("READY 100")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY 100", "alive 0"], r


def test_a_timeout_of_zero_still_lets_cancelled_tasks_clean_up(app):
    a = app("""
        async def worker(n):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("cleaned", n)
                raise
        async def main():
            for n in range(5):
                asyncio.get_running_loop().create_task(worker(n))
            say("READY")
            await asyncio.sleep(3600)
        run(main(), timeout_task_shutdown=0)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert sorted(r.stdout[1:]) == [f"cleaned {n}" for n in range(5)], r
    assert "refused to exit" not in r.stderr_text, r
