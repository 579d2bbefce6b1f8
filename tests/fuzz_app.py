"""Child side of the re-entrancy fuzzer (tests/test_fuzz_reentrancy.py).

    python tests/fuzz_app.py '<scenario json>'

runs one scenario: an app under aiorun.run() in which every hook aiorun
calls (shutdown_handler, shutdown_callback, a Task subclass's cancel and
add/remove_done_callback, an __eq__, a __del__, a logging filter and
handler, the loop's exception handler, the executor's shutdown, a loop
subclass's call_soon/stop, and a worker's `except CancelledError:` block)
may, on its k-th call, raise, stop the loop, cancel, signal the process or
call back into aiorun.  The parent checks the invariants on what this
prints; to check one scenario by hand, run

    python tests/test_fuzz_reentrancy.py '<scenario json>'

stdout carries one `FUZZ ...` line per event (written with os.write, so a
__del__ or a signal handler that prints in the middle of another print
cannot interleave or raise); the "aiorun" logger is written to stderr as
LEVEL:aiorun:message by a filter that comes before every hostile one, so
a hook that raises inside logging cannot hide aiorun's log lines.
"""
import asyncio
import concurrent.futures
import json
import logging
import os
import signal
import sys
import time
import traceback

import aiorun

SCENARIO = json.loads(sys.argv[1])
PLAN = {hook: {int(k): action for k, action in pairs}
        for hook, pairs in SCENARIO.get("hooks", {}).items()}
COUNTS = {}
LOOP = None          # the loop run() drives, once known
MAIN_TASK = None
DONE = False         # run() has returned: hooks do nothing any more
PHASE = "setup"      # setup, running, shutdown, executor, leaving, after
JOB_IDS = iter(range(1, 1_000_000))


def say(*args):
    os.write(1, (" ".join(map(str, args)) + "\n").encode())


def err(text):
    os.write(2, (text + "\n").encode())


# ---------------------------------------------------------------- actions

async def short_job(job_id, duration):
    say("FUZZ job-start", job_id)
    await asyncio.sleep(duration)
    say("FUZZ job-done", job_id)


def request_job(duration, why):
    """shutdown_waits_for(short_job()), fire-and-forget."""
    job_id = next(JOB_IDS)
    coro = short_job(job_id, duration)
    say("FUZZ job-requested", job_id, PHASE, why)
    try:
        aiorun.shutdown_waits_for(coro)
    except Exception as e:
        coro.close()
        say("FUZZ job-refused", job_id, type(e).__name__)
    return job_id


def running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def act(action, name, n):
    loop = LOOP
    if action == "raise":
        raise Exception(f"fuzz: {name} call {n}")
    if action == "kbi":
        raise KeyboardInterrupt(f"fuzz: {name} call {n}")
    if action == "sysexit":
        raise SystemExit(f"fuzz: {name} call {n}")
    if action == "stop":
        if loop is not None and not loop.is_closed():
            loop.stop()
    elif action == "cancel_current":
        task = asyncio.current_task(loop) if loop is not None else None
        if task is not None:
            task.cancel()
    elif action == "cancel_main":
        if MAIN_TASK is not None:
            MAIN_TASK.cancel()
    elif action in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if action == "sigterm" else signal.SIGINT)
    elif action == "waits_for":
        request_job(0.1, f"hook:{name}")
    elif action == "event":
        try:
            aiorun.shutdown_event()
        except Exception as e:
            say("FUZZ api-error shutdown_event", type(e).__name__)
    elif action == "cancelled_by_shutdown":
        for arg in (asyncio.CancelledError("aiorun shutdown: SIGTERM"),
                    sys.exc_info()[1], 42):
            try:
                aiorun.cancelled_by_shutdown(arg)
            except TypeError:
                pass
    elif action == "rerun":
        if running_loop() is None:
            say("FUZZ rerun-skipped no running loop")
            return
        coro = asyncio.sleep(0)
        try:
            aiorun.run(coro)
        except RuntimeError:
            pass
        else:
            say("FUZZ rerun-unexpected returned")
        finally:
            coro.close()
    elif action in ("report_exc", "report_nonexc"):
        if loop is not None and not loop.is_closed():
            exc = ValueError("fuzz report") if action == "report_exc" else "not an exception"
            loop.call_exception_handler({"message": f"fuzz report from {name}",
                                         "exception": exc})
    elif action != "none":
        raise AssertionError(f"unknown action {action!r}")


def hook(name):
    """Called by every hook; acts on the call numbers the scenario names."""
    if DONE:
        return
    n = COUNTS[name] = COUNTS.get(name, 0) + 1
    action = PLAN.get(name, {}).get(n)
    if action is None or action == "none":
        return
    say("FUZZ hook", name, n, action, PHASE)
    act(action, name, n)


