"""Fault injection: fail the n-th memory allocation, for every n, inside a
scenario, and check the run ends in success or a Python exception; never
a crash, an assertion, a hang or a SystemError (a C-API misuse).

Runs under the debug interpreter (scripts/debug-python), whose assertions
catch C-API misuse.  The parent imports and warms everything, then forks one
child per n so each child starts from the same state; the n-th allocation
after failalloc_set() fails (only that one, as with _testcapi.set_nomemory),
and failalloc.c writes its C stack, and the stack of any crash, to the
child's log as it happens.  A child tells whether its
failure point was reached inside the scenario by allocating afterwards: if
a probe allocation fails, the scenario was shorter than n.  The sweep of a
scenario ends after a few n in a row were not reached.

    scripts/debug-python tests/reliability/nomemory.py [--step K] [--scenario NAME]
"""
import argparse, ctypes, faulthandler, functools, itertools, os, re, shutil, signal, subprocess, sys, sysconfig, tempfile, time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "leaks"))
import refleak  # noqa: E402  (the scenarios, and aiorun's logging kept quiet)
from aiorun import FORCED_EXIT_CODE  # noqa: E402

SCENARIOS = {
    # start-up, shutdown_waits_for, a signal, shutdown callback, executor
    "run_signal_shutdown": refleak.scenario_run_stop,
    # the stop_on_unhandled_errors path and a failing shutdown callback
    "unhandled_error": refleak.scenario_unhandled,
    # the watchdog thread, the helper thread and the stuck-task report
    "watchdog": refleak.scenario_watchdog,
    # shutdown_waits_for: awaited, cancelled, thrown into (3 rounds of each
    # cover the paths; 50 would only repeat them)
    "waiters": functools.partial(refleak.scenario_cancel_awaiter, rounds=3),
    # run() off the main thread and refused inside a running loop
    "thread_and_nested": refleak.scenario_thread_and_nested,
    # every argument error path
    "bad_arguments": refleak.scenario_bad_args,
    # systemd notifications: READY, watchdog pings, STOPPING, the phases
    "notify": refleak.scenario_notify,
    # python -m aiorun: a good command line and every usage error
    "cli": refleak.scenario_cli,
    # drain_delay, cancel_main_first, shutdown_event, messages, task dump,
    # the reaper timer, the result, a stuck main task
    "ordered": refleak.scenario_ordered,
    # the health endpoint: start, probes, a unix socket, refused addresses
    "health": refleak.scenario_health,
    # the shutdown report: summary, JSON, refused and protected tasks
    "report": refleak.scenario_report,
}
NOT_REACHED_TO_STOP = 5


def probe_reached(budget):
    """True if the failure point was passed inside the scenario: then none
    of `budget` more allocations (one per bytes(), none for the loop) fails.
    The sweep's n never runs ahead of the scenario by more than the budget.
    """
    try:
        for _ in itertools.repeat(None, budget):
            bytes(100)
    except MemoryError:   # also when the failure hit the probe's own set-up
        return False
    return True


def load_failalloc():
    """Builds failalloc.c for this interpreter (once, in a temporary
    directory) and loads it; PyDLL keeps the GIL held across its calls."""
    out = Path(tempfile.mkdtemp(prefix="failalloc-")) / "failalloc.so"
    cc = (sysconfig.get_config_var("CC") or "cc").split()
    subprocess.run([*cc, "-shared", "-fPIC", "-O1", "-g", "-Wall", "-Wextra", "-Werror",
                    "-I", sysconfig.get_paths()["include"],
                    str(Path(__file__).with_name("failalloc.c")), "-o", str(out)], check=True)
    lib = ctypes.PyDLL(str(out))
    lib.failalloc_set.argtypes = [ctypes.c_long, ctypes.c_int]
    shutil.rmtree(out.parent)             # the mapping stays
    return lib


FAILALLOC = load_failalloc()


