"""shutdown_waits_for(): every way to spawn it, both ways to cancel, and
its use outside run()."""
import asyncio
import collections.abc
import signal

import pytest

import aiorun
from aiorun import shutdown_waits_for
from conftest import PYPY, run_app, skip_on_pypy_gc


def test_seed_shield_demo_under_a_signal(app):
    a = app("""
        async def corofn():
            for i in range(3):
                say(i)
                await asyncio.sleep(0.3)
            say("done!")

        async def main():
            try:
                await shutdown_waits_for(corofn())
            except asyncio.CancelledError:
                say("oh noes!")

        run(main())
        say("run returned")
    """)
    a.wait_line("0")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["0", "oh noes!", "1", "2", "done!", "run returned"]
    # The protected task is waited for but never cancelled.
    cancelled = [l for l in r.log if l.startswith("DEBUG:Cancelling task:")]
    assert len(cancelled) == 1 and "coro=<main()" in cancelled[0]


@pytest.mark.parametrize("style", ["await", "create_task", "ensure_future", "bare"])
def test_spawn_styles_survive_the_shutdown(app, style):
    spawn = {
        "await": "say('result', await shutdown_waits_for(work()))",
        "create_task": "t = asyncio.get_running_loop().create_task(shutdown_waits_for(work()))\n"
                       "    say('result', await t)",
        "ensure_future": "t = asyncio.ensure_future(shutdown_waits_for(work()))\n"
                         "    say('result', await t)",
        "bare": "shutdown_waits_for(work())\n    await asyncio.sleep(3600)",
    }[style]
    a = app(f"""
import warnings
warnings.simplefilter("ignore", RuntimeWarning)
started = asyncio.Event()

async def work():
    say("work started")
    await asyncio.sleep(0.3)
    say("work finished")
    return 7

async def main():
    {spawn}

run(main())
say("run returned")
""")
    a.wait_line("work started")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["work started", "work finished", "run returned"]
    assert r.messages[-1] == "Leaving. Bye!"


@pytest.mark.parametrize("style", ["await", "create_task", "ensure_future"])
def test_spawn_styles_return_the_result(app, style):
    get = {
        "await": "await shutdown_waits_for(work())",
        "create_task": "await asyncio.get_running_loop().create_task("
                       "shutdown_waits_for(work()))",
        "ensure_future": "await asyncio.ensure_future(shutdown_waits_for(work()))",
    }[style]
    r = run_app(app, f"""
async def work():
    await asyncio.sleep(0.01)
    return ("tuple", 1)

async def fails():
    raise ValueError("inner")

async def main():
    say("result", {get})
    try:
        await shutdown_waits_for(fails())
    except ValueError as e:
        say("raised", e)
    asyncio.get_running_loop().stop()

run(main())
""")
    assert r.returncode == 0, r
    assert r.stdout == ["result ('tuple', 1)", "raised inner"]


