"""aiorun under a real systemd, in a booted container (make test-systemd).

Each test drives a unit of the user guide's "Tested under a real systemd" (docs/guide/systemd.md)
section with systemctl inside the container, and asserts what systemd
reports (systemctl show, journalctl), not only what the app printed."""
import json
import os
import subprocess
import time

import pytest

INIT = os.environ.get("AIORUN_SYSTEMD_INIT")
pytestmark = pytest.mark.skipif(not INIT, reason="needs the container of make test-systemd")


def inside(*argv, check=True, timeout=120):
    """A command in the container's namespaces (its systemd's bus included)."""
    return subprocess.run(["nsenter", "-t", INIT, "-a", *argv], capture_output=True,
                          text=True, check=check, timeout=timeout)


def show(unit, *props):
    out = inside("systemctl", "show", unit, "-p", ",".join(props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def entries(unit):
    """This boot's journal of the unit: (monotonic µs, message) pairs."""
    out = inside("journalctl", "--no-pager", "-b", "-o", "json", "-u", unit).stdout
    return [(int(e["__MONOTONIC_TIMESTAMP"]), e.get("MESSAGE"))
            for e in map(json.loads, out.splitlines())]


def stopped_cleanly(unit):
    """What systemd said of the stop: an inactive unit is unloaded at once,
    so `systemctl show` no longer knows its result; the journal does.
    Returns the stop's duration in µs, by systemd's clock."""
    log = entries(unit)
    texts = [m for _, m in log if isinstance(m, str)]
    assert any(m.endswith("Deactivated successfully.") for m in texts), texts
    assert not any("Failed with result" in m or "Main process exited" in m
                   for m in texts), texts
    began = [t for t, m in log if isinstance(m, str) and m.startswith("Stopping ")]
    ended = [t for t, m in log if isinstance(m, str) and m.startswith("Stopped ")]
    assert began and ended, texts
    return ended[-1] - began[-1]


def journal(unit):
    return inside("journalctl", "--no-pager", "-b", "-o", "cat", "-u", unit).stdout


def wait_for(predicate, what, tries=600, pause=0.05):
    """Polls systemd's state: a handshake with systemd, not a fixed sleep."""
    for _ in range(tries):
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    raise AssertionError(f"never happened: {what}")


@pytest.fixture
def unit(request):
    """Each test's unit starts from scratch and is stopped at the end."""
    name = request.param
    inside("systemctl", "reset-failed", name, check=False)
    yield name
    inside("systemctl", "stop", name, check=False)
    inside("systemctl", "reset-failed", name, check=False)


def usec(props, name):
    return int(props[name])


@pytest.mark.parametrize("unit", ["aiorun-ready.service"], indirect=True)
def test_start_returns_after_the_first_step_and_the_status_follows_the_phases(unit):
    inside("rm", "-f", "/run/aiorun-ready.first-step")
    inside("systemctl", "start", unit)   # blocks until READY=1
    # The first step wrote this before READY=1 could go out.
    assert inside("test", "-e", "/run/aiorun-ready.first-step", check=False).returncode == 0
    p = show(unit, "ActiveState", "StatusText", "ExecMainStartTimestampMonotonic",
             "ActiveEnterTimestampMonotonic")
    assert (p["ActiveState"], p["StatusText"]) == ("active", "running")
    # systemd's own clock: active only after the 2 s first step.
    assert usec(p, "ActiveEnterTimestampMonotonic") - \
        usec(p, "ExecMainStartTimestampMonotonic") >= 2_000_000, p

    inside("systemctl", "stop", "--no-block", unit)
    seen = []

    def stopped():
        q = show(unit, "ActiveState", "StatusText")
        if q["StatusText"] and (not seen or seen[-1] != q["StatusText"]):
            seen.append(q["StatusText"])
        return q["ActiveState"] in ("inactive", "failed")
    wait_for(stopped, "the unit stopped")
    # The callback takes 3 s, so it is seen; the faster phases may not be.
    assert "shutdown: running shutdown_callback" in seen, seen
    assert set(seen) <= {"running", "stopping: SIGTERM received", "shutdown: the loop stopped",
                         "shutdown: running shutdown_callback", "shutdown: cancelling tasks",
                         "shutdown: waiting for tasks", "shutdown: shutting down the executor",
                         "shutdown: closing async generators", "shutdown: closing the loop",
                         "stopped"}, seen
    stopped_cleanly(unit)


@pytest.mark.parametrize("unit", ["aiorun-helper.service"], indirect=True)
def test_a_helper_thread_run_does_not_stop_the_service(unit):
    inside("systemctl", "start", unit)   # blocks until READY=1
    wait_for(lambda: show(unit, "StatusText")["StatusText"] == "helper done",
             "the helper's run() returned")
    p = show(unit, "ActiveState", "SubState", "NRestarts")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p
    inside("systemctl", "stop", unit)
    stopped_cleanly(unit)


@pytest.mark.parametrize("unit", ["aiorun-listen.service"], indirect=True)
def test_start_returns_once_a_client_can_connect(unit):
    inside("systemctl", "start", unit)
    # At once, no retry: the server must already listen.
    r = inside("/opt/app/venv/bin/python", "-c",
               "import socket\n"
               "s = socket.create_connection(('127.0.0.1', 18080), timeout=10)\n"
               "s.sendall(b'hello\\n')\n"
               "print(s.makefile().readline().strip())")
    assert r.stdout.strip() == "hello"
    assert show(unit, "StatusText")["StatusText"] == "serving on :18080"


@pytest.mark.parametrize("unit", ["aiorun-listen-early.service"], indirect=True)
def test_the_default_ready_comes_before_a_server_listens(unit):
    """What the systemd guide warns of: the default READY=1 follows the first step."""
    inside("systemctl", "start", unit)
    r = inside("/opt/app/venv/bin/python", "-c",
               "import socket\n"
               "socket.create_connection(('127.0.0.1', 18081), timeout=10)",
               check=False)
    assert "ConnectionRefusedError" in r.stderr, r


@pytest.mark.parametrize("unit", ["aiorun-watchdog.service"], indirect=True)
def test_the_watchdog_restarts_a_blocked_loop_and_leaves_a_healthy_one_alone(unit):
    inside("rm", "-f", "/run/aiorun-block")
    inside("systemctl", "start", unit)
    first = show(unit, "MainPID")["MainPID"]
    # Three watchdog periods (WatchdogSec=2) of a healthy loop: untouched.
    # Waiting is the point here: nothing must happen meanwhile.
    time.sleep(6)
    p = show(unit, "ActiveState", "NRestarts", "MainPID")
    assert p == {"ActiveState": "active", "NRestarts": "0", "MainPID": first}

    inside("touch", "/run/aiorun-block")    # the app's loop now blocks in time.sleep()
    wait_for(lambda: int(show(unit, "NRestarts")["NRestarts"]) >= 1, "a restart", tries=400)
    assert "Watchdog timeout" in journal(unit)
    assert "blocking the loop" in journal(unit)
    # The restarted service is healthy again, in a new process.
    wait_for(lambda: show(unit, "ActiveState")["ActiveState"] == "active", "active again")
    assert show(unit, "MainPID")["MainPID"] not in ("0", first)


@pytest.mark.parametrize("unit", ["aiorun-extend.service"], indirect=True)
def test_a_shutdown_that_keeps_moving_runs_past_timeout_stop_sec(unit):
    inside("systemctl", "start", unit)
    inside("systemctl", "stop", unit)    # blocks until it has stopped
    # Exit 0, and by systemd's own clock the stop took longer than
    # TimeoutStopSec=2.
    assert stopped_cleanly(unit) > 4_000_000
    log = journal(unit)
    assert "worker cleaned up" in log
    assert "Leaving. Bye!" in log
    assert "timed out" not in log


@pytest.mark.parametrize("unit", ["aiorun-hung.service"], indirect=True)
def test_a_hung_shutdown_ends_at_the_deadline_with_its_diagnosis_before_the_kill(unit):
    inside("systemctl", "start", unit)
    inside("systemctl", "stop", unit)
    p = show(unit, "Result", "ExecMainStatus", "ActiveExitTimestampMonotonic",
             "InactiveEnterTimestampMonotonic")
    assert (p["Result"], p["ExecMainStatus"]) == ("exit-code", "124"), p
    # Ended by the deadline (3 s), not by systemd at TimeoutStopSec=10.
    assert usec(p, "InactiveEnterTimestampMonotonic") - \
        usec(p, "ActiveExitTimestampMonotonic") < 10_000_000, p
    log = journal(unit)
    assert "aiorun: the shutdown deadline of 3 s passed" in log, log
    assert 'File "/opt/app/hung.py"' in log and "in hang" in log, log
    assert "aiorun: exiting with code 124" in log
    assert "timed out" not in log and "Killing" not in log, log


@pytest.mark.parametrize("unit", ["aiorun-jobs.service"], indirect=True)
def test_python_m_aiorun_waits_for_the_executor_job_under_killmode_mixed(unit):
    inside("systemctl", "start", unit)
    wait_for(lambda: "job started" in journal(unit), "the executor job started")
    inside("systemctl", "stop", unit)
    stopped_cleanly(unit)
    log = journal(unit)
    assert log.index("Waiting for executor shutdown.") < log.index("job done"), log
    assert "Leaving. Bye!" in log


RESULTS = os.environ.get("AIORUN_SYSTEMD_RESULTS")


def failures(counts):
    return {k: counts[k] for k in ("refused", "reset", "no_response", "timeout", "other")}


def restarts_under_load(unit, port, restarts=20, held=False):
    """The load client inside the container, `restarts` restarts of unit
    while it runs, then its counts.  With held, a connection kept in the
    fd store asks after each restart which process serves it."""
    inside("rm", "-f", "/run/aiorun-load.stop")
    load = subprocess.Popen(["nsenter", "-t", INIT, "-a", "/opt/app/venv/bin/python",
                             "/opt/app/load.py", str(port), "/run/aiorun-load.stop"],
                            stdout=subprocess.PIPE, text=True)
    hold = subprocess.Popen(["nsenter", "-t", INIT, "-a", "/opt/app/venv/bin/python",
                             "/opt/app/hold.py", str(port)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, bufsize=1) if held else None
    answers = []
    try:
        pids = [show(unit, "MainPID")["MainPID"]]
        if hold:
            answers.append(hold.stdout.readline().strip())
        for _ in range(restarts):
            time.sleep(0.3)   # load between restarts, not a handshake
            inside("systemctl", "restart", unit)
            pids.append(show(unit, "MainPID")["MainPID"])
            if hold:
                hold.stdin.write("which\n")
                answers.append(hold.stdout.readline().strip())
        time.sleep(0.3)
    finally:
        inside("touch", "/run/aiorun-load.stop")
        out, _ = load.communicate(timeout=60)
        if hold:
            hold.stdin.close()
            hold.wait(timeout=30)
    assert len(set(pids)) == restarts + 1, pids   # each restart made a new process
    if hold:
        # The one connection, answered by every process in turn.
        assert answers == pids, (answers, pids)
    counts = json.loads(out)
    counts["restarts"] = restarts
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"unit": unit, **counts}) + "\n")
    return counts


