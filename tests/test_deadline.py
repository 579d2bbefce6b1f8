"""The shutdown watchdog: shutdown_deadline, exit_on_repeated_signal, the
late-signal warning, and what is written when the process is ended.

Each app runs in a child process and hangs its shutdown in one way; the test
signals it once it says READY and checks the exit code, the phase named, and
that the stacks written name the blocking line.  Timing is checked only from
below (never before the deadline) and against the blocker (the exit did not
wait for it); how close to the deadline the exit comes is measured by
bench/deadline.py, not asserted here.
"""
import re
import signal
import time

import pytest

import aiorun
from conftest import FREE_THREADED, PYPY, line_of, run_app, skip_on_pypy_stacks, subsequence

FORCED = 124


def forced_exit(a, r, phase, sent_at, deadline=None):
    """The common shape of every forced exit."""
    elapsed = time.monotonic() - sent_at
    assert r.returncode == FORCED == aiorun.FORCED_EXIT_CODE, r
    text = r.stderr_text
    assert f"aiorun: the shutdown was in phase: {phase}." in text, text
    assert "aiorun: stacks of all threads:" in text
    assert re.search(r"aiorun: exiting with code 124, [0-9.]+ s after the shutdown "
                     r"was requested\.$", text), text
    if deadline is not None:
        assert f"aiorun: the shutdown deadline of {deadline:g} s passed" in text
        assert elapsed >= deadline
    return text


# A task that swallows every cancellation and says so.
STUBBORN = """
        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(3600)  # SWALLOWS CANCEL
                except asyncio.CancelledError:
                    say("not stopping")
"""


def signal_when_ready(a, sig, ready="READY"):
    """Wait for the app's ready line, send sig; return (Result, when sent)."""
    a.wait_line(ready)
    sent = time.monotonic()
    a.send(sig)
    return a.finish(), sent


def thread_frame(a, marker, func):
    """How faulthandler names a line of the app in a thread's stack."""
    return f'File "{a.script}", line {line_of(a.script, marker)} in {func}'


def task_frame(a, marker, func):
    """How a task's stack names a line of the app (traceback style)."""
    return f'File "{a.script}", line {line_of(a.script, marker)}, in {func}'


@skip_on_pypy_stacks
def test_blocking_sleep_in_a_coroutine(app):
    a = app("""
        async def job():
            say("READY")
            time.sleep(3600)  # BLOCKS THE LOOP

        run(job(), shutdown_deadline=2)
    """)
    r, sent = signal_when_ready(a, signal.SIGTERM)
    text = forced_exit(a, r, "waiting for the event loop to act on the request", sent,
                       deadline=2)
    assert "requested by SIGTERM" in text
    # The late-signal warning came first, through logging, naming the line.
    late = [l for l in r.stderr if "has not acted on it" in l]
    assert len(late) == 1, r
    # A free-threaded build has no GIL to keep the loop's thread still while
    # its frames are read: there the stack is faulthandler's, read with the
    # world stopped, most recent call first.
    order, frame = (("first", thread_frame) if FREE_THREADED else ("last", task_frame))
    assert re.fullmatch(r"WARNING:aiorun:Shutdown requested 1\.\d s ago by SIGTERM, but "
                        r"the event loop has not acted on it: its thread is blocked here "
                        rf"\(most recent call {order}\):", late[0]), late
    first_dump = text.index("aiorun: the shutdown deadline")
    assert frame(a, "# BLOCKS THE LOOP", "job") in text[:first_dump]
    if not FREE_THREADED:   # faulthandler shows no source lines
        assert "time.sleep(3600)  # BLOCKS THE LOOP" in text[:first_dump]
    assert thread_frame(a, "# BLOCKS THE LOOP", "job") in text[first_dump:]


@pytest.mark.skipif(PYPY, reason="ctypes.PyDLL (a C call that holds the GIL) is CPython's")
def test_call_that_holds_the_gil(app):
    a = app("""
        import ctypes
        libc = ctypes.PyDLL(None)  # PyDLL: the GIL stays held during calls

        async def job():
            say("READY")
            while True:
                libc.sleep(3600)  # HOLDS THE GIL

        run(job(), shutdown_deadline=2)
    """)
    r, sent = signal_when_ready(a, signal.SIGINT)
    text = forced_exit(a, r, "waiting for the event loop to act on the request", sent,
                       deadline=2)
    # No logging is possible: the warning is written directly, with stacks.
    assert re.search(r"aiorun: WARNING: shutdown requested 1\.\d s ago by SIGINT, but "
                     r"the event loop has not acted on it and its thread holds the "
                     r"GIL\.", text), text
    assert text.count(thread_frame(a, "# HOLDS THE GIL", "job")) == 2
    assert "aiorun: the GIL could not be had within 0.25 s" in text
    assert r.stdout == ["READY"]


