"""The app a signal storm is aimed at (driven by tests/reliability/storm.py).

    python storm_app.py PHASE HOLD [--uvloop]

It goes through every phase of a run() once, says "PHASE <name>" on stdout
as it enters each one, and holds PHASE open for HOLD seconds so a storm can
start inside it.  Phases inside run() that no user code can see are marked
from aiorun's own log records, so the handshake needs no hook into aiorun.

Work it starts: shutdown_waits_for jobs (each says JOB START / JOB DONE), a
task that cleans up after its cancellation, an executor job, an async
generator with a finally block.  The shutdown handler says HANDLER.
Before and after run() a counting Python handler owns SIGINT/SIGTERM, so a
storm that begins too early or ends too late is harmless; at the very end
both signals are ignored, because the interpreter's finalisation would put
the default dispositions back (the storm goes on until the exit).
"""
import asyncio
import logging
import os
import signal
import sys
import threading
import time

PHASE, HOLD = sys.argv[1], float(sys.argv[2])
USE_UVLOOP = "--uvloop" in sys.argv

from aiorun import run, shutdown_waits_for


def say(text):
    os.write(1, (text + "\n").encode())


executor_phase = threading.Event()


def mark(phase):
    say("PHASE " + phase)
    if phase == "executor":
        executor_phase.set()   # lets the executor job finish, HOLD later
    if phase == PHASE:
        time.sleep(HOLD)


# aiorun's log message that begins each phase which has no user code.
LOG_PHASES = {
    "Entering run()": "startup",
    "Cancelling pending tasks.": "cancelling",
    "Running pending tasks till complete": "waiting",
    "Waiting for executor shutdown.": "executor",
    "Closing the loop.": "closing",
}


class PhaseMarker(logging.Handler):
    def emit(self, record):
        phase = LOG_PHASES.get(record.getMessage())
        if phase:
            mark(phase)


log = logging.getLogger("aiorun")
log.setLevel(logging.DEBUG)
log.addHandler(PhaseMarker())
log.propagate = False

counted = []
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda s, f: counted.append(s))


async def job(i):
    say(f"JOB START {i}")
    await asyncio.sleep(HOLD)
    say(f"JOB DONE {i}")


async def cleans_up():
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(HOLD)   # the "waiting" phase lasts this long
        raise


async def agen():
    try:
        while True:
            yield
    finally:
        await asyncio.sleep(0)


async def main():
    loop = asyncio.get_running_loop()
    jobs = [loop.create_task(shutdown_waits_for(job(i))) for i in range(3)]
    loop.create_task(cleans_up())
    loop.run_in_executor(None, lambda: executor_phase.wait() and time.sleep(HOLD))
    gen = agen()
    await gen.__anext__()
    mark("running")
    await asyncio.gather(*jobs)
    await asyncio.sleep(3600)


async def callback(loop):
    mark("callback")


def handler(loop):
    say("HANDLER")
    loop.stop()


mark("prerun")
run(main(), shutdown_handler=handler, shutdown_callback=callback,
    use_uvloop=USE_UVLOOP)
mark("after")
# Blocked first: one landing between signal.signal()'s check of pending
# signals and its swap would be reported as "ignored due to race condition".
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
say("END")
