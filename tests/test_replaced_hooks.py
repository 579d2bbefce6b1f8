"""What C takes from a hook an app can replace (sys, signal, faulthandler,
asyncio, argparse attributes; the loop; a future) is checked before C relies
on its type.  Each app replaces one the way code in the wild does, and the
shutdown still runs to its end: no crash, no hang, the right exit code.
RELIABILITY.md lists every such place."""
import signal
import sys
import textwrap

import pytest

from conftest import FREE_THREADED, PYPY, App, run_app

# The late warning reads sys._current_frames() with the GIL; a free-threaded
# build takes its stacks from faulthandler, which stops the world instead.
current_frames_used = pytest.mark.skipif(
    PYPY or FREE_THREADED,
    reason="the late warning reads no sys._current_frames() here (PyPy has none; a "
           "free-threaded build asks faulthandler)")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

BLOCKED_LOOP = """
    async def main():
        await asyncio.sleep(0)
        say("READY")
        time.sleep(2.5)      # the loop is blocked: the late warning comes at 1 s
    run(main(), shutdown_deadline=30)
    say("returned")
"""


@current_frames_used
@pytest.mark.parametrize("replacement, note", [
    ("lambda: {k: object() for k in real()}", "TypeError: expected a frame, not object"),
    ("lambda: {k: None for k in real()}", "TypeError: expected a frame, not NoneType"),
    ("lambda: list(real().values())",
     "TypeError: sys._current_frames() returned list, not a dict"),
    ("threading._active.copy", "TypeError: expected a frame, not _MainThread"),
])
def test_a_replaced_current_frames_leaves_a_note_instead_of_the_stack(app, replacement, note):
    a = app(textwrap.dedent(f"""
        real = sys._current_frames
        sys._current_frames = {replacement}
    """) + textwrap.dedent(BLOCKED_LOOP))
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "returned"], r
    assert f"  (its stack cannot be shown: {note})" in r.stderr, r


@current_frames_used
def test_a_stand_in_sys_module_is_not_consulted(app):
    # sys.modules["sys"] replaced: the watchdog reads the real sys (it never
    # imports through __import__), and shows the real stack.
    a = app(textwrap.dedent("""
        import types
        real = sys._current_frames
        sys.modules["sys"] = types.SimpleNamespace(_current_frames=lambda: {0: "x"})
    """) + textwrap.dedent(BLOCKED_LOOP))
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert any("time.sleep(2.5)" in line for line in r.stderr), r


@pytest.mark.parametrize("answer", ['"A" * 64', "42"])
def test_a_future_whose_exception_is_not_an_exception(app, answer):
    # The shutdown_callback's future reports something that is not an
    # exception: run() raises the real error, as the future's result() does.
    r = run_app(app, f"""
        class Odd(asyncio.Future):
            def exception(self):
                return {answer}
        def callback(loop):
            f = Odd(loop=loop)
            f.set_exception(ValueError("real"))
            return f
        async def main():
            asyncio.get_running_loop().stop()
        try:
            run(main(), shutdown_callback=callback)
        except ValueError as e:
            say("raised", repr(e))
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["raised ValueError('real')"], r


@pytest.mark.parametrize("name", ["12345", 'b"x" * 40'])
def test_a_replaced_signals_enum_names_the_signal_by_number(app, name):
    r = run_app(app, f"""
        import types
        signal.Signals = lambda n: types.SimpleNamespace(name={name})
        async def main():
            loop = asyncio.get_running_loop()
            os.kill(os.getpid(), signal.SIGUSR1)
            await asyncio.sleep(0.3)
            loop.stop()
        run(main(), task_dump_signal=True)
        say("returned")
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["returned"], r
    assert any(f"Task dump (signal {int(signal.SIGUSR1)}): " in l for l in r.stderr), r


def test_a_faulthandler_that_registers_nothing_still_exits_124(app):
    a = app("""
        import faulthandler
        faulthandler.register = lambda *args, **kwargs: None
        async def main():
            say("READY")
            await asyncio.sleep(0)
            time.sleep(30)
        run(main(), shutdown_deadline=1)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 124, r
    assert "aiorun: exiting with code 124" in r.stderr_text, r


STUBBORN = """
    async def stubborn():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
    async def main():
        asyncio.get_running_loop().create_task(stubborn())
        await asyncio.sleep(0)
        asyncio.get_running_loop().stop()
"""


def test_a_timeout_whose_float_changes_is_read_once(app):
    # Checked as 0.3 s, then NaN: the shutdown uses what run() checked.
    r = run_app(app, textwrap.dedent("""
        import math
        class Shifty(int):
            calls = 0
            def __float__(self):
                Shifty.calls += 1
                return 0.3 if Shifty.calls == 1 else math.nan
    """) + textwrap.dedent(STUBBORN) + textwrap.dedent("""
        run(main(), timeout_task_shutdown=Shifty(0))
        say("returned")
    """))
    assert r.returncode == 0, r
    assert r.stdout == ["returned"], r
    assert "refused to exit" in r.stderr_text, r


def test_a_loop_whose_clock_is_nan_does_not_make_the_wait_endless(app):
    r = run_app(app, textwrap.dedent("""
        import math
        class NanClock(asyncio.SelectorEventLoop):
            def time(self):
                caller = sys._getframe(1).f_code.co_filename
                return super().time() if "asyncio" in caller else math.nan
    """) + textwrap.dedent(STUBBORN) + textwrap.dedent("""
        try:
            run(main(), loop=NanClock(), timeout_task_shutdown=0.3)
        except ValueError as e:
            say("raised", e)
    """))
    assert r.stdout == ["raised loop.time() returned a time that is not finite"], r


def test_a_loop_whose_is_closed_answers_0_still_dumps_its_tasks(app):
    r = run_app(app, """
        class Zero(asyncio.SelectorEventLoop):
            def is_closed(self):
                return int(super().is_closed())
        async def main():
            os.kill(os.getpid(), signal.SIGUSR1)
            await asyncio.sleep(0.3)
            asyncio.get_running_loop().stop()
        loop = Zero()
        run(main(), loop=loop, task_dump_signal=True)
        loop.close()
        say("returned")
    """)
    assert r.returncode == 0, r
    assert any("Task dump (SIGUSR1): " in l for l in r.stderr), r
    assert "Could not schedule the task dump" not in r.stderr_text, r


def test_a_cancelled_error_that_is_not_a_class_is_refused_at_import(app):
    r = run_app(app, """
        import asyncio
        asyncio.CancelledError = "not a type"
        try:
            import aiorun
        except TypeError as e:
            print("TypeError:", e)
    """, prelude=False)
    assert r.stdout == ["TypeError: asyncio.CancelledError is str, not an exception class"], r


def test_the_cli_takes_what_argparse_gives_as_any_sequence(tmp_path):
    (tmp_path / "svc.py").write_text(
        "import asyncio, sys\n"
        "async def main():\n"
        "    print(sys.argv, flush=True)\n"
        "    asyncio.get_running_loop().stop()\n")
    boot = ("import argparse, runpy\n"
            "real = argparse.ArgumentParser.parse_args\n"
            "def as_tuple(self, *a, **k):\n"
            "    ns = real(self, *a, **k)\n"
            "    ns.args = tuple(ns.args)\n"
            "    return ns\n"
            "argparse.ArgumentParser.parse_args = as_tuple\n"
            "import sys; sys.argv = ['aiorun', 'svc:main', 'x']\n"
            "runpy.run_module('aiorun', run_name='__main__')\n")
    r = App([sys.executable, "-c", boot], cwd=str(tmp_path)).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["['svc:main', 'x']"], r
