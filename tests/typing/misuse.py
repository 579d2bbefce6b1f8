"""Each marked line must be rejected by mypy (tests/test_typing.py)."""
import asyncio
from typing import Dict

import aiorun
from aiorun import run, shutdown_waits_for

run(5)  # E: coro
run(None, loop=3)  # E: loop
run(timeout_task_shutdown="60")  # E: timeout
run(shutdown_deadline="25")  # E: deadline
run(exit_on_repeated_signal="yes")  # E: repeated signal
shutdown_waits_for(42)  # E: waits_for


async def typed() -> int:
    return 1


async def main() -> None:
    s: str = await shutdown_waits_for(typed())  # E: result type
    print(s)
    asyncio.get_running_loop().stop()
aiorun.notify_ready(5)  # E: status is a str
run(notify_ready_on_start="no")  # E: ready flag
run(drain_delay="5")  # E: drain delay
run(task_dump_signal="SIGUSR1")  # E: dump signal
returned: str = run(typed())  # E: result type of run
aiorun.cancelled_by_shutdown("x")  # E: not an exception
aiorun.store_fd(3, 4)  # E: the name is a str
aiorun.store_fd("3", "x")  # E: an fd, not a str
aiorun.store_fd(3, "x", False)  # E: poll is keyword-only
aiorun.remove_stored_fd(None)  # E: the name is a str
sockets: Dict[str, int] = aiorun.listen_sockets()  # E: lists of sockets