@pytest.mark.parametrize("unit", ["aiorun-web.service"], indirect=True)
def test_restarts_under_load_refuse_nothing_with_socket_activation(unit):
    inside("systemctl", "start", "aiorun-web.socket")
    inside("systemctl", "start", unit)
    c = restarts_under_load(unit, 18090, held=True)
    assert c["ok"] > 100, c
    assert failures(c) == dict.fromkeys(failures(c), 0), c


@pytest.mark.parametrize("unit", ["aiorun-web-bound.service"], indirect=True)
def test_restarts_under_load_without_socket_activation_refuse_connections(unit):
    """The baseline beside the test above: the same app and load, the
    app binding its port itself."""
    inside("systemctl", "start", unit)
    c = restarts_under_load(unit, 18091)
    assert c["ok"] > 100, c
    assert c["refused"] + c["reset"] + c["no_response"] > 0, c


@pytest.mark.parametrize("unit", ["aiorun-web.service"], indirect=True)
def test_a_connection_in_the_fd_store_outlives_restarts(unit):
    inside("systemctl", "start", "aiorun-web.socket")
    inside("systemctl", "start", unit)
    r = inside("/opt/app/venv/bin/python", "/opt/app/hold.py", "18090", unit, "3")
    pids = json.loads(r.stdout)
    # One connection, answered by four processes in turn.
    assert len(pids) == 4 and len(set(pids)) == 4, pids
    assert pids[-1] == int(show(unit, "MainPID")["MainPID"]), pids


