"""Shared helpers: run a small app in a child process, talk to it by lines.

Every behaviour test runs the app in a real child process, waits for a line
that says it is ready (never a bare sleep), sends real signals, and then
looks at what a user sees: exit code, stdout lines, the aiorun log lines.
"""
import os
import queue
import re
import signal
import subprocess
import sys
import sysconfig
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Prepended to every app script: log everything, print with flush.
PRELUDE = """\
import asyncio, logging, os, signal, sys, threading, time
logging.basicConfig(level=logging.DEBUG, stream=sys.stderr,
                    format="%(levelname)s:%(name)s:%(message)s")
import aiorun
from aiorun import run, shutdown_waits_for

def say(*args):
    # One write per line: print() writes the text and the newline apart, so
    # lines said from two threads could interleave.
    sys.stdout.write(" ".join(map(str, args)) + "\\n")
    sys.stdout.flush()
"""

# Generous: these bound a hang, they are not timing assertions.
LINE_TIMEOUT = 30.0
EXIT_TIMEOUT = 60.0


def example_argv(python, name):
    """Command line running examples/<name> under python with every log line
    shown as LEVEL:logger:message (examples/with_logging.py)."""
    return [python, "-u", str(EXAMPLES / "with_logging.py"), "--debug", "--levels",
            str(EXAMPLES / name)]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class App:
    """A child Python process whose stdout is read line by line."""

    def __init__(self, argv, cwd=None, env=None, stdin=False, pass_fds=()):
        full_env = dict(os.environ)
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.pop("PYTHONASYNCIODEBUG", None)
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)  # None removes a variable
            else:
                full_env[key] = value
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # A shell runs background jobs with SIGINT ignored, and Python
            # keeps an inherited SIG_IGN; give every app the usual start.
            preexec_fn=_default_sigint,
            pass_fds=pass_fds,
        )
        self.stdout_lines = []
        self.stderr_lines = []
        self._out = queue.Queue()
        self._err = queue.Queue()
        self._threads = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._out), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self._err), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @staticmethod
    def _pump(stream, q):
        for line in stream:
            q.put(line.rstrip("\n"))
        q.put(None)

    def _wait_in(self, q, store, predicate, what, timeout):
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise AssertionError(f"timed out waiting for {what!r}; got {store}")
            try:
                line = q.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                q.put(None)
                self.kill()
                r = self.finish()
                raise AssertionError(f"{what!r} never came; {r}")
            store.append(line)
            if predicate(line):
                return line

    def wait_line(self, text, timeout=LINE_TIMEOUT):
        """Block until stdout has a line equal to text."""
        return self._wait_in(self._out, self.stdout_lines, lambda l: l == text, text, timeout)

    def wait_prefix(self, prefix, timeout=LINE_TIMEOUT):
        """Block until stdout has a line starting with prefix; return it."""
        return self._wait_in(self._out, self.stdout_lines, lambda l: l.startswith(prefix),
                             prefix, timeout)

    def wait_log(self, fragment, timeout=LINE_TIMEOUT):
        """Block until stderr has a line containing fragment."""
        return self._wait_in(self._err, self.stderr_lines, lambda l: fragment in l,
                             fragment, timeout)

    def send(self, sig):
        self.proc.send_signal(sig)

    def write(self, text):
        self.proc.stdin.write(text)
        self.proc.stdin.flush()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()

    def finish(self, timeout=EXIT_TIMEOUT):
        """Wait for exit; return a Result with everything the app printed."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            raise AssertionError(f"app did not exit; stdout={self.stdout_lines}")
        for q, store in ((self._out, self.stdout_lines), (self._err, self.stderr_lines)):
            while True:
                line = q.get(timeout=10)
                if line is None:
                    break
                store.append(line)
        if self.proc.stdin:
            self.proc.stdin.close()
        return Result(self.proc.returncode, self.stdout_lines, self.stderr_lines)


class Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    @property
    def log(self):
        """aiorun's log lines as 'LEVEL:message' (first line of each), but
        for the shutdown's summary line (see `summaries`), which comes after
        the original's lines and is checked on its own."""
        out = []
        for line in self.stderr:
            m = re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):aiorun:(.*)$", line)
            if m and not m.group(2).startswith(SUMMARY_PREFIX):
                out.append(f"{m.group(1)}:{m.group(2)}")
        return out

    @property
    def summaries(self):
        """The shutdown summary lines, as logged (INFO:aiorun:...)."""
        return [l for l in self.stderr if l.startswith("INFO:aiorun:" + SUMMARY_PREFIX)]

    @property
    def messages(self):
        """aiorun's log messages at INFO and above, without levels."""
        return [l.split(":", 1)[1] for l in self.log if not l.startswith("DEBUG:")]

    @property
    def stderr_text(self):
        return "\n".join(self.stderr)

    def count(self, text):
        return sum(1 for line in self.stdout if line == text)

    def __repr__(self):
        return (f"Result(rc={self.returncode}, stdout={self.stdout!r}, "
                f"stderr={self.stderr_text!r})")


@pytest.fixture
def app(tmp_path):
    """app(body, **kw) -> App running PRELUDE + body as a script."""
    started = []

    def start(body, args=(), env=None, stdin=False, prelude=True):
        script = tmp_path / f"app{len(started)}.py"
        script.write_text((PRELUDE if prelude else "") + textwrap.dedent(body))
        a = App([sys.executable, str(script), *args], cwd=str(tmp_path), env=env,
                stdin=stdin)
        a.script = script
        started.append(a)
        return a

    yield start
    for a in started:
        a.kill()


def run_app(app, body, **kw):
    """Run an app that ends by itself; return its Result."""
    return app(body, **kw).finish()


def subsequence(needles, haystack):
    """True if needles appear in haystack in this order (gaps allowed)."""
    it = iter(haystack)
    return all(any(n == h for h in it) for n in needles)


SHUTDOWN_TAIL = [
    "Entering shutdown phase.",
    "Cancelling pending tasks.",
    "Running pending tasks till complete",
    "Waiting for executor shutdown.",
    "Shutting down async generators",
    "Closing the loop.",
    "Leaving. Bye!",
]

SIGNALS = [signal.SIGINT, signal.SIGTERM]

# Every shutdown's last log line (report.c).
SUMMARY_PREFIX = "Shutdown summary ("


def line_of(path, marker):
    """1-based number of the line of a script that contains marker."""
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if marker in line:
            return number
    raise AssertionError(f"{marker!r} not in {path}")


PYPY = sys.implementation.name == "pypy"
# What PyPy cannot do, each listed on the documentation's Platforms page.
PYPY_GC = ("on PyPy, a task's or a waiter's unretrieved exception is reported when "
           "the garbage collector frees it, not when it is dropped (the original too)")
PYPY_STACKS = ("on PyPy, other threads' stacks (faulthandler) have approximate line "
               "numbers")
skip_on_pypy_gc = pytest.mark.skipif(PYPY, reason=PYPY_GC)
skip_on_pypy_stacks = pytest.mark.skipif(PYPY, reason=PYPY_STACKS)

# A free-threaded CPython (3.13t and later), where the GIL can be off.
FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


@pytest.fixture
def echo_port():
    """The echo examples listen on 127.0.0.1:8888: one test at a time across
    the pytest-xdist workers, by a lock on a file all of them see."""
    import fcntl
    import tempfile
    with open(os.path.join(tempfile.gettempdir(), "aiorun-tests-port-8888.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield 8888
