"""Bad input to run(): a clear exception naming the parameter, raised before
anything runs, with signal handlers and the event loop left as they were.
These run in-process on purpose: they must leave *this* process intact."""
import asyncio
import inspect
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from aiorun import run, shutdown_waits_for
from conftest import run_app


def handlers():
    return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)


@pytest.fixture(autouse=True)
def handlers_untouched():
    before = handlers()
    yield
    assert handlers() == before


async def never():
    pass  # pragma: no cover


BAD_TYPES = [
    ("coro", {"coro": 5}, "must be a coroutine or awaitable, not int"),
    ("coro", {"coro": never}, "must be a coroutine or awaitable, not function"),
    ("loop", {"loop": "loop"}, "must be an asyncio event loop or None, not str"),
    ("shutdown_handler", {"shutdown_handler": 1}, "must be callable or None, not int"),
    ("shutdown_callback", {"shutdown_callback": 3.5},
     "must be an awaitable, a callable taking the loop, or None, not float"),
    ("executor_workers", {"executor_workers": "4"}, "must be int or None, not str"),
    ("executor_workers", {"executor_workers": 2.0}, "must be int or None, not float"),
    ("executor_workers", {"executor_workers": True}, "must be int or None, not bool"),
    ("executor", {"executor": object()},
     "must be a concurrent.futures.Executor or None, not object"),
    ("use_uvloop", {"use_uvloop": "yes"}, "must be bool, not str"),
    ("use_uvloop", {"use_uvloop": None}, "must be bool, not NoneType"),
    ("stop_on_unhandled_errors", {"stop_on_unhandled_errors": []},
     "must be bool, not list"),
    ("timeout_task_shutdown", {"timeout_task_shutdown": "60"},
     "must be a number of seconds or None, not str"),
    ("timeout_task_shutdown", {"timeout_task_shutdown": False},
     "must be a number of seconds or None, not bool"),
    ("drain_delay", {"drain_delay": "5"}, "must be a number of seconds or None, not str"),
    ("cancel_main_first", {"cancel_main_first": "yes"}, "must be bool, not str"),
    ("task_dump_signal", {"task_dump_signal": "SIGUSR1"},
     "must be a signal number, True or None, not str"),
    ("task_dump_signal", {"task_dump_signal": 10.0},
     "must be a signal number, True or None, not float"),
    ("reap_orphans", {"reap_orphans": "1"}, "must be bool, not str"),
]


@pytest.mark.parametrize("param,kwargs,message", BAD_TYPES,
                         ids=[f"{p}-{type(k[p]).__name__}" for p, k, _ in BAD_TYPES])
def test_wrong_types_raise_type_error_naming_the_parameter(param, kwargs, message):
    coro = kwargs.pop("coro", None)
    with pytest.raises(TypeError) as info:
        run(coro, **kwargs)
    assert str(info.value) == f"run() argument '{param}' {message}"


@pytest.mark.parametrize("kwargs,message", [
    ({"executor_workers": 0}, "'executor_workers' must be greater than 0"),
    ({"executor_workers": -3}, "'executor_workers' must be greater than 0"),
    # Found by the hostile-input test: beyond a C long it was an OverflowError.
    ({"executor_workers": -2**70}, "'executor_workers' must be greater than 0"),
    ({"timeout_task_shutdown": -1}, "'timeout_task_shutdown' must be >= 0"),
    ({"timeout_task_shutdown": float("nan")}, "'timeout_task_shutdown' must be >= 0"),
    ({"drain_delay": -0.5}, "'drain_delay' must be >= 0"),
    ({"task_dump_signal": 0}, "'task_dump_signal' must be a signal number from 1 to"),
    ({"task_dump_signal": 2**70}, "'task_dump_signal' must be a signal number from 1 to"),
    ({"task_dump_signal": signal.SIGTERM}, "'task_dump_signal' cannot be 15: run\\(\\) stops"),
    ({"task_dump_signal": signal.SIGINT}, "'task_dump_signal' cannot be 2"),
    ({"task_dump_signal": signal.SIGKILL}, "'task_dump_signal' cannot be 9"),
])
def test_bad_values_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        run(**kwargs)