def test_cancelling_the_awaiting_task_leaves_the_work_running(app):
    r = run_app(app, """
        async def work():
            await asyncio.sleep(0.3)
            say("work finished")

        async def waiter():
            try:
                await shutdown_waits_for(work())
            except asyncio.CancelledError:
                say("waiter cancelled")
                raise

        async def main():
            t = asyncio.get_running_loop().create_task(waiter())
            await asyncio.sleep(0.05)
            t.cancel()
            await asyncio.sleep(0)
            say("after cancel")
            await asyncio.sleep(0.5)
            asyncio.get_running_loop().stop()

        run(main())
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["waiter cancelled", "after cancel", "work finished"]


def test_cancelling_the_protected_task_reaches_the_awaiting_side(app):
    r = run_app(app, """
        async def work():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("work cancelled")
                raise

        async def main():
            loop = asyncio.get_running_loop()
            loop.call_later(0.05, cancel_protected)
            try:
                await shutdown_waits_for(work())
            except asyncio.CancelledError:
                say("awaiting side got CancelledError")
            loop.stop()

        def cancel_protected():
            [t.cancel() for t in asyncio.all_tasks()
             if getattr(t, "_aiorun_protected", False)]

        run(main())
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["work cancelled", "awaiting side got CancelledError"]


def test_the_protected_tasks_and_only_they_are_marked(app):
    # The documentation: a task started by shutdown_waits_for() carries
    # `_aiorun_protected = True` (the original's WeakSet entry cost too much).
    r = run_app(app, """
        async def work():
            await asyncio.sleep(0.05)

        async def plain():
            await asyncio.sleep(0.05)

        async def main():
            loop = asyncio.get_running_loop()
            shutdown_waits_for(work()).close()
            loop.create_task(plain())
            await asyncio.sleep(0)
            for t in sorted(asyncio.all_tasks(), key=lambda t: t.get_coro().__name__):
                say(t.get_coro().__name__, getattr(t, "_aiorun_protected", False))
            say(len(aiorun._DO_NOT_CANCEL_COROS))
            loop.stop()

        run(main())
    """)
    # The original's set still finds the protected work: the view counts the
    # marked task's coroutine.
    assert r.stdout == ["main False", "plain False", "work True", "1"]


def test_a_coroutine_the_app_puts_in_do_not_cancel_coros_is_not_cancelled(app):
    # As with the original: _DO_NOT_CANCEL_COROS still protects the task of
    # any coroutine the app adds to it itself.
    a = app("""
        async def saver():
            say("READY")
            await asyncio.sleep(0.3)
            say("saver finished")

        async def main():
            coro = saver()
            aiorun._DO_NOT_CANCEL_COROS.add(coro)
            asyncio.get_running_loop().create_task(coro)
            await asyncio.sleep(3600)

        run(main())
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "saver finished", "run returned"], r


def test_a_task_class_without_a_dict_is_marked_through_the_weakset():
    # asyncio's Task has a __dict__, so only a task class that refuses the
    # attribute gets the original's WeakSet entry instead.
    class Refusing(asyncio.Task):
        def __setattr__(self, name, value):
            if name == "_aiorun_protected":
                raise (AttributeError if self.get_name() == "a" else TypeError)(name)
            super().__setattr__(name, value)

    async def work():
        await asyncio.sleep(0)

    async def main():
        loop = asyncio.get_running_loop()
        names = iter("ab")
        loop.set_task_factory(lambda loop, coro, **kw: Refusing(coro, loop=loop,
                                                                name=next(names, "z")))
        for _ in "ab":   # refused with AttributeError, then with TypeError
            waiter = shutdown_waits_for(work())
            assert not hasattr(waiter.task, "_aiorun_protected")
            assert waiter.task.get_coro() in aiorun._DO_NOT_CANCEL_COROS
            await waiter

    asyncio.run(main())


def test_protected_work_is_bounded_by_timeout_task_shutdown(app):
    a = app("""
        async def forever():
            say("READY")
            await asyncio.sleep(3600)

        async def main():
            await shutdown_waits_for(forever())

        run(main(), timeout_task_shutdown=0.3)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "run returned"]
    assert any("refused to exit after 0.3 seconds" in l for l in r.log)
    assert "coro=<forever()" in r.stderr_text


def test_wait_for_timeout_does_not_stop_the_work(app):
    r = run_app(app, """
        async def work():
            await asyncio.sleep(0.2)
            say("work finished")

        async def main():
            try:
                await asyncio.wait_for(shutdown_waits_for(work()), 0.01)
            except asyncio.TimeoutError:
                say("timed out")
            await asyncio.sleep(0.4)
            asyncio.get_running_loop().stop()

        run(main())
    """)
    assert r.stdout == ["timed out", "work finished"]


# ---- outside run(): it behaves like asyncio.shield ----

def test_outside_run_like_shield():
    events = []

    async def work():
        await asyncio.sleep(0.05)
        events.append("work finished")
        return 5

    async def main():
        assert await shutdown_waits_for(work()) == 5
        t = asyncio.ensure_future(shutdown_waits_for(work()))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        events.append("outer cancelled")
        await asyncio.sleep(0.1)

    asyncio.run(main())
    assert events == ["work finished", "outer cancelled", "work finished"]


def test_explicit_loop_argument():
    loop = asyncio.new_event_loop()
    try:
        async def work():
            return "w"
        w = shutdown_waits_for(work(), loop=loop)
        assert loop.run_until_complete(w) == "w"
        w2 = shutdown_waits_for(work(), loop)
        assert loop.run_until_complete(asyncio.ensure_future(w2, loop=loop)) == "w"
    finally:
        loop.close()


def test_waiter_is_a_coroutine_and_cannot_be_reused():
    async def main():
        async def work():
            return 1
        w = shutdown_waits_for(work())
        assert isinstance(w, collections.abc.Coroutine)
        assert asyncio.iscoroutine(w)
        assert await w == 1
        with pytest.raises(RuntimeError, match="^cannot reuse already awaited coroutine$"):
            await w

    asyncio.run(main())


def test_waiter_reads_like_the_originals_coroutine_in_names_and_task_reprs():
    async def main():
        async def work():
            await asyncio.sleep(0)
        w = shutdown_waits_for(work())
        assert w.__name__ == "inner"
        assert w.__qualname__ == "shutdown_waits_for.<locals>.inner"
        assert repr(w).startswith("<coroutine object shutdown_waits_for.<locals>.inner at 0x")
        task = asyncio.get_running_loop().create_task(w)
        assert "coro=<shutdown_waits_for.<locals>.inner()" in repr(task)
        await task

    asyncio.run(main())


def test_waiter_throw_and_close():
    async def main():
        async def work():
            await asyncio.sleep(0.05)
            return 1
        w = shutdown_waits_for(work())
        fut = w.send(None)
        assert asyncio.isfuture(fut) and fut.get_loop() is asyncio.get_running_loop()
        with pytest.raises(ValueError, match="thrown"):
            w.throw(ValueError("thrown"))
        w2 = shutdown_waits_for(work())
        w2.send(None)
        with pytest.raises(KeyError):
            w2.throw(KeyError, KeyError("k"), None)
        w3 = shutdown_waits_for(work())
        assert w3.close() is None
        with pytest.raises(TypeError):
            shutdown_waits_for(work()).throw(42)
        # The protected tasks still finish.
        await asyncio.sleep(0.1)
        protected = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert protected == []

    asyncio.run(main())


def test_bad_arguments():
    with pytest.raises(TypeError, match="'coro' must be a coroutine or awaitable, not int"):
        shutdown_waits_for(5)

    async def work():
        pass

    coro = work()
    with pytest.raises(TypeError, match="'loop' must be an asyncio event loop"):
        shutdown_waits_for(coro, loop="loop")
    coro.close()
    with pytest.raises(TypeError):
        shutdown_waits_for()


@pytest.mark.skipif(PYPY, reason="PyPy has no reference counts to check")
def test_throw_does_not_leak_the_traceback():
    # Regression: throw() of a raised exception took one reference too many
    # on its traceback, keeping every frame in it alive.
    import sys

    async def main():
        async def work():
            await asyncio.sleep(0.01)
        try:
            raise KeyError("raised")
        except KeyError as e:
            err = e
        tb = err.__traceback__
        before = sys.getrefcount(tb)
        w = shutdown_waits_for(work())
        w.send(None)
        with pytest.raises(KeyError):
            w.throw(err)
        err.__traceback__ = tb  # drop the frames the raise added on top
        assert sys.getrefcount(tb) == before
        await asyncio.sleep(0.05)

    asyncio.run(main())


def _cancel_races(task_factory):
    """The awaiting task is cancelled (1) while the protected task runs, with
    a message, and (2) in the turn in which the protected task ends, after
    it has ended; each time it must get CancelledError exactly once, then
    be able to go on awaiting other things."""
    async def main():
        loop = asyncio.get_running_loop()
        if task_factory is not None:
            loop.set_task_factory(task_factory)
        seen = []

        async def waiter(work):
            try:
                await shutdown_waits_for(work())
                seen.append("woken with the result")
            except asyncio.CancelledError as e:
                seen.append(("cancelled", e.args))
            await asyncio.sleep(0.02)   # a second wake-up would cut this short
            seen.append("slept")
            return "went on"

        may_finish = asyncio.Event()

        async def long_work():
            await may_finish.wait()   # ends only after the awaiter went on
            seen.append("long work finished")

        t = loop.create_task(waiter(long_work))
        await asyncio.sleep(0)        # its first step: it awaits the work
        t.cancel("bye")
        assert await t == "went on"
        may_finish.set()
        while "long work finished" not in seen:
            await asyncio.sleep(0.01)

        async def ending_work():
            # Queued before the task ends, so it runs after the task ended
            # and before the awaiting task's wake-up.
            loop.call_soon(t2.cancel)
            return 1

        t2 = loop.create_task(waiter(ending_work))
        assert await t2 == "went on"
        await asyncio.sleep(0.05)
        return seen

    return asyncio.run(main())


@pytest.mark.parametrize("tasks", ["C", "pure Python"])
def test_cancel_races_of_the_awaiting_task(tasks):
    factory = None
    if tasks == "pure Python":
        # asyncio's Python Task calls cancel(msg=...) by keyword and looks
        # the wait up through futures._get_loop(): the other spelling.
        def factory(loop, coro, **kwargs):
            return asyncio.tasks._PyTask(coro, loop=loop, **kwargs)
    seen = _cancel_races(factory)
    assert seen == [
        ("cancelled", ("bye",)), "slept", "long work finished",
        ("cancelled", ()), "slept",
    ]


def test_the_awaiting_task_waits_on_the_protected_task_directly():
    # No future in between: the awaiting task resumes in the turn after the
    # protected task ends, as after `await task` (aiorun's own version
    # needed one turn more).
    async def main():
        loop = asyncio.get_running_loop()
        turns = 0

        async def ticker():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        async def work():
            await asyncio.sleep(0)

        tick = loop.create_task(ticker())
        await asyncio.sleep(0)
        start = turns
        await shutdown_waits_for(work())
        shielded = turns - start
        start = turns
        await loop.create_task(work())
        plain = turns - start
        tick.cancel()
        return shielded, plain

    shielded, plain = asyncio.run(main())
    assert shielded == plain


def test_the_wait_answers_like_a_future():
    async def main():
        loop = asyncio.get_running_loop()

        async def work():
            await asyncio.sleep(0.01)
            return 7

        w = shutdown_waits_for(work())
        wait = w.send(None)
        assert wait._asyncio_future_blocking and not wait.done() and not wait.cancelled()
        with pytest.raises(asyncio.InvalidStateError):
            wait.result()
        woken = loop.create_future()
        wait.add_done_callback(woken.set_result)
        # Passed on to the task, so it is the task that the callback gets.
        assert await woken is wait.task
        assert wait.done() and wait.result() == 7 and wait.exception() is None
        assert wait.cancel() is False          # over: nothing to cancel
        w.close()

        w = shutdown_waits_for(work())
        wait = w.send(None)
        calls = []
        wait.add_done_callback(calls.append)
        wait.add_done_callback(calls.append)   # a second one, kept apart
        assert wait.remove_done_callback(calls.append) == 2
        wait.add_done_callback(calls.append)
        assert wait.cancel("why") is True and wait.cancelled() and wait.done()
        for ask in (wait.result, wait.exception):
            with pytest.raises(asyncio.CancelledError, match="why"):
                ask()
        await asyncio.sleep(0)
        assert calls == [wait]                 # scheduled once, by cancel()
        late = loop.create_future()
        wait.add_done_callback(late.set_result)  # a cancelled wait calls at once
        assert await late is wait
        with pytest.raises(TypeError, match="unexpected keyword argument 'ctx'"):
            wait.add_done_callback(print, ctx=None)
        w.close()
        await asyncio.sleep(0.02)              # the protected work still ended
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []

    asyncio.run(main())


def test_the_awaiter_resumes_in_as_many_turns_as_after_await_task():
    # The documentation: the awaiter resumes in the turn after the work ends, as after
    # `await task` (and as with the original, measured with 2025.1.1).
    class Loop(asyncio.SelectorEventLoop):
        turns = 0

        def _run_once(self):
            Loop.turns += 1
            super()._run_once()

    def turns_after(wrap):
        marks = {}

        async def job():
            await asyncio.sleep(0)
            marks["end"] = Loop.turns

        async def main():
            await wrap(job())
            marks["resumed"] = Loop.turns

        loop = Loop()
        try:
            loop.run_until_complete(main())
        finally:
            loop.close()
        return marks["resumed"] - marks["end"]

    floor = turns_after(lambda coro: asyncio.get_running_loop().create_task(coro))
    assert turns_after(shutdown_waits_for) == floor == 1


@skip_on_pypy_gc
def test_a_protected_coroutine_failing_after_its_awaiter_gave_up(app):
    # The awaiter stops waiting (wait_for times out) and the app goes on; the
    # upload fails later.  It must not stop the app (the original stays
    # silent), and it is reported once, as a WARNING naming the coroutine.
    a = app("""
        async def upload():
            await asyncio.sleep(0.3)
            raise ConnectionError("upload failed")

        async def main():
            try:
                await asyncio.wait_for(shutdown_waits_for(upload()), 0.1)
            except asyncio.TimeoutError:
                say("gave up waiting")
            await asyncio.sleep(0.6)
            say("still serving")
            shutdown_waits_for(upload())          # never awaited at all
            await asyncio.sleep(0.6)
            say("READY")
            await asyncio.sleep(3600)

        run(main(), stop_on_unhandled_errors=True)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["gave up waiting", "still serving", "READY", "run returned"], r
    reports = [l for l in r.log if "protected by shutdown_waits_for()" in l]
    assert reports == ["WARNING:The coroutine upload, protected by shutdown_waits_for(), "
                       "raised after its awaiter had stopped waiting:"] * 2, r
    assert "ConnectionError: upload failed" in r.stderr_text
    assert "never retrieved" not in r.stderr_text
    assert "Unhandled exception" not in r.stderr_text


def test_an_awaiter_that_gets_the_failure_is_no_orphan(app):
    # The awaiter is still waiting when the protected coroutine raises: it
    # gets the exception at its await, and nothing else is reported (no
    # "stopped waiting" WARNING, no "never retrieved").  A protected task
    # cancelled directly reaches its awaiter the same way.
    a = app("""
        async def upload():
            await asyncio.sleep(0)
            raise ConnectionError("upload failed")

        async def forever():
            await asyncio.sleep(3600)

        async def main():
            try:
                await shutdown_waits_for(upload())
            except ConnectionError as e:
                say("caught", e)
            waiter = shutdown_waits_for(forever())
            asyncio.get_running_loop().call_later(0.05, waiter.task.cancel)
            try:
                await waiter
            except asyncio.CancelledError:
                say("protected task cancelled")
            say("READY")
            await asyncio.sleep(3600)

        run(main(), stop_on_unhandled_errors=True)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["caught upload failed", "protected task cancelled", "READY",
                        "run returned"], r
    assert "protected by shutdown_waits_for()" not in r.stderr_text, r
    assert "never retrieved" not in r.stderr_text, r


def test_an_exception_of_the_apps_own_thrown_in_leaves_the_failure_reported(app):
    # Driven by hand, not by a task: the protected work fails, then the app
    # throws something else into the awaitable.  The work's failure reached
    # nobody: it is reported (the WARNING), never silently dropped.
    r = app("""
        async def upload():
            raise ConnectionError("upload failed")

        async def main():
            it = shutdown_waits_for(upload()).__await__()
            next(it)
            await asyncio.sleep(0.05)
            try:
                it.throw(KeyError("of the app"))
            except KeyError:
                say("KeyError came back")
            del it
            await asyncio.sleep(0.05)
            asyncio.get_running_loop().stop()

        run(main())
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["KeyError came back"], r
    assert any(l.startswith("WARNING:The coroutine upload, protected by") for l in r.log), r
    assert "never retrieved" not in r.stderr_text, r


@skip_on_pypy_gc
def test_a_waiter_dropped_after_the_loop_closed_still_reports_its_failure(app):
    # The waiter outlives run() (kept in a global) and is collected after
    # the loop closed: the WARNING comes, not "Event loop is closed".
    r = app("""
        async def upload():
            raise ConnectionError("upload failed")

        kept = []
        async def main():
            kept.append(shutdown_waits_for(upload()))   # never awaited
            await asyncio.sleep(0.1)
            asyncio.get_running_loop().stop()

        run(main())
        say("run returned")
        kept.clear()
        say("dropped")
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["run returned", "dropped"], r
    assert "Event loop is closed" not in r.stderr_text, r
    assert any(l.startswith("WARNING:The coroutine upload, protected by") for l in r.log), r


def test_one_awaitable_two_awaiters_close_and_bad_throw_act_as_a_coroutine_does(app):
    # Each case runs on shutdown_waits_for()'s object and on a plain
    # coroutine, under run(); the two must read the same.
    r = run_app(app, """
        async def work(log):
            await asyncio.sleep(0.2)
            log.append("work finished")
            return "result"

        async def case(make):
            loop = asyncio.get_running_loop()
            log = []
            # A second awaiter is refused at its await; cancelling the first
            # reaches only the first.
            w = make(log)
            async def awaiter(name):
                try:
                    got = await w
                    log.append(f"{name} got {got}")
                except BaseException as e:
                    log.append(f"{name}: {type(e).__name__}: {e}")
            first = loop.create_task(awaiter("first"))
            await asyncio.sleep(0.01)
            second = loop.create_task(awaiter("second"))
            await asyncio.sleep(0.01)
            first.cancel()
            await asyncio.sleep(0.3)
            say(*log, sep=" | ")
            # close() while a task awaits it: the task ends with an error.
            log.clear()
            w = make(log)
            t = loop.create_task(awaiter("awaiter"))
            await asyncio.sleep(0.01)
            w.close()
            await asyncio.sleep(0.3)
            say(*log, "task done:", t.done())
            # throw() with bad arguments changes nothing: the awaiter still
            # gets the result.
            log.clear()
            w = make(log)
            t = loop.create_task(awaiter("awaiter"))
            await asyncio.sleep(0.01)
            for bad in [(42,), (ValueError("v"), 1), (ValueError, None, 5)]:
                try:
                    w.throw(*bad)
                except Exception as e:   # a coroutine's answer varies by version
                    log.append(f"{type(e).__name__}: {e}")
            await asyncio.sleep(0.3)
            say(*log, sep=" | ")

        async def main():
            def protected(log):
                return shutdown_waits_for(work(log))
            def plain(log):
                async def inner():   # what the original's shutdown_waits_for returns
                    return await asyncio.shield(work(log))
                return inner()
            for name, make in (("ours", protected), ("coroutine", plain)):
                say("==", name)
                await case(make)
            asyncio.get_running_loop().stop()

        def say(*args, sep=" "):
            sys.stdout.write(sep.join(map(str, args)) + "\\n")
            sys.stdout.flush()
        run(main())
    """)
    assert r.returncode == 0, r
    ours, plain = "\n".join(r.stdout).split("== coroutine\n")
    lines = ours.split("== ours\n")[1].strip().splitlines()
    plain = plain.strip().splitlines()
    assert lines[0] == plain[0], r.stdout
    # After close() the awaiter fails as a coroutine's does; ours at once,
    # the coroutine's once what it awaited is done.
    assert plain[1] == ("work finished awaiter: RuntimeError: cannot reuse already "
                        "awaited coroutine task done: True"), plain
    assert lines[0] == ("second: RuntimeError: coroutine is being awaited already | "
                        "first: CancelledError:  | work finished"), lines
    assert lines[1] == ("awaiter: RuntimeError: cannot reuse already awaited coroutine "
                        "work finished task done: True"), lines
    # Bad arguments to throw() are refused before anything changes, as
    # asyncio's own future iterator does (a coroutine would pass them down
    # and end with the TypeError).
    assert lines[2].endswith(" | work finished | awaiter got result"), lines
    assert lines[2].count("TypeError:") == 3, lines


def test_do_not_cancel_coros_finds_the_protected_work_as_the_originals_tests_do(app):
    # The original's own tests find the protected task through the set and
    # cancel it directly; membership, iteration and len() answer for the
    # work that has not ended, on this run()'s loop.
    r = run_app(app, """
        async def save():
            await asyncio.sleep(3600)
        async def other():
            await asyncio.sleep(3600)
        async def main():
            loop = asyncio.get_running_loop()
            loop.create_task(other())
            waiter = shutdown_waits_for(save())
            await asyncio.sleep(0)
            s = aiorun._DO_NOT_CANCEL_COROS
            found = [t for t in asyncio.all_tasks() if t.get_coro() in s]
            say("found", [t.get_coro().__name__ for t in found],
                "len", len(s), "iter", [c.__name__ for c in s])
            found[0].cancel()
            try:
                await waiter
            except asyncio.CancelledError:
                say("the awaiter saw the cancel")
            await asyncio.sleep(0)
            say("after: len", len(s), "iter", list(s))
            loop.stop()
        run(main())
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["found ['save'] len 1 iter ['save']", "the awaiter saw the cancel",
                        "after: len 0 iter []"], r


SUBTASK_STYLES = {
    "gather": "await asyncio.gather(step('a'), step('b'))",
    "create_task": "await asyncio.get_running_loop().create_task(step('a'))",
    "wait_for": "await asyncio.wait_for(step('a'), 10)",
    "fire_and_forget": "asyncio.get_running_loop().create_task(step('late'))",
    "taskgroup": """async with asyncio.TaskGroup() as tg:
                    tg.create_task(step('a'))
                    tg.create_task(step('b'))""",
}


@pytest.mark.parametrize("when", ["before", "during"])
@pytest.mark.parametrize("style", sorted(SUBTASK_STYLES))
def test_work_that_protected_work_starts_is_protected(app, style, when):
    # save() is protected; the tasks it starts for its own work must not be
    # cancelled by the shutdown, whether save() began before the signal or
    # as fire-and-forget clean-up in an except CancelledError: block.
    import sys
    if style == "taskgroup" and sys.version_info < (3, 11):
        pytest.skip("TaskGroup is 3.11+")
    a = app(f"""
        async def step(name):
            await asyncio.sleep(0.3)
            say("step", name, "finished")

        async def save():
            {SUBTASK_STYLES[style]}
            say("save finished")

        async def other():
            await asyncio.sleep(3600)

        async def main():
            asyncio.get_running_loop().create_task(other())
            if {when!r} == "before":
                shutdown_waits_for(save())
                await asyncio.sleep(0.05)
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if {when!r} == "during":
                    shutdown_waits_for(save())
                raise

        run(main())
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    steps = sorted(l for l in r.stdout if l.startswith("step"))
    expected = {"gather": ["step a finished", "step b finished"],
                "taskgroup": ["step a finished", "step b finished"],
                "fire_and_forget": ["step late finished"]}.get(style, ["step a finished"])
    assert steps == expected, r
    assert "save finished" in r.stdout, r
    assert r.stdout[-1] == "run returned", r
    assert "CancelledError" not in r.stderr_text, r


@pytest.mark.parametrize("mark", ["1", "False", "anything"])
def test_a_mark_that_is_not_true_itself_protects_nothing(app, mark):
    # Only `_aiorun_protected is True` protects: a 1, a False, or a task
    # class whose __getattr__ answers every name is cancelled like any task.
    a = app(f"""
        class Answering(asyncio.Task):
            def __getattr__(self, name):
                return "yes"
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("worker cancelled")
                raise
        async def main():
            loop = asyncio.get_running_loop()
            if {mark!r} == "anything":
                task = Answering(worker(), loop=loop)
            else:
                task = loop.create_task(worker())
                task._aiorun_protected = {mark}
            say("READY")
            await asyncio.sleep(3600)
        run(main(), timeout_task_shutdown=5)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "worker cancelled"], r
    assert "refused to exit" not in r.stderr_text, r


def test_a_protected_coroutine_that_cancels_its_own_awaiter_wakes_it_once(app):
    r = run_app(app, """
        holder = []
        async def work():
            await asyncio.sleep(0.05)
            holder[0].cancel()          # its last step
            return "done"
        async def awaiter():
            try:
                say("got", await shutdown_waits_for(work()))
            except asyncio.CancelledError:
                say("awaiter cancelled")
                raise
        async def main():
            t = asyncio.get_running_loop().create_task(awaiter())
            holder.append(t)
            try:
                await t
            except asyncio.CancelledError:
                pass
            await asyncio.sleep(0.1)    # any second wake-up would come here
            say("main continues")
            asyncio.get_running_loop().stop()
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["awaiter cancelled", "main continues"], r
    assert "InvalidStateError" not in r.stderr_text, r
    assert "Unhandled exception" not in r.stderr_text, r


def test_a_second_awaiter_before_the_first_ones_cancel_arrives_is_refused(app):
    # The first awaiter is cancelled (its wake-up queued); a second task
    # awaits in that very turn: it is refused at once, not left pending.
    r = run_app(app, """
        async def protected():
            await asyncio.sleep(0.3)
            return 42
        async def main():
            w = shutdown_waits_for(protected())
            async def awaiter(name):
                try:
                    say(name, "got", await w)
                except BaseException as e:
                    say(name, "raised", type(e).__name__, e)
            t1 = asyncio.ensure_future(awaiter("first"))
            await asyncio.sleep(0.01)
            t2 = asyncio.ensure_future(awaiter("second"))
            t1.cancel()
            done, pending = await asyncio.wait({t1, t2}, timeout=10)
            say("pending", len(pending))
            asyncio.get_running_loop().stop()
        run(main())
    """)
    assert r.returncode == 0, r
    assert sorted(r.stdout) == ["first raised CancelledError ",
                                "pending 0",
                                "second raised RuntimeError coroutine is being awaited already"], r


def test_close_after_the_awaiter_was_cancelled_keeps_the_cancel(app):
    r = run_app(app, """
        async def protected():
            await asyncio.sleep(0.3)
        async def main():
            w = shutdown_waits_for(protected())
            async def awaiter():
                await w
            t = asyncio.ensure_future(awaiter())
            await asyncio.sleep(0.01)
            t.cancel()          # the wake-up is queued
            w.close()           # before it runs
            try:
                await t
            except BaseException as e:
                say("task ended", type(e).__name__, "cancelled:", t.cancelled())
            asyncio.get_running_loop().stop()
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["task ended CancelledError cancelled: True"], r


def test_do_not_cancel_coros_survives_odd_task_likes(app):
    # A task-like whose mark raises, beside one with _coro and no get_coro:
    # len() raises that error (or counts), never crashes.
    r = run_app(app, """
        class Bad(asyncio.Future):
            @property
            def _aiorun_protected(self):
                raise RuntimeError("boom")
        class NoGetCoro(asyncio.Future):
            _aiorun_protected = True
            def __init__(self, loop, coro):
                super().__init__(loop=loop)
                self._coro = coro
        async def c():
            pass
        async def main():
            loop = asyncio.get_running_loop()
            odd = []
            for _ in range(20):
                odd.append(Bad(loop=loop))
                odd.append(NoGetCoro(loop, c()))
            for o in odd:
                asyncio.tasks._register_task(o)
            try:
                say("len", len(aiorun._DO_NOT_CANCEL_COROS))
            except RuntimeError as e:
                say("raised", e)
            for o in odd:
                if hasattr(o, "_coro"):
                    o._coro.close()
                o.cancel()
                asyncio.tasks._unregister_task(o)
            loop.stop()
        run(main())
        say("survived")
    """)
    assert r.returncode == 0, r
    assert r.stdout[-1] == "survived", r
