"""The documents keep their word: every Python sample in the README, the
contributing guide and the documentation site runs, and prints what the page
shows; every relative link leads somewhere; and the project speaks only of
itself.

A sample is a ```python block with a line of its own just before it:

    <!-- sample: [signal=SIGINT|SIGTERM] [after=TEXT] [exit=N] [file=NAME]
                 [args="ARGS"] [env=K=V] [needs=MODULE] -->

The harness writes the block to NAME (default app.py) in an empty directory
and runs it there with this interpreter: `python NAME`, or `python ARGS`
(skipped when this interpreter lacks MODULE, a third-party package).  With a signal, it waits until the app is
ready (READY=1 on a NOTIFY_SOCKET of the harness's own: run()'s main task has
made its first step, or the app called notify_ready()), then until the line
TEXT has been printed if `after` is given, and sends the signal.  The exit
code must be N (default 0).  A ```console block right after the sample is
its transcript: `$ ...` lines are the commands, `^C` at the start of a line
is where Ctrl-C was pressed (it implies signal=SIGINT; a terminal shows the
next output right after it), and the rest must be the program's
output (stdout and stderr as one stream), line for line; a line `...` stands
for any number of lines and `...` inside a line for any text.
"""
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md",
                    *(ROOT / "docs").rglob("*.md")])
SAMPLE = re.compile(r"<!-- sample:(.*?)-->")
TIMEOUT = 60.0


class Sample:
    def __init__(self, path, line, code, spec, transcript):
        self.path, self.line, self.code = path, line, code
        self.transcript = transcript
        self.options = dict(item.split("=", 1) for item in shlex.split(spec or ""))
        self.spec = spec

    @property
    def id(self):
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(text):
    """(first line number, info string, lines, line before the fence)."""
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,})(\S*)", lines[i])
        if not m:
            i += 1
            continue
        start, fence, info = i, m.group(1), m.group(2)
        i += 1
        body = []
        while i < len(lines) and lines[i].rstrip() != fence:
            body.append(lines[i])
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        yield start + 1, info, body, before, i
        i += 1


def collect():
    found = []
    for path in DOCUMENTS:
        if not path.exists():
            continue
        blocks = list(fenced_blocks(path.read_text()))
        for n, (line, info, body, before, end) in enumerate(blocks):
            if info != "python":
                continue
            m = SAMPLE.search(before)
            transcript = None
            if n + 1 < len(blocks) and blocks[n + 1][1] == "console":
                text = path.read_text().split("\n")
                between = text[end + 1:blocks[n + 1][0] - 1]
                if not any(s.strip() for s in between):
                    transcript = blocks[n + 1][2]
            found.append(Sample(path, line, "\n".join(body) + "\n",
                                m.group(1) if m else None, transcript))
    return found


SAMPLES = collect()


def test_the_documents_have_samples():
    # A harness that finds nothing would pass everything.
    assert len(SAMPLES) >= 10
    assert sum(s.transcript is not None for s in SAMPLES) >= 4


class Output:
    """The app's stdout and stderr as one stream, read by a thread."""

    def __init__(self, stream):
        self.lines = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream):
        for raw in stream:
            with self.cond:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, text, deadline):
        with self.cond:
            return self.cond.wait_for(lambda: any(text == l for l in self.lines),
                                      timeout=max(0.0, deadline - time.monotonic()))


