"""Reload on SIGHUP (run()'s reload_callback), as systemd's
Type=notify-reload expects: real SIGHUPs to a child app, and the exact
notifications on a NOTIFY_SOCKET this test reads.  Every step is a
handshake (a line the app prints, a datagram it sends, a line this test
writes to it)."""
import signal
import sys
import time

import pytest

from conftest import App
from test_notify import Receiver

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGHUP is POSIX only")


@pytest.fixture
def receiver(tmp_path):
    r = Receiver(str(tmp_path / "notify.sock"))
    r.env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": None}
    yield r
    r.close()


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# A service whose configuration a reload swaps; each reload waits for a line
# on stdin, so the test decides when it ends.
SERVICE = """
    config = {"version": 1}
    answers = None

    async def reload():
        say("RELOADING", config["version"] + 1)
        if await answers.get() == "fail":
            raise ValueError("bad configuration")
        config["version"] += 1
        say("RELOADED", config["version"])

    async def main():
        global answers
        answers = asyncio.Queue()
        say("SERVING", config["version"])
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if line == "version?":
                say("VERSION", config["version"])
            elif not line:
                return   # stdin closed: the test is about to stop it
            else:
                answers.put_nowait(line)   # what the reload under way is to do

    run(main(), notify_ready_on_start=True, reload_callback=reload)
"""


def stop(a):
    """Close the app's stdin (its reader thread ends), then SIGTERM."""
    a.proc.stdin.close()
    a.proc.stdin = None
    a.send(signal.SIGTERM)
    return a.finish()


def reloaded(receiver):
    """The messages that end a reload: RELOADING=1 with READY=1."""
    return [m for m in receiver.messages if m.startswith("RELOADING=1\n")]


def test_a_reload_runs_the_callback_and_then_says_reloading_and_ready(app, receiver):
    a = app(SERVICE, env=receiver.env, stdin=True)
    a.wait_line("SERVING 1")
    receiver.wait_for("READY=1\nSTATUS=running")
    before = monotonic_usec()
    a.send(signal.SIGHUP)
    a.wait_line("RELOADING 2")
    receiver.wait_for("STATUS=reloading")
    after = monotonic_usec()
    a.write("version?\n")          # the app serves on during the reload
    assert a.wait_prefix("VERSION") == "VERSION 1"
    assert reloaded(receiver) == []    # nothing systemd takes as the end yet
    a.write("ok\n")
    a.wait_line("RELOADED 2")
    with receiver.arrived:
        assert receiver.arrived.wait_for(lambda: reloaded(receiver), 30), receiver.messages
    message, = reloaded(receiver)
    fields = dict(line.split("=", 1) for line in message.split("\n"))
    assert fields.keys() == {"RELOADING", "MONOTONIC_USEC", "READY", "STATUS"}, message
    assert (fields["READY"], fields["STATUS"]) == ("1", "running")
    # Stamped when the reload began, after the SIGHUP: what systemd checks.
    assert before <= int(fields["MONOTONIC_USEC"]) <= after
    a.write("version?\n")
    a.wait_line("VERSION 2")
    r = stop(a)
    assert r.returncode == 0, r
    assert "INFO:Reloading (SIGHUP)." in r.log and "INFO:Reload done." in r.log


def test_a_failed_reload_is_logged_and_the_app_serves_on_without_ready(app, receiver):
    a = app(SERVICE, env=receiver.env, stdin=True)
    a.wait_line("SERVING 1")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.send(signal.SIGHUP)
    a.wait_line("RELOADING 2")
    a.write("fail\n")
    receiver.wait_for("STATUS=reload failed (ValueError), serving on with the old state")
    a.write("version?\n")
    a.wait_line("VERSION 1")
    assert reloaded(receiver) == [], receiver.messages
    # The next reload works, and only it says READY=1.
    a.send(signal.SIGHUP)
    a.wait_line("RELOADING 2")
    a.write("ok\n")
    a.wait_line("RELOADED 2")
    with receiver.arrived:
        assert receiver.arrived.wait_for(lambda: reloaded(receiver), 30), receiver.messages
    r = stop(a)
    assert r.returncode == 0, r
    receiver.wait_for("STATUS=stopped")
    ready = [i for i, m in enumerate(receiver.messages) if "READY=1" in m.split("\n")]
    assert len(ready) == 2, receiver.messages   # the start, and the second reload
    failed = receiver.messages.index(
        "STATUS=reload failed (ValueError), serving on with the old state")
    assert ready[0] < failed < ready[1], receiver.messages
    assert "ERROR:Reload failed; serving on with the state from before it" in r.log
    assert "ValueError: bad configuration" in r.stderr_text


def test_sighups_during_a_reload_ask_for_one_more(app, receiver):
    a = app(SERVICE, env=receiver.env, stdin=True)
    a.wait_line("SERVING 1")
    a.send(signal.SIGHUP)
    a.wait_line("RELOADING 2")
    for _ in range(5):
        a.send(signal.SIGHUP)
    a.write("version?\n")          # the five have been handled when this is answered
    a.wait_line("VERSION 1")
    a.write("ok\n")
    a.wait_line("RELOADED 2")
    a.wait_line("RELOADING 3")     # one more, for all five
    a.write("ok\n")
    a.wait_line("RELOADED 3")
    a.write("version?\n")
    a.wait_line("VERSION 3")
    r = stop(a)
    assert r.returncode == 0, r
    assert r.stdout.count("RELOADING 2") + r.stdout.count("RELOADING 3") == 2, r
    assert r.log.count("INFO:Reloading (SIGHUP).") == 2, r


