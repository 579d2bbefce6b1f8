"""aiorun: the run-forever entry point for asyncio applications.

Every line of logic lives in the C extension ``aiorun._aiorun``; this file
only re-exports its names (``name as name`` marks them as public for type
checkers).
"""
from ._aiorun import FORCED_EXIT_CODE as FORCED_EXIT_CODE
from ._aiorun import WINDOWS as WINDOWS
from ._aiorun import ShutdownCallback as ShutdownCallback
from ._aiorun import _DO_NOT_CANCEL_COROS as _DO_NOT_CANCEL_COROS
from ._aiorun import __all__ as __all__
from ._aiorun import __version__ as __version__
from ._aiorun import _shutdown_handler as _shutdown_handler
from ._aiorun import cancelled_by_shutdown as cancelled_by_shutdown
from ._aiorun import listen_fds as listen_fds
from ._aiorun import listen_sockets as listen_sockets
from ._aiorun import logger as logger
from ._aiorun import notify_ready as notify_ready
from ._aiorun import remove_stored_fd as remove_stored_fd
from ._aiorun import run as run
from ._aiorun import shutdown_event as shutdown_event
from ._aiorun import shutdown_waits_for as shutdown_waits_for
from ._aiorun import store_fd as store_fd