@skip_on_pypy_stacks
def test_executor_job_that_never_returns(app):
    a = app("""
        never = threading.Event()

        def forever():
            never.wait()  # JOB NEVER RETURNS

        async def main():
            loop = asyncio.get_running_loop()
            loop.run_in_executor(None, forever)
            say("READY")

        run(main(), shutdown_deadline=1)
    """)
    r, sent = signal_when_ready(a, signal.SIGTERM)
    text = forced_exit(a, r, "waiting for the executor to shut down", sent, deadline=1)
    assert thread_frame(a, "# JOB NEVER RETURNS", "forever") in text
    assert subsequence(["Entering shutdown phase.", "Waiting for executor shutdown."],
                       r.messages)
    assert "Leaving. Bye!" not in r.messages
    # The GIL was free: the task report and flushing happened.
    assert "Unfinished asyncio tasks: 0" in text


def test_task_that_swallows_every_cancellation(app):
    a = app(STUBBORN + """

        async def main():
            asyncio.get_running_loop().create_task(stubborn())
            say("READY")

        run(main(), shutdown_deadline=1)  # timeout_task_shutdown stays 60
    """)
    r, sent = signal_when_ready(a, signal.SIGINT)
    text = forced_exit(a, r, "waiting for cancelled tasks to finish", sent, deadline=1)
    assert "Unfinished asyncio tasks: 1 (most recent call last):" in text
    assert "coro=<stubborn()" in text
    assert task_frame(a, "# SWALLOWS CANCEL", "stubborn") in text
    assert r.stdout == ["READY", "not stopping"]


def test_shutdown_callback_that_never_returns(app):
    a = app("""
        async def callback(loop):
            await asyncio.Event().wait()  # CALLBACK HANGS

        async def main():
            say("READY")

        run(main(), shutdown_callback=callback, shutdown_deadline=1)
    """)
    r, sent = signal_when_ready(a, signal.SIGTERM)
    text = forced_exit(a, r, "running shutdown_callback", sent, deadline=1)
    assert task_frame(a, "# CALLBACK HANGS", "callback") in text
    assert "Executing provided shutdown_callback." in r.messages


STUCK_APP = """
    async def stubborn():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            say("first cancel ignored")
        # Finish only when told through stdin: the shutdown hangs till then.
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        say("stubborn done")

    async def main():
        asyncio.get_running_loop().create_task(stubborn())
        say("READY")

    run(main(){args})
    say("run returned")
"""


def test_repeated_signal_forces_the_exit_when_asked(app):
    a = app(STUCK_APP.format(args=", exit_on_repeated_signal=True"), stdin=True)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    a.wait_line("first cancel ignored")
    sent = time.monotonic()
    a.send(signal.SIGINT)
    r = a.finish()
    text = forced_exit(a, r, "waiting for cancelled tasks to finish", sent)
    assert "aiorun: SIGINT again during the shutdown (requested by SIGINT" in text
    assert "coro=<stubborn()" in text
    assert "deadline" not in text
    assert "stubborn done" not in r.stdout


