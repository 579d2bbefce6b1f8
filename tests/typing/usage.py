"""Every public name used with full annotations: `mypy --strict` must accept it
(checked by tests/test_typing.py; this file is not run)."""
import asyncio
from concurrent.futures import ThreadPoolExecutor
import socket
from typing import Dict, List, Optional

import aiorun
from aiorun import ShutdownCallback, run, shutdown_waits_for


async def work() -> int:
    await asyncio.sleep(0)
    return 1


async def main() -> None:
    value: int = await shutdown_waits_for(work())
    task: "asyncio.Task[int]" = asyncio.get_running_loop().create_task(
        shutdown_waits_for(work()))
    future: "asyncio.Future[int]" = asyncio.ensure_future(shutdown_waits_for(work()))
    print(value, await task, await future)
    asyncio.get_running_loop().stop()


def stop(loop: asyncio.AbstractEventLoop) -> None:
    loop.stop()


async def cleanup(loop: asyncio.AbstractEventLoop) -> None:
    await asyncio.sleep(0)


callbacks: List[ShutdownCallback] = [None, cleanup, stop, cleanup(asyncio.new_event_loop())]
names: List[str] = aiorun.__all__
version: str = aiorun.__version__
aiorun.logger.info("typed")
protected: bool = main() in aiorun._DO_NOT_CANCEL_COROS

run(main(), shutdown_handler=stop, shutdown_callback=cleanup, executor_workers=2,
    executor=ThreadPoolExecutor(), use_uvloop=False, stop_on_unhandled_errors=True,
    timeout_task_shutdown=1.5)
run(loop=asyncio.new_event_loop(), timeout_task_shutdown=None)
run(main(), shutdown_deadline=25, exit_on_repeated_signal=True)
run(main(), shutdown_deadline=None, exit_on_repeated_signal=None)
forced: int = aiorun.FORCED_EXIT_CODE
run(main(), notify_ready_on_start=False)
sent: bool = aiorun.notify_ready("serving") or aiorun.notify_ready(None)


async def answer() -> int:
    event: asyncio.Event = aiorun.shutdown_event()
    await event.wait()
    return 42


result: Optional[int] = run(answer(), drain_delay=5, cancel_main_first=True,
                             task_dump_signal=True, reap_orphans=None)
run(main(), drain_delay=None, task_dump_signal=10, reap_orphans=False)
told: bool = aiorun.cancelled_by_shutdown(asyncio.CancelledError("x"))
same: asyncio.Event = aiorun.shutdown_event(asyncio.new_event_loop())
passed_fds: Dict[str, List[int]] = aiorun.listen_fds()
passed_socks: Dict[str, List[socket.socket]] = aiorun.listen_sockets()
kept: bool = aiorun.store_fd(passed_socks["web"][0], "web") and aiorun.store_fd(3, "x", poll=False)
dropped: bool = aiorun.remove_stored_fd("web")
