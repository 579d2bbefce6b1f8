"""Differential check against the original aiorun 2025.1.1 from PyPI.

The original is installed into a virtual environment of its own (made once
per Python version under .venvs/, or named by AIORUN_ORIGINAL_PYTHON).
Each scenario runs the same example, with the same handshake, under both;
stdout, every log line (all loggers, DEBUG and up) and the exit code must
match once addresses, ports, task numbers and paths are taken out.

The one intended difference: this project logs a DEBUG line per cancelled
task ("Cancelling task: ...", as in the old documentation's transcript), which 2025.1.1
dropped; those lines are left out of the comparison.
"""
import fcntl
import os
import re
import signal
import subprocess
import sys
import venv

import pytest

from conftest import EXAMPLES, FREE_THREADED, PYPY, PYPY_GC, ROOT, App, example_argv

ORIGINAL = "aiorun==2025.1.1"


@pytest.fixture(scope="session")
def original_python():
    python = os.environ.get("AIORUN_ORIGINAL_PYTHON")
    if not python:
        # The original on this very interpreter: PyPy and free-threaded
        # builds get venvs of their own.
        tag = (f"{'pypy' if PYPY else ''}{sys.version_info[0]}.{sys.version_info[1]}"
               f"{'t' if FREE_THREADED else ''}")
        home = ROOT / ".venvs" / f"original-{tag}"
        python = str(home / "bin" / "python")
        (ROOT / ".venvs").mkdir(exist_ok=True)
        # One maker at a time: the test workers (pytest-xdist) all want it.
        with open(ROOT / ".venvs" / f"original-{tag}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not os.path.exists(home / "made"):
                venv.create(home, with_pip=True, clear=True)
                subprocess.run([python, "-m", "pip", "install", "-q",
                                "--disable-pip-version-check", ORIGINAL], check=True)
                # Where uvloop has no wheel (free-threaded builds), none.
                subprocess.run([python, "-m", "pip", "install", "-q",
                                "--disable-pip-version-check", "--only-binary=:all:",
                                "uvloop"], capture_output=True)
                (home / "made").touch()
    where = subprocess.run([python, "-c", "import aiorun; print(aiorun.__file__)"],
                           capture_output=True, text=True, env=clean_env(), check=True)
    assert where.stdout.strip().endswith(os.path.join("aiorun", "__init__.py"))
    assert "_aiorun" not in open(where.stdout.strip()).read()  # the Python original
    return python


def clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


NOISE = [
    (re.compile(r"0x[0-9a-f]+"), "0xADDR"),
    (re.compile(r"\('127\.0\.0\.1', \d+\)"), "('127.0.0.1', PORT)"),
    (re.compile(r"Task-\d+"), "Task-N"),
    (re.compile(r"/[^\s'\"]*/"), "/PATH/"),
]
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:")


def normal(line):
    for pattern, repl in NOISE:
        line = pattern.sub(repl, line)
    return line


# Our summary line (an accepted difference): left out of the comparison,
# except where a scenario shows it.
SUMMARY = "INFO:aiorun:Shutdown summary ("


def transcript(result, raw=False, summary=False):
    logs = [normal(l) for l in result.stderr
            if LOG_LINE.match(l)
            and (raw or not l.startswith("DEBUG:aiorun:Cancelling task:"))
            and (summary or not l.startswith(SUMMARY))]
    final = normal(result.stderr[-1]) if result.returncode and result.stderr else None
    return {"exit code": result.returncode, "stdout": [normal(l) for l in result.stdout],
            "log": logs, "final error line": final}


def until_ready_then(sig, ready_log=None, ready_line=None):
    def drive(app):
        if ready_log:
            app.wait_log(ready_log)
        if ready_line:
            app.wait_line(ready_line)
        app.send(sig)
    return drive


SCENARIOS = {
    "hello.py": until_ready_then(signal.SIGINT, ready_log=":aiorun:Creating default executor"),
    "shield_demo.py": until_ready_then(signal.SIGINT, ready_line="4"),
    "stop_demo.py": None,
    "stop_unhandled_loop.py": None,
    "stop_unhandled_illegal.py": None,
    "custom_stop.py": None,
    "uvloop_demo.py": until_ready_then(signal.SIGTERM, ready_line="Running on uvloop"),
}


def run_both(python_ours, python_orig, name, drive):
    results = {}
    for side, python in (("original", python_orig), ("ours", python_ours)):
        app = App(example_argv(python, name), cwd=str(EXAMPLES),
                  env={"PYTHONPATH": None} if side == "original" else None)
        if drive:
            drive(app)
        results[side] = transcript(app.finish())
    return results


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_example_matches_the_original(original_python, name):
    if "uvloop" in name:
        pytest.importorskip("uvloop")
    if PYPY and name in ("stop_unhandled_loop.py", "custom_stop.py", "stop_demo.py"):
        pytest.skip(PYPY_GC)
    results = run_both(sys.executable, original_python, name, SCENARIOS[name])
    assert results["ours"] == results["original"]


def test_echo_server_and_client_match_the_original(original_python, echo_port):
    results = {}
    for side, python in (("original", original_python), ("ours", sys.executable)):
        env = {"PYTHONPATH": None} if side == "original" else None
        server = App(example_argv(python, "echo_server.py"), cwd=str(EXAMPLES), env=env)
        server.wait_line("Serving on ('127.0.0.1', 8888)")
        client = App(example_argv(python, "echo_client.py"), cwd=str(EXAMPLES),
                     env=env).finish()
        server.wait_line("Close the client socket")
        server.send(signal.SIGINT)
        results[side] = (transcript(server.finish()), transcript(client))
    assert results["ours"] == results["original"]
