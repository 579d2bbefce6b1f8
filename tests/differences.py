"""Every accepted difference from aiorun 2025.1.1, by name and reason, in one
place.  The names are the bold leads of the list on the documentation's
"What differs from aiorun 2025.1.1" page (docs/differences.md), one to one
(tests/test_docs_contract.py checks both ways);
tests/test_differential_scenarios.py runs the same scenarios under both
packages and allows a transcript to differ only under one of these names,
and then requires that it does differ, so no entry outlives its behaviour.
"""

ACCEPTED = {
    "Signals are taken over at once, through the `signal` module.":
        "a signal during start-up is not lost, and a storm of signals cannot run "
        "shutdown_handler twice or raise 'Signal 2 ignored due to race condition'",
    "The previous handlers are back":
        "the original leaves SIGINT and SIGTERM ignored after a signal's shutdown, "
        "and bound to the closed loop after loop.stop() (a Ctrl-C then raises "
        "RuntimeError: Event loop is closed)",
    "The main task's exception reaches the exception handler immediately":
        "the original relied on garbage collection to report it",
    "A signal always wakes the loop.":
        "a signal that lands just before the loop sleeps, or in another thread, "
        "must not wait for the next event",
    "Inside a running loop":
        "the original fails half-way: it makes a loop and an executor, then "
        "'Cannot run the event loop while another loop is running' and 'Task was "
        "destroyed but it is pending!'",
    "Off the main thread":
        "the original raises ValueError from signal.signal(); a loop in a thread is "
        "a real use (tests, embedded services)",
    "`run()` returns the main coroutine's return value":
        "asyncio.run() does; code that ignored the None is unaffected",
    "The shutdown runs to its end, whatever user code does in it.":
        "a stop() or an error in one phase must not skip the executor, the "
        "protected work or the loop's close",
    "A `SystemExit` (or any `BaseException` that is not an `Exception`) escaping the "
    "loop starts the shutdown":
        "sys.exit() in a task should still shut down gracefully, not leave the loop "
        "open and the executor running",
    "The main task's `KeyboardInterrupt` is not logged a second time.":
        "run() has handled it ('Got KeyboardInterrupt'); asyncio's 'Task exception "
        "was never retrieved' at collection is noise",
    "Cancelled tasks are told why.":
        "a task can tell the shutdown's cancel from any other "
        "(aiorun.cancelled_by_shutdown)",
    "No event-loop policy is ever installed.":
        "policies are deprecated from 3.14; no deprecation warning on any Python",
    "Bad arguments fail fast":
        "the original accepted anything truthy and failed later, sometimes only "
        "at shutdown",
    "Argument errors read as Python's own":
        "3.13's 'Did you mean' hint for a misspelt keyword is not given",
    "Tasks stuck at shutdown are listed like a traceback":
        "the original's one-line repr does not say where the task is stuck",
    "The collector is paused while the tasks drain":
        "with many tasks the collector took over half of the shutdown",
    "The shutdown frees what the tasks held before `run()` returns.":
        "objects such as stream writers are finalized while the loop is open, "
        "not after it closed",
    "A protected coroutine that fails after its awaiter stopped waiting":
        "asyncio's 'Task exception was never retrieved' stopped the whole app "
        "under stop_on_unhandled_errors",
    "What `shutdown_waits_for()` returns is a C object, not a Python coroutine.":
        "all of the logic is C; the names and reprs are the original's",
    "A task awaiting `shutdown_waits_for()` waits on the protected task itself":
        "no helper coroutine and future per call",
    "The error that stopped the loop is the one `run()` raises.":
        "the original's handler kept the latest report, so a report without an "
        "exception (aiohttp's 'Unclosed client session') made a crashed service "
        "exit 0, and Restart=on-failure never restarted it",
    "Work that protected work starts is protected with it.":
        "the original cancelled the tasks a protected coroutine started for its own "
        "work, so the work it protected failed with CancelledError",
    "Every shutdown ends with one INFO summary line":
        "what the shutdown did (cause, time taken, tasks cancelled and refused, "
        "protected work, threads left) in one line a log search finds; it comes "
        "after the original's last line, so its sequence is unchanged",
    "A DEBUG line per cancelled task":
        "the old documentation's transcript shows 'Cancelling task: ...', which 2025.1.1 dropped; "
        "at DEBUG it does not flood a service's log",
}