def child(scenario, n, log_fd, hang_seconds, budget):
    """Never returns: a forked child that went back into the sweep's loop
    would fork children of its own."""
    status = 3                            # no RESULT line: a harness error
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        faulthandler.dump_traceback_later(hang_seconds, exit=True)
        outcome = "success"
        FAILALLOC.failalloc_set(n, 2)     # fails allocation number n only
        try:
            scenario()
        except BaseException as e:        # noqa: B902  whatever came out of it
            outcome = type(e).__name__
        reached = probe_reached(budget)
        FAILALLOC.failalloc_remove()
        faulthandler.cancel_dump_traceback_later()
        os.write(1, f"\nRESULT {outcome} {int(reached)}\n".encode())
        status = 0
    finally:
        os._exit(status)


def wait_nudging(children, nudge_seconds):
    """Waits for every child; one still running after nudge_seconds gets a
    SIGTERM, as a supervisor would send.  A main coroutine that died of the
    MemoryError leaves run() waiting for a signal, by design, so this is
    how such a run ends.  Returns {pid: (status, nudged)}."""
    started, done, nudged = time.monotonic(), {}, set()
    while len(done) < len(children):
        for pid in children:
            if pid in done:
                continue
            got, status = os.waitpid(pid, os.WNOHANG)
            if got:
                done[pid] = (status, pid in nudged)
            elif pid not in nudged and time.monotonic() - started > nudge_seconds:
                os.kill(pid, signal.SIGTERM)
                nudged.add(pid)
        time.sleep(0.002)
    return done


def classify(status, log, nudged):
    """(verdict, outcome, reached): verdict is 'ok' or what went wrong."""
    result = [line for line in log.splitlines() if line.startswith("RESULT ")]
    if nudged and os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGTERM:
        # Still waiting when the nudge came, and nothing handled it (an
        # asyncio.run() that lost a wake-up): a hang.
        return "hang (ended by the SIGTERM)", "-", True
    if os.WIFSIGNALED(status):
        return f"crash ({signal.Signals(os.WTERMSIG(status)).name})", "-", True
    if "Timeout (" in log:
        return "hang", "-", True
    if os.WEXITSTATUS(status) == FORCED_EXIT_CODE and "aiorun: " in log:
        # The watchdog's documented exit: a deadline passed, or a repeated
        # signal (the nudge) with exit_on_repeated_signal.
        return "ok", f"exit {FORCED_EXIT_CODE}", True
    if os.WEXITSTATUS(status) != 0 or not result:
        return f"exit {os.WEXITSTATUS(status)}", "-", True
    _, outcome, reached = result[-1].split()
    if "SystemError" in log or "Fatal Python error" in log:
        return "SystemError", outcome, True
    return "ok", outcome, reached == "1"


def first_owner(backtrace, skip_eval_frames=0):
    """'aiorun' if a frame of the extension comes before the first frame
    of the eval loop (walking outwards from the innermost, past the first
    skip_eval_frames of them), 'CPython' if the eval loop comes first, None
    if neither is there."""
    for line in backtrace.splitlines():
        if "src/aiorun/_aiorun/" in line:
            return "aiorun"
        if "_PyEval_EvalFrameDefault" in line:
            if skip_eval_frames == 0:
                return "CPython"
            skip_eval_frames -= 1
    return None


@functools.lru_cache(maxsize=None)
def is_position_dependent(path):
    """True for an ELF executable linked at a fixed address (ET_EXEC): its
    frames are looked up by address, those of everything else by offset."""
    with open(path, "rb") as f:
        return f.read(18)[16:18] == b"\x02\x00"


def object_file(name):
    """The file behind a frame's object name: dladdr() names the main
    program as it was started (no directory), shared objects by path."""
    if os.path.basename(name) == os.path.basename(sys.executable):
        return os.path.realpath(sys.executable)
    return name if os.path.exists(name) else None


