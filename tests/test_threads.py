"""Many run() calls at once on threads, and the free-threaded build.

The stress test itself is tests/reliability/threads_stress.py; make
test-freethreaded runs it at a larger size with the GIL off."""
import os
import subprocess
import sys

import pytest

from conftest import FREE_THREADED, ROOT

STRESS = ROOT / "tests" / "reliability" / "threads_stress.py"


def test_runs_on_many_threads_at_once_each_finish_their_protected_work():
    proc = subprocess.run([sys.executable, str(STRESS), "--threads", "6", "--rounds", "4",
                           "--tasks", "10"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("24 runs on 6 threads, 240 protected coroutines"), proc.stdout
    assert "FAILED" not in proc.stdout


def test_the_stress_test_can_fail():
    """It must see a protected coroutine that never finished: here the
    second half of them sleep for an hour, and the shutdown gives up on the
    tasks at once."""
    code = STRESS.read_text()
    for old, new in [("timeout_task_shutdown=30", "timeout_task_shutdown=0"),
                     ("await asyncio.sleep(0.001)\n",
                      "await asyncio.sleep(0.001 if k < tasks_per_run // 2 else 3600)\n")]:
        assert old in code
        code = code.replace(old, new)
    proc = subprocess.run([sys.executable, "-c", code, "--threads", "2", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "protected coroutines that did not finish" in proc.stdout


@pytest.mark.skipif(not FREE_THREADED, reason="on a free-threaded build only")
def test_import_leaves_the_gil_off_and_says_nothing():
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    proc = subprocess.run([sys.executable, "-W", "error", "-c",
                           "import aiorun, sys; print(sys._is_gil_enabled())"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "False\n", "")