def wait_ready(sock, proc, deadline):
    """Until READY=1 arrives, or the app ends first."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        sock.settimeout(0.2)
        try:
            msg = sock.recv(4096).decode()
        except socket.timeout:
            continue
        if "READY=1" in msg.split("\n"):
            return True
    return False


def matches(want, got):
    """A transcript (with `...` lines and `...` inside lines) against lines."""
    if not want:
        return not got
    head = want[0]
    if head == "...":
        return any(matches(want[1:], got[i:]) for i in range(len(got) + 1))
    if not got:
        return False
    pattern = ".*".join(re.escape(part) for part in head.split("..."))
    return re.fullmatch(pattern, got[0]) is not None and matches(want[1:], got[1:])


@pytest.mark.parametrize("sample", SAMPLES, ids=lambda s: s.id)
def test_sample_runs_as_shown(sample, tmp_path):
    assert sample.spec is not None, (
        f"{sample.id}: a Python sample needs a '<!-- sample: ... -->' line before it")
    opts = sample.options
    if "needs" in opts:
        pytest.importorskip(opts["needs"])
    transcript = sample.transcript
    signame = opts.get("signal")
    if transcript is not None and any(l.startswith("^C") for l in transcript):
        assert signame in (None, "SIGINT"), sample.id
        signame = "SIGINT"
    name = opts.get("file", "app.py")
    (tmp_path / name).write_text(sample.code)
    sock_path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, PYTHONUNBUFFERED="1")
    env.pop("AIORUN_SHUTDOWN_DEADLINE", None)
    if "env" in opts:
        key, value = opts["env"].split("=", 1)
        env[key] = value
    argv = shlex.split(opts["args"]) if "args" in opts else [name]
    proc = subprocess.Popen([sys.executable, *argv], cwd=tmp_path, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = Output(proc.stdout)
    deadline = time.monotonic() + TIMEOUT
    try:
        if signame:
            assert wait_ready(sock, proc, deadline), (sample.id, out.lines)
            if "after" in opts:
                assert out.wait_for(opts["after"], deadline), (sample.id, out.lines)
            proc.send_signal(getattr(signal, signame))
        code = proc.wait(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    out.thread.join(TIMEOUT)
    assert code == int(opts.get("exit", 0)), (sample.id, code, out.lines)
    if transcript is not None:
        shown = [l[2:] if l.startswith("^C") else l for l in transcript
                 if not l.startswith("$ ") and l != "^C"]
        assert matches(shown, out.lines), (sample.id, "\n".join(out.lines))


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading):
    """The anchor a heading gets (MyST's and the code hosts' rule)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path):
    lines = [b for b in re.split(r"^`{3,}.*?^`{3,}", path.read_text(), flags=re.M | re.S)]
    return {slug(m.group(1)) for part in lines
            for m in re.finditer(r"^#{1,6} (.+)$", part, re.M)}


def test_every_relative_link_leads_to_a_file_and_heading_that_exist():
    checked, broken = 0, []
    for path in DOCUMENTS:
        text = re.sub(r"^`{3,}.*?^`{3,}", "", path.read_text(), flags=re.M | re.S)
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            checked += 1
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert checked >= 30
    assert not broken, broken


# What a reader outside the project cannot place: tracker numbers, the names
# of the material the project was written from, private jargon.
INTERNAL = re.compile(r"[Ii]ssues? #?\d+|(?:^|[^.\w])seeds?\b|X-macro|stop the world"
                      r"|SPEC\.md|STYLE\.md|shared/")
# And in the prose of the documents, the benchmark's old name for the
# hand-written shutdown (the code may keep it as a key).
IN_PROSE = re.compile(r"\bfloor\b")


def project_files():
    for pattern in ("*.md", "Makefile", ".ci/run", "docs/**/*.md", "docs/conf.py",
                    "examples/*.py", "bench/*.py", "bench/*.md", "scripts/*",
                    "src/aiorun/**/*.[chp]*", "tests/**/*.py"):
        for path in ROOT.glob(pattern):
            if path.is_file() and path.resolve() != Path(__file__).resolve() \
                    and ".venvs" not in path.parts:
                yield path


def test_the_project_speaks_only_of_itself():
    found = []
    for path in project_files():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if INTERNAL.search(line) or (path.suffix == ".md" and IN_PROSE.search(line)):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_internal_reference_check_finds_what_it_looks_for():
    for text in ("see issue 7", "Issue #16", "as the seeds say", "an X-macro list"):
        assert INTERNAL.search(text), text
    for text in ("hypothesis.seed(1)", "AIORUN_FUZZ_SEED", "a floorless room"):
        assert not INTERNAL.search(text) and not IN_PROSE.search(text), text
    assert IN_PROSE.search("the bare-asyncio floor")