def symbolize(text, header):
    """The stack written by failalloc.c after `header` in a child's log, as
    "#i function at file:line (object)" lines, inlined calls included, or
    "" if the log has none.  failalloc.c's own frames are left out."""
    _, found, rest = text.partition(f"\n{header}\n")
    if not found:
        return ""
    frames = [line.split()[1:] for line in rest.partition("@@END")[0].splitlines()
              if line.startswith("FRAME ") and "failalloc" not in line]
    where = {}   # (path, address) -> "function at file:line"
    by_file = {}
    for name, address, offset in frames:
        path = object_file(name)
        if path:
            by_file.setdefault(path, set()).add(
                (address, address if is_position_dependent(path) else offset))
    for path, addresses in by_file.items():
        addresses = sorted(addresses)
        # -a starts each address's answer with the address itself, so the
        # inlined frames (-i) of one address stay together.
        out = subprocess.run(["addr2line", "-a", "-f", "-i", "-C", "-e", path,
                              *(at for _, at in addresses)],
                             capture_output=True, text=True).stdout
        answers = re.split(r"^0x[0-9a-f]+\n", out, flags=re.M)[1:]
        for (address, _), answer in zip(addresses, answers):
            lines = answer.splitlines()
            where[path, address] = " inlined into ".join(
                f"{fn} at {loc}" for fn, loc in zip(lines[::2], lines[1::2]))
    return "\n".join(
        f"#{i} {where.get((object_file(name), address), '??')} ({os.path.basename(name)})"
        for i, (name, address, _) in enumerate(frames))


def python_function_lost_its_error(crash):
    """True when the crash is the debug build's check that a call returned
    NULL with no exception set, and the callable was a Python function (a
    bound method or a function object): only the interpreter can make one
    do that, whoever called it (the frame.c take_ownership bug)."""
    lines = crash.splitlines()
    for i, line in enumerate(lines):
        if " _Py_CheckFunctionResult " in line:
            callers = [l for l in lines[i + 1:] if " _PyObject_VectorcallTstate " not in l]
            return bool(callers) and any(f" {name} " in callers[0] for name in
                                         ("method_vectorcall", "_PyFunction_Vectorcall"))
    return False


def explain(log_path):
    """Appends the C stacks of the failed allocation and of the crash (both
    as they happened, written by failalloc.c) to the log, and says whose
    code mishandled the failure: the extension's, or the interpreter's own
    (a failure while running Python code, as in enum.py or asyncio)."""
    text = Path(log_path).read_text(errors="replace")
    allocation = symbolize(text, "@@FAILED-ALLOCATION")
    crash = symbolize(text, "@@CRASH")
    with open(log_path, "a") as log:
        log.write(f"\n--- the failed allocation\n{allocation}\n--- the crash\n{crash}\n")
    culprit = re.search(r"SystemError: <(\S+) [^\n]*?> returned", text)
    if culprit:
        # The function that broke the C-API contract is named: a Python
        # function is the eval loop losing its exception; a built-in one
        # is counted as ours, to be looked at.
        return "CPython" if culprit.group(1) == "function" else "aiorun"
    if python_function_lost_its_error(crash):
        return "CPython"
    if crash:
        # The crash's stack decides.  A frame entered with an exception
        # already set (ceval.c's entry assertion) is the caller's fault:
        # look past that frame.
        entered_with_error = "!_PyErr_Occurred(tstate)" in text and "ceval.c:1741" in text
        return first_owner(crash, skip_eval_frames=int(entered_with_error)) or "unexplained"
    # A hang: whose code the failure hit.  Ours if the extension was
    # running when the allocation failed (it got the MemoryError first).
    return first_owner(allocation) or "unexplained"


