"""How close to its deadline does a hung shutdown end?

For each way a shutdown can hang, start an app with shutdown_deadline=D,
wait for its READY line, send SIGTERM, and time the exit from this (the
parent) process.  Prints, per scenario, the overrun beyond D (median, min,
max over the runs) and whether every run ended within D + 0.5 s with exit
code 124 (aiorun.FORCED_EXIT_CODE); with stderr a full pipe, within D + 1 s.
Exits 1 if any run did not.  make deadline-bound runs it with D = 1 (CI).

    python bench/deadline.py [--runs N] [--deadline D]

It is a measurement, not a unit test: the machine's load shows in it.
"""
import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

LIMIT = 0.5  # seconds past the deadline allowed
# With stderr stuck, the report's writes give up and _exit() comes from a
# timer 0.9 s past the deadline (watchdog.c); the scheduler adds a little.
FULL_PIPE_LIMIT = 1.0
FULL_PIPE = "stderr a full pipe nobody reads"

PRELUDE = """\
import asyncio, ctypes, sys, threading, time
from aiorun import run
def ready():
    print("READY", flush=True)
"""

SCENARIOS = {
    "time.sleep in a coroutine": """
        async def main():
            ready()
            time.sleep(3600)
        run(main(), shutdown_deadline=D)
    """,
    "C call holding the GIL": """
        libc = ctypes.PyDLL(None)
        async def main():
            ready()
            while True:
                libc.sleep(3600)
        run(main(), shutdown_deadline=D)
    """,
    "executor job never returns": """
        async def main():
            asyncio.get_running_loop().run_in_executor(None, threading.Event().wait)
            ready()
        run(main(), shutdown_deadline=D)
    """,
    "task swallows cancellation": """
        async def stubborn():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass
        async def main():
            asyncio.get_running_loop().create_task(stubborn())
            ready()
        run(main(), shutdown_deadline=D)
    """,
    "stderr a full pipe nobody reads": """
        import fcntl, os
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
            ready()
            await asyncio.sleep(3600)
        run(main(), shutdown_callback=stuck, shutdown_deadline=D)
    """,
    "shutdown_callback never returns": """
        async def callback(loop):
            await asyncio.Event().wait()
        async def main():
            ready()
        run(main(), shutdown_callback=callback, shutdown_deadline=D)
    """,
}


def one_run(script, stderr_stuck):
    # A pipe nobody reads, for the scenario that fills it.
    proc = subprocess.Popen([sys.executable, script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE if stderr_stuck else subprocess.DEVNULL,
                            text=True)
    try:
        if proc.stdout.readline().strip() != "READY":
            raise RuntimeError(f"{script}: no READY line")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=120)
        return time.monotonic() - sent, code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=1.0)
    args = parser.parse_args()

    ok = True
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
          f"deadline {args.deadline:g} s, {args.runs} runs each; overrun = exit - deadline")
    print(f"{'scenario':34} {'median':>8} {'min':>8} {'max':>8}  codes  verdict")
    with tempfile.TemporaryDirectory() as tmp:
        for name, body in SCENARIOS.items():
            script = os.path.join(tmp, "app.py")
            with open(script, "w") as f:
                f.write(PRELUDE + textwrap.dedent(body).replace("=D", f"={args.deadline!r}"))
            overruns, codes = [], set()
            for _ in range(args.runs):
                elapsed, code = one_run(script, name == FULL_PIPE)
                overruns.append(elapsed - args.deadline)
                codes.add(code)
            limit = FULL_PIPE_LIMIT if name == FULL_PIPE else LIMIT
            good = codes == {124} and max(overruns) <= limit and min(overruns) >= 0
            ok = ok and good
            print(f"{name:34} {statistics.median(overruns):8.3f} {min(overruns):8.3f} "
                  f"{max(overruns):8.3f}  {sorted(codes)!s:5}  "
                  f"{'ok' if good else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