@pytest.mark.parametrize("call, message", [
    (lambda: run(bogus=1), "run() got an unexpected keyword argument 'bogus'"),
    (lambda: run(None, None), "run() takes from 0 to 1 positional arguments but 2 were given"),
    (lambda: run(None, coro=None), "run() got multiple values for argument 'coro'"),
    (lambda: run(None, None, loop=None), "run() takes from 0 to 1 positional arguments "
     "but 2 positional arguments (and 1 keyword-only argument) were given"),
    (lambda: run(None, None, bogus=1), "run() got an unexpected keyword argument 'bogus'"),
    (lambda: run(**{"coro": None, "timeout": 1}),
     "run() got an unexpected keyword argument 'timeout'"),
    (lambda: shutdown_waits_for(), "shutdown_waits_for() missing 1 required positional "
                                   "argument: 'coro'"),
    (lambda: shutdown_waits_for(None, None, None),
     "shutdown_waits_for() takes from 1 to 2 positional arguments but 3 were given"),
    (lambda: shutdown_waits_for(coro=None, bogus=1),
     "shutdown_waits_for() got an unexpected keyword argument 'bogus'"),
    (lambda: shutdown_waits_for(None, coro=None),
     "shutdown_waits_for() got multiple values for argument 'coro'"),
])
def test_call_errors_are_worded_as_for_a_python_function(call, message):
    # The original is a Python function: users' tests match its wording.
    with pytest.raises(TypeError) as info:
        call()
    assert str(info.value) == message


def test_loop_and_use_uvloop_are_mutually_exclusive():
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(Exception, match="mutually exclusive"):
            run(loop=loop, use_uvloop=True)
        assert not loop.is_closed()
    finally:
        loop.close()


def test_custom_handler_with_stop_on_unhandled_errors_is_refused():
    loop = asyncio.new_event_loop()
    handler = lambda loop, context: None  # noqa: E731
    loop.set_exception_handler(handler)
    try:
        with pytest.raises(Exception, match="parameter is unavailable"):
            run(loop=loop, stop_on_unhandled_errors=True)
        assert loop.get_exception_handler() is handler
        assert not loop.is_closed()
    finally:
        loop.close()


def test_executor_of_wrong_kind_for_the_loop_leaves_nothing_behind():
    # A failure after run() made its loop: the loop is closed again and not
    # left as the current loop.
    class NotAThreadPool(ThreadPoolExecutor):
        pass

    class Odd(asyncio.SelectorEventLoop):
        def set_default_executor(self, executor):
            raise RuntimeError("refused")

    loop = Odd()
    try:
        with pytest.raises(RuntimeError, match="refused"):
            run(loop=loop, executor=NotAThreadPool())
        assert not loop.is_closed()  # supplied: its owner closes it
    finally:
        loop.close()


def test_accepted_forms():
    # ints for flags, an int timeout, None timeout; the loop stops itself.
    async def main():
        asyncio.get_running_loop().stop()

    run(main(), use_uvloop=0, stop_on_unhandled_errors=1, timeout_task_shutdown=None)
    run(main(), executor_workers=1, timeout_task_shutdown=0)
    # None and False switch the new options off; a Signals member is a number.
    run(main(), drain_delay=None, cancel_main_first=0, task_dump_signal=False,
        reap_orphans=False)
    run(main(), drain_delay=0.01, cancel_main_first=True,
        task_dump_signal=signal.SIGUSR2, reap_orphans=None)
    assert signal.getsignal(signal.SIGUSR2) is signal.SIG_DFL


def test_a_worker_count_beyond_a_c_long_is_still_a_count():
    # Too many workers is the executor's business, as in aiorun: its threads
    # start only when needed.
    async def main():
        say_done.append(await asyncio.get_running_loop().run_in_executor(None, int, "7"))
        asyncio.get_running_loop().stop()
    say_done = []
    run(main(), executor_workers=2**70)
    assert say_done == [7]


@pytest.mark.parametrize("kwargs", [{"executor_workers": "x"}, {"use_uvloop": "yes"},
                                    {"timeout_task_shutdown": -1}, "loop_and_uvloop"])
def test_a_refused_coroutine_is_closed_as_asyncio_run_does(kwargs):
    if kwargs == "loop_and_uvloop":
        loop = asyncio.new_event_loop()
        kwargs = {"loop": loop, "use_uvloop": True}
        try:
            return check_closed_after_refusal(kwargs, Exception)
        finally:
            loop.close()
    check_closed_after_refusal(kwargs, (TypeError, ValueError))


def check_closed_after_refusal(kwargs, error):
    # The user sees the error only, not also "coroutine 'main' was never
    # awaited" when the coroutine is collected.
    async def main():
        pass
    coro = main()
    with pytest.raises(error):
        run(coro, **kwargs)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the loop refuses it from 3.11")
def test_an_executor_the_loop_refuses_fails_before_anything_is_created(app):
    r = run_app(app, """
        import concurrent.futures, gc
        async def main():
            say("main ran")
        with concurrent.futures.ProcessPoolExecutor(1) as pool:
            try:
                run(main(), executor=pool)
            except TypeError as e:
                say("TypeError:", e)
        gc.collect()
        say("end")
    """)
    assert r.returncode == 0, r
    assert r.stdout == ["TypeError: executor must be ThreadPoolExecutor instance", "end"], r
    assert "Task was destroyed" not in r.stderr_text, r
    assert "never awaited" not in r.stderr_text, r
