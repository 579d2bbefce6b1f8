"""SPEC steps 4 and 5: stop_on_unhandled_errors."""
import signal

import pytest

from conftest import SHUTDOWN_TAIL, line_of, run_app, skip_on_pypy_gc, subsequence

STOPPING = "ERROR:Unhandled exception; stopping loop: 'Task exception was never retrieved'"


def test_exception_from_main_stops_and_is_reraised(app):
    a = app("""
        async def other():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("other cancelled")
                raise

        async def main():
            asyncio.get_running_loop().create_task(other())
            await asyncio.sleep(0)
            raise Exception("ouch")

        run(main(), stop_on_unhandled_errors=True)
    """)
    r = a.finish()
    assert r.returncode == 1, r
    assert r.stdout == ["other cancelled"]
    assert r.log[2] == STOPPING
    assert subsequence(SHUTDOWN_TAIL + ["Reraising unhandled exception"], r.messages)
    # The uncaught exception's traceback reaches back to where it was raised.
    line = line_of(a.script, 'raise Exception("ouch")')
    assert r.stderr[-3:] == [f'  File "{a.script}", line {line}, in main',
                             '    raise Exception("ouch")', "Exception: ouch"]


def test_exception_from_main_is_reported_while_the_task_is_still_referenced(app):
    # run() keeps the main task alive; the error must still arrive at once
    # rather than whenever the task is collected.
    r = run_app(app, """
        import gc
        gc.disable()
        keep = []
        async def main():
            keep.append(asyncio.current_task())
            raise KeyError("k")
        try:
            run(main(), stop_on_unhandled_errors=True)
        except KeyError as e:
            say("raised", repr(e))
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["raised KeyError('k')"]


@skip_on_pypy_gc
def test_exception_from_a_background_task(app):
    r = run_app(app, """
        async def job():
            raise ValueError("from background")

        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        loop.create_task(job())
        run(loop=loop, stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.log[2] == STOPPING
    assert r.stderr[-1] == "ValueError: from background"
    assert r.messages[-2:] == ["Leaving. Bye!", "Reraising unhandled exception"]


def test_call_exception_handler_with_an_exception(app):
    r = run_app(app, """
        async def main():
            asyncio.get_running_loop().call_exception_handler(
                {"message": "custom report", "exception": LookupError("lk")})
            say("main continues")
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stdout == ["main continues"]
    assert "ERROR:Unhandled exception; stopping loop: 'custom report'" in r.log
    assert r.stderr[-1] == "LookupError: lk"


def test_call_exception_handler_without_an_exception(app):
    r = run_app(app, """
        async def main():
            asyncio.get_running_loop().call_exception_handler({"message": "just a note"})
        run(main(), stop_on_unhandled_errors=True)
        say("run returned normally")
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["run returned normally"]
    assert "ERROR:Unhandled exception; stopping loop: 'just a note'" in r.log
    assert "Reraising unhandled exception" not in r.messages
    assert "Traceback" not in r.stderr_text


def test_the_latest_report_wins(app):
    r = run_app(app, """
        async def main():
            loop = asyncio.get_running_loop()
            loop.call_exception_handler({"message": "a", "exception": ValueError("1")})
            loop.call_exception_handler({"message": "b", "exception": TypeError("2")})
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "TypeError: 2"


def test_without_the_flag_errors_are_logged_and_the_loop_runs_on(app):
    a = app("""
        async def main():
            raise Exception("ouch")
        loop = asyncio.new_event_loop()
        loop.call_later(0.1, say, "still running")
        run(main(), loop=loop)
        say("run returned")
    """)
    a.wait_line("still running")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["still running", "run returned"]
    assert any(l.startswith("ERROR:asyncio:Task exception was never retrieved")
               for l in r.stderr)


def test_exception_handler_is_removed_from_a_supplied_loop(app):
    r = run_app(app, """
        loop = asyncio.new_event_loop()
        async def main():
            say("installed:", loop.get_exception_handler() is not None)
            loop.stop()
        run(main(), loop=loop, stop_on_unhandled_errors=True)
        say("after run:", loop.get_exception_handler())
    """)
    assert r.stdout == ["installed: True", "after run: None"]


def test_exception_during_the_shutdown_does_not_abort_it(app):
    # A task that fails while being cancelled: its error is kept for
    # re-raising, and the shutdown still runs to the end.
    a = app("""
        async def bad_cleanup():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise RuntimeError("cleanup failed")

        async def main():
            say("READY")
            await bad_cleanup()

        run(main(), stop_on_unhandled_errors=True)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 1, r
    assert subsequence(SHUTDOWN_TAIL + ["Reraising unhandled exception"], r.messages)
    assert r.stderr[-1] == "RuntimeError: cleanup failed"


def test_keyboard_interrupt_from_main_under_stop_on_unhandled_errors(app):
    # As the original: it is a request to shut down, logged, and run()
    # returns; it is not re-raised as an unhandled error.
    r = app("""
        async def main():
            await asyncio.sleep(0.01)
            raise KeyboardInterrupt

        try:
            run(main(), stop_on_unhandled_errors=True)
            say("run returned")
        except BaseException as e:
            say("run raised", type(e).__name__)
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["run returned"]
    assert "Got KeyboardInterrupt" in r.messages
    assert "Leaving. Bye!" in r.messages
    assert "Reraising unhandled exception" not in r.messages


# The error rule: the error that stopped the loop is what run() raises;
# whatever is reported after the loop stopped is logged, never replaces or
# erases it.

def _aiohttp_or_skip():
    return pytest.importorskip("aiohttp", reason="aiohttp is not installed for this Python")


def test_an_unclosed_aiohttp_session_does_not_erase_the_fatal_error(app):
    _aiohttp_or_skip()
    r = run_app(app, """
        import aiohttp
        async def holder():
            session = aiohttp.ClientSession()   # never closed: its __del__ reports it
            await asyncio.sleep(3600)
        async def main():
            asyncio.get_running_loop().create_task(holder())
            await asyncio.sleep(0.05)
            raise RuntimeError("fatal")
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "RuntimeError: fatal", r
    assert any("Unclosed client session" in line for line in r.stderr), r


def test_sys_exit_in_a_task_keeps_its_code_beside_an_unclosed_session(app):
    _aiohttp_or_skip()
    r = run_app(app, """
        import aiohttp
        async def holder():
            session = aiohttp.ClientSession()
            await asyncio.sleep(3600)
        async def quitter():
            await asyncio.sleep(0.05)
            sys.exit(3)
        async def main():
            loop = asyncio.get_running_loop()
            loop.create_task(holder())
            loop.create_task(quitter())
            await asyncio.sleep(3600)
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 3, r
    assert any("Unclosed client session" in line for line in r.stderr), r


@skip_on_pypy_gc
def test_an_error_raised_while_cancelled_is_logged_not_raised(app):
    r = run_app(app, """
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise ValueError("secondary, from the clean-up")
        async def main():
            asyncio.get_running_loop().create_task(worker())
            await asyncio.sleep(0.05)
            raise RuntimeError("fatal")
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "RuntimeError: fatal", r
    assert "ValueError: secondary, from the clean-up" in r.stderr, r


@skip_on_pypy_gc
def test_mains_finally_that_raises_does_not_replace_the_fatal_error(app):
    r = run_app(app, """
        async def crasher():
            await asyncio.sleep(0.05)
            raise RuntimeError("fatal")
        async def main():
            asyncio.get_running_loop().create_task(crasher())
            try:
                await asyncio.sleep(3600)
            finally:
                raise KeyError("secondary, from main's finally")
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "RuntimeError: fatal", r
    assert any("KeyError: \"secondary, from main's finally\"" in l for l in r.stderr), r


def test_a_report_without_an_exception_erases_nothing(app):
    r = run_app(app, """
        async def main():
            loop = asyncio.get_running_loop()
            loop.call_exception_handler({"message": "a", "exception": ValueError("1")})
            loop.call_exception_handler({"message": "just a note"})
        run(main(), stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "ValueError: 1"


@skip_on_pypy_gc
def test_an_error_reported_during_a_signal_shutdown_is_raised(app):
    # Nothing stopped the loop with an error: the first error of the
    # shutdown is the one to raise.
    a = app("""
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise ValueError("from the clean-up")
        async def main():
            asyncio.get_running_loop().create_task(worker())
            say("READY")
            await asyncio.sleep(3600)
        run(main(), stop_on_unhandled_errors=True)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 1, r
    assert r.stderr[-1] == "ValueError: from the clean-up", r


@skip_on_pypy_gc
def test_an_error_reported_during_the_shutdown_leaves_the_callers_loop_usable(app):
    # The report comes while the shutdown runs, between two turns of the
    # loop (from the __del__ of what a cancelled task held, freed by the
    # shutdown): it must not leave the caller's own loop stopping, so that
    # its next run_until_complete() works.
    a = app("""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        class Reporter:
            def __del__(self):
                loop.call_exception_handler(
                    {"message": "late", "exception": ValueError("late")})
        async def worker(held):
            await asyncio.sleep(3600)
        async def main():
            asyncio.get_running_loop().create_task(worker(Reporter()))
            say("READY")
            await asyncio.sleep(3600)
        try:
            run(main(), loop=loop, stop_on_unhandled_errors=True)
        except ValueError as e:
            say("run raised", e)
        say("next run:", loop.run_until_complete(asyncio.sleep(0.01, result=5)))
        loop.close()
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "run raised late", "next run: 5"], r
