"""Declares the C extension; all metadata lives in pyproject.toml."""
import os
import sys

from setuptools import Extension, setup

SOURCES = [
    "module.c", "log.c", "runstate.c", "run.c", "signals.c",
    "unhandled.c", "shutdown.c", "shield.c", "waitfuture.c", "watchdog.c",
    "sigwake.c", "stacks.c", "notify.c", "cli.c", "reasons.c", "taskdump.c",
    "reaper.c", "sigcatch.c", "callargs.c", "idset.c", "protectedset.c",
    "environ.c", "activation.c", "fdstore.c", "reload.c", "health.c", "report.c",
]

if sys.platform == "win32":
    # Untested here: warnings stay warnings so an MSVC header quirk cannot
    # break users' builds.
    compile_args = ["/W3"]
else:
    compile_args = ["-Wall", "-Wextra", "-std=c11", "-pthread"]
    # The project's own builds (make test, CI) turn warnings into errors; a
    # user's install never does, so a warning that a future CPython header
    # brings cannot break it.
    if os.environ.get("AIORUN_STRICT_BUILD"):
        compile_args.append("-Werror")
    # AIORUN_DEBUG_BUILD=1: unoptimised, assertions on, full debug info.
    if os.environ.get("AIORUN_DEBUG_BUILD"):
        compile_args += ["-O0", "-g3", "-UNDEBUG"]
    compile_args += os.environ.get("AIORUN_EXTRA_CFLAGS", "").split()

setup(
    ext_modules=[
        Extension(
            "aiorun._aiorun",
            sources=[f"src/aiorun/_aiorun/{name}" for name in SOURCES],
            depends=["src/aiorun/_aiorun/aiorun.h", "src/aiorun/_aiorun/compat.h"],
            extra_compile_args=compile_args,
            extra_link_args=(["-pthread"] if sys.platform != "win32" else [])
            + os.environ.get("AIORUN_EXTRA_LDFLAGS", "").split(),
        )
    ]
)