def systemd_version():
    out = inside("systemctl", "--version").stdout.split()
    return int(out[1])


def get(port):
    r = inside("/opt/app/venv/bin/python", "-c",
               "import socket, sys\n"
               f"s = socket.create_connection(('127.0.0.1', {port}), timeout=10)\n"
               "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n"
               "print(s.makefile('rb').read().split(b'\\r\\n\\r\\n', 1)[1].decode().strip())")
    pid, greeting = r.stdout.split()
    return int(pid), greeting


def set_greeting(text):
    inside("sh", "-c", f"echo {text} > /run/aiorun-web.greeting")


@pytest.fixture
def reload_unit(unit):
    if systemd_version() < 253:
        pytest.skip("Type=notify-reload needs systemd 253 or later")
    set_greeting("hello")
    inside("systemctl", "start", "aiorun-reload.socket")
    inside("systemctl", "start", unit)
    return unit


@pytest.mark.parametrize("unit", ["aiorun-reload.service"], indirect=True)
def test_reload_returns_once_the_callback_ran_and_refuses_nothing_under_load(reload_unit):
    unit = reload_unit
    pid, _ = get(18092)
    inside("rm", "-f", "/run/aiorun-load.stop")
    load = subprocess.Popen(["nsenter", "-t", INIT, "-a", "/opt/app/venv/bin/python",
                             "/opt/app/load.py", "18092", "/run/aiorun-load.stop"],
                            stdout=subprocess.PIPE, text=True)
    try:
        for n in range(20):
            set_greeting(f"version-{n}")
            inside("systemctl", "reload", unit)       # returns after READY=1
            # Its effect is in the very next response, from the same process.
            assert get(18092) == (pid, f"version-{n}")
    finally:
        inside("touch", "/run/aiorun-load.stop")
        out, _ = load.communicate(timeout=60)
    c = json.loads(out)
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"unit": unit + " (20 reloads)", "restarts": 0, **c}) + "\n")
    assert c["ok"] > 100, c
    failed = {k: c[k] for k in ("refused", "reset", "no_response", "timeout", "other")}
    assert failed == dict.fromkeys(failed, 0), c
    assert show(unit, "MainPID")["MainPID"] == str(pid)


