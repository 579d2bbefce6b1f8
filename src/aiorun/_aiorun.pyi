import asyncio
import os
import logging
import socket
from concurrent.futures import Executor
from typing import (Any, Awaitable, Callable, Coroutine, Dict, Generator, List, Optional,
                    TypeVar, Union)
from weakref import WeakSet

from _typeshed import FileDescriptorLike

_T = TypeVar("_T")

ShutdownCallback = Optional[
    Union[
        Awaitable[Any],
        Callable[[asyncio.AbstractEventLoop], Awaitable[Any]],
        Callable[[asyncio.AbstractEventLoop], None],
    ]
]

__all__: List[str]
__version__: str
logger: logging.Logger
WINDOWS: bool
FORCED_EXIT_CODE: int
_DO_NOT_CANCEL_COROS: WeakSet[Coroutine[Any, Any, Any]]

class ShutdownWaiter(Coroutine[Any, None, _T]):
    """What shutdown_waits_for() returns: await it, or pass it to create_task()."""
    @property
    def task(self) -> "asyncio.Future[_T]": ...
    def send(self, value: None, /) -> Any: ...
    def throw(self, typ: Any, val: Any = ..., tb: Any = ..., /) -> Any: ...
    def close(self) -> None: ...
    def __await__(self) -> Generator[Any, None, _T]: ...

def run(
    coro: Optional[Awaitable[_T]] = None,
    *,
    loop: Optional[asyncio.AbstractEventLoop] = None,
    shutdown_handler: Optional[Callable[[asyncio.AbstractEventLoop], None]] = None,
    shutdown_callback: ShutdownCallback = None,
    executor_workers: Optional[int] = None,
    executor: Optional[Executor] = None,
    use_uvloop: bool = False,
    stop_on_unhandled_errors: bool = False,
    timeout_task_shutdown: Optional[float] = 60,
    shutdown_deadline: Optional[float] = None,
    exit_on_repeated_signal: Optional[bool] = None,
    notify_ready_on_start: bool = True,
    drain_delay: Optional[float] = 0,
    cancel_main_first: bool = False,
    task_dump_signal: Union[int, bool, None] = None,
    reap_orphans: Optional[bool] = None,
    reload_callback: Optional[Callable[[], Optional[Awaitable[Any]]]] = None,
    deadline_covers_exit: Optional[bool] = None,
    health: Union[str, int, os.PathLike[str], None] = None,
    liveness_timeout: Optional[float] = None,
    shutdown_report: Union[str, os.PathLike[str], None] = None,
) -> Optional[_T]: ...

def shutdown_event(loop: Optional[asyncio.AbstractEventLoop] = None) -> asyncio.Event: ...

def cancelled_by_shutdown(exc: BaseException) -> bool: ...

def notify_ready(status: Optional[str] = None) -> bool: ...

def listen_fds() -> Dict[str, List[int]]: ...

def listen_sockets() -> Dict[str, List[socket.socket]]: ...

def store_fd(fd: FileDescriptorLike, name: str, *, poll: bool = True) -> bool: ...

def remove_stored_fd(name: str) -> bool: ...

def shutdown_waits_for(
    coro: Awaitable[_T], loop: Optional[asyncio.AbstractEventLoop] = None
) -> ShutdownWaiter[_T]: ...

def _shutdown_handler(loop: Optional[asyncio.AbstractEventLoop]) -> None: ...
