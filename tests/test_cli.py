"""python -m aiorun: a service module in a temporary directory, started from
the command line in a child process, signalled once it says it is up."""
import signal
import sys
import textwrap

import pytest

from conftest import App

SERVICE = '''
import asyncio, sys

def say(*args):
    sys.stdout.write(" ".join(map(str, args)) + "\\n")
    sys.stdout.flush()

async def main():
    say("UP", sys.argv)
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        say("cancelled")
        raise

async def fails():
    say("UP")
    raise ValueError("boom")

async def exits():
    raise SystemExit(7)

async def stuck():
    loop = asyncio.get_running_loop()
    async def refuse():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("refusing")
    loop.create_task(refuse())
    say("UP")
    await asyncio.sleep(3600)

def factory():
    return main()

def not_async():
    return 5

'''

# An awaitable attribute, made at import: a module of its own, so that the
# other tests do not leave it un-awaited.
ATTRIBUTE = '''
import asyncio

async def _waiting():
    print("UP attribute", flush=True)
    asyncio.get_running_loop().stop()

class holder:
    waiting = _waiting()
'''


@pytest.fixture
def cli(tmp_path):
    (tmp_path / "service.py").write_text(SERVICE)
    (tmp_path / "broken.py").write_text("import no_such_dependency\n")
    (tmp_path / "attribute.py").write_text(ATTRIBUTE)

    started = []

    def start(*args):
        a = App([sys.executable, "-m", "aiorun", *args], cwd=str(tmp_path),
                env={"NOTIFY_SOCKET": None, "AIORUN_SHUTDOWN_DEADLINE": None})
        started.append(a)
        return a
    yield start
    for a in started:   # a test that failed half-way leaves no app running
        a.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_runs_the_function_until_a_signal_and_passes_the_apps_arguments(cli, sig):
    a = cli("service:main", "--port", "8080", "-v")
    assert a.wait_prefix("UP") == "UP ['service:main', '--port', '8080', '-v']"
    a.send(sig)
    r = a.finish()
    assert r.returncode == 0, r
    assert "cancelled" in r.stdout
    assert "Traceback" not in r.stderr_text


def test_a_function_returning_a_coroutine_and_an_awaitable_attribute(cli):
    a = cli("service:factory")
    a.wait_prefix("UP")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    r = cli("attribute:holder.waiting").finish()
    assert r.returncode == 0, r
    assert r.stdout == ["UP attribute"]


def test_stop_on_unhandled_errors_exits_1_with_the_traceback(cli):
    r = cli("--stop-on-unhandled-errors", "service:fails").finish()
    assert r.returncode == 1, r
    assert r.stderr[-1] == "ValueError: boom", r


def test_without_the_option_an_error_leaves_it_running_until_a_signal(cli):
    a = cli("service:fails")
    a.wait_line("UP")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r


def test_system_exit_keeps_its_code(cli):
    r = cli("service:exits").finish()
    assert r.returncode == 7, r


def test_shutdown_options_reach_run(cli):
    # A task that refuses cancellation: the task timeout names it after
    # 0.2 s; a deadline and a repeated signal both end with 124.
    a = cli("--timeout-task-shutdown", "0.2", "service:stuck")
    a.wait_line("UP")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert any("refusing" == line for line in r.stdout)

    a = cli("--timeout-task-shutdown", "1000", "--shutdown-deadline", "0.5", "service:stuck")
    a.wait_line("UP")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 124, r
    assert "aiorun: the shutdown deadline of 0.5 s passed" in r.stderr_text

    a = cli("--timeout-task-shutdown", "1000", "--exit-on-repeated-signal", "service:stuck")
    a.wait_line("UP")
    a.send(signal.SIGTERM)
    a.wait_line("refusing")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 124


def test_ordered_shutdown_options_reach_run(cli, tmp_path):
    (tmp_path / "ordered.py").write_text(textwrap.dedent('''
        import asyncio, aiorun

        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                print("worker:", e.args[0], flush=True)
                raise

        async def main():
            asyncio.get_running_loop().create_task(worker(), name="the-worker")
            print("UP", flush=True)
            try:
                await aiorun.shutdown_event().wait()
                print("main saw the event", flush=True)
                await asyncio.sleep(3600)
            except asyncio.CancelledError as e:
                print("main:", e.args[0], flush=True)
                raise
    '''))
    a = cli("--drain-delay", "0.1", "--cancel-main-first", "--task-dump", "--reap-orphans",
            "ordered:main")
    a.wait_line("UP")
    a.send(signal.SIGUSR1)
    a.wait_log("Task dump (SIGUSR1): 2 tasks")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["UP", "main saw the event", "main: aiorun shutdown: SIGTERM",
                        "worker: aiorun shutdown: SIGTERM"]
    assert "the-worker" in r.stderr_text


def test_uvloop_and_executor_workers(cli, tmp_path):
    pytest.importorskip("uvloop")
    (tmp_path / "loopkind.py").write_text(textwrap.dedent('''
        import asyncio
        async def main():
            loop = asyncio.get_running_loop()
            try:
                print(type(loop).__module__, flush=True)
                print(getattr(loop, "_default_executor", None)._max_workers, flush=True)
            finally:
                loop.stop()
    '''))
    r = cli("--executor-workers", "3", "loopkind:main").finish()
    assert r.returncode == 0, r
    assert r.stdout == ["asyncio.unix_events", "3"]
    r = cli("--uvloop", "loopkind:main").finish()   # uvloop keeps its executor hidden
    assert r.stdout[0] == "uvloop", r


