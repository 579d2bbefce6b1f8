"""Re-entrancy fuzzer: random scenarios in which every hook aiorun calls
may raise, stop the loop, cancel, signal the process, or call back into
aiorun's API, each run in a fresh child process (tests/fuzz_app.py).

Invariants, whatever the hooks do: no crash, no sanitizer report, no
hang, exactly one shutdown that runs to "Leaving. Bye!", every protected
job (shutdown_waits_for) started before the executor phase finished, the
executor waited for, and a loop run() created closed.  Which exception
run() re-raises is not an invariant, only that it came after the whole
shutdown.  Only a run() whose set-up failed (a hook raised before the
loop ran) may end without a shutdown; a KeyboardInterrupt or SystemExit
escaping the running loop starts it.

    pytest tests/test_fuzz_reentrancy.py                 # 40 examples, derandomized
    AIORUN_FUZZ_SEED=123 pytest tests/...                # another fixed draw
    AIORUN_FUZZ_EXAMPLES=5000 AIORUN_FUZZ_SEED=$RANDOM pytest tests/...   # soak
    python tests/test_fuzz_reentrancy.py '<json>'        # check one scenario
    python tests/fuzz_app.py '<json>'                    # just run it

A failure prints the (shrunk) scenario JSON to rerun it.  Under
`make sanitize` (PYTEST_ARGS=tests/test_fuzz_reentrancy.py scripts/sanitize)
the children inherit LD_PRELOAD and PYTHONPATH, so they run the
sanitizer build.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings, strategies as st  # noqa: E402

HERE = Path(__file__).resolve().parent
FUZZ_APP = HERE / "fuzz_app.py"

EXAMPLES = int(os.environ.get("AIORUN_FUZZ_EXAMPLES", "40"))
SEED = os.environ.get("AIORUN_FUZZ_SEED")
HANG_TIMEOUT = float(os.environ.get("AIORUN_FUZZ_TIMEOUT", "60"))

try:
    import uvloop  # noqa: F401
    HAVE_UVLOOP = True
except ImportError:
    HAVE_UVLOOP = False

ACTIONS = ["none", "raise", "kbi", "sysexit", "stop", "cancel_current", "cancel_main",
           "sigterm", "sigint", "waits_for", "event", "cancelled_by_shutdown", "rerun",
           "report_exc", "report_nonexc"]

# Each hook and the highest call number worth drawing for it: a little
# above how often a busy scenario calls it (fuzz_app prints FUZZ counts).
HOOKS = {
    "shutdown_handler": 1,
    "shutdown_callback": 2,
    "task_cancel": 6,
    "task_add_done_callback": 24,
    "task_remove_done_callback": 14,
    "eq": 10,
    "del": 3,
    "log_filter": 16,
    "log_handler": 16,
    "exc_handler": 4,
    "executor_shutdown": 2,
    "worker_cancelled": 3,
    "loop_call_soon": 45,    # FuzzLoop only
    "loop_stop": 7,          # FuzzLoop only
}
LOOP_HOOKS = {"loop_call_soon", "loop_stop"}

BAD_STDERR = ["Fatal Python error", "Segmentation fault", "SystemError",
              "returned a result with an exception set", "AddressSanitizer",
              "runtime error:", "LeakSanitizer", "UndefinedBehaviorSanitizer"]


@st.composite
def scenarios(draw):
    loops = ["own", "subclass"] + (["uvloop"] if HAVE_UVLOOP else [])
    loop = draw(st.sampled_from(loops))
    hooks = [h for h in HOOKS if loop == "subclass" or h not in LOOP_HOOKS]
    chosen = draw(st.lists(st.sampled_from(hooks), max_size=4, unique=True))
    plan = {}
    for h in chosen:
        pairs = draw(st.lists(st.tuples(st.integers(1, HOOKS[h]),
                                        st.sampled_from(ACTIONS[1:])),
                              min_size=1, max_size=2, unique_by=lambda p: p[0]))
        plan[h] = [list(p) for p in pairs]
    start = draw(st.sampled_from(["sigterm", "sigint", "stop", "error"]))
    jobs = draw(st.lists(st.tuples(st.sampled_from([0.05, 0.1, 0.2, 0.3]), st.booleans()),
                         max_size=3))
    return {
        "loop": loop,
        "start": start,
        "hooks": plan,
        "workers": draw(st.integers(0, 3)),
        "dels": draw(st.integers(0, 2)),
        "jobs": [list(j) for j in jobs],
        "eq": draw(st.booleans()),
        "ff_in_except": draw(st.booleans()),
        "drain_delay": draw(st.sampled_from([0, 0, 0.05, 0.2])),
        "cancel_main_first": draw(st.booleans()),
        "stop_on_unhandled_errors": start == "error" or draw(st.booleans()),
        "custom_handler": draw(st.booleans()),
        "callback": draw(st.sampled_from([None, "coro", "plain"])),
        "executor_kwonly": draw(st.booleans()),
        "timeout": 2.0,
    }


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Outcome:
    def __init__(self, scenario, returncode, stdout, stderr, hung, elapsed):
        self.scenario = scenario
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        self.hung = hung
        self.elapsed = elapsed

    def log(self, message):
        return [l for l in self.stderr if re.match(r"^[A-Z]+:aiorun:", l)
                and l.split(":", 2)[2] == message]

    def report(self):
        return (f"scenario: {json.dumps(self.scenario)}\n"
                f"rerun: python tests/test_fuzz_reentrancy.py "
                f"'{json.dumps(self.scenario)}'\n"
                f"returncode={self.returncode} hung={self.hung} "
                f"elapsed={self.elapsed:.2f}s\n"
                "--- stdout ---\n" + "\n".join(self.stdout) + "\n"
                "--- stderr ---\n" + "\n".join(self.stderr[-150:]))


def run_scenario(scenario, timeout=HANG_TIMEOUT):
    """Run one scenario in a child (same interpreter and environment) and
    return what it printed.  A child still alive after `timeout` is killed
    and counts as a hang."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PYTHONASYNCIODEBUG", None)
    env.pop("AIORUN_SHUTDOWN_DEADLINE", None)
    env.pop("AIORUN_EXIT_ON_REPEATED_SIGNAL", None)
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(FUZZ_APP), json.dumps(scenario)],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    stdout, stderr = [], []
    ready = threading.Event()

    def pump(stream, store, watch):
        for line in stream:
            line = line.rstrip("\n")
            store.append(line)
            if watch and line == "READY":
                ready.set()
        if watch:
            ready.set()   # end of output: never READY

    threads = [threading.Thread(target=pump, args=(proc.stdout, stdout, True), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, stderr, False), daemon=True)]
    for t in threads:
        t.start()
    hung = False
    if scenario["start"] in ("sigterm", "sigint"):
        ready.wait(timeout)
        if proc.poll() is None and "READY" in stdout:
            try:
                proc.send_signal(signal.SIGTERM if scenario["start"] == "sigterm"
                                 else signal.SIGINT)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=max(0.1, timeout - (time.monotonic() - t0)))
    except subprocess.TimeoutExpired:
        hung = True
        proc.kill()
        proc.wait()
    for t in threads:
        t.join(10)
    return Outcome(scenario, proc.returncode, stdout, stderr, hung,
                   time.monotonic() - t0)


