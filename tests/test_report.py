"""The shutdown report: the INFO summary line every shutdown ends with, and
the JSON file of run(shutdown_report=...), validated against the schema the
package ships, after a normal shutdown, an error, a task that refuses to
exit and a forced exit."""
import json
import re
import signal
import sys
from pathlib import Path

import pytest

from conftest import SUMMARY_PREFIX

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "src" / "aiorun"
     / "shutdown_report.schema.json").read_text())
SUMMARY = re.compile(
    r"INFO:aiorun:Shutdown summary \((?P<cause>[^,]+), (?P<seconds>\d+\.\d{3}) s\): "
    r"(?P<cancelled>\d+) tasks? cancelled, (?P<stuck>\d+) still running at the timeout, "
    r"(?P<drained>\d+) finished during the drain; protected work: (?P<pfin>\d+) finished, "
    r"(?P<paband>\d+) abandoned; non-daemon threads left: (?P<threads>\d+)\.$")


def read_report(path):
    report = json.loads(Path(path).read_text())
    jsonschema.validate(report, SCHEMA)
    return report


def summary_of(r):
    assert len(r.summaries) == 1, r.summaries
    m = SUMMARY.match(r.summaries[0])
    assert m, r.summaries[0]
    return m.groupdict()


def test_the_schema_is_shipped_with_the_package():
    from importlib import resources
    shipped = resources.files("aiorun") / "shutdown_report.schema.json"
    assert json.loads(shipped.read_text()) == SCHEMA
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_a_signal_shutdown_is_summed_up_and_reported(app, tmp_path):
    path = tmp_path / "report.json"
    a = app(f"""
    async def worker():
        await asyncio.sleep(3600)

    async def save():
        await asyncio.sleep(0.3)
        say("SAVED")

    async def main():
        for _ in range(3):
            asyncio.ensure_future(worker())
        hold = threading.Event()
        threading.Thread(target=hold.wait, name="holder", daemon=True).start()
        say("READY")
        await shutdown_waits_for(save())

    run(main(), shutdown_report={str(path)!r})
    say("RETURNED")
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0
    assert r.stdout == ["READY", "SAVED", "RETURNED"]
    assert r.stderr.index(r.summaries[0]) > r.stderr.index("INFO:aiorun:Leaving. Bye!")
    s = summary_of(r)
    assert (s["cause"], s["cancelled"], s["stuck"], s["pfin"], s["paband"]) == \
        ("SIGTERM", "4", "0", "1", "0")   # three workers and main; save() protected
    report = read_report(path)
    assert report["cause"] == {"kind": "signal", "signal": "SIGTERM"}
    assert report["tasks"]["cancelled"] == 4
    assert report["tasks"]["refused_to_exit"] == 0
    assert report["protected"] == {"finished": 1, "abandoned": 0}
    names = [p["name"] for p in report["phases"]]
    assert names == ["shutdown_handler", "shutdown", "cancelling", "waiting_for_tasks",
                     "executor", "async_generators", "closing_the_loop", "leaving"]
    waiting = report["phases"][3]
    assert waiting["duration_s"] >= 0.25   # save() took 0.3 s of it
    assert report["threads"] == [{"name": "holder", "daemon": True}]
    assert report["outcome"] == {"kind": "returned", "exception": None, "exit_code": None,
                                 "phase": None}
    assert not list(tmp_path.glob("report.json.tmp*"))


def test_an_error_is_the_outcome(app, tmp_path):
    path = tmp_path / "report.json"
    r = app(f"""
    async def main():
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    run(main(), stop_on_unhandled_errors=True, shutdown_report={str(path)!r})
    """).finish()
    assert r.returncode == 1
    assert summary_of(r)["cause"] == "unhandled error"
    # The summary is the last log line: after Reraising, before the traceback.
    assert r.log[-1] == "INFO:Reraising unhandled exception"
    report = read_report(path)
    assert report["cause"] == {"kind": "unhandled error"}
    assert report["outcome"]["kind"] == "raised"
    assert report["outcome"]["exception"] == "ValueError: boom"


def test_a_task_that_refuses_to_exit_is_named_with_its_stack(app, tmp_path):
    path = tmp_path / "report.json"
    a = app(f"""
    async def stubborn():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    async def never_done():
        await asyncio.sleep(3600)

    async def main():
        asyncio.ensure_future(stubborn())
        asyncio.ensure_future(shutdown_waits_for(never_done()))
        say("READY")
        await asyncio.sleep(3600)

    run(main(), timeout_task_shutdown=0.3, shutdown_report={str(path)!r})
    """)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    r = a.finish()
    assert r.returncode == 0
    s = summary_of(r)
    assert (s["cause"], s["stuck"], s["paband"]) == ("SIGINT", "2", "1")
    report = read_report(path)
    assert report["tasks"]["refused_to_exit"] == 2
    assert report["protected"]["abandoned"] == 1
    described = "\n".join(t["description"] for t in report["tasks"]["refused"])
    assert "coro=<stubborn() running at" in described
    assert re.search(r'File ".*app0\.py", line \d+, in stubborn', described)
    assert "never_done" in described
    assert report["tasks"]["refused_list_complete"] is True


def test_a_forced_exit_writes_the_report_from_the_watchdog(app, tmp_path):
    path = tmp_path / "report.json"
    a = app(f"""
    async def main():
        say("READY")
        try:
            await asyncio.sleep(3600)
        finally:
            time.sleep(3600)   # the loop's thread never comes back

    run(main(), shutdown_deadline=1, shutdown_report={str(path)!r})
    """)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 124
    assert r.summaries == []   # the loop's thread never got there
    report = read_report(path)
    assert report["cause"] == {"kind": "signal", "signal": "SIGTERM"}
    assert report["outcome"] == {"kind": "forced_exit", "exception": None, "exit_code": 124,
                                 "phase": "waiting_for_tasks"}
    assert report["phases"][-1]["name"] == "waiting_for_tasks"
    assert report["duration_s"] >= 1
    assert report["tasks"]["cancelled"] == 1
    names = {t["name"] for t in report["threads"]}
    assert "aiorun-watchdog" in names and all("tid" in t for t in report["threads"])


def test_every_way_a_shutdown_ends_is_summed_up_once(app):
    r = app("""
    async def stop():
        asyncio.get_running_loop().stop()

    async def interrupt():
        raise KeyboardInterrupt

    def ended(coro):
        try:
            run(coro)
        except KeyboardInterrupt:
            pass

    ended(stop())
    ended(interrupt())
    def helper():
        ended(stop())
    t = threading.Thread(target=helper)
    t.start()
    t.join()
    """).finish()
    assert r.returncode == 0
    causes = [SUMMARY.match(l).group("cause") for l in r.summaries]
    assert causes == ["loop.stop()", "KeyboardInterrupt", "loop.stop()"]


def test_only_the_owner_writes_a_report(app, tmp_path):
    r = app(f"""
    def helper():
        async def stop():
            asyncio.get_running_loop().stop()
        try:
            run(stop(), shutdown_report={str(tmp_path / "x.json")!r})
        except ValueError as e:
            say("REFUSED", e)
        run(stop())   # the environment's report is not the helper's
        say("HELPER DONE")

    t = threading.Thread(target=helper)
    t.start()
    t.join()
    """, env={"AIORUN_SHUTDOWN_REPORT": str(tmp_path / "env.json")}).finish()
    assert r.stdout == ["REFUSED run() argument 'shutdown_report' needs run() in the "
                        "main thread", "HELPER DONE"]
    assert not (tmp_path / "x.json").exists() and not (tmp_path / "env.json").exists()


def test_the_environment_and_the_command_line(app, tmp_path):
    from conftest import App
    env_path = tmp_path / "env.json"
    r = app("""
    async def stop():
        asyncio.get_running_loop().stop()
    run(stop())
    """, env={"AIORUN_SHUTDOWN_REPORT": str(env_path)}).finish()
    assert r.returncode == 0
    assert read_report(env_path)["cause"] == {"kind": "loop.stop()"}

    (tmp_path / "svc.py").write_text(
        "import asyncio\nasync def main():\n    asyncio.get_running_loop().stop()\n")
    cli_path = tmp_path / "cli.json"
    c = App([sys.executable, "-m", "aiorun", "--shutdown-report", str(cli_path),
             "svc:main"], cwd=str(tmp_path)).finish()
    assert c.returncode == 0, c
    assert read_report(cli_path)["outcome"]["kind"] == "returned"


@pytest.mark.parametrize("value, error", [
    ("3", "TypeError: run() argument 'shutdown_report' must be a str or os.PathLike"),
    ("''", "ValueError: run() argument 'shutdown_report' must be a non-empty path"),
    ("'a\\x00b'", "ValueError: run() argument 'shutdown_report' must be a non-empty path"),
])
def test_a_bad_path_is_refused_naming_the_parameter(app, value, error):
    r = app(f"""
    async def main():
        say("NEVER")
    try:
        run(main(), shutdown_report={value})
    except Exception as e:
        say(f"{{type(e).__name__}}: {{e}}")
    """).finish()
    assert len(r.stdout) == 1 and r.stdout[0].startswith(error), r.stdout


def test_an_unwritable_path_is_a_warning_not_a_failure(app, tmp_path):
    r = app(f"""
    async def stop():
        asyncio.get_running_loop().stop()
    run(stop(), shutdown_report={str(tmp_path / "no" / "such" / "dir.json")!r})
    say("RETURNED")
    """).finish()
    assert r.returncode == 0 and r.stdout == ["RETURNED"]
    assert any(l.startswith("WARNING:The shutdown report could not be written: ")
               and l.endswith("No such file or directory") for l in r.log), r.log


def test_a_log_handler_raising_on_the_summary_is_what_run_raises(app, tmp_path):
    path = tmp_path / "report.json"
    r = app(f"""
    class Raise(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Shutdown summary"):
                raise KeyError("from the handler")
    logging.getLogger("aiorun").addHandler(Raise())

    async def stop():
        asyncio.get_running_loop().stop()
    try:
        run(stop(), shutdown_report={str(path)!r})
    except KeyError as e:
        say("raised", e)
    """).finish()
    assert r.stdout == ["raised 'from the handler'"]
    assert read_report(path)["outcome"]["kind"] == "returned"
