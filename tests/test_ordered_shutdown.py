"""The ordered, explainable shutdown: shutdown_event(), drain_delay,
cancel_main_first, the cancel messages naming the cause,
cancelled_by_shutdown(), and what run() returns.  Each app runs in a child
process and is stopped by a real signal (or by itself)."""
import signal

import pytest

from conftest import PYPY, PYPY_GC, SHUTDOWN_TAIL, subsequence

# A main task and two workers that say when they are cancelled, and what
# the main task does with its cancellation: wind down for a while.
THREE_TASKS = """
    async def worker(name):
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            say(name, "cancelled")
            raise

    async def main():
        loop = asyncio.get_running_loop()
        for name in ("worker-a", "worker-b"):
            loop.create_task(worker(name))
        say("READY")
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            say("main cancelled")
            await asyncio.sleep(0.2)      # winds down while the workers still run
            say("main wound down")
            raise
"""


def test_cancel_main_first_waits_for_the_main_task_before_the_rest(app):
    a = app(THREE_TASKS + "    run(main(), cancel_main_first=True)\n")
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[1:3] == ["main cancelled", "main wound down"]
    assert sorted(r.stdout[3:]) == ["worker-a cancelled", "worker-b cancelled"]
    assert subsequence(["Entering shutdown phase.", "Cancelling the main task first.",
                        "Cancelling pending tasks.", "Running pending tasks till complete",
                        "Leaving. Bye!"], r.messages)


def test_without_cancel_main_first_every_task_is_cancelled_at_once(app):
    # The contrast: aiorun's order, which the option changes.
    a = app(THREE_TASKS + "    run(main())\n")
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[-1] == "main wound down"
    assert set(r.stdout[1:4]) == {"main cancelled", "worker-a cancelled",
                                  "worker-b cancelled"}
    assert "Cancelling the main task first." not in r.messages