# ------------------------------------------------------------------ hooks

class FuzzTask(asyncio.Task):
    def cancel(self, msg=None):
        hook("task_cancel")
        return super().cancel(msg)

    def add_done_callback(self, fn, *, context=None):
        hook("task_add_done_callback")
        return super().add_done_callback(fn, context=context)

    def remove_done_callback(self, fn):
        hook("task_remove_done_callback")
        return super().remove_done_callback(fn)


def task_factory(loop, coro, **kwargs):
    return FuzzTask(coro, loop=loop, **kwargs)


class EqCallback:
    """A done callback that aiorun and asyncio compare with others."""

    def __init__(self, tag):
        self.tag = tag

    def __call__(self, fut):
        say("FUZZ eq-callback-called", self.tag)

    def __eq__(self, other):
        hook("eq")
        return self is other

    __hash__ = object.__hash__


class DelObj:
    def __del__(self):
        hook("del")


class RecorderFilter(logging.Filter):
    """First on the logger: writes every aiorun record to stderr and marks
    the phase.  Never raises."""

    def filter(self, record):
        global PHASE
        msg = record.getMessage()
        if msg == "Entering shutdown phase.":
            PHASE = "shutdown"
        elif msg == "Waiting for executor shutdown.":
            PHASE = "executor"
        elif msg == "Leaving. Bye!":
            PHASE = "leaving"
        text = f"{record.levelname}:aiorun:{msg}"
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        err(text)
        return True


class HostileFilter(logging.Filter):
    def filter(self, record):
        hook("log_filter")
        return True


class HostileHandler(logging.Handler):
    def emit(self, record):
        hook("log_handler")


class FuzzExecutor(concurrent.futures.ThreadPoolExecutor):
    def shutdown(self, wait=True, *, cancel_futures=False):
        say("FUZZ executor-shutdown wait", wait)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        hook("executor_shutdown")


class FuzzExecutorKwOnly(concurrent.futures.ThreadPoolExecutor):
    """An executor whose shutdown() takes its arguments by keyword only."""

    def shutdown(self, *, wait=True, cancel_futures=False):
        say("FUZZ executor-shutdown wait", wait)
        super().shutdown(wait=wait, cancel_futures=cancel_futures)
        hook("executor_shutdown")


class FuzzLoop(asyncio.SelectorEventLoop):
    def call_soon(self, callback, *args, context=None):
        handle = super().call_soon(callback, *args, context=context)
        hook("loop_call_soon")
        return handle

    def stop(self):
        super().stop()
        hook("loop_stop")


def exception_handler(loop, context):
    hook("exc_handler")
    loop.default_exception_handler(context)


def wrap_handler(inner):
    def handler(loop, context):
        # aiorun's handler runs whatever the hook does: without it an
        # unhandled error could not stop the loop (a hang of our making).
        try:
            hook("exc_handler")
        finally:
            inner(loop, context)
    return handler


def shutdown_handler(loop):
    try:
        hook("shutdown_handler")
    finally:
        say("FUZZ shutdown-handler stops the loop")
        loop.stop()


async def shutdown_callback_coro(loop):
    say("FUZZ callback-start")
    try:
        hook("shutdown_callback")
        await asyncio.sleep(0.01)
        hook("shutdown_callback")
    except BaseException as e:
        say("FUZZ callback-raised", type(e).__name__)
        raise
    say("FUZZ callback-done")


AGENS = []


async def agen():
    """An async generator left suspended: shutdown_asyncgens() closes it."""
    try:
        yield 1
        await asyncio.sleep(3600)
    finally:
        say("FUZZ agen-closed")


def shutdown_callback_plain(loop):
    hook("shutdown_callback")


# -------------------------------------------------------------------- app

def executor_job():
    say("FUZZ executor-job-start")
    time.sleep(0.2)
    say("FUZZ executor-job-done")


async def worker(i):
    keep = [DelObj() for _ in range(1)] if i < SCENARIO.get("dels", 0) else None
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        if i == 0 and SCENARIO.get("ff_in_except"):
            request_job(0.15, "except-cancelled")
        hook("worker_cancelled")
        raise
    finally:
        del keep


async def waiter(job_id, duration):
    # Said here, not where the waiter task is created: a waiter cancelled
    # before its first step never asks for its job.
    say("FUZZ job-requested", job_id, PHASE, "waiter")
    try:
        await aiorun.shutdown_waits_for(short_job(job_id, duration))
        say("FUZZ waiter-resumed", job_id)
    except asyncio.CancelledError:
        say("FUZZ waiter-cancelled", job_id)
        raise


