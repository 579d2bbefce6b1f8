"""Hostile input (property-based): run() and shutdown_waits_for() called
with arbitrary values for every parameter either work or raise a clear
TypeError/ValueError naming the parameter, and the process is left able to
run() again: signal handlers restored, no event loop left set.

In-process on purpose: a crash, a leak of handlers or a loop left behind
would show here, in this very interpreter."""
import asyncio
import math
import os
import signal
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, Phase, given, settings, strategies as st

from aiorun import run, shutdown_waits_for

PARAMS = ["coro", "loop", "shutdown_handler", "shutdown_callback", "executor_workers",
          "executor", "use_uvloop", "stop_on_unhandled_errors", "timeout_task_shutdown",
          "shutdown_deadline", "exit_on_repeated_signal", "drain_delay",
          "cancel_main_first", "task_dump_signal", "reap_orphans", "reload_callback",
          "deadline_covers_exit", "health", "liveness_timeout", "shutdown_report"]

# The one message aiorun 2025.1.1 words without a parameter name (kept).
EXCLUSIVE = "'loop' and 'use_uvloop' parameters are mutually exclusive"


class Weird:
    """Hostile duck: every dunder a checker might try raises."""
    def __bool__(self):
        raise RuntimeError("bool")

    def __index__(self):
        raise RuntimeError("index")

    def __float__(self):
        raise RuntimeError("float")

    def __await__(self):
        raise RuntimeError("await")


junk = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
    st.binary(max_size=5), st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
    st.builds(object), st.builds(Weird), st.just(print), st.just(signal.SIG_IGN),
)


async def stopper():
    asyncio.get_running_loop().stop()


# Stands for a fresh stopper() coroutine, made inside the test: one made by
# the strategy is never closed when hypothesis discards the example.
A_STOPPER = object()

# Per parameter: values that work (kept cheap and self-ending) or junk.
VALID = {
    "coro": st.just(A_STOPPER),
    "loop": st.builds(asyncio.new_event_loop),
    "shutdown_handler": st.just(lambda loop: loop.stop()),
    "shutdown_callback": st.sampled_from([lambda loop: None, None]),
    "executor_workers": st.integers(1, 4),
    "executor": st.builds(ThreadPoolExecutor, st.just(1)),
    "use_uvloop": st.booleans(),
    "stop_on_unhandled_errors": st.booleans(),
    "timeout_task_shutdown": st.one_of(st.none(), st.floats(0, 1), st.integers(0, 1)),
    "shutdown_deadline": st.one_of(st.none(), st.floats(5, 60)),
    "exit_on_repeated_signal": st.one_of(st.none(), st.booleans()),
    "drain_delay": st.one_of(st.none(), st.floats(0, 0.05)),
    "cancel_main_first": st.booleans(),
    "task_dump_signal": st.sampled_from([None, False, True, signal.SIGUSR2]),
    "reap_orphans": st.one_of(st.none(), st.booleans()),
    "reload_callback": st.sampled_from([None, lambda: None]),
    "deadline_covers_exit": st.one_of(st.none(), st.booleans()),
    "health": st.sampled_from([None, "127.0.0.1:0", 0]),
    "liveness_timeout": st.one_of(st.none(), st.floats(0.05, 60)),
    "shutdown_report": st.sampled_from([None, os.path.join(tempfile.gettempdir(), f"aiorun-hostile-{os.getpid()}.json")]),
}
# A Weird coroutine is a valid awaitable whose main task fails: the loop
# then rightly runs on forever, so it is kept out of "coro".
JUNK = {p: junk for p in PARAMS}
JUNK["coro"] = junk.filter(lambda v: not isinstance(v, Weird))
# Any number > 0 is a valid deadline, and a tiny one (4e-23 s was drawn)
# rightly ends the process with exit 124: junk deadlines stay out of that
# range, as the valid ones do (5..60 s).
JUNK["shutdown_deadline"] = junk.filter(
    lambda v: not (type(v) in (int, float) and 0 < v < 5))
arguments = st.fixed_dictionaries(
    {}, optional={p: st.one_of(VALID[p], JUNK[p]) for p in PARAMS})


try:
    import uvloop  # noqa: F401
    UVLOOP = True
except ImportError:
    UVLOOP = False


def handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


def current_loop():
    # The loop set for this thread, read without creating one (the policy
    # API is deprecated from 3.14 on, but it is where that loop lives).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return asyncio.get_event_loop_policy()._local._loop


@settings(max_examples=300, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.too_slow])
@given(arguments)
def test_run_with_arbitrary_arguments(kwargs):
    # Without a coroutine that stops it, a valid call would run forever
    # (coro=None included: that is run() waiting for a signal).
    if kwargs.get("coro", A_STOPPER) in (None, A_STOPPER):
        kwargs["coro"] = stopper()
    if not asyncio.iscoroutine(kwargs["coro"]):
        kwargs["shutdown_callback"] = None
    before = handlers(), current_loop()
    try:
        run(**kwargs)
    except (TypeError, ValueError) as e:
        assert any(f"'{p}'" in str(e) or p in str(e) for p in PARAMS), repr(e)
    except RuntimeError as e:
        # A Weird shutdown_callback is awaited, as asked: its own error
        # comes out (as does any callable's; print is the only one here).
        assert str(e) in {"await", "bool", "index", "float"}, repr(e)
    except ImportError:
        # use_uvloop where uvloop cannot be imported: the documented error.
        assert kwargs.get("use_uvloop") and not UVLOOP
    except Exception as e:
        assert type(e) is Exception and str(e).startswith(EXCLUSIVE), repr(e)
    finally:
        for value in kwargs.values():
            if asyncio.iscoroutine(value):
                value.close()
            elif isinstance(value, asyncio.AbstractEventLoop):
                value.close()
            elif isinstance(value, ThreadPoolExecutor):
                value.shutdown()
    assert (handlers(), current_loop()) == before


@settings(max_examples=200, deadline=None, phases=[Phase.explicit, Phase.generate])
@given(junk)
def test_shutdown_waits_for_with_arbitrary_values(value):
    async def main():
        try:
            waiter = shutdown_waits_for(value)
        except TypeError as e:
            assert "awaitable" in str(e), repr(e)
            return
        # Accepted as awaitable: awaiting it raises what awaiting it raises.
        with pytest.raises(RuntimeError, match="await"):
            await waiter

    asyncio.run(main())


def test_run_still_works_afterwards():
    before = handlers()
    run(stopper())
    assert handlers() == before
    assert current_loop() is None or not current_loop().is_running()
