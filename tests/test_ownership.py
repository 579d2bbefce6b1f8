"""One run() at a time owns what belongs to the process: signals, the
watchdog, systemd (tests/test_notify.py), the collector's pause, reaping.
Each effect is tried with a helper-thread run() beside the main one, and
with runs in sequence or nested."""
import signal
import sys

import pytest

from conftest import run_app

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


def test_only_the_owner_pauses_the_collector(app):
    # Each run() has a task that reports, from its except CancelledError:
    # block (inside the drain), whether the collector is on.  The helper's
    # drain runs while the main run() serves: it must not turn the
    # collector off under it; the main run()'s own drain does.
    a = app("""
        import gc
        def helper():
            async def job():
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    say("helper drain, gc on:", gc.isenabled())
                    raise
            async def work():
                asyncio.get_running_loop().create_task(job())
                await asyncio.sleep(0)
                asyncio.get_running_loop().stop()
            run(work())
            say("helper done, gc on:", gc.isenabled())
        async def job():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("main drain, gc on:", gc.isenabled())
                raise
        async def main():
            asyncio.get_running_loop().create_task(job())
            t = threading.Thread(target=helper)
            t.start()
            await asyncio.get_running_loop().run_in_executor(None, t.join)
            say("READY")
            await asyncio.sleep(3600)
        run(main())
        say("after run, gc on:", gc.isenabled())
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["helper drain, gc on: True", "helper done, gc on: True", "READY",
                        "main drain, gc on: False", "after run, gc on: True"], r


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork()")
def test_a_child_forked_during_the_drain_has_the_collector_on(app):
    a = app("""
        import gc
        async def job():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pid = os.fork()
                if pid == 0:
                    say("child, gc on:", gc.isenabled())
                    os._exit(0)
                os.waitpid(pid, 0)
                say("parent, gc on:", gc.isenabled())
                raise
        async def main():
            asyncio.get_running_loop().create_task(job())
            say("READY")
            await asyncio.sleep(3600)
        run(main())
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "child, gc on: True", "parent, gc on: False"], r


def test_a_helper_thread_run_leaves_the_signals_to_the_main_one(app):
    a = app("""
        def helper():
            async def work():
                say("HELPER")
                await asyncio.sleep(3600)
            run(work())
            say("helper returned")
        async def main():
            t = threading.Thread(target=helper, daemon=True)
            t.start()
            await asyncio.sleep(0.2)
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("main cancelled")
                raise
        run(main())
        say("main returned", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[-2:] == ["main cancelled", "main returned True"], r
    assert "helper returned" not in r.stdout


def test_a_run_nested_in_a_shutdown_callback_is_not_the_owner(app):
    # A plain shutdown_callback runs while the outer loop is stopped, so a
    # run() inside it is allowed; it must not take the signals, the
    # deadline or the collector away from the outer run(), nor give the
    # signals back when it ends.
    a = app("""
        import gc
        def callback(loop):
            outer = signal.getsignal(signal.SIGTERM)
            async def inner():
                say("inner sees the outer handler:", signal.getsignal(signal.SIGTERM) == outer)
                asyncio.get_running_loop().stop()
            run(inner())
            say("after inner:", signal.getsignal(signal.SIGTERM) == outer)
            try:
                run(inner(), shutdown_deadline=1)
            except ValueError as e:
                say(e)
        async def main():
            say("READY")
            await asyncio.sleep(3600)
        run(main(), shutdown_callback=callback)
        say("after run, default:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "inner sees the outer handler: True",
                        "after inner: True",
                        "run() argument 'shutdown_deadline' needs the outermost run(): "
                        "another run() under way on the main thread owns the process",
                        "after run, default: True"], r
    assert any("another run() is under way on the main thread" in l for l in r.stderr), r


@pytest.mark.parametrize("param", ["shutdown_deadline=5", "task_dump_signal=True",
                                   "reap_orphans=True", "exit_on_repeated_signal=True"])
def test_a_helper_thread_run_refuses_what_belongs_to_the_process(app, param):
    r = run_app(app, f"""
        def helper():
            async def work():
                pass
            try:
                run(work(), {param})
            except ValueError as e:
                say("ValueError:", e)
        t = threading.Thread(target=helper)
        t.start()
        t.join()
    """)
    assert r.returncode == 0, r
    name = param.split("=")[0]
    assert r.stdout == [f"ValueError: run() argument '{name}' needs run() in the main "
                        "thread"], r


def test_the_environment_does_not_turn_process_effects_on_for_a_helper(app):
    # An operator's variables are for the process owner: a helper's run()
    # neither reads them nor fails on a malformed one.
    r = run_app(app, """
        def helper():
            async def work():
                asyncio.get_running_loop().stop()
            run(work())
            say("helper ran")
        t = threading.Thread(target=helper)
        t.start()
        t.join()
    """, env={"AIORUN_REAP_ORPHANS": "yes please", "AIORUN_SHUTDOWN_DEADLINE": "soon",
              "AIORUN_EXIT_ON_REPEATED_SIGNAL": "maybe"})
    assert r.returncode == 0, r
    assert r.stdout == ["helper ran"]
    assert not any("Reaping orphaned processes" in l for l in r.stderr)


def test_runs_in_sequence_each_own_the_process_in_turn(app):
    # The second run() takes the signals again once the first gave them
    # back: a SIGTERM then stops it gracefully.
    a = app("""
        async def first():
            say("FIRST", signal.getsignal(signal.SIGTERM).__name__)
            asyncio.get_running_loop().stop()
        run(first())
        async def second():
            say("SECOND", signal.getsignal(signal.SIGTERM).__name__)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("second cancelled")
                raise
        run(second(), shutdown_deadline=30)
        say("done")
    """)
    a.wait_line("SECOND _on_signal")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["FIRST _on_signal", "SECOND _on_signal", "second cancelled",
                        "done"], r
