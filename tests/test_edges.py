"""Trustworthy at the edges: what user code may do while run() calls into it.

One test (or a few) per way user code or the world can misbehave, each in a child process, each
asserting what a user sees: the exit code, which work finished, what run()
raised, and that nothing crashed.  Every one failed before its fix.
"""
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from conftest import PYPY, SHUTDOWN_TAIL, subsequence

NOT_CRASHED = ("Segmentation fault", "Fatal Python error", "SystemError",
               "returned a result with an exception set", "AddressSanitizer",
               "runtime error:")


def healthy(r):
    assert r.returncode == 0, r
    for text in NOT_CRASHED:
        assert text not in r.stderr_text, r


# ---- memory safety ----------------------------------------------------------

@pytest.mark.parametrize("payload", ["bytearray(b'payload')", "'not an exception'", "42"])
def test_a_non_exception_reported_as_the_exception_is_a_type_error(app, payload):
    a = app(f"""
        async def main():
            asyncio.get_running_loop().call_exception_handler(
                {{"message": "a library bug", "exception": {payload}}})
            await asyncio.sleep(3600)
        try:
            run(main(), stop_on_unhandled_errors=True)
        except TypeError as e:
            say("raised:", e)
    """)
    r = a.finish()
    healthy(r)
    assert r.stdout == ["raised: exceptions must derive from BaseException"]
    assert "Leaving. Bye!" in r.messages


def test_a_log_handler_reporting_an_error_as_the_pending_one_is_reraised(app):
    """The "Reraising unhandled exception" line's handler calls the loop's
    exception handler again, which replaces the pending exception: the one
    taken for re-raising must still be raised (it was a crash)."""
    r = app("""
        class Rereport(logging.Handler):
            def emit(self, record):
                if record.getMessage() == "Reraising unhandled exception":
                    loop.call_exception_handler({"message": "from the log handler"})
        logging.getLogger("aiorun").addHandler(Rereport())
        loop = asyncio.new_event_loop()

        async def main():
            raise KeyError("the app's own")
        try:
            run(main(), loop=loop, stop_on_unhandled_errors=True)
        except KeyError as e:
            say("raised:", e)
    """).finish()
    healthy(r)
    assert r.stdout == ["raised: \"the app's own\""]


def test_an_exception_class_reported_as_the_exception_is_raised_as_an_instance(app):
    r = app("""
        async def main():
            asyncio.get_running_loop().call_exception_handler(
                {"message": "a class", "exception": LookupError})
            await asyncio.sleep(3600)
        try:
            run(main(), stop_on_unhandled_errors=True)
        except LookupError as e:
            say("raised:", type(e).__name__)
    """).finish()
    healthy(r)
    assert r.stdout == ["raised: LookupError"]


WAIT_OBJECT = """
    class HookTask(asyncio.Task):
        hook = None
        def add_done_callback(self, fn, *, context=None):
            hook, HookTask.hook = HookTask.hook, None
            if hook is not None:
                hook()
                raise RuntimeError("refused")
            super().add_done_callback(fn, context=context)

    async def job():
        await asyncio.sleep(0.2)
        say("job done")

    def callback(name):
        return lambda fut: say(name, "called, cancelled:", fut.cancelled())

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda loop, coro, **kw: HookTask(coro, loop=loop, **kw))
        waiter = shutdown_waits_for(job())
        wait = waiter.__await__().send(None)   # what an awaiting task waits on
        wait.add_done_callback(callback("first"))
"""


def test_add_done_callback_failing_after_the_wait_was_cancelled(app):
    r = app(WAIT_OBJECT + """
        HookTask.hook = wait.cancel
        try:
            wait.add_done_callback(callback("second"))
        except RuntimeError as e:
            say("add_done_callback raised:", e)
        say("wait cancelled:", wait.cancelled())
        await asyncio.sleep(0.5)
        loop.stop()
    run(main())
    """).finish()
    healthy(r)
    assert r.stdout[:2] == ["add_done_callback raised: refused", "wait cancelled: True"]
    assert "first called, cancelled: True" in r.stdout
    assert "job done" in r.stdout


