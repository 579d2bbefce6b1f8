"""Start-up window sweep: one signal aimed at each moment of run()'s start,
from the call until the main coroutine runs.  None may be lost.

    python tests/reliability/startup_window.py [--trials N] [--python PY]

The app says CALLING just before it calls run() and MAIN when its main
coroutine starts; a handler of its own notes signals that arrive before
run() has taken them over.  Those that reached it before the call are not
counted: the handler tells them apart by the line its module frame was on
(the run() line means the call had begun).  A few calibration runs measure
the window (CALLING to MAIN as the parent sees it); then each trial sends SIGINT or SIGTERM at a
delay swept evenly from 0 to 1.2 times the window.  A trial counts as lost
unless the shutdown handler ran once, run() returned and the exit code is 0
with no traceback.  Give --python a venv with the original aiorun to see it
lose some.
"""
import argparse
import signal
import statistics
import subprocess
import sys
import textwrap
import time

APP = textwrap.dedent("""
    import asyncio, os, signal, sys
    from aiorun import run

    def say(text):
        os.write(1, (text + "\\n").encode())

    # Until run() takes the signals over, this handler notes where they hit:
    # inside the call of run() (True) or before it (False).  The module
    # frame's line says which; a flag set on the line before the call would
    # count a signal handled between the flag and the call as run()'s.
    early = []

    def note(signum, frame):
        while frame is not None and frame.f_back is not None:
            frame = frame.f_back
        early.append(frame is None or frame.f_lineno == RUN_LINE)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, note)

    def handler(loop):
        say("HANDLER")
        loop.stop()

    async def main():
        say("MAIN")
        if early:
            # Caught by the handler before run()'s: too early to count
            # (False), or lost by run() (True).  Either way, end the run.
            say("LOST" if early[0] else "EARLY")
            os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.sleep(3600)

    coro = main()
    RUN_LINE = sys._getframe().f_lineno + 2
    say("CALLING")
    run(coro, shutdown_handler=handler)
    say("RETURNED")
""")
TRIAL_TIMEOUT = 10.0


def start(python):
    proc = subprocess.Popen([python, "-c", APP], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.stdout.readline() == b"CALLING\n"
    return proc, time.perf_counter()


def window(python, runs=15):
    """Median time from CALLING to MAIN, as seen from here."""
    spans = []
    for _ in range(runs):
        proc, t0 = start(python)
        assert proc.stdout.readline() == b"MAIN\n"
        spans.append(time.perf_counter() - t0)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TRIAL_TIMEOUT)
    return statistics.median(spans)


def trial(python, delay, signum):
    proc, t0 = start(python)
    while time.perf_counter() - t0 < delay:   # a sleep is far too coarse
        pass
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=TRIAL_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return "hung", out, err
    lines = out.decode().split()
    if "EARLY" in lines:
        return "early", out, err
    if "LOST" in lines:
        return "caught by the handler before run()'s", out, err
    if (proc.returncode == 0 and lines.count("HANDLER") == 1 and lines[-1] == "RETURNED"
            and b"Traceback" not in err):
        return None, out, err
    return f"exit code {proc.returncode}", out, err


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=400)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()

    w = window(args.python)
    print(f"start-up window sweep: {args.trials} trials, window {w * 1e3:.2f} ms "
          f"(CALLING to MAIN), {args.python}", flush=True)
    lost, early = [], 0
    for i in range(args.trials):
        delay = 1.2 * w * i / max(args.trials - 1, 1)
        signum = (signal.SIGINT, signal.SIGTERM)[i % 2]
        problem, out, err = trial(args.python, delay, signum)
        if problem == "early":
            early += 1
        elif problem:
            lost.append((delay, signum, problem, out, err))
    counted = args.trials - early
    print(f"lost: {len(lost)} of {counted} ({100 * len(lost) / max(counted, 1):.1f} %); "
          f"{early} more landed before run() was called and are not counted")
    for delay, signum, problem, out, err in lost[:5]:
        print(f"\n--- {signal.Signals(signum).name} at {delay * 1e3:.3f} ms: {problem}")
        print("stdout:", out.decode().split())
        print("stderr:", err.decode()[-1500:])
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
