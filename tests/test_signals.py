"""SPEC steps 1, 7 and 11: signals start the shutdown once, are never lost
in start-up, and the previous handlers are back when run() returns."""
import signal

import pytest

from conftest import SHUTDOWN_TAIL, SIGNALS, run_app, subsequence

MAIN_WAITS = """
async def main():
    say("READY")
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        say("main cancelled")
        raise

run(main())
say("run returned")
"""


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_runs_the_full_shutdown(app, sig):
    a = app(MAIN_WAITS)
    a.wait_line("READY")
    a.send(sig)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "main cancelled", "run returned"]
    assert r.log == [
        "DEBUG:Entering run()",
        "DEBUG:Creating default executor",
        "DEBUG:Entering shutdown handler",
        "WARNING:Stopping the loop",
        "INFO:Entering shutdown phase.",
        "INFO:Cancelling pending tasks.",
        r.log[6],  # the per-task DEBUG line, checked below
        "INFO:Running pending tasks till complete",
        "INFO:Waiting for executor shutdown.",
        "INFO:Shutting down async generators",
        "INFO:Closing the loop.",
        "INFO:Leaving. Bye!",
    ]
    assert r.log[6].startswith("DEBUG:Cancelling task: <Task pending")
    assert "coro=<main()" in r.log[6]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_without_coro_the_loop_runs_until_a_signal(app, sig):
    # No coroutine: readiness comes from a thread that sees run() take the
    # signal over; a signal then is handled whether or not the loop runs yet.
    a = app("""
        def announce():
            while signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                time.sleep(0.001)
            say("READY")
        threading.Thread(target=announce, daemon=True).start()
        run()
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(sig)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "run returned"]
    # No task at all: the cancel and wait steps have nothing to do.
    assert r.messages == ["Stopping the loop", "Entering shutdown phase.",
                          "Waiting for executor shutdown.",
                          "Shutting down async generators", "Closing the loop.",
                          "Leaving. Bye!"]


def test_burst_of_signals_runs_the_handler_once(app):
    # The shutdown waits (in its callback) until the test has sent the whole
    # burst: a signal that came after run() returned would rightly reach the
    # handler put back (death by SIGTERM), which a fast shutdown on a loaded
    # machine let happen (seen once in 50 runs).
    a = app("""
        def handler(loop):
            say("HANDLER")
            loop.stop()

        def callback(loop):
            sys.stdin.readline()

        async def main():
            say("READY")
            await asyncio.sleep(3600)

        run(main(), shutdown_handler=handler, shutdown_callback=callback)
        say("run returned")
    """, stdin=True)
    a.wait_line("READY")
    for i in range(60):
        a.send(SIGNALS[i % 2])
    a.write("burst sent\n")   # every kill() has returned: pending or taken
    r = a.finish()
    assert r.returncode == 0, r
    assert r.count("HANDLER") == 1
    assert r.stdout[-1] == "run returned"
    assert "Traceback" not in r.stderr_text
    assert subsequence(SHUTDOWN_TAIL, r.messages)


def test_signals_during_the_shutdown_are_ignored(app):
    # The shutdown callback blocks on stdin; while it does, a storm of both
    # signals arrives.  The shutdown must go on undisturbed.
    a = app("""
        def handler(loop):
            say("HANDLER")
            loop.stop()

        def callback(loop):
            say("IN_CALLBACK")
            say("callback got " + sys.stdin.readline().strip())

        async def main():
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("main cancelled")
                raise

        run(main(), shutdown_handler=handler, shutdown_callback=callback)
        say("run returned")
    """, stdin=True)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    a.wait_line("IN_CALLBACK")
    for i in range(100):
        a.send(SIGNALS[i % 2])
    a.write("go\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "HANDLER", "IN_CALLBACK", "callback got go",
                        "main cancelled", "run returned"]
    assert "Traceback" not in r.stderr_text
    assert "ignored due to race condition" not in r.stderr_text


def test_signal_in_the_start_up_window_is_not_lost(app):
    # The signal arrives inside run(), before the loop runs (aiorun in Python
    # has SIGINT/SIGTERM ignored at that moment and loses it).
    a = app("""
        class Loop(asyncio.SelectorEventLoop):
            def set_default_executor(self, executor):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):   # let the Python-level handler run here
                    pass
                say("signal sent in start-up")
                super().set_default_executor(executor)

        async def main():
            say("main started")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("main cancelled")
                raise

        loop = Loop()
        asyncio.set_event_loop(loop)
        run(main(), loop=loop)
        say("run returned")
    """)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["signal sent in start-up", "main started", "main cancelled",
                        "run returned"]
    assert r.log.count("WARNING:Stopping the loop") == 1


def test_previous_handlers_are_back_after_run(app):
    r = run_app(app, """
        def mine(signum, frame):
            say("my SIGTERM handler")
        signal.signal(signal.SIGTERM, mine)

        async def main():
            asyncio.get_running_loop().stop()

        run(main())
        say("SIGINT:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        say("SIGTERM:", signal.getsignal(signal.SIGTERM) is mine)
        say("wakeup fd:", signal.set_wakeup_fd(-1))
        os.kill(os.getpid(), signal.SIGTERM)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            say("no KeyboardInterrupt")
        except KeyboardInterrupt:
            say("KeyboardInterrupt")
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["SIGINT: True", "SIGTERM: True", "wakeup fd: -1",
                        "my SIGTERM handler", "KeyboardInterrupt"]


def test_handlers_are_back_when_run_raises(app):
    r = run_app(app, """
        async def main():
            raise ValueError("boom")
        try:
            run(main(), stop_on_unhandled_errors=True)
        except ValueError as e:
            say("raised", e)
        say("SIGINT:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        say("SIGTERM:", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["raised boom", "SIGINT: True", "SIGTERM: True"]


def test_handlers_are_taken_over_while_running(app):
    r = run_app(app, """
        async def main():
            h = signal.getsignal(signal.SIGINT)
            say("same handler:", h == signal.getsignal(signal.SIGTERM))
            say("ours:", callable(h) and h is not signal.default_int_handler)
            asyncio.get_running_loop().stop()
        run(main())
    """)
    assert r.stdout == ["same handler: True", "ours: True"]


def test_run_twice_in_one_process(app):
    a = app("""
        async def main(n):
            say(f"READY {n}")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say(f"cancelled {n}")
                raise
        run(main(1))
        run(main(2))
        say("both returned")
    """)
    a.wait_line("READY 1")
    a.send(signal.SIGINT)
    a.wait_line("READY 2")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY 1", "cancelled 1", "READY 2", "cancelled 2",
                        "both returned"]
    assert r.log.count("WARNING:Stopping the loop") == 2


def test_custom_shutdown_handler_runs_on_the_loop_thread(app):
    a = app("""
        main_thread = threading.get_ident()

        def handler(loop):
            say("handler on loop thread:", threading.get_ident() == main_thread)
            say("loop running:", loop.is_running())
            say("same loop:", loop is the_loop)
            loop.stop()

        async def main():
            global the_loop
            the_loop = asyncio.get_running_loop()
            say("READY")
            await asyncio.sleep(3600)

        run(main(), shutdown_handler=handler)
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[1:] == ["handler on loop thread: True", "loop running: True",
                            "same loop: True"]
    # The default handler's messages are not logged for a custom handler.
    assert "WARNING:Stopping the loop" not in r.log


def test_handler_that_does_not_stop_keeps_the_loop_running(app):
    # The handler is the user's to write; a second signal is still ignored,
    # as in aiorun, so the app stops itself later.
    a = app("""
        def handler(loop):
            say("HANDLER")
            loop.call_later(0.2, loop.stop)

        async def main():
            say("READY")
            await asyncio.sleep(3600)

        run(main(), shutdown_handler=handler)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    a.wait_line("HANDLER")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.count("HANDLER") == 1
    assert r.stdout[-1] == "run returned"


RACE = """
async def callback(loop):
    await asyncio.sleep(0.05)
    say("callback finished")

async def main():
    loop = asyncio.get_running_loop()
    loop.stop()
    os.kill(os.getpid(), signal.SIGTERM)   # lands while the loop is stopping
    for _ in range(100):
        pass
    say("both requested")

run(main(), shutdown_callback=callback)
say("run returned")
"""


def test_signal_racing_loop_stop_does_not_abort_the_shutdown(app):
    # The signal's handler call is queued as the loop stops; running it
    # during the shutdown would stop the loop again mid-callback
    # ("Event loop stopped before Future completed", as in the original).
    r = run_app(app, RACE)
    assert r.returncode == 0, r
    assert r.stdout == ["both requested", "callback finished", "run returned"]
    assert "WARNING:Stopping the loop" not in r.log
    assert r.messages[-1] == "Leaving. Bye!"


def test_a_signal_while_run_sets_its_loop_up_runs_the_handler_once(app):
    # Found by the signal storm (tests/reliability/storm.py): a signal whose
    # Python handler ran after run() made its loop but before the loop was
    # marked ready scheduled the shutdown handler twice.  A policy whose
    # set_event_loop() signals its own process lands one exactly there.
    a = app("""
        class Policy(asyncio.DefaultEventLoopPolicy):
            def set_event_loop(self, loop):
                super().set_event_loop(loop)
                if loop is not None:
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(100):   # the Python handler runs in here
                        pass

        asyncio.set_event_loop_policy(Policy())

        def handler(loop):
            say("HANDLER")
            loop.stop()

        async def main():
            await asyncio.sleep(3600)

        run(main(), shutdown_handler=handler)
        say("run returned")
    """)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["HANDLER", "run returned"]


def test_a_signal_taken_by_another_thread_still_wakes_the_loop(app):
    # The kernel gives a process-wide signal to any thread that does not
    # block it.  Here only a helper thread can take SIGTERM; the loop's
    # thread sits in its selector with an hour to wait, and must still wake.
    a = app("""
        threading.Thread(target=threading.Event().wait, daemon=True).start()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

        async def main():
            say("READY")
            await asyncio.sleep(3600)

        run(main())
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "run returned"]
    assert "Stopping the loop" in r.messages


def test_a_shutdown_handler_that_failed_is_tried_again_on_the_next_signal(app):
    # Found by fault injection (tests/reliability/nomemory.py): when the
    # shutdown handler could not run (a MemoryError), every later signal was
    # ignored and the process could only be killed.  As with aiorun's
    # add_signal_handler(), the next signal calls the handler again.
    a = app("""
        calls = []

        def handler(loop):
            calls.append(1)
            say("HANDLER", len(calls))
            if len(calls) == 1:
                raise MemoryError("the first try fails")
            loop.stop()

        async def main():
            asyncio.get_running_loop().set_exception_handler(
                lambda loop, context: say("FAILED", repr(context.get("exception"))))
            say("READY")
            await asyncio.sleep(3600)

        run(main(), shutdown_handler=handler)
        say("run returned")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    a.wait_prefix("FAILED")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "HANDLER 1", "FAILED MemoryError('the first try fails')",
                        "HANDLER 2", "run returned"]


@pytest.mark.parametrize("sender", ["existing", "new"])
def test_a_signal_that_comes_while_the_handlers_go_back_is_absorbed(app, sender):
    # A SIGINT sent while run() is putting the handlers back (here: from
    # inside that very step, through a signal.signal() that has a thread
    # send it first) belongs to run(): no KeyboardInterrupt may come out
    # after a clean return.  An existing thread takes it (it does not block
    # it); a thread started there inherits the block, so the signal waits
    # in the kernel until the main thread lets it through.
    a = app(f"""
        import os, signal, sys, threading, time
        go, sent = threading.Event(), threading.Event()
        def sender():
            go.wait()
            os.kill(os.getpid(), signal.SIGINT)
            sent.set()
        if {sender!r} == "existing":
            threading.Thread(target=sender, daemon=True).start()
        real_signal = signal.signal
        def signal_that_sends_one(signum, handler):
            if signum == signal.SIGTERM and getattr(handler, "__name__", "") != "_on_signal":
                if {sender!r} == "new":
                    threading.Thread(target=sender, daemon=True).start()
                go.set()
                sent.wait()         # kill() has returned: taken, or pending
            return real_signal(signum, handler)
        signal.signal = signal_that_sends_one     # before aiorun takes it
        import asyncio, aiorun
        async def main():
            print("READY", flush=True)
            await asyncio.sleep(3600)
        aiorun.run(main())
        time.sleep(0.3)                           # a late KeyboardInterrupt lands here
        print("clean", flush=True)
    """, prelude=False)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "clean"], r
    assert "KeyboardInterrupt" not in r.stderr_text, r