def test_remove_done_callback_whose_eq_cancels_the_wait(app):
    r = app(WAIT_OBJECT + """
        wait.add_done_callback(callback("second"))
        wait.add_done_callback(callback("third"))

        class CancelsOnCompare:
            def __eq__(self, other):
                wait.cancel()
                return False
            __hash__ = object.__hash__

        say("removed:", wait.remove_done_callback(CancelsOnCompare()))
        say("wait cancelled:", wait.cancelled())
        await asyncio.sleep(0.5)
        loop.stop()
    run(main())
    """).finish()
    healthy(r)
    assert r.stdout[:2] == ["removed: 0", "wait cancelled: True"]
    for name in ("first", "second", "third"):
        assert f"{name} called, cancelled: True" in r.stdout
    assert "job done" in r.stdout


def test_shutdown_event_from_a_thread_while_run_ends(app):
    # asyncio.Event() is made while the other thread waits in it; run()
    # returns and frees its state meanwhile.
    r = app("""
        import asyncio, threading
        entered, release = threading.Event(), threading.Event()

        class SlowEvent(asyncio.Event):
            def __init__(self):
                entered.set()
                release.wait()
                super().__init__()

        asyncio.Event = SlowEvent   # before aiorun takes it
        import aiorun

        outcome = []
        def ask(loop):
            try:
                outcome.append(type(aiorun.shutdown_event(loop)).__name__)
            except RuntimeError as e:
                outcome.append("RuntimeError")

        async def main():
            loop = asyncio.get_running_loop()
            t = threading.Thread(target=ask, args=(loop,))
            t.start()
            await loop.run_in_executor(None, entered.wait)
            loop.stop()
            main.thread = t

        aiorun.run(main())
        release.set()
        main.thread.join()
        print("outcome:", outcome, flush=True)
    """, prelude=False).finish()
    healthy(r)
    assert r.stdout in (["outcome: ['SlowEvent']"], ["outcome: ['RuntimeError']"]), r


def test_notify_receiver_gone_during_a_signal_handled_inside_call_soon(app, tmp_path):
    # call_soon() of a loop subclass: the receiver goes away and SIGTERM
    # comes there, so STOPPING=1 finds the socket gone while run() is still
    # setting up the notifications.
    path = tmp_path / "notify.sock"
    r = app(f"""
        import socket
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind({str(path)!r})
        os.environ["NOTIFY_SOCKET"] = {str(path)!r}
        os.environ["WATCHDOG_USEC"] = "1000000"

        class Loop(asyncio.SelectorEventLoop):
            armed = True
            def call_soon(self, callback, *args, **kw):
                if Loop.armed and getattr(callback, "__name__", "") == "_notify_ready":
                    Loop.armed = False
                    receiver.close()
                    os.unlink({str(path)!r})
                    os.kill(os.getpid(), signal.SIGTERM)
                return super().call_soon(callback, *args, **kw)

        async def main():
            await asyncio.sleep(3600)

        loop = Loop()
        run(main(), loop=loop)
        say("run returned")
    """).finish()
    healthy(r)
    assert r.stdout == ["run returned"]
    assert "Stopping the loop" in r.messages


def test_main_task_outliving_run_on_the_callers_loop(app):
    r = app("""
        loop = asyncio.new_event_loop()

        async def main():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.3)   # outlives timeout_task_shutdown
                raise ValueError("failed after run() returned")

        loop.call_later(0.05, loop.stop)
        run(main(), loop=loop, timeout_task_shutdown=0.05)
        say("run returned")
        loop.run_until_complete(asyncio.sleep(0.6))
        say("loop ran on")
        loop.close()
    """).finish()
    healthy(r)
    assert r.stdout == ["run returned", "loop ran on"]
    assert any("refused to exit after 0.05 seconds" in m for m in r.messages)


# ---- lost or unfinished work --------------------------------------------------