def violations(o):
    """Every invariant the outcome breaks, as text (empty: all hold)."""
    bad = []
    if o.hung:
        bad.append(f"hang: the child did not exit within {HANG_TIMEOUT:.0f} s")
        return bad
    if o.returncode is not None and o.returncode < 0:
        bad.append(f"crash: killed by signal {-o.returncode}")
    elif o.returncode != 0:
        bad.append(f"exit code {o.returncode} (the child catches everything run() raises)")
    text = "\n".join(o.stderr)
    for marker in BAD_STDERR:
        if marker in text:
            bad.append(f"stderr has {marker!r}")
    out = o.stdout
    ends = [i for i, l in enumerate(out) if l == "FUZZ run-returned"
            or l.startswith("FUZZ run-raised ")]
    if len(ends) != 1:
        bad.append(f"run() ended {len(ends)} times (FUZZ run-returned/raised)")
        return bad
    end = ends[0]
    raised = out[end].split()[2] if out[end].startswith("FUZZ run-raised ") else None
    entering = len(o.log("Entering shutdown phase."))
    if entering == 0 and raised is not None and "FUZZ main-started" not in out:
        return bad    # run()'s set-up failed (a hook raised in it): no loop ran
    if entering != 1:
        bad.append(f"'Entering shutdown phase.' logged {entering} times, not once")
    if len(o.log("Leaving. Bye!")) != 1:
        bad.append("'Leaving. Bye!' not logged once: the shutdown did not finish")
    done_before = {l.split()[2] for l in out[:end] if l.startswith("FUZZ job-done ")}
    for l in out:
        if not l.startswith("FUZZ job-requested "):
            continue
        _, _, job, phase, why = l.split(" ", 4)
        refused = f"FUZZ job-refused {job}" in " ".join(out)
        # Not counted: never started; asked for after the final wait; or
        # asked for in run()'s set-up (a log hook on "Entering run()"),
        # before run() has made its loop, so on some other loop.
        if refused or phase in ("setup", "executor", "leaving", "after"):
            continue
        if job not in done_before:
            bad.append(f"protected job {job} (requested in phase {phase} by {why}) "
                       "not finished before run() ended")
    if "FUZZ executor-job-start" in out and "FUZZ executor-job-done" not in out[:end]:
        bad.append("the executor job was not finished before run() ended "
                   "(executor not waited for)")
    closed = [l for l in out if l.startswith("FUZZ loop-closed ")]
    if closed and closed[0].endswith(" own") and closed[0].split()[2] != "True":
        bad.append("the loop run() created is not closed after run()")
    if "FUZZ callback-start" in out:
        first = out.index("FUZZ callback-start")
        ended = [i for i, l in enumerate(out[first:end], first)
                 if l == "FUZZ callback-done" or l.startswith("FUZZ callback-raised ")]
        how = out[ended[0]].split()[-1] if ended else None
        # Cancelled by a hook of its own (cancel_current) is fine; cancelled by
        # the shutdown's cancelling, or closed (GeneratorExit) unfinished, is not.
        own_cancel = ended and any(l.startswith("FUZZ hook ") and " cancel_current " in l
                                   for l in out[first:ended[0]])
        if how is None or how == "GeneratorExit" or (how == "CancelledError"
                                                     and not own_cancel):
            bad.append("the shutdown_callback coroutine was abandoned half-way "
                       f"({how or 'never finished'} before run() ended)")
    own = bool(closed) and closed[0].endswith(" own")
    # asyncio's own shutdown_asyncgens() makes tasks (gather) of the app's
    # task class: one whose add_done_callback() raises breaks it inside
    # asyncio, and aiorun can only keep the error and go on.
    gens_skipped = any("shutdown_asyncgens()" in l for l in o.stderr) or any(
        l.startswith("FUZZ hook task_add_done_callback ")
        and l.split()[4] in ("raise", "kbi", "sysexit") for l in out)
    if own and "FUZZ agen-started" in out and "FUZZ agen-closed" not in out[:end] \
            and not gens_skipped:
        bad.append("an async generator was not closed by the shutdown "
                   "(shutdown_asyncgens cut short)")
    refused = [l for l in o.stderr if "refused to exit after" in l]
    if refused and o.elapsed < o.scenario.get("timeout", 2.0):
        bad.append(f"a wait ended early: {refused[0]!r} after {o.elapsed:.2f} s in all")
    late = any(l.startswith("FUZZ job-requested ") and l.split()[3] in
               ("setup", "executor", "leaving", "after") for l in out)
    # A Task subclass whose add_done_callback() raises keeps
    # loop.run_until_complete(loop.shutdown_asyncgens()) from starting its
    # task; nothing aiorun can wait for.
    destroyed = [o.stderr[i + 1] for i, l in enumerate(o.stderr[:-1])
                 if l.endswith("Task was destroyed but it is pending!")
                 and "shutdown_asyncgens()" not in o.stderr[i + 1]]
    if destroyed and not refused and not late:
        bad.append(f"a task was destroyed pending: the shutdown did not wait for it: "
                   f"{destroyed[0][:160]}")
    if any(l.startswith("FUZZ rerun-unexpected") for l in out):
        bad.append("run() inside the running loop did not raise RuntimeError")
    return bad


def check(scenario):
    o = run_scenario(scenario)
    bad = violations(o)
    return o, bad


def _settings():
    kw = dict(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck), print_blob=False)
    if SEED is None:
        kw["derandomize"] = True
    return settings(**kw)


@_settings()
@given(scenarios())
def test_reentrant_hooks_never_break_the_shutdown(scenario):
    note(f"scenario JSON: {json.dumps(scenario)}")
    o, bad = check(scenario)
    assert not bad, "invariants broken:\n  " + "\n  ".join(bad) + "\n" + o.report()


if SEED is not None:
    test_reentrant_hooks_never_break_the_shutdown = hypothesis.seed(int(SEED))(
        test_reentrant_hooks_never_break_the_shutdown)


if __name__ == "__main__":
    o, bad = check(json.loads(sys.argv[1]))
    print(o.report())
    print("invariants broken:" if bad else "all invariants hold")
    for b in bad:
        print("  " + b)
    sys.exit(1 if bad else 0)