def test_repeated_signal_is_ignored_by_default(app):
    a = app(STUCK_APP.format(args=""), stdin=True)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    a.wait_line("first cancel ignored")
    a.send(signal.SIGINT)
    a.send(signal.SIGTERM)
    a.write("go\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "first cancel ignored", "stubborn done", "run returned"]
    assert not any(l.startswith("aiorun: ") for l in r.stderr), r
    assert r.messages[-1] == "Leaving. Bye!"


def test_repeated_signal_from_the_environment(app):
    a = app(STUCK_APP.format(args=""), stdin=True,
            env={"AIORUN_EXIT_ON_REPEATED_SIGNAL": "1"})
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    a.wait_line("first cancel ignored")
    sent = time.monotonic()
    a.send(signal.SIGINT)
    r = a.finish()
    text = forced_exit(a, r, "waiting for cancelled tasks to finish", sent)
    assert "aiorun: SIGINT again during the shutdown (requested by SIGTERM" in text


def test_deadline_from_the_environment(app):
    a = app(STUCK_APP.format(args=""), stdin=True,
            env={"AIORUN_SHUTDOWN_DEADLINE": "1.5"})
    r, sent = signal_when_ready(a, signal.SIGTERM)
    forced_exit(a, r, "waiting for cancelled tasks to finish", sent, deadline=1.5)


def test_the_parameter_wins_over_the_environment(app):
    a = app(STUCK_APP.format(args=", shutdown_deadline=1"), stdin=True,
            env={"AIORUN_SHUTDOWN_DEADLINE": "3600"})
    r, sent = signal_when_ready(a, signal.SIGTERM)
    forced_exit(a, r, "waiting for cancelled tasks to finish", sent, deadline=1)


@pytest.mark.parametrize("value", ["soon", "0", "-1", "nan", "inf", "1s"])
def test_bad_deadline_in_the_environment_names_the_variable(app, value):
    r = run_app(app, """
        async def main():
            say("main ran")
        try:
            run(main())
        except ValueError as e:
            say(e)
    """, env={"AIORUN_SHUTDOWN_DEADLINE": value})
    assert r.returncode == 0, r
    assert r.stdout == ["environment variable AIORUN_SHUTDOWN_DEADLINE must be a "
                        f"number of seconds > 0, not '{value}'"]


def test_unhandled_error_starts_the_deadline(app):
    a = app(STUBBORN + """

        async def main():
            asyncio.get_running_loop().create_task(stubborn())
            say("READY")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            raise RuntimeError("boom")

        run(main(), stop_on_unhandled_errors=True, shutdown_deadline=1)
    """, stdin=True)
    a.wait_line("READY")
    sent = time.monotonic()
    a.write("go\n")
    r = a.finish()
    text = forced_exit(a, r, "waiting for cancelled tasks to finish", sent, deadline=1)
    assert "(requested by an unhandled error" in text


def test_loop_stop_starts_the_deadline(app):
    r = run_app(app, STUBBORN + """

        async def main():
            loop = asyncio.get_running_loop()
            loop.create_task(stubborn())
            await asyncio.sleep(0)  # let stubborn reach its try
            loop.stop()

        run(main(), shutdown_deadline=1)
    """)
    assert r.returncode == FORCED, r
    assert "(requested by loop.stop()" in r.stderr_text


def test_a_shutdown_that_finishes_in_time_is_untouched(app):
    body = """
        async def slow():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.3)
                say("slow cleanup done")
                raise

        async def main():
            asyncio.get_running_loop().create_task(slow())
            say("READY")

        run(main(){args})
        say("run returned")
    """
    results = []
    for args in ("", ", shutdown_deadline=30, exit_on_repeated_signal=True"):
        a = app(body.format(args=args))
        a.wait_line("READY")
        a.send(signal.SIGTERM)
        results.append(a.finish())
    plain, watched = results
    assert watched.returncode == plain.returncode == 0, watched
    assert watched.stdout == plain.stdout == ["READY", "slow cleanup done",
                                              "run returned"]
    assert watched.messages == plain.messages
    assert not any(l.startswith("aiorun: ") for l in watched.stderr), watched


WATCHDOG_THREADS = """
    def aiorun_threads():
        names = []
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
            if name.startswith("aiorun"):
                names.append((name, tid))
        return names

    def state(tid):
        with open(f"/proc/self/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    def switches(tid):
        with open(f"/proc/self/task/{tid}/status") as f:
            for line in f:
                if line.startswith(("voluntary_ctxt_switches",
                                    "nonvoluntary_ctxt_switches")):
                    yield int(line.split()[1])
"""


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/task"),
                    reason="needs Linux /proc")