def test_a_main_task_that_refuses_to_exit_is_named_and_the_rest_still_cancelled(app):
    a = app("""
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("worker cancelled")
                raise

        async def stubborn_main():
            asyncio.get_running_loop().create_task(worker())
            say("READY")
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    say("main ignores its cancellation")

        run(stubborn_main(), cancel_main_first=True, timeout_task_shutdown=0.5)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    # Cancelled once (not again with the rest), named once after its own
    # turn, and not waited for a second time with the rest: the worker ends
    # at once, so the rest's wait names nobody.
    assert r.stdout[1:] == ["main ignores its cancellation", "worker cancelled",
                            "run returned"]
    warnings = [m for m in r.messages if m.startswith("During shutdown")]
    assert len(warnings) == 1
    assert "stubborn_main" in r.stderr_text
    # One DEBUG line per cancelled task, the main task's included.
    cancelling = [l for l in r.log if l.startswith("DEBUG:Cancelling task:")]
    assert len(cancelling) == 2 and "stubborn_main" in cancelling[0], cancelling


def test_drain_delay_sets_the_event_first_and_lets_work_finish_before_cancelling(app):
    a = app("""
        t = {}

        async def request_in_flight():
            await aiorun.shutdown_event().wait()
            await asyncio.sleep(0.3)               # finishes its work meanwhile
            say("in-flight request finished")

        async def ignores_the_event():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                t["cancelled"] = time.monotonic()
                say("idle task cancelled after",
                    t["cancelled"] - t["event"] >= 1.0, "(>= drain_delay)")
                raise

        async def main():
            loop = asyncio.get_running_loop()
            loop.create_task(request_in_flight())
            loop.create_task(ignores_the_event())
            event = aiorun.shutdown_event()
            say("same event:", event is aiorun.shutdown_event(), "set:", event.is_set())
            say("READY")
            await event.wait()
            t["event"] = time.monotonic()
            say("main saw the event; stops accepting")

        def callback(loop):
            say("shutdown_callback: event set", aiorun.shutdown_event(loop).is_set())

        run(main(), drain_delay=1.0, shutdown_callback=callback)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == [
        "same event: True set: False", "READY",
        "shutdown_callback: event set True",
        "main saw the event; stops accepting",
        "in-flight request finished",
        "idle task cancelled after True (>= drain_delay)",
    ]
    assert subsequence(["Entering shutdown phase.", "Executing provided shutdown_callback.",
                        "Letting tasks finish for up to 1.0 seconds (drain_delay).",
                        "Cancelling pending tasks."], r.messages)


def test_drain_delay_ends_as_soon_as_every_task_has_finished(app):
    # With an hour of drain_delay the app would hang (and the test time out)
    # unless the drain ends when the last task, started during it, ends.
    a = app("""
        async def follow_up():
            await asyncio.sleep(0.1)
            say("follow-up done")

        async def main():
            say("READY")
            await aiorun.shutdown_event().wait()
            asyncio.get_running_loop().create_task(follow_up())
            say("main done")

        run(main(), drain_delay=3600)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "main done", "follow-up done", "run returned"]
    assert "Cancelling pending tasks." not in r.messages


def test_shutdown_event_outside_run_is_a_clear_error(app):
    r = app("""
        async def main():
            try:
                aiorun.shutdown_event()
            except RuntimeError as e:
                say("refused:", e)
        asyncio.run(main())
        try:
            aiorun.shutdown_event()
        except RuntimeError as e:
            say("refused:", e)
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["refused: shutdown_event() must be called from code running in "
                        "the event loop of aiorun.run() or in its shutdown_callback, or "
                        "be given that loop"] * 2


def test_shutdown_event_in_a_plain_shutdown_callback_is_that_runs(app):
    # A plain function runs while the loop is stopped: the natural call
    # works there, and run() still returns what main returned.
    a = app("""
        def callback(loop):
            event = aiorun.shutdown_event()
            say("callback: event set", event.is_set())
        async def main():
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return "main's value"
        say("run returned", run(main(), shutdown_callback=callback))
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "callback: event set True", "run returned main's value"], r


# ---- the cancel messages ----

MESSAGE_APP = """
    async def worker():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError as e:
            say("message:", e.args[0] if e.args else None,
                "| by shutdown:", aiorun.cancelled_by_shutdown(e))
            raise

    async def fail():
        raise ValueError("boom")

    def keyboard_interrupt():
        raise KeyboardInterrupt

    async def main(how):
        loop = asyncio.get_running_loop()
        loop.create_task(worker())
        await asyncio.sleep(0)
        say("READY")
        if how == "stop":
            loop.stop()
        elif how == "error":
            loop.create_task(fail())
        elif how == "interrupt":
            loop.call_soon(keyboard_interrupt)
        await worker()

    try:
        run(main(sys.argv[1]), stop_on_unhandled_errors=sys.argv[1] == "error")
    except ValueError:
        say("ValueError re-raised")
"""


@pytest.mark.parametrize("how, cause", [
    ("SIGTERM", "SIGTERM"),
    ("SIGINT", "SIGINT"),
    ("stop", "loop stopped"),
    ("error", "unhandled error"),
    ("interrupt", "KeyboardInterrupt"),
])
def test_every_cancelled_task_is_told_the_cause(app, how, cause):
    if PYPY and how == "error":
        pytest.skip(PYPY_GC)
    a = app(MESSAGE_APP, args=[how])
    a.wait_line("READY")
    if how.startswith("SIG"):
        a.send(getattr(signal, how))
    r = a.finish()
    assert r.returncode == 0, r
    assert f"message: aiorun shutdown: {cause} | by shutdown: True" in r.stdout
    assert r.stdout.count(f"message: aiorun shutdown: {cause} | by shutdown: True") == 2


def test_cancellations_not_made_by_the_shutdown_are_told_apart(app):
    a = app("""
        def check(what, exc):
            say(what, aiorun.cancelled_by_shutdown(exc))

        async def victim():
            await asyncio.sleep(3600)

        async def main():
            loop = asyncio.get_running_loop()
            for message in (None, "aiorun shutdown: SIGTERM"):
                task = loop.create_task(victim())
                await asyncio.sleep(0)
                task.cancel(message)
                try:
                    await task
                except asyncio.CancelledError as e:
                    check(f"app's own cancel({message!r}):", e)
            try:
                await asyncio.wait_for(victim(), 0.01)
            except asyncio.TimeoutError as e:
                check("a timeout:", e)
            check("a ValueError:", ValueError("aiorun shutdown: SIGTERM"))
            try:
                aiorun.cancelled_by_shutdown("aiorun shutdown: SIGTERM")
            except TypeError as e:
                say("TypeError:", e)
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                check("the shutdown's:", e)
                raise

        run(main())
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == [
        "app's own cancel(None): False",
        "app's own cancel('aiorun shutdown: SIGTERM'): False",
        "a timeout: False",
        "a ValueError: False",
        "TypeError: cancelled_by_shutdown() argument 'exc' must be an exception, not str",
        "READY",
        "the shutdown's: True",
    ]


def test_a_task_class_whose_cancel_takes_no_message_is_still_cancelled(app):
    a = app("""
        class OldTask(asyncio.Task):
            def cancel(self):                     # no msg parameter
                return super().cancel()

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                say("worker cancelled, args", e.args)
                raise

        async def main():
            loop = asyncio.get_running_loop()
            loop.set_task_factory(lambda loop, coro, **kw: OldTask(coro, loop=loop, **kw))
            loop.create_task(worker())
            say("READY")
            await asyncio.sleep(3600)

        run(main())
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[1:] == ["worker cancelled, args ()", "run returned"]


# ---- what run() returns ----

def test_run_returns_what_the_main_coroutine_returned(app):
    # Returned before the shutdown (the loop runs on until the signal), while
    # stopping the loop, after catching the shutdown's cancellation; and
    # None when the main coroutine was cancelled.
    a = app("""
        async def quick():
            say("READY")
            return {"answer": 42}

        async def winds_down():
            try:
                say("READY")
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return "stopped cleanly"

        async def stops_the_loop():
            asyncio.get_running_loop().stop()
            return 7

        async def cancelled():
            say("READY")
            await asyncio.sleep(3600)

        say("returned", run(stops_the_loop()))
        say("returned", run(quick()))
        say("returned", run(winds_down()))
        say("returned", run(cancelled()))
    """)
    for _ in range(3):
        a.wait_line("READY")
        a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["returned 7", "READY", "returned {'answer': 42}", "READY",
                        "returned stopped cleanly", "READY", "returned None"]
    assert subsequence(SHUTDOWN_TAIL, r.messages)


@pytest.mark.parametrize("options, returned", [
    ("", "None"),                                  # main is cancelled at once
    (", drain_delay=0.2, cancel_main_first=True", "main done"),
])
def test_a_loop_stop_from_a_task_winding_down_does_not_abort_the_shutdown(
        app, options, returned):
    # aiorun's examples end main() with loop.stop(); done during the
    # shutdown it used to end the wait for the tasks with RuntimeError.
    a = app(f"""
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                asyncio.get_running_loop().stop()
                await asyncio.sleep(0.05)
                say("worker wound down")
                raise

        async def main():
            asyncio.get_running_loop().create_task(worker())
            say("READY")
            await aiorun.shutdown_event().wait()
            asyncio.get_running_loop().stop()
            return "main done"

        say("returned:", run(main(){options}))
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[1:] == ["worker wound down", f"returned: {returned}"]
    assert "Traceback" not in r.stderr_text
    assert subsequence(SHUTDOWN_TAIL, r.messages)


def test_the_shutdowns_cancelled_error_crosses_a_multiprocessing_queue(app):
    # Put on a real multiprocessing.Queue from the except block: its feeder
    # thread pickles it; what comes back out is a CancelledError whose
    # message reads the same.
    a = app("""
        import multiprocessing, pickle
        q = multiprocessing.Queue()
        async def main():
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                q.put(e)
                back = q.get(timeout=30)
                say(type(back).__name__, repr(back.args[0]), back.args[0] == e.args[0],
                    type(back.args[0]).__name__)
                again = pickle.loads(pickle.dumps(e, protocol=0))
                say("protocol 0:", repr(again.args[0]))
                raise
        run(main())
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[1:] == ["CancelledError 'aiorun shutdown: SIGTERM' True str",
                            "protocol 0: 'aiorun shutdown: SIGTERM'"], r


def test_shutdown_event_asked_from_another_thread_works(app):
    # Another thread asks for the event of a running run() (3.9 bound an
    # Event to the asking thread's loop, which it has not); the loop's own
    # code then waits on it, and the shutdown sets it.
    a = app("""
        got = {}
        def ask(loop):
            got["event"] = aiorun.shutdown_event(loop=loop)
        async def main():
            loop = asyncio.get_running_loop()
            t = threading.Thread(target=ask, args=(loop,))
            t.start()
            await loop.run_in_executor(None, t.join)
            event = got["event"]
            say("same:", event is aiorun.shutdown_event(), "set:", event.is_set())
            say("READY")
            await event.wait()
            say("event set")
            await asyncio.sleep(3600)
        run(main(), drain_delay=5)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["same: True set: False", "READY", "event set"], r