@pytest.mark.parametrize("args, message", [
    (["nosuch:main"], "cannot import module 'nosuch': No module named 'nosuch'"),
    (["service:nosuch"], "module 'service' has no attribute 'nosuch'"),
    (["service.py"], "TARGET must be module:function, not 'service.py'"),
    (["service:"], "TARGET must be module:function, not 'service:'"),
    (["service:not_async"], "TARGET 'service:not_async' must be an async function or an "
                            "awaitable; calling it gave int"),
    (["--shutdown-deadline", "0", "service:main"],
     "argument --shutdown-deadline: must be > 0 and finite, not 0.0"),
    (["--timeout-task-shutdown", "-1", "service:main"],
     "argument --timeout-task-shutdown: must be >= 0 and finite, not -1.0"),
    (["--executor-workers", "0", "service:main"],
     "argument --executor-workers: must be > 0, not 0"),
    (["--executor-workers", "-" + "9" * 30, "service:main"],
     "argument --executor-workers: must be > 0, not -" + "9" * 30),
    (["--shutdown-deadline", "inf", "service:main"],
     "argument --shutdown-deadline: must be > 0 and finite, not inf"),
    (["--executor-workers", "two", "service:main"],
     "argument --executor-workers: invalid int value: 'two'"),
    (["--drain-delay", "-1", "service:main"],
     "argument --drain-delay: must be >= 0 and finite, not -1.0"),
    ([], "the following arguments are required: TARGET"),
])
def test_bad_command_lines_are_usage_errors(cli, args, message):
    r = cli(*args).finish()
    assert r.returncode == 2, r
    assert r.stderr[0].startswith("usage: python -m aiorun"), r
    # ARGS is optional: no Python names it as required.
    assert r.stderr[-1] == f"python -m aiorun: error: {message}", r
    assert "Traceback" not in r.stderr_text


def test_an_import_error_inside_the_app_keeps_its_traceback(cli):
    r = cli("broken:main").finish()
    assert r.returncode == 1, r
    assert "Traceback" in r.stderr_text
    assert r.stderr[-1] == "ModuleNotFoundError: No module named 'no_such_dependency'"


def test_help(cli):
    r = cli("--help").finish()
    assert r.returncode == 0
    text = "\n".join(r.stdout)
    for option in ["--uvloop", "--stop-on-unhandled-errors", "--timeout-task-shutdown",
                   "--executor-workers", "--shutdown-deadline", "--exit-on-repeated-signal",
                   "--no-ready-on-start", "--drain-delay", "--cancel-main-first",
                   "--task-dump", "--reap-orphans", "TARGET"]:
        assert option in text


@pytest.mark.parametrize("args, app_argv", [
    (["--", "--port", "1"], ["--port", "1"]),          # the separator is dropped
    (["--", "--", "x"], ["--", "x"]),                  # only the first one
    (["a", "--", "b"], ["a", "--", "b"]),              # a later one is the app's
    (["--"], []),
])
def test_a_double_dash_right_after_the_target_separates_and_is_dropped(cli, args, app_argv):
    # The rule (the command-line guide): everything after TARGET is
    # the app's; one `--` right after it is a separator, for apps whose own
    # options could be read as ours, and the app does not see it.
    a = cli("service:main", *args)
    assert a.wait_prefix("UP") == f"UP {['service:main', *app_argv]!r}"
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


@pytest.mark.parametrize("level_args, shown, hidden", [
    ([], ["WARNING:aiorun:Stopping the loop", "INFO:aiorun:Entering shutdown phase.",
          "INFO:aiorun:Leaving. Bye!"], ["DEBUG:aiorun:"]),
    (["--log-level", "warning"], ["WARNING:aiorun:Stopping the loop"], ["INFO:aiorun:"]),
    (["--log-level", "DEBUG"], ["DEBUG:aiorun:Entering shutdown handler",
                                "INFO:aiorun:Leaving. Bye!"], []),
    (["--log-level", "off"], [], ["aiorun:"]),
])
def test_the_cli_shows_the_shutdown_transcript_at_the_level_asked(cli, level_args, shown,
                                                                  hidden):
    a = cli(*level_args, "service:main")
    a.wait_prefix("UP")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    for line in shown:
        assert line in r.stderr, (line, r)
    for fragment in hidden:
        assert not any(fragment in l for l in r.stderr), (fragment, r)


def test_an_app_that_configures_logging_at_import_keeps_its_own(cli, tmp_path):
    (tmp_path / "configured.py").write_text(
        "import asyncio, logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='app says %(message)s')\n"
        "async def main():\n"
        "    print('UP', flush=True)\n"
        "    await asyncio.sleep(3600)\n")
    a = cli("configured:main")
    a.wait_prefix("UP")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert "app says Stopping the loop" in r.stderr, r
    assert not any(l.startswith("INFO:") for l in r.stderr), r


def test_an_unknown_log_level_is_a_usage_error(cli):
    r = cli("--log-level", "loud", "service:main").finish()
    assert r.returncode == 2, r
    assert r.stderr[-1] == ("python -m aiorun: error: argument --log-level: not a logging "
                            "level: 'loud' (DEBUG, INFO, WARNING, ERROR, CRITICAL or off)"), r