async def set_up(loop):
    if SCENARIO["loop"] != "subclass":
        loop.set_task_factory(task_factory)
    if SCENARIO["stop_on_unhandled_errors"]:
        loop.set_exception_handler(wrap_handler(loop.get_exception_handler()))
    else:
        loop.set_exception_handler(exception_handler)
    loop.run_in_executor(None, executor_job)
    gen = agen()
    AGENS.append(gen)
    await gen.__anext__()
    say("FUZZ agen-started")
    for i in range(SCENARIO.get("workers", 0)):
        loop.create_task(worker(i))
    eq_waiter = None
    for duration, awaited in SCENARIO.get("jobs", []):
        if awaited:
            job_id = next(JOB_IDS)
            task = loop.create_task(waiter(job_id, duration))
            eq_waiter = eq_waiter or task
        else:
            request_job(duration, "main")
    if SCENARIO.get("eq") and eq_waiter is not None:
        await asyncio.sleep(0)      # the waiter now waits on its ShutdownWaitFuture
        fut = eq_waiter._fut_waiter
        say("FUZZ eq-future", type(fut).__name__)
        if fut is not None:
            fut.add_done_callback(EqCallback("kept"))
            fut.add_done_callback(EqCallback("removed"))
            fut.remove_done_callback(EqCallback("stranger"))


async def main():
    global LOOP, MAIN_TASK, PHASE
    LOOP = loop = asyncio.get_running_loop()
    MAIN_TASK = asyncio.current_task()
    PHASE = "running"
    say("FUZZ main-started")
    # A hook that raises (or cancels main) during the set-up must not keep
    # the shutdown from being started: that would be a hang of the app's
    # own making.  KeyboardInterrupt and SystemExit go on as they are.
    failed = None
    try:
        await set_up(loop)
    except (Exception, asyncio.CancelledError) as e:
        say("FUZZ main-set-up-raised", type(e).__name__)
        failed = e
    say("READY")
    start = SCENARIO["start"]
    if start == "stop":
        loop.stop()
    elif start == "error":
        raise RuntimeError("fuzz: main fails")
    if failed is not None:
        raise failed
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        say("FUZZ main-cancelled")
        raise


def late_signal(signum, frame):
    say("FUZZ late-signal", signum)


def run_app():
    global DONE, PHASE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s:%(name)s:%(message)s")
    log = logging.getLogger("aiorun")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    log.addFilter(RecorderFilter())
    log.addFilter(HostileFilter())
    log.addHandler(HostileHandler())
    # What run() gives back at the end: a signal sent by a hook that lands
    # after run() returned is shown, not fatal.
    signal.signal(signal.SIGTERM, late_signal)
    signal.signal(signal.SIGINT, late_signal)

    kwargs = dict(
        shutdown_handler=shutdown_handler if SCENARIO.get("custom_handler") else None,
        stop_on_unhandled_errors=SCENARIO["stop_on_unhandled_errors"],
        timeout_task_shutdown=SCENARIO.get("timeout", 2.0),
        drain_delay=SCENARIO.get("drain_delay", 0),
        cancel_main_first=SCENARIO.get("cancel_main_first", False),
    )
    form = SCENARIO.get("callback")
    if form == "coro":
        kwargs["shutdown_callback"] = shutdown_callback_coro
    elif form == "plain":
        kwargs["shutdown_callback"] = shutdown_callback_plain
    executor_cls = FuzzExecutorKwOnly if SCENARIO.get("executor_kwonly") else FuzzExecutor
    kwargs["executor"] = executor_cls(max_workers=2)
    given = None
    if SCENARIO["loop"] == "subclass":
        given = FuzzLoop()
        given.set_task_factory(task_factory)
        asyncio.set_event_loop(given)
        kwargs["loop"] = given
    elif SCENARIO["loop"] == "uvloop":
        kwargs["use_uvloop"] = True
    try:
        aiorun.run(main(), **kwargs)
    except BaseException as e:
        DONE = True
        PHASE = "after"
        say("FUZZ run-raised", type(e).__name__, repr(str(e))[:120])
    else:
        DONE = True
        PHASE = "after"
        say("FUZZ run-returned")
    if LOOP is not None:
        say("FUZZ loop-closed", LOOP.is_closed(), "own" if given is None else "given")
    if given is not None and not given.is_closed():
        given.close()
    say("FUZZ counts", json.dumps(COUNTS, sort_keys=True))
    say("FUZZ exit")


if __name__ == "__main__":
    run_app()
