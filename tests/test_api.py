"""The public surface (SPEC 'Public surface') and how the module is built."""
import ast
import asyncio
import importlib.util
import inspect
import logging
import subprocess
import sys
import typing
import weakref
from pathlib import Path

import pytest

import aiorun
from aiorun import ShutdownCallback, __version__, run, shutdown_waits_for


def test_names():
    assert aiorun.__all__ == ["run", "shutdown_waits_for"]
    assert __version__ == "2025.1.1"
    assert aiorun.logger is logging.getLogger("aiorun")
    assert isinstance(aiorun._DO_NOT_CANCEL_COROS, weakref.WeakSet)
    assert aiorun.WINDOWS is (sys.platform == "win32")


def test_shutdown_callback_alias():
    expected = typing.Optional[typing.Union[
        typing.Awaitable,
        typing.Callable[[asyncio.AbstractEventLoop], typing.Awaitable],
        typing.Callable[[asyncio.AbstractEventLoop], None],
    ]]
    assert ShutdownCallback == expected


def test_logic_is_in_c():
    assert type(run).__name__ == "builtin_function_or_method"
    assert type(shutdown_waits_for).__name__ == "builtin_function_or_method"
    package = Path(aiorun.__file__).parent
    python_files = sorted(p.name for p in package.glob("*.py"))
    assert python_files == ["__init__.py", "__main__.py"]
    # Neither defines anything: imports, and __main__ hands sys.argv over.
    for name in python_files:
        tree = ast.parse((package / name).read_text())
        kinds = {type(node).__name__ for node in tree.body}
        assert kinds <= {"Expr", "Import", "ImportFrom"}, (name, kinds)


def test_signatures_are_introspectable():
    params = inspect.signature(run).parameters
    # The original's nine first, in their order; then ours, all keyword-only.
    assert list(params) == [
        "coro", "loop", "shutdown_handler", "shutdown_callback", "executor_workers",
        "executor", "use_uvloop", "stop_on_unhandled_errors", "timeout_task_shutdown",
        "shutdown_deadline", "exit_on_repeated_signal", "notify_ready_on_start",
        "drain_delay", "cancel_main_first", "task_dump_signal", "reap_orphans",
        "reload_callback", "deadline_covers_exit", "health", "liveness_timeout",
        "shutdown_report"]
    assert params["timeout_task_shutdown"].default == 60
    assert params["notify_ready_on_start"].default is True
    assert params["drain_delay"].default == 0
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items()
               if name != "coro")
    inspect.signature(run).bind(drain_delay=1, cancel_main_first=True)
    assert list(inspect.signature(shutdown_waits_for).parameters) == ["coro", "loop"]


def test_multi_phase_init_gives_a_fresh_module():
    spec = importlib.util.find_spec("aiorun._aiorun")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)
    assert fresh is not aiorun._aiorun
    assert fresh._DO_NOT_CANCEL_COROS is not aiorun._DO_NOT_CANCEL_COROS
    assert fresh.ShutdownWaiter is not aiorun._aiorun.ShutdownWaiter

    async def main():
        async def work():
            return "fresh"
        return await fresh.shutdown_waits_for(work())

    assert asyncio.run(main()) == "fresh"


def test_internal_types_cannot_be_instantiated():
    with pytest.raises(TypeError):
        aiorun._aiorun.ShutdownWaiter()


def test_import_does_not_warn():
    pytest.importorskip("uvloop")
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import aiorun, asyncio\n"
         "async def m():\n"
         "    asyncio.get_running_loop().stop()\n"
         "aiorun.run(m())\n"
         "aiorun.run(m(), use_uvloop=True)\n"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_no_event_loop_policy_is_installed():
    # aiorun in Python installs uvloop.EventLoopPolicy; policies are deprecated.
    pytest.importorskip("uvloop")
    out = subprocess.run(
        [sys.executable, "-c",
         "import asyncio, aiorun\n"
         "before = asyncio.get_event_loop_policy()\n"
         "async def m():\n"
         "    asyncio.get_running_loop().stop()\n"
         "aiorun.run(m(), use_uvloop=True)\n"
         "print(asyncio.get_event_loop_policy() is before)\n"],
        capture_output=True, text=True)
    assert out.stdout == "True\n", out.stderr
