"""aiorun: the run-forever entry point for asyncio applications.

Every line of logic lives in the C extension ``aiorun._aiorun``; this file
only re-exports its names.
"""
from ._aiorun import (  # noqa: F401
    WINDOWS,
    ShutdownCallback,
    _DO_NOT_CANCEL_COROS,
    __all__,
    __version__,
    _shutdown_handler,
    logger,
    run,
    shutdown_waits_for,
)