def test_the_watchdog_sleeps_while_the_app_runs_and_never_outlives_run(app):
    r = run_app(app, WATCHDOG_THREADS + """
    async def main():
        threads = aiorun_threads()
        say("threads:", [name for name, _ in threads])
        for _, tid in threads:  # wait until it sleeps in poll()
            while state(tid) != "S":
                await asyncio.sleep(0.001)
        before = [sum(switches(tid)) for _, tid in threads]
        # A busy app: many loop iterations, timers, executor calls.
        loop = asyncio.get_running_loop()
        for i in range(2000):
            await asyncio.sleep(0)
        for i in range(20):
            await asyncio.sleep(0.01)
            await loop.run_in_executor(None, len, "x")
        after = [sum(switches(tid)) for _, tid in threads]
        say("woken while running:", [b - a for a, b in zip(before, after)])
        asyncio.get_running_loop().stop()

    run(main(), shutdown_deadline=30)
    say("after run:", aiorun_threads())
    run(main())
    say("after run:", aiorun_threads())
    """)
    assert r.returncode == 0, r
    assert r.stdout == [
        "threads: ['aiorun-watchdog']", "woken while running: [0]", "after run: []",
        "threads: []", "woken while running: []", "after run: []",
    ]


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(shutdown_deadline="5"), TypeError,
     "run() argument 'shutdown_deadline' must be a number of seconds or None, not str"),
    (dict(shutdown_deadline=True), TypeError,
     "run() argument 'shutdown_deadline' must be a number of seconds or None, not bool"),
    (dict(shutdown_deadline=0), ValueError,
     "run() argument 'shutdown_deadline' must be > 0 and finite"),
    (dict(shutdown_deadline=-1.5), ValueError,
     "run() argument 'shutdown_deadline' must be > 0 and finite"),
    (dict(shutdown_deadline=float("nan")), ValueError,
     "run() argument 'shutdown_deadline' must be > 0 and finite"),
    (dict(shutdown_deadline=float("inf")), ValueError,
     "run() argument 'shutdown_deadline' must be > 0 and finite"),
    (dict(exit_on_repeated_signal="yes"), TypeError,
     "run() argument 'exit_on_repeated_signal' must be bool, not str"),
])
def test_bad_watchdog_arguments_name_the_parameter(kwargs, error, message):
    import asyncio
    import signal as signal_module
    before = signal_module.getsignal(signal_module.SIGINT)

    async def main():
        raise AssertionError("must not run")

    coro = main()
    with pytest.raises(error) as info:
        aiorun.run(coro, **kwargs)
    coro.close()
    assert str(info.value) == message
    assert signal_module.getsignal(signal_module.SIGINT) is before
    asyncio.set_event_loop(None)


def test_deadline_with_uvloop(app):
    pytest.importorskip("uvloop")
    a = app(STUBBORN + """

        async def main():
            asyncio.get_running_loop().create_task(stubborn())
            say("READY", type(asyncio.get_running_loop()).__module__)

        run(main(), use_uvloop=True, shutdown_deadline=1)
    """)
    r, sent = signal_when_ready(a, signal.SIGTERM, ready="READY uvloop")
    text = forced_exit(a, r, "waiting for cancelled tasks to finish", sent, deadline=1)
    assert task_frame(a, "# SWALLOWS CANCEL", "stubborn") in text


def test_two_signals_at_once_are_told_apart(app):
    # Seen in CI under load: the watchdog thread first woke after both
    # signals and took the second for the request ("requested by SIGINT",
    # "0.00 s after the shutdown was requested").  The request is the first
    # signal, as recorded by the C handler itself.
    a = app("""
        async def main():
            try:
                # Back to back: the watchdog thread cannot run in between.
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                await asyncio.sleep(3600)
            except asyncio.CancelledError:   # holds the shutdown open
                await asyncio.sleep(3600)

        run(main(), exit_on_repeated_signal=True)
    """)
    r = a.finish()
    assert r.returncode == FORCED, r
    assert "aiorun: SIGINT again during the shutdown (requested by SIGTERM" in r.stderr_text, r


AFTER_RUN = ("run() returned; waiting for the process to exit (atexit handlers, threads "
             "that are not daemons)")


@skip_on_pypy_stacks
def test_deadline_covers_exit_bounds_a_thread_that_is_not_a_daemon(app):
    a = app("""
        never = threading.Event()

        def worker():
            never.wait()  # NOT A DAEMON, NEVER ENDS

        async def main():
            threading.Thread(target=worker).start()
            say("READY")

        run(main(), shutdown_deadline=1, deadline_covers_exit=True)
        say("RETURNED")
    """)
    r, sent = signal_when_ready(a, signal.SIGTERM)
    text = forced_exit(a, r, AFTER_RUN, sent, deadline=1)
    assert r.stdout[-1] == "RETURNED", r
    assert "Leaving. Bye!" in r.messages
    assert thread_frame(a, "# NOT A DAEMON, NEVER ENDS", "worker") in text
    assert "aiorun: run() had returned: no task list" in text


