"""use_uvloop and user-supplied uvloop loops."""
import signal

import pytest

from conftest import SHUTDOWN_TAIL, run_app, subsequence

pytest.importorskip("uvloop")  # the test venvs install it; see scripts/test


def test_use_uvloop_runs_on_uvloop_and_stops_on_a_signal(app):
    a = app("""
        import uvloop
        async def main():
            say("uvloop:", isinstance(asyncio.get_running_loop(), uvloop.Loop))
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("main cancelled")
                raise
        run(main(), use_uvloop=True)
        say("wakeup fd:", signal.set_wakeup_fd(-1))
        say("SIGTERM:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    a.wait_line("uvloop: True")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["uvloop: True", "main cancelled", "wakeup fd: -1", "SIGTERM: True"]
    assert r.messages == ["Stopping the loop"] + SHUTDOWN_TAIL


def test_missing_uvloop_raises_import_error(app):
    r = run_app(app, """
        sys.modules["uvloop"] = None   # as if it were not installed
        async def main():
            pass
        coro = main()
        try:
            run(coro, use_uvloop=True)
        except ImportError as e:
            say("ImportError")
        coro.close()
        say("SIGINT:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["ImportError", "SIGINT: True"]


def test_supplied_uvloop_loop_with_shield_and_executor(app):
    a = app("""
        import uvloop
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)

        async def work():
            await asyncio.sleep(0.2)
            say("protected done")

        def blocking():
            time.sleep(0.2)
            say("executor job done")

        async def main():
            asyncio.get_running_loop().run_in_executor(None, blocking)
            say("READY")
            try:
                await shutdown_waits_for(work())
            except asyncio.CancelledError:
                say("main cancelled")

        run(main(), loop=loop)
        say("open:", not loop.is_closed())
        loop.close()
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[:2] == ["READY", "main cancelled"]
    assert sorted(r.stdout[2:4]) == ["executor job done", "protected done"]
    assert r.stdout[4] == "open: True"
    assert subsequence(["Waiting for executor shutdown.", "Leaving. Bye!"], r.messages)


def test_stop_on_unhandled_errors_under_uvloop(app):
    r = run_app(app, """
        async def main():
            raise Exception("ouch")
        run(main(), use_uvloop=True, stop_on_unhandled_errors=True)
    """)
    assert r.returncode == 1, r
    assert r.stderr[-1] == "Exception: ouch"
    assert r.messages[-1] == "Reraising unhandled exception"


def test_the_ordered_shutdown_and_the_task_dump_on_uvloop(app):
    a = app("""
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                say("worker:", e.args[0], aiorun.cancelled_by_shutdown(e))
                raise

        async def main():
            asyncio.get_running_loop().create_task(worker(), name="the-worker")
            event = aiorun.shutdown_event()
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                say("main:", e.args[0], "event set:", event.is_set())
                await asyncio.sleep(0.1)
                return "main's value"

        say("returned:", run(main(), use_uvloop=True, drain_delay=0.2,
                             cancel_main_first=True, task_dump_signal=True))
    """)
    a.wait_line("READY")
    a.send(signal.SIGUSR1)
    a.wait_log("Task dump (SIGUSR1): 2 tasks")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "main: aiorun shutdown: SIGTERM event set: True",
                        "worker: aiorun shutdown: SIGTERM True", "returned: main's value"]
    assert "the-worker" in r.stderr_text
    assert subsequence(["Letting tasks finish for up to 0.2 seconds (drain_delay).",
                        "Cancelling the main task first.", "Cancelling pending tasks."],
                       r.messages)
