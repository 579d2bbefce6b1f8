"""The shipped stubs: mypy --strict accepts a typed use of the whole API and
rejects misuse at the lines marked '# E:'."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mypy")
HERE = Path(__file__).parent / "typing"


def mypy(path):
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", "/dev/null", str(path)],
                          capture_output=True, text=True, cwd=str(HERE))


def test_typed_usage_passes_strict():
    out = mypy(HERE / "usage.py")
    assert out.returncode == 0, out.stdout + out.stderr


def test_misuse_is_rejected_where_marked():
    out = mypy(HERE / "misuse.py")
    flagged = {int(m.group(1)) for m in re.finditer(r"misuse\.py:(\d+): error", out.stdout)}
    lines = (HERE / "misuse.py").read_text().splitlines()
    marked = {n for n, line in enumerate(lines, 1) if "# E:" in line}
    assert flagged == marked, out.stdout


def test_examples_use_the_api_correctly():
    # --strict, less only the three checks that ask the examples for
    # annotations of their own: the documentation's examples have none and must stay
    # as written.  Every other strict check applies to their use of the API.
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--allow-untyped-defs",
                          "--allow-incomplete-defs", "--allow-untyped-calls",
                          "--no-incremental", "--cache-dir", "/dev/null",
                          str(HERE.parent.parent / "examples")],
                         capture_output=True, text=True, cwd=str(HERE))
    assert out.returncode == 0, out.stdout + out.stderr
