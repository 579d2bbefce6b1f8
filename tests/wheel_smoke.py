"""Smoke test of an installed wheel (run by scripts/wheels, in a fresh venv
whose PATH has no compiler):

    python tests/wheel_smoke.py path/to/aiorun-....whl

Checks the wheel's contents (the extension, the stubs, no C sources), that
aiorun is imported from the venv and is the C extension, then runs a small
app in a child process, sends it SIGTERM once it is ready, and checks what
it printed and its exit code.  Exits non-zero with a message on a failure.
"""
import os
import signal
import subprocess
import sys
import sysconfig
import zipfile

APP = r"""
import asyncio, sys
from aiorun import run, shutdown_waits_for

async def save():
    await asyncio.sleep(0.2)
    print("saved", flush=True)
    return "ok"

async def main():
    print("READY", flush=True)
    try:
        print("got", await shutdown_waits_for(save()), flush=True)
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        print("main cancelled", flush=True)
        raise

print("returned", run(main()), flush=True)
"""


def fail(message):
    print(f"wheel smoke test: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def check_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    sources = [n for n in names if n.endswith((".c", ".h"))]
    if sources:
        fail(f"the wheel carries C sources: {sources}")
    for wanted in ("aiorun/__init__.py", "aiorun/py.typed", "aiorun/_aiorun.pyi"):
        if wanted not in names:
            fail(f"{wanted} is not in the wheel")
    if not any(n.startswith("aiorun/_aiorun.") and n.endswith(".so") for n in names):
        fail("the extension module is not in the wheel")


def check_import():
    import aiorun
    import aiorun._aiorun as ext
    site = sysconfig.get_paths()["purelib"]
    for module in (aiorun, ext):
        if not os.path.realpath(module.__file__).startswith(os.path.realpath(site)):
            fail(f"{module.__name__} comes from {module.__file__}, not from {site}")
    if not ext.__file__.endswith(".so"):
        fail(f"aiorun._aiorun is not the C extension: {ext.__file__}")
    if sysconfig.get_config_var("Py_GIL_DISABLED") and sys._is_gil_enabled():
        fail("importing aiorun turned the GIL on in this free-threaded build")


def check_app():
    child = subprocess.Popen([sys.executable, "-c", APP], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    first = child.stdout.readline().strip()
    if first != "READY":
        child.kill()
        fail(f"the app did not start: {first!r} {child.stderr.read()}")
    child.send_signal(signal.SIGTERM)
    try:
        out, err = child.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        child.kill()
        fail("the app did not exit after SIGTERM")
    lines = out.splitlines()
    # The awaiter is cancelled at once; the protected save() still ends.
    if lines != ["main cancelled", "saved", "returned None"] or child.returncode != 0:
        fail(f"exit {child.returncode}, stdout {lines}, stderr {err[-2000:]}")


if __name__ == "__main__":
    check_contents(sys.argv[1])
    check_import()
    check_app()
    print(f"wheel smoke test passed: {os.path.basename(sys.argv[1])}")