def sweep(name, scenario, step, start, stop, jobs, hang_seconds, nudge_seconds, keep,
          explaining):
    scenario()                       # warm: imports, caches, thread pools
    scenario()
    outcomes, failures, cpython = Counter(), [], []
    n, not_reached, tried, last_reached = start, 0, 0, 0
    budget = 20 * step * jobs + 20_000
    t0 = time.monotonic()
    while not_reached < NOT_REACHED_TO_STOP and (stop is None or n <= stop):
        batch = {}
        for _ in range(jobs):
            log_fd, log_path = tempfile.mkstemp(prefix=f"nomem-{name}-{n}-", suffix=".log")
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                child(scenario, n, log_fd, hang_seconds, budget)
            os.close(log_fd)
            batch[pid] = (n, log_path)
            n += step
        statuses = wait_nudging(batch, nudge_seconds)
        for pid, (at, log_path) in sorted(batch.items(), key=lambda kv: kv[1][0]):
            status, nudged = statuses[pid]
            log = Path(log_path).read_text(errors="replace")
            verdict, outcome, reached = classify(status, log, nudged)
            if nudged and verdict == "ok":
                outcome += " after SIGTERM"
            if verdict != "ok":
                owner = explain(log_path) if explaining else "-"
                if owner == "CPython":
                    cpython.append((at, verdict, log_path))
                else:
                    failures.append((at, verdict, log_path))
                said = [line for line in log.splitlines()
                        if line.strip() and not line.startswith(("@@", "FRAME "))]
                first = said[0][:100] if said else ""
                print(f"  n={at}: {verdict} in {owner} code: {first}\n    log: {log_path}",
                      flush=True)
            elif not keep:
                os.unlink(log_path)
            if reached:
                tried += 1
                last_reached = max(last_reached, at)
                outcomes[outcome] += 1
                not_reached = 0
            else:
                not_reached += 1
    seconds = time.monotonic() - t0
    summary = ", ".join(f"{k} {v}" for k, v in outcomes.most_common())
    print(f"{name:20s} failure points tried {tried} (n = {start}..{last_reached} step {step}) "
          f"in {seconds:.0f} s: {summary}; failures {len(failures)}, "
          f"in CPython's own code {len(cpython)}", flush=True)
    return tried, failures, cpython


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS))
    ap.add_argument("--step", type=int, default=1, help="try every STEP-th n (default 1)")
    ap.add_argument("--start", type=int, default=1)
    ap.add_argument("--stop", type=int, help="the last n to try (default: the end)")
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--nudge-seconds", type=float, default=1,
                    help="send SIGTERM to a child still running after this long")
    ap.add_argument("--hang-seconds", type=float, default=20,
                    help="a child still running after this long is a hang")
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--no-explain", action="store_true",
                    help="do not read the failures' C stacks to find whose code it was")
    ap.add_argument("--only", type=int, metavar="N",
                    help="fail allocation N of the one --scenario, in the foreground")
    args = ap.parse_args()
    if args.only:
        scenario = SCENARIOS[args.scenario[0]]
        scenario()
        scenario()
        child(scenario, args.only, os.dup(1), args.hang_seconds, 20_000)
    names = args.scenario or list(SCENARIOS)
    if len(names) > 1:
        # One process per scenario: `--scenario NAME --start n --stop n`
        # then fails the same allocation as the whole run did.
        failed = 0
        for name in names:
            argv = [sys.executable, __file__, "--scenario", name, "--step", str(args.step),
                    "--start", str(args.start), "--jobs", str(args.jobs),
                    "--nudge-seconds", str(args.nudge_seconds),
                    "--hang-seconds", str(args.hang_seconds)]
            argv += ["--stop", str(args.stop)] if args.stop else []
            argv += ["--keep-logs"] if args.keep_logs else []
            argv += ["--no-explain"] if args.no_explain else []
            failed += subprocess.run(argv).returncode != 0
        sys.exit(1 if failed else 0)
    tried, failures, theirs = sweep(
        names[0], SCENARIOS[names[0]], args.step, args.start, args.stop, args.jobs,
        args.hang_seconds, args.nudge_seconds, args.keep_logs, not args.no_explain)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
