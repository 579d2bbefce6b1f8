"""Seeing into a running service, and living as PID 1: the task dump on a
signal (task_dump_signal), run() off the main thread, and reap_orphans
inside a new PID namespace.  Each app runs in a child process."""
import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import SHUTDOWN_TAIL, App, subsequence

DUMP_APP = """
    async def deep_wait(event):
        await event.wait()

    async def inner_job(event):
        await deep_wait(event)

    async def outer_job(inner):
        await inner

    async def main():
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        inner = loop.create_task(inner_job(event), name="inner-job")
        loop.create_task(outer_job(inner), name="outer-job")
        for n in range(1, 4):
            say("READY", n)
            await asyncio.sleep(0.05)
            while not dumps[0]:
                await asyncio.sleep(0.01)
            dumps[0] = 0
        say("still running after the dumps")
        await asyncio.sleep(3600)

    dumps = [0]
    class Counter(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Task dump"):
                dumps[0] += 1
    aiorun.logger.addHandler(Counter())
    run(main(), task_dump_signal=%s)
    say("run returned")
"""


def dumps_in(stderr):
    """The task dumps in the log: each a list of its lines."""
    out, current = [], None
    for line in stderr:
        if line.startswith("WARNING:aiorun:Task dump"):
            current = [line]
            out.append(current)
        elif current is not None and not line.startswith(("DEBUG:", "INFO:", "WARNING:")):
            current.append(line)
        else:
            current = None
    return out


@pytest.mark.parametrize("arg, name", [("True", "SIGUSR1"), ("signal.SIGUSR2", "SIGUSR2")])
def test_the_task_dump_shows_every_task_and_its_await_chain_while_the_app_runs(
        app, arg, name):
    a = app(DUMP_APP % arg)
    for n in range(1, 4):
        a.wait_line(f"READY {n}")
        a.send(getattr(signal, name))
    a.wait_line("still running after the dumps")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[-1] == "run returned"
    dumps = dumps_in(r.stderr)
    assert len(dumps) == 3, r
    first = "\n".join(dumps[0])
    assert dumps[0][0] == f"WARNING:aiorun:Task dump ({name}): 3 tasks"
    # The main task comes first; every task is named with where it waits.
    assert first.index("in main") < first.index("inner-job")
    for task in ("inner-job", "outer-job"):
        assert task in first
    for frame in ("in deep_wait", "in inner_job", "in outer_job", "in main"):
        assert frame in first, first
    assert "wait_for=<Task pending name='inner-job'" in first
    if sys.version_info >= (3, 14):            # asyncio.capture_call_graph
        assert "  awaited by <Task pending name='outer-job'" in first
    # Nothing was stopped or cancelled by the dumps.
    assert subsequence(SHUTDOWN_TAIL, r.messages)
    assert r.messages.count("Stopping the loop") == 1


def test_the_dump_signal_gets_its_old_handler_back(app):
    r = app("""
        seen = []
        signal.signal(signal.SIGUSR1, lambda s, f: seen.append(s))
        async def main():
            say("during:", signal.getsignal(signal.SIGUSR1).__name__)
            asyncio.get_running_loop().stop()
        run(main(), task_dump_signal=True)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        say("after: old handler ran", seen == [signal.SIGUSR1])
    """).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["during: _on_dump_signal", "after: old handler ran True"]