def test_a_plain_function_works_and_the_handler_is_given_back(app):
    r = app("""
        before = signal.getsignal(signal.SIGHUP)
        def reload():
            say("RELOADED")
            asyncio.get_running_loop().stop()
        async def main():
            os.kill(os.getpid(), signal.SIGHUP)
        run(main(), reload_callback=reload)
        say("GIVEN BACK", signal.getsignal(signal.SIGHUP) == before)
    """, env={"NOTIFY_SOCKET": None}).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["RELOADED", "GIVEN BACK True"], r


def test_without_a_callback_sighup_is_left_alone(app):
    a = app("""
        async def main():
            say("READY", signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)
        run(main())
    """, env={"NOTIFY_SOCKET": None})
    a.wait_line("READY True")
    a.send(signal.SIGHUP)
    r = a.finish()
    assert r.returncode == -signal.SIGHUP, r


def test_sighup_during_the_shutdown_starts_no_reload(app):
    a = app("""
        def reload():
            say("RELOADED")
        async def callback(loop):
            say("IN SHUTDOWN")
            await loop.run_in_executor(None, sys.stdin.readline)
        async def main():
            say("READY")
        run(main(), reload_callback=reload, shutdown_callback=callback)
    """, env={"NOTIFY_SOCKET": None}, stdin=True)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    a.wait_line("IN SHUTDOWN")
    a.send(signal.SIGHUP)
    a.write("go\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert "RELOADED" not in r.stdout and "INFO:Reloading (SIGHUP)." not in r.log, r


def test_a_reload_cut_short_by_the_shutdown_sends_no_ready(app, receiver):
    a = app("""
        async def reload():
            say("RELOADING")
            await asyncio.sleep(3600)
        async def main():
            say("READY")
        run(main(), reload_callback=reload)
    """, env=receiver.env)
    a.wait_line("READY")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.send(signal.SIGHUP)
    a.wait_line("RELOADING")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    receiver.wait_for("STATUS=stopped")
    assert sum("READY=1" in m.split("\n") for m in receiver.messages) == 1, receiver.messages
    assert "INFO:Reload cut short by the shutdown." in r.log, r


def test_bad_reload_callbacks_are_refused(app):
    r = app("""
        async def main():
            pass
        for kwargs in [{"reload_callback": 5}]:
            try:
                run(main(), **kwargs)
            except TypeError as e:
                say("TypeError", e)
        result = []
        def helper():
            try:
                run(main(), reload_callback=lambda: None)
            except ValueError as e:
                result.append(str(e))
        t = threading.Thread(target=helper); t.start(); t.join()
        say("ValueError", result[0])
    """, env={"NOTIFY_SOCKET": None}).finish()
    assert r.stdout == [
        "TypeError run() argument 'reload_callback' must be callable or None, not int",
        "ValueError run() argument 'reload_callback' needs run() in the main thread"], r


def test_the_command_line_takes_a_reload_callback(tmp_path):
    (tmp_path / "svc.py").write_text(
        "import asyncio, sys\n"
        "def reload():\n"
        "    print('RELOADED', flush=True)\n"
        "async def main():\n"
        "    print('READY', flush=True)\n"
        "    await asyncio.sleep(3600)\n"
        "not_callable = 5\n")
    a = App([sys.executable, "-m", "aiorun", "--reload-callback", "svc:reload", "svc:main"],
            cwd=str(tmp_path), env={"NOTIFY_SOCKET": None})
    a.wait_line("READY")
    a.send(signal.SIGHUP)
    a.wait_line("RELOADED")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    bad = App([sys.executable, "-m", "aiorun", "--reload-callback", "svc:not_callable",
               "svc:main"], cwd=str(tmp_path), env={"NOTIFY_SOCKET": None}).finish()
    assert bad.returncode == 2, bad
    assert bad.stderr[-1] == "python -m aiorun: error: argument --reload-callback: " \
                             "'svc:not_callable' is int, not a function", bad
    missing = App([sys.executable, "-m", "aiorun", "--reload-callback", "nope", "svc:main"],
                  cwd=str(tmp_path), env={"NOTIFY_SOCKET": None}).finish()
    assert missing.returncode == 2, missing
    assert missing.stderr[-1] == "python -m aiorun: error: argument --reload-callback " \
                                 "must be module:function, not 'nope'", missing


def test_system_exit_from_the_callback_ends_run_not_the_reload(app):
    r = app("""
        def reload():
            sys.exit(3)
        async def main():
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(3600)
        run(main(), reload_callback=reload)
    """, env={"NOTIFY_SOCKET": None}).finish()
    assert r.returncode == 3, r
    assert "Reload failed" not in r.stderr_text, r


def test_a_sighup_before_the_app_is_ready_sends_no_ready(app, receiver):
    a = app("""
        def reload():
            say("RELOADED")
        async def main():
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.2)
            say("NOT READY YET")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            aiorun.notify_ready("ready now")
            say("READY")
        run(main(), reload_callback=reload, notify_ready_on_start=False)
    """, env=receiver.env, stdin=True)
    a.wait_line("RELOADED")
    a.wait_line("NOT READY YET")
    assert not any("READY=1" in m.split("\n") for m in receiver.messages), receiver.messages
    a.write("go\n")
    a.wait_line("READY")
    receiver.wait_for("READY=1\nSTATUS=ready now")
    r = stop(a)
    assert r.returncode == 0, r
    ready = [m for m in receiver.messages if "READY=1" in m.split("\n")]
    assert ready == ["READY=1\nSTATUS=ready now"], receiver.messages