@pytest.mark.parametrize("unit", ["aiorun-reload.service"], indirect=True)
def test_a_failed_reload_fails_systemctl_reload_while_the_service_serves_on(reload_unit):
    unit = reload_unit
    pid, greeting = get(18092)
    set_greeting("fail")
    r = inside("systemctl", "reload", unit, check=False, timeout=60)
    assert r.returncode != 0, r
    p = show(unit, "ActiveState", "SubState", "StatusText", "MainPID", "ReloadResult")
    assert (p["ActiveState"], p["SubState"]) == ("active", "running"), p
    assert p["ReloadResult"] == "timeout", p     # TimeoutStartSec=3 ended it
    assert p["StatusText"] == "reload failed (ValueError), serving on with the old state", p
    assert get(18092) == (pid, greeting)
    assert "ValueError: the greeting file says fail" in journal(unit)
    # The next reload works again.
    set_greeting("fixed")
    inside("systemctl", "reload", unit)
    assert get(18092) == (pid, "fixed")
    assert show(unit, "StatusText")["StatusText"] == "running"


def needs_notify_reload():
    if systemd_version() < 253:
        pytest.skip("Type=notify-reload needs systemd 253 or later")


@pytest.mark.parametrize("unit", ["aiorun-aiohttp.service"], indirect=True)
def test_aiohttp_restarts_and_reloads_under_load_fail_nothing(unit):
    needs_notify_reload()
    set_greeting("hello")
    inside("systemctl", "start", "aiorun-aiohttp.socket")
    inside("systemctl", "start", unit)
    c = restarts_under_load(unit, 18093)
    assert c["ok"] > 100 and failures(c) == dict.fromkeys(failures(c), 0), c
    pid, _ = get(18093)
    inside("rm", "-f", "/run/aiorun-load.stop")
    load = subprocess.Popen(["nsenter", "-t", INIT, "-a", "/opt/app/venv/bin/python",
                             "/opt/app/load.py", "18093", "/run/aiorun-load.stop"],
                            stdout=subprocess.PIPE, text=True)
    try:
        for n in range(20):
            set_greeting(f"aiohttp-{n}")
            inside("systemctl", "reload", unit)
            assert get(18093) == (pid, f"aiohttp-{n}")
    finally:
        inside("touch", "/run/aiorun-load.stop")
        out, _ = load.communicate(timeout=60)
    r = json.loads(out)
    if RESULTS:
        with open(RESULTS, "a") as f:
            f.write(json.dumps({"unit": unit + " (20 reloads)", "restarts": 0, **r}) + "\n")
    assert r["ok"] > 100 and failures(r) == dict.fromkeys(failures(r), 0), r


@pytest.mark.parametrize("unit", ["aiorun-aiohttp-bound.service"], indirect=True)
def test_aiohttp_restarts_without_socket_activation_refuse_connections(unit):
    needs_notify_reload()   # its pair above runs only there
    inside("systemctl", "start", unit)
    c = restarts_under_load(unit, 18094)
    assert c["ok"] > 100, c
    assert c["refused"] + c["reset"] + c["no_response"] > 0, c
