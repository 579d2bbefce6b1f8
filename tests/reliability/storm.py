"""Signal storm: SIGINT and SIGTERM as fast as one core can send them, aimed
at a child app (storm_app.py) from a random moment inside each phase of its
life, until it exits.

    python tests/reliability/storm.py [--trials N] [--hold S] [--phases a,b]
                                      [--uvloop] [--python PY]

Every trial must: exit 0, run the shutdown handler exactly once, finish
every shutdown_waits_for job it started, print no traceback, and exit
within the time limit.  Prints one line per phase and exits 1 on any
failure, showing the first ones in full.
"""
import argparse
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

APP = Path(__file__).with_name("storm_app.py")
PHASES = ["prerun", "startup", "running", "callback", "cancelling", "waiting",
          "executor", "closing", "after"]
# Up to "running" the storm itself starts the shutdown; from "callback" on
# a single SIGTERM starts it first and the storm follows.
SELF_TRIGGERED = {"prerun", "startup", "running"}
TRIAL_TIMEOUT = 60.0


def storm(pid, stop):
    """Send SIGINT/SIGTERM to pid alternately until it exits; return the count."""
    pidfd = os.pidfd_open(pid)
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    sent = 0
    try:
        while not stop.is_set():
            for _ in range(64):
                os.kill(pid, signal.SIGINT)
                os.kill(pid, signal.SIGTERM)
            sent += 128
            if poller.poll(0):   # exited (a zombie still accepts kill())
                break
    finally:
        os.close(pidfd)
    return sent


def trial(python, phase, hold, uvloop):
    argv = [python, str(APP), phase, str(hold)] + (["--uvloop"] if uvloop else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, stop, sent = [], threading.Event(), [0]
    sender = threading.Thread(target=lambda: sent.__setitem__(0, storm(proc.pid, stop)))
    timer = threading.Timer(TRIAL_TIMEOUT, proc.kill)
    timer.start()
    try:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line == "PHASE running" and phase not in SELF_TRIGGERED:
                proc.send_signal(signal.SIGTERM)
            if line == "PHASE " + phase and not sender.is_alive():
                time.sleep(random.uniform(0, hold))
                sender.start()
        stderr = proc.stderr.read()
        # Wait for the exit without reaping: the pid must stay the child's
        # until the sender has stopped.
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    finally:
        timed_out = not timer.is_alive() and proc.returncode == -signal.SIGKILL
        timer.cancel()
        stop.set()
        if sender.ident:
            sender.join()
        proc.wait()
    problems = []
    if timed_out:
        problems.append(f"hung (killed after {TRIAL_TIMEOUT:.0f} s)")
    elif proc.returncode != 0:
        problems.append(f"exit code {proc.returncode}")
    if not sender.ident:
        problems.append(f"phase {phase} never reached")
    if lines.count("HANDLER") != 1:
        problems.append(f"shutdown handler ran {lines.count('HANDLER')} times")
    started = sum(l.startswith("JOB START") for l in lines)
    done = sum(l.startswith("JOB DONE") for l in lines)
    if started != done:
        problems.append(f"{started - done} of {started} shutdown_waits_for jobs unfinished")
    if "Traceback" in stderr or "Error" in stderr:
        problems.append("error output")
    if "END" not in lines and not timed_out:
        problems.append("no END line")
    return sent[0], problems, lines, stderr


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=100, help="trials per phase")
    ap.add_argument("--hold", type=float, default=0.02,
                    help="seconds each phase is held open")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--uvloop", action="store_true")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    phases = args.phases.split(",")
    unknown = set(phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases: {', '.join(sorted(unknown))}")

    print(f"signal storm: {args.trials} trials per phase, hold {args.hold} s, "
          f"{'uvloop' if args.uvloop else 'asyncio loop'}, {args.python}", flush=True)
    failures = []
    total_trials = total_sent = 0
    for phase in phases:
        t0, sent_here, failed_here = time.monotonic(), 0, 0
        for i in range(args.trials):
            sent, problems, lines, stderr = trial(args.python, phase, args.hold, args.uvloop)
            sent_here += sent
            if problems:
                failed_here += 1
                failures.append((phase, i, problems, lines, stderr))
        total_trials += args.trials
        total_sent += sent_here
        print(f"  {phase:11s} trials={args.trials:5d} signals sent={sent_here:9d} "
              f"failures={failed_here}  ({time.monotonic() - t0:.0f} s)", flush=True)
    print(f"total: {total_trials} trials, {total_sent} signals, {len(failures)} failures")
    for phase, i, problems, lines, stderr in failures[:5]:
        print(f"\n--- {phase} trial {i}: {'; '.join(problems)}")
        print("stdout:", lines)
        print("stderr:", stderr[-3000:])
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
