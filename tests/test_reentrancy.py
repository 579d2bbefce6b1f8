"""Re-entrancy and reuse: run() twice, inside a running loop, after fork(),
and off the main thread.  Each case runs in a child process."""
import os
import signal

from conftest import SHUTDOWN_TAIL, subsequence

OFF_MAIN = ("WARNING:run() is not in the main thread, so SIGINT and SIGTERM are left "
            "alone: stop it with loop.stop() (from another thread, "
            "loop.call_soon_threadsafe(loop.stop))")


def test_inside_a_running_loop_is_refused_before_anything_changes(app):
    a = app("""
        async def outer():
            before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            coro = asyncio.sleep(0)
            try:
                run(coro)
            except RuntimeError as e:
                say("refused:", e)
            coro.close()
            after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
            say("handlers kept:", after == before)
            say("loop kept:", asyncio.get_event_loop() is loop)
            await asyncio.sleep(0)
            say("outer loop still runs")

        asyncio.run(outer())
    """)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["refused: run() cannot be called from a running event loop",
                        "handlers kept: True", "loop kept: True", "outer loop still runs"]


def test_run_in_a_forked_child_and_again_in_the_parent(app):
    # The parent has run() once (watchdog on) before it forks; the child
    # runs with its own watchdog; each is stopped by a real signal.
    a = app("""
        async def quick():
            asyncio.get_running_loop().stop()
        run(quick(), shutdown_deadline=30)

        async def main(who):
            say(who, "READY", os.getpid())
            await asyncio.sleep(3600)

        pid = os.fork()
        if pid == 0:
            run(main("child"), shutdown_deadline=30)
            say("child run returned")
            sys.stdout.flush()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        say("child exit code", os.waitstatus_to_exitcode(status))
        run(main("parent"))
        say("parent run returned")
    """)
    child = a.wait_prefix("child READY")
    os.kill(int(child.split()[-1]), signal.SIGTERM)
    a.wait_line("child exit code 0")
    a.wait_prefix("parent READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0, r
    assert "child run returned" in r.stdout
    assert r.stdout[-1] == "parent run returned"
    assert "Traceback" not in r.stderr_text


def test_off_the_main_thread_signals_are_left_to_the_main_thread(app):
    a = app("""
        got = []
        signal.signal(signal.SIGTERM, lambda s, f: got.append(s))
        before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
        box = {}

        async def main():
            box["loop"] = asyncio.get_running_loop()
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("main cancelled")
                raise

        def in_thread():
            run(main())
            say("thread run returned")
            try:
                run(main(), shutdown_deadline=5)
            except ValueError as e:
                say("refused:", e)

        t = threading.Thread(target=in_thread)
        t.start()
        while not got:              # the test's SIGTERM reaches this handler
            time.sleep(0.01)
        say("main thread got SIGTERM")
        say("handlers kept:", before == (signal.getsignal(signal.SIGINT),
                                         signal.getsignal(signal.SIGTERM)))
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        t.join()
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[:4] == ["READY", "main thread got SIGTERM", "handlers kept: True",
                            "main cancelled"]
    assert r.stdout[4:] == [
        "thread run returned",
        "refused: run() argument 'shutdown_deadline' needs run() in the main thread"]
    assert r.log.count(OFF_MAIN) == 2   # one per run()
    assert subsequence(SHUTDOWN_TAIL, r.messages)


def test_off_the_main_thread_the_deadline_variables_are_not_read(app):
    # The documentation: off the main thread the environment variables of the
    # watchdog are not applied; a malformed one must not make run() fail.
    r = app("""
        async def main():
            asyncio.get_running_loop().stop()
            return "done"

        result = []
        t = threading.Thread(target=lambda: result.append(run(main())))
        t.start()
        t.join()
        say("thread run returned", result)
    """, env={"AIORUN_SHUTDOWN_DEADLINE": "soon", "AIORUN_EXIT_ON_REPEATED_SIGNAL": "maybe"}
    ).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["thread run returned ['done']"]