def test_deadline_covers_exit_bounds_an_atexit_handler(app):
    a = app("""
        import atexit
        atexit.register(lambda: threading.Event().wait())   # HANGS AT EXIT

        async def main():
            say("READY")

        run(main(), shutdown_deadline=1)
    """, env={"AIORUN_DEADLINE_COVERS_EXIT": "1"})
    r, sent = signal_when_ready(a, signal.SIGTERM)
    forced_exit(a, r, AFTER_RUN, sent, deadline=1)


def test_deadline_covers_exit_leaves_a_clean_exit_alone(app):
    r = app("""
        async def main():
            asyncio.get_running_loop().stop()
        run(main(), shutdown_deadline=30, deadline_covers_exit=True)
        say("RETURNED")
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["RETURNED"], r
    assert "aiorun: the shutdown deadline" not in r.stderr_text, r


def test_without_covers_exit_the_deadline_ends_with_run(app):
    """The default: what follows run() is the app's.  The thread ends
    when this test says so, past the deadline, and the exit is clean."""
    a = app("""
        def worker():
            sys.stdin.readline()   # ends when the test writes a line

        async def main():
            threading.Thread(target=worker).start()
            say("READY")

        run(main(), shutdown_deadline=1)
        say("RETURNED")
    """, stdin=True)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    a.wait_line("RETURNED")
    time.sleep(2)   # past the deadline: a bound to outlast, not an ordering
    a.write("go\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert "aiorun: the shutdown deadline" not in r.stderr_text, r


def test_a_later_run_retires_the_exit_guard(app):
    """The process went on to another run(): the first run()'s deadline no
    longer bounds it."""
    a = app("""
        async def stop():
            asyncio.get_running_loop().stop()

        run(stop(), shutdown_deadline=1, deadline_covers_exit=True)

        async def main():
            say("SECOND")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            asyncio.get_running_loop().stop()

        run(main())
        say("RETURNED")
    """, stdin=True)
    a.wait_line("SECOND")
    time.sleep(2)   # past the first run()'s deadline
    a.write("go\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[-1] == "RETURNED", r


def test_deadline_covers_exit_needs_the_owner(app):
    r = app("""
        result = []
        def helper():
            async def main():
                pass
            try:
                run(main(), deadline_covers_exit=True)
            except ValueError as e:
                result.append(str(e))
        t = threading.Thread(target=helper); t.start(); t.join()
        say(result[0])
    """).finish()
    assert r.stdout == ["run() argument 'deadline_covers_exit' needs run() in the main "
                        "thread"], r


def test_deadline_covers_exit_leaves_work_between_runs_alone(app):
    """The guard holds once the interpreter exits, not while the process
    goes on (longer than the deadline) between two run()s."""
    r = app("""
        async def stop():
            asyncio.get_running_loop().stop()

        for i in range(2):
            run(stop(), shutdown_deadline=1, deadline_covers_exit=True)
            time.sleep(1.5)   # work between the runs, past the deadline
            say("WORKED", i)
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["WORKED 0", "WORKED 1"], r
    assert "aiorun: the shutdown deadline" not in r.stderr_text, r


@skip_on_pypy_stacks
def test_deadline_covers_exit_with_busy_threads_ends_with_124(app):
    """Threads that run Python while the stacks are dumped: the dump holds
    the GIL, as inside run(), so the exit is 124, never a crash."""
    a = app("""
        def busy(n=0):
            while True:
                busy_step(40)

        def busy_step(depth):
            if depth:
                busy_step(depth - 1)

        async def main():
            for _ in range(3):
                threading.Thread(target=busy).start()
            say("READY")

        run(main(), shutdown_deadline=0.3, deadline_covers_exit=True)
    """)
    r, sent = signal_when_ready(a, signal.SIGTERM)
    forced_exit(a, r, AFTER_RUN, sent)


def test_a_forked_child_runs_with_a_deadline_after_the_guard(app):
    r = app("""
        async def stop():
            asyncio.get_running_loop().stop()

        run(stop(), shutdown_deadline=30, deadline_covers_exit=True)
        pid = os.fork()
        if pid == 0:
            try:
                run(stop(), shutdown_deadline=30)
                os._exit(0)
            except BaseException as e:
                say("CHILD", type(e).__name__, e)
                os._exit(1)
        say("CHILD EXIT", os.waitpid(pid, 0)[1])
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout[-1] == "CHILD EXIT 0", r