def test_a_task_ending_with_the_drain_timer_does_not_end_the_next_wait(app):
    # B blocks the loop across A's timer and the drain's, so both fire in
    # one turn: A ends in the next, and its done callback of the drain's
    # wait is still queued when the final wait begins.
    a = app("""
        async def flush():
            await aiorun.shutdown_event().wait()
            await asyncio.sleep(0.6)
            say("flush done")

        async def a_task():
            await aiorun.shutdown_event().wait()
            await asyncio.sleep(0.27)

        async def b_task():
            await aiorun.shutdown_event().wait()
            await asyncio.sleep(0.25)
            time.sleep(0.1)

        async def main():
            loop = asyncio.get_running_loop()
            shutdown_waits_for(flush())
            loop.create_task(a_task())
            loop.create_task(b_task())
            say("READY")
            await asyncio.sleep(3600)

        run(main(), drain_delay=0.3, timeout_task_shutdown=10)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    healthy(r)
    assert r.stdout[1:] == ["flush done", "run returned"]
    assert not any("refused to exit" in m for m in r.messages), r


def test_loop_stop_in_shutdown_callback_and_in_an_async_generator(app):
    r = app("""
        async def callback(loop):
            loop.stop()
            await asyncio.sleep(0.1)
            say("callback finished")

        async def gen():
            try:
                yield 1
                await asyncio.sleep(3600)
            finally:
                asyncio.get_running_loop().stop()
                await asyncio.sleep(0.05)
                say("generator closed")

        kept = []
        async def main():
            # A task to wait for: the wait before must not end the one of
            # the async generators (found by the audit).
            asyncio.get_running_loop().create_task(asyncio.sleep(3600))
            g = gen()
            kept.append(g)
            await g.__anext__()
            asyncio.get_running_loop().stop()

        run(main(), shutdown_callback=callback)
        say("run returned")
    """).finish()
    healthy(r)
    assert r.stdout == ["callback finished", "generator closed", "run returned"]
    assert "Task was destroyed but it is pending!" not in r.stderr_text
    assert subsequence(["Executing provided shutdown_callback.",
                        "Shutting down async generators", "Closing the loop.",
                        "Leaving. Bye!"], r.messages)


# The work a shutdown must never lose, whatever else goes wrong in it.
WORK = """
    from concurrent.futures import ThreadPoolExecutor

    async def protected():
        await asyncio.sleep(0.3)
        say("protected job done")

    def executor_job():
        time.sleep(0.3)
        say("executor job done")

    def start_work(loop):
        shutdown_waits_for(protected())
        loop.run_in_executor(None, executor_job)

    def finish(**kw):
        try:
            run(main(), **kw)
            say("run returned")
        except BaseException as e:
            say("run raised:", type(e).__name__, e)
"""


def work_kept(r):
    healthy(r)
    assert "protected job done" in r.stdout and "executor job done" in r.stdout, r
    last_work = max(r.stdout.index("protected job done"),
                    r.stdout.index("executor job done"))
    assert r.stdout[-1].startswith("run "), r
    assert last_work < len(r.stdout) - 1
    assert r.messages.count("Entering shutdown phase.") == 1
    assert "Leaving. Bye!" in r.messages


def test_a_task_class_whose_cancel_raises(app):
    r = app(WORK + """
    class Stubborn(asyncio.Task):
        def cancel(self, msg=None):
            if getattr(self.get_coro(), "__name__", "") == "bad":
                raise RuntimeError("cancel refused")
            return super().cancel(msg)

    async def bad():
        await asyncio.sleep(0.1)
        say("bad ended")

    async def good():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            say("good cancelled")
            raise

    async def main():
        loop = asyncio.get_running_loop()
        loop.set_task_factory(lambda loop, coro, **kw: Stubborn(coro, loop=loop, **kw))
        loop.create_task(bad())
        loop.create_task(good())
        start_work(loop)
        await asyncio.sleep(0.01)
        loop.stop()

    finish()
    """).finish()
    work_kept(r)
    assert "good cancelled" in r.stdout and "bad ended" in r.stdout
    assert r.stdout[-1] == "run raised: RuntimeError cancel refused"


@pytest.mark.parametrize("exc", ["KeyboardInterrupt", "SystemExit"])
def test_a_cancelled_task_raising_keyboard_interrupt_or_system_exit(app, exc):
    r = app(WORK + f"""
    async def worker():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise {exc}("from a task")

    async def main():
        loop = asyncio.get_running_loop()
        loop.create_task(worker())
        start_work(loop)
        await asyncio.sleep(0.01)
        loop.stop()

    finish()
    """).finish()
    work_kept(r)
    assert r.stdout[-1] == f"run raised: {exc} from a task"


def test_a_system_exit_from_a_task_while_the_loop_runs_shuts_down_first(app):
    r = app(WORK + """
    async def main():
        loop = asyncio.get_running_loop()
        start_work(loop)
        await asyncio.sleep(0.01)
        sys.exit(3)

    finish()
    """).finish()
    work_kept(r)
    assert r.stdout[-1] == "run raised: SystemExit 3"


@pytest.mark.parametrize("where", ["filter", "handler"])
def test_a_logging_filter_or_handler_raising_on_aiorun_lines(app, where):
    r = app(WORK + f"""
    raised = set()
    def check(record):
        text = record.getMessage()
        if text in ("Cancelling pending tasks.", "Waiting for executor shutdown.",
                    "Closing the loop.") and text not in raised:
            raised.add(text)
            raise ValueError("log refused: " + text)
        return True

    class RaisingFilter(logging.Filter):
        def filter(self, record):
            return check(record)

    class RaisingHandler(logging.Handler):
        def emit(self, record):
            check(record)
        def handleError(self, record):
            raise   # the error goes on to the caller of log()

    if {where!r} == "filter":
        aiorun.logger.addFilter(RaisingFilter())
    else:
        aiorun.logger.addHandler(RaisingHandler())

    async def main():
        loop = asyncio.get_running_loop()
        start_work(loop)
        loop.create_task(asyncio.sleep(3600))
        await asyncio.sleep(0.01)
        loop.stop()

    finish()
    """).finish()
    work_kept(r)
    assert r.stdout[-1] == "run raised: ValueError log refused: Cancelling pending tasks."


def test_protected_work_started_while_cancelled_tasks_wind_down(app):
    r = app("""
        async def save_state():
            await asyncio.sleep(0.3)
            say("state saved")

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                shutdown_waits_for(save_state())   # fire and forget
                raise

        async def main():
            asyncio.get_running_loop().create_task(worker())
            await asyncio.sleep(0.01)
            asyncio.get_running_loop().stop()

        run(main())
        say("run returned")
    """).finish()
    healthy(r)
    assert r.stdout == ["state saved", "run returned"]


def test_an_executor_whose_wait_is_keyword_only(app):
    r = app("""
        from concurrent.futures import ThreadPoolExecutor

        class KeywordOnly(ThreadPoolExecutor):
            def shutdown(self, *, wait=True, cancel_futures=False):
                say("shutdown wait =", wait)
                super().shutdown(wait=wait)

        async def main():
            asyncio.get_running_loop().stop()

        run(main(), executor=KeywordOnly())
        say("run returned")
    """).finish()
    healthy(r)
    # (loop.close() calls shutdown(wait=False) on the loop's executor again)
    assert r.stdout[0] == "shutdown wait = True" and r.stdout[-1] == "run returned", r


# ---- promises -----------------------------------------------------------------

def test_forced_exit_with_stderr_a_full_pipe_nobody_reads(tmp_path):
    # The log collector is stuck: stderr is a pipe that is full and never
    # read.  The deadline must still end the process, with code 124.
    script = tmp_path / "app.py"
    script.write_text(textwrap.dedent("""
        import asyncio, fcntl, os, sys, time
        from aiorun import run

        flags = fcntl.fcntl(2, fcntl.F_GETFL)
        fcntl.fcntl(2, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        try:
            while True:
                os.write(2, b"x" * 4096)
        except BlockingIOError:
            pass
        fcntl.fcntl(2, fcntl.F_SETFL, flags)

        def stuck(loop):
            time.sleep(3600)

        async def main():
            print("READY", flush=True)
            await asyncio.sleep(3600)

        run(main(), shutdown_deadline=1, shutdown_callback=stuck)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline() == "READY\n"
        # Its WARNING "Stopping the loop" blocks the loop's thread for good.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 124
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_a_signal_taken_by_another_thread_during_set_up_is_the_shutdown(app):
    # The kernel gives a process-directed SIGINT to a thread that does not
    # block it.  It comes while run() sets up (threading.main_thread() is
    # one of the first things run() calls), and must start the shutdown,
    # not raise KeyboardInterrupt out of run().
    r = app("""
        import os, signal, sys, threading, time
        original = threading.main_thread
        armed = []

        def hooked():
            if armed and armed.pop():
                os.kill(os.getpid(), signal.SIGINT)
                # Until another thread has taken it off the process's queue.
                while signal.SIGINT in signal.sigpending():
                    time.sleep(0.001)
                time.sleep(0.05)
            return original()

        threading.main_thread = hooked
        import asyncio, logging
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s:%(name)s:%(message)s")
        from aiorun import run

        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()

        async def main():
            await asyncio.sleep(3600)

        armed.append(True)
        try:
            run(main())
            print("run returned", flush=True)
        except KeyboardInterrupt:
            print("KeyboardInterrupt out of run()", flush=True)
    """, prelude=False).finish()
    healthy(r)
    assert r.stdout == ["run returned"]
    assert "Stopping the loop" in r.messages


@pytest.mark.skipif(not hasattr(signal, "SIGRTMAX"), reason="no real-time signals")
def test_task_dump_on_the_signal_the_watchdog_would_pick(app):
    # The watchdog gives faulthandler the highest free real-time signal;
    # task_dump_signal asks for that very one.  A forced exit must still
    # show the thread stacks.
    a = app("""
        def stuck(loop):
            time.sleep(3600)  # STUCK HERE

        async def main():
            say("READY")
            await asyncio.sleep(3600)

        run(main(), shutdown_deadline=1, shutdown_callback=stuck,
            task_dump_signal=signal.SIGRTMAX)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 124, r
    stacks = r.stderr_text.split("aiorun: stacks of all threads:", 1)[1]
    assert "in stuck" in stacks, r


def test_a_python_signal_handler_raising_while_handlers_are_given_back(app):
    pytest.importorskip("uvloop")
    # Sent while run() is past its last line of Python code (it joins the
    # watchdog then, without the GIL), so the handler runs when run() gives
    # the handlers back.  Whether the sender gets the GIL in that window is
    # up to the scheduler: on an idle machine it does (and the code before
    # the fix returned a value with an exception set, a SystemError).
    r = app("""
        def on_usr1(signum, frame):
            raise RuntimeError("from SIGUSR1")
        signal.signal(signal.SIGUSR1, on_usr1)
        main_ident = threading.get_ident()
        bye = threading.Event()

        class Bye(logging.Handler):
            def emit(self, record):
                # the summary is run()'s last log line
                if record.getMessage().startswith("Shutdown summary"):
                    bye.set()
        logging.getLogger().addHandler(Bye())   # the last to see the line
        sys.setswitchinterval(5.0)   # the GIL passes only where run() lets it go

        def send():
            bye.wait()
            signal.pthread_kill(main_ident, signal.SIGUSR1)
        sender = threading.Thread(target=send)
        sender.start()

        async def main():
            asyncio.get_running_loop().stop()

        try:
            run(main(), use_uvloop=True, shutdown_deadline=30)
            # Under load the sender may get the GIL only now: then the
            # handler raises here instead, which is no less right.
            sender.join()
            time.sleep(0.5)
            say("handler never ran")
        except RuntimeError as e:
            say("raised:", e)
    """).finish()
    assert r.returncode == 0, r
    assert "SystemError" not in r.stderr_text, r
    assert r.stdout == ["raised: from SIGUSR1"], r


def test_extend_timeout_of_an_infinite_timeout_is_a_large_positive_number(app, tmp_path):
    path = str(tmp_path / "notify.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(30)
    try:
        r = app("""
            async def main():
                asyncio.get_running_loop().stop()
            run(main(), timeout_task_shutdown=float("inf"))
        """, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": None}).finish()
        healthy(r)
        messages = []
        while "STATUS=stopped" not in messages:
            messages.append(receiver.recv(4096).decode())
    finally:
        receiver.close()
    extends = [line for m in messages for line in m.splitlines()
               if line.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends and set(extends) == {"EXTEND_TIMEOUT_USEC=1000000000000000"}, messages


@pytest.mark.parametrize("value, shown", [
    (b"not-utf8-\xff\xfe", "not-utf8-\\xff\\xfe"),
    ("é".encode() * 70, "é" * 60),
])
def test_a_notify_socket_that_is_not_utf8_or_is_cut_is_a_warning(app, value, shown):
    r = app(f"""
        os.environb[b"NOTIFY_SOCKET"] = {value!r}
        async def main():
            asyncio.get_running_loop().stop()
        run(main())
        say("notify_ready:", aiorun.notify_ready())
    """).finish()
    healthy(r)
    assert (f"WARNING:environment variable NOTIFY_SOCKET='{shown}' is not a path or an "
            "abstract socket name (only AF_UNIX is supported): no notifications are "
            "sent") in r.log, r
    assert r.stdout == ["notify_ready: False"]
    assert (f"WARNING:notify_ready(): READY=1 not delivered: environment variable "
            f"NOTIFY_SOCKET='{shown}' is not a path or an abstract socket name (only "
            "AF_UNIX is supported)") in r.log, r


def test_a_task_dump_request_after_the_loop_closed_is_dropped_quietly(app):
    r = app("""
        class LateDump(logging.Handler):
            def emit(self, record):
                if record.getMessage() == "Leaving. Bye!":
                    os.kill(os.getpid(), signal.SIGUSR1)
        aiorun.logger.addHandler(LateDump())

        async def main():
            asyncio.get_running_loop().stop()
        run(main(), task_dump_signal=True)
        say("run returned")
    """).finish()
    healthy(r)
    assert r.stdout == ["run returned"]
    assert not any(m.startswith("ERROR:") for m in r.log), r


@pytest.mark.skipif(PYPY, reason="PyPy has no subinterpreters")
def test_a_legacy_subinterpreter_uses_the_off_main_thread_mode(app, tmp_path):
    try:
        import _testcapi  # noqa: F401
    except ImportError:
        pytest.skip("_testcapi (run_in_subinterp) is not built")
    out = tmp_path / "sub.txt"
    code = "\n".join([
        "import asyncio, aiorun",
        "async def main():",
        "    await asyncio.sleep(0.05)",
        "    asyncio.get_running_loop().stop()",
        "    return 'main returned'",
        "try:",
        "    result = aiorun.run(main())",
        "except BaseException as e:",
        "    result = 'raised %s: %s' % (type(e).__name__, e)",
        f"with open({str(out)!r}, 'w') as f:",
        "    f.write(str(result))",
    ])
    r = app(f"""
        import _testcapi
        say("subinterpreter:", _testcapi.run_in_subinterp({code!r}))
        say("signals still ours:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    """).finish()
    healthy(r)
    assert out.read_text() == "main returned"
    assert r.stdout == ["subinterpreter: 0", "signals still ours: True"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_child_forked_during_run_keeps_the_deadline(app):
    a = app("""
        def stuck_in_the_child(loop):
            if os.getpid() != PARENT:
                time.sleep(30)

        async def main():
            pid = os.fork()
            if pid == 0:
                say("CHILD", os.getpid())
            else:
                def reap():
                    _, status = os.waitpid(pid, 0)
                    say("child exit code", os.waitstatus_to_exitcode(status))
                threading.Thread(target=reap).start()
            await asyncio.sleep(3600)

        PARENT = os.getpid()
        run(main(), shutdown_deadline=1, shutdown_callback=stuck_in_the_child)
    """)
    child = int(a.wait_prefix("CHILD ").split()[1])
    os.kill(child, signal.SIGTERM)
    line = a.wait_prefix("child exit code")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert line == "child exit code 124", r
    assert r.returncode == 0, r


# ---- found by the audit of calls into Python (RELIABILITY.md) -----------------

def test_an_exception_class_whose_new_returns_a_non_exception(app):
    r = app("""
        class Weird(Exception):
            __new__ = lambda cls, *args: 42
        async def main():
            asyncio.get_running_loop().call_exception_handler(
                {"message": "m", "exception": Weird})
            await asyncio.sleep(3600)
        try:
            run(main(), stop_on_unhandled_errors=True)
        except TypeError as e:
            say("raised:", e)
    """).finish()
    healthy(r)
    assert len(r.stdout) == 1 and r.stdout[0].startswith("raised: calling "), r


def test_closing_the_waiter_from_an_eq_run_while_it_is_closed(app):
    r = app("""
        async def job():
            await asyncio.sleep(0.2)
            say("job done")

        async def main():
            waiter = shutdown_waits_for(job())
            wait = waiter.send(None)
            wait.add_done_callback(lambda f: None)
            wait.add_done_callback(lambda f: None)
            del wait

            class Evil:
                def __call__(self, fut):
                    pass
                def __eq__(self, other):
                    waiter.close()
                    return False
                __hash__ = object.__hash__

            waiter.task.add_done_callback(Evil())
            waiter.close()
            say("closed")
            await asyncio.sleep(0.4)
            asyncio.get_running_loop().stop()
        run(main())
    """).finish()
    healthy(r)
    assert r.stdout == ["closed", "job done"]


def test_a_loop_that_runs_the_watchdog_ping_at_once(app, tmp_path):
    path = str(tmp_path / "notify.sock")
    r = app(f"""
        import socket
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        receiver.bind({path!r})
        os.environ["NOTIFY_SOCKET"] = {path!r}
        os.environ["WATCHDOG_USEC"] = "2000000"

        class EagerLoop(asyncio.SelectorEventLoop):
            nested = False
            def call_later(self, delay, callback, *args, **kw):
                if not EagerLoop.nested and getattr(callback, "__name__", "") == "_notify_watchdog":
                    EagerLoop.nested = True
                    callback(*args)
                return super().call_later(delay, callback, *args, **kw)

        async def main():
            await asyncio.sleep(0.1)
            asyncio.get_running_loop().stop()
        run(main(), loop=EagerLoop())
        say("run returned")
    """).finish()
    healthy(r)
    assert r.stdout == ["run returned"]


# ---- found by the re-entrancy fuzzer (RELIABILITY.md) --------------------------

def test_a_logging_filter_raising_on_stopping_the_loop_still_stops_it(app):
    a = app("""
        class RaiseOnce(logging.Filter):
            done = False
            def filter(self, record):
                if record.getMessage() == "Stopping the loop" and not RaiseOnce.done:
                    RaiseOnce.done = True
                    raise ValueError("filter refused")
                return True
        aiorun.logger.addFilter(RaiseOnce())

        async def main():
            say("READY")
            await asyncio.sleep(3600)
        run(main())
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    healthy(r)
    assert r.stdout == ["READY", "run returned"]
    assert "Leaving. Bye!" in r.messages


def test_a_system_exit_from_the_loops_stop_as_the_final_wait_ends(app):
    # The loop's stop() raises as the wait for the tasks ends; a protected
    # job started by a task winding down must still be waited for.
    r = app("""
        class Loop(asyncio.SelectorEventLoop):
            stops = 0
            def stop(self):
                super().stop()
                Loop.stops += 1
                if Loop.stops == 2:
                    raise SystemExit("from stop()")

        async def save():
            await asyncio.sleep(0.2)
            say("saved")

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                shutdown_waits_for(save())
                raise

        async def main():
            loop = asyncio.get_running_loop()
            loop.create_task(worker())
            await asyncio.sleep(0.01)
            loop.stop()

        loop = Loop()
        try:
            run(main(), loop=loop)
            say("run returned")
        except SystemExit as e:
            say("run raised SystemExit:", e)
        loop.close()
    """).finish()
    healthy(r)
    assert r.stdout == ["saved", "run raised SystemExit: from stop()"], r
    assert "Task was destroyed but it is pending!" not in r.stderr_text


def test_cancel_of_a_wait_whose_second_call_soon_fails(app):
    # cancel() has scheduled the first wake-up when call_soon() fails for
    # the second: each callback must still be called exactly once.
    r = app("""
        class Loop(asyncio.SelectorEventLoop):
            fail_on = None
            def call_soon(self, callback, *args, **kw):
                if Loop.fail_on is not None and getattr(callback, "name", None) == Loop.fail_on:
                    Loop.fail_on = None
                    raise MemoryError("call_soon")
                return super().call_soon(callback, *args, **kw)

        class Callback:
            def __init__(self, name):
                self.name = name
            def __call__(self, fut):
                say(self.name, "called, wait cancelled:", fut.cancelled())

        async def job():
            await asyncio.sleep(0.2)
            say("job done")
            return 7

        async def main():
            waiter = shutdown_waits_for(job())
            wait = waiter.send(None)
            wait.add_done_callback(Callback("first"))
            wait.add_done_callback(Callback("second"))
            Loop.fail_on = "second"
            try:
                wait.cancel()
            except MemoryError:
                say("cancel raised MemoryError")
            await asyncio.sleep(0.4)
            asyncio.get_running_loop().stop()
        run(main(), loop=Loop())
    """).finish()
    healthy(r)
    assert r.stdout == ["cancel raised MemoryError", "first called, wait cancelled: True",
                        "job done", "second called, wait cancelled: False"], r


def test_a_failing_shutdown_callback_and_an_escaping_error_in_the_same_turn(app):
    # The callback's own exception and a SystemExit from another callback
    # come out of the same turn: neither may be lost.
    r = app("""
        async def callback(loop):
            loop.call_soon(lambda: (_ for _ in ()).throw(SystemExit("from a callback")))
            raise ValueError("callback failed")

        async def main():
            asyncio.get_running_loop().stop()

        try:
            run(main(), shutdown_callback=callback)
        except BaseException as e:
            say("run raised", type(e).__name__, e)
    """).finish()
    healthy(r)
    assert len(r.stdout) == 1 and r.stdout[0].startswith("run raised "), r
    # One is re-raised, the other logged: both are seen.
    assert "callback failed" in r.stderr_text + r.stdout[0]
    assert "from a callback" in r.stderr_text + r.stdout[0]


@pytest.mark.parametrize("failures, outcome", [(15, "clean"), (25, "RuntimeError")])
def test_all_tasks_giving_up_under_other_threads_is_asked_again(app, failures, outcome):
    """asyncio.all_tasks() (3.9-3.13) gives up with RuntimeError when other
    threads' loops keep changing the WeakSet it copies (seen under
    ThreadSanitizer on a free-threaded build).  The shutdown asks again, up
    to 20 times; here asyncio's function is made to give up `failures` times
    in a row, before aiorun binds it."""
    r = app(f"""
        import asyncio, sys
        real_all_tasks = asyncio.all_tasks
        left = [{failures}]
        def all_tasks(loop=None):
            if left[0]:
                left[0] -= 1
                raise RuntimeError("Set changed size during iteration")
            return real_all_tasks(loop)
        asyncio.all_tasks = all_tasks
        from aiorun import run

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                print("worker cancelled", flush=True)
                raise

        async def main():
            asyncio.get_running_loop().create_task(worker())
            await asyncio.sleep(0)
            asyncio.get_running_loop().stop()
        try:
            run(main())
            print("clean", flush=True)
        except RuntimeError as e:
            print("RuntimeError:", e, flush=True)
    """, prelude=False).finish()
    assert r.returncode == 0, r
    if outcome == "clean":
        assert r.stdout == ["worker cancelled", "clean"]
    else:
        assert r.stdout[-1] == "RuntimeError: Set changed size during iteration", r