def test_tasks_that_refuse_to_exit_are_described_like_the_dump(app):
    a = app("""
        async def never_gives_up():
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    pass

        async def main():
            asyncio.get_running_loop().create_task(never_gives_up(), name="stubborn")
            say("READY")
            await asyncio.sleep(3600)

        run(main(), timeout_task_shutdown=0.3)
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    text = r.stderr_text
    assert "During shutdown, the following tasks refused to exit after 0.3 seconds:" in text
    assert "name='stubborn'" in text and "in never_gives_up" in text


def test_off_the_main_thread_everything_but_signals_works(app):
    a = app("""
        box = {}

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                say("worker:", e.args[0], aiorun.cancelled_by_shutdown(e))
                raise

        async def main():
            box["loop"] = asyncio.get_running_loop()
            box["loop"].create_task(worker())
            say("READY")
            await aiorun.shutdown_event().wait()
            await asyncio.sleep(0.05)
            return "main's result"

        def in_thread():
            say("returned:", run(main(), drain_delay=5, cancel_main_first=True))
            try:
                run(main(), task_dump_signal=True)
            except ValueError as e:
                say("refused:", e)

        t = threading.Thread(target=in_thread)
        t.start()
        while "loop" not in box:
            time.sleep(0.01)
        line = sys.stdin.readline()
        box["loop"].call_soon_threadsafe(box["loop"].stop)
        t.join()
    """, stdin=True)
    a.wait_line("READY")
    a.write("stop\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[1:] == [
        "worker: aiorun shutdown: loop stopped True",
        "returned: main's result",
        "refused: run() argument 'task_dump_signal' needs run() in the main thread",
    ]
    off_main = [m for m in r.log if "not in the main thread" in m]
    assert len(off_main) == 2 and all(m.startswith("WARNING:") for m in off_main)


# ---- PID 1 ----

ZOMBIES = """
def zombie_children():
    own = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] == "Z" and int(fields[1]) == own:
                found.append(int(name))
    return found
"""

PID1_APP = ZOMBIES + """
async def main():
    say("pid", os.getpid())
    # Orphans: the shell leaves three children behind, which exit soon after.
    orphans = await asyncio.create_subprocess_exec(
        "sh", "-c", "for i in 1 2 3; do sleep 0.2 & done; exit 0")
    await orphans.wait()
    # The loop's own child must keep its exit status.
    own = await asyncio.create_subprocess_exec("sh", "-c", "sleep 1.5; exit 7")
    say("own child exit code", await own.wait())
    # So must a subprocess.Popen child the app waits for (in an executor,
    # as the containers guide says), across the reaper's looks.
    import subprocess
    popen = subprocess.Popen(["sh", "-c", "sleep 2.5; exit 5"])
    code = await asyncio.get_running_loop().run_in_executor(None, popen.wait)
    say("Popen child exit code", code)
    for _ in range(40):                 # up to ~8 s for the reaper
        if not zombie_children():
            break
        await asyncio.sleep(0.2)
    say("zombies left", len(zombie_children()))
    asyncio.get_running_loop().stop()

run(main(), reap_orphans=sys.argv[1] == "1")
"""


def unshare_argv():
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        pytest.skip("needs Linux and unshare(1)")
    base = ["unshare", "--pid", "--fork", "--mount-proc"]
    if os.geteuid() != 0:
        base[1:1] = ["--user", "--map-root-user"]
    probe = subprocess.run(base + ["true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a PID namespace here: {probe.stderr.decode().strip()}")
    return base


@pytest.mark.parametrize("reap", ["1", "0"])
def test_as_pid_1_orphans_are_reaped_and_the_loops_own_child_keeps_its_status(
        tmp_path, reap):
    from conftest import PRELUDE
    script = tmp_path / "pid1.py"
    script.write_text(PRELUDE + PID1_APP)
    a = App(unshare_argv() + [sys.executable, str(script), reap])
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[0] == "pid 1"
    assert "own child exit code 7" in r.stdout
    assert "Popen child exit code 5" in r.stdout, r
    reaped = [m for m in r.log if m.startswith("DEBUG:Reaped orphaned process")]
    if reap == "1":
        assert r.stdout[-1] == "zombies left 0", r
        assert len(reaped) == 3, r
        assert all(m.endswith("(exit code 0)") for m in reaped)
        assert "Reaping orphaned processes (PID 1)." in r.messages
    else:
        # The contrast: without the option the orphans stay zombies.
        assert r.stdout[-1] == "zombies left 3", r
        assert reaped == []


def test_reap_orphans_from_the_environment_and_off_pid_1(app):
    r = app("""
        async def main():
            asyncio.get_running_loop().stop()
        run(main())
    """, env={"AIORUN_REAP_ORPHANS": "1"}).finish()
    assert r.returncode == 0, r
    assert ("DEBUG:reap_orphans: not PID 1 nor a subreaper, so no orphans come here; "
            "nothing to reap") in r.log
