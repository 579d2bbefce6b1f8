"""systemd notifications: a real datagram socket bound where NOTIFY_SOCKET
points (a path, or an abstract name), a child app under run(), and the exact
messages it sends, in order.  Watchdog pings are counted between markers the
app itself sends, so no assertion depends on how fast the machine is.
"""
import os
import signal
import socket
import sys
import threading
import uuid

import pytest

import aiorun

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="systemd is POSIX only")

EXTEND = "EXTEND_TIMEOUT_USEC=65000000"   # the default timeout_task_shutdown (60 s) + 5 s


class Receiver:
    """What systemd does with NOTIFY_SOCKET: read every datagram at once (the
    kernel's queue holds only a few) and keep them in order."""

    def __init__(self, address):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages = []
        self.arrived = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(4096)
            except OSError:
                return
            with self.arrived:
                self.messages.append(data.decode())
                self.arrived.notify_all()

    def wait_for(self, message, timeout=30):
        with self.arrived:
            assert self.arrived.wait_for(lambda: message in self.messages, timeout), \
                (message, self.messages)

    def close(self):
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(10)

    def without_pings(self):
        """Every message but the pings, once run() has said it stopped (the
        datagrams may still be on their way when the process has exited)."""
        self.wait_for("STATUS=stopped")
        return [m for m in self.messages if m != "WATCHDOG=1"]


@pytest.fixture(params=["path", "abstract"])
def receiver(request, tmp_path):
    if request.param == "path":
        env_value = str(tmp_path / "notify.sock")
        bind_to = env_value
    else:
        env_value = f"@aiorun-test-{uuid.uuid4().hex}"
        bind_to = "\0" + env_value[1:]
    r = Receiver(bind_to)
    r.env = {"NOTIFY_SOCKET": env_value, "WATCHDOG_USEC": None, "WATCHDOG_PID": None}
    yield r
    r.close()


PHASES = [
    "STATUS=shutdown: the loop stopped\n" + EXTEND,
    "STATUS=shutdown: cancelling tasks\n" + EXTEND,
    "STATUS=shutdown: waiting for tasks\n" + EXTEND,
    "STATUS=shutdown: shutting down the executor\n" + EXTEND,
    "STATUS=shutdown: closing async generators\n" + EXTEND,
    "STATUS=shutdown: closing the loop\n" + EXTEND,
    "STATUS=stopped",
]

SLEEPER = """
    async def main():
        asyncio.get_running_loop().create_task(asyncio.sleep(3600))
        say("READY")
        await asyncio.sleep(3600)
    run(main())
"""


def test_signal_shutdown_sends_every_message_in_order(app, receiver):
    a = app(SLEEPER, env=receiver.env)
    a.wait_line("READY")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert receiver.without_pings() == [
        "STATUS=starting",
        "READY=1\nSTATUS=running",
        "STOPPING=1\nSTATUS=stopping: SIGTERM received",
        "STATUS=shutdown: calling shutdown_handler\n" + EXTEND,
        *PHASES,
    ]
    assert "WATCHDOG=1" not in receiver.messages   # not asked for


def test_loop_stop_and_shutdown_callback_are_named(app, receiver):
    a = app("""
        async def main():
            say("READY")
            asyncio.get_running_loop().stop()
        async def callback(loop):
            say("callback")
        run(main(), shutdown_callback=callback, timeout_task_shutdown=7)
    """, env=receiver.env)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "callback"]
    extend = "EXTEND_TIMEOUT_USEC=12000000"   # 7 s + 5 s
    phases = [p.replace(EXTEND, extend) for p in PHASES if "tasks" not in p]
    # No STOPPING=1: the app stopped its loop, which another run() may
    # follow; no task left: none to cancel or wait for.
    assert receiver.without_pings() == [
        "STATUS=starting",
        "READY=1\nSTATUS=running",
        phases[0],
        "STATUS=shutdown: running shutdown_callback\n" + extend,
        *phases[1:],
    ]


def test_sigint_is_named(app, receiver):
    a = app(SLEEPER, env=receiver.env)
    a.wait_line("READY")
    a.send(signal.SIGINT)
    assert a.finish().returncode == 0
    assert "STOPPING=1\nSTATUS=stopping: SIGINT received" in receiver.without_pings()


def test_ready_waits_for_the_app_when_asked(app, receiver):
    a = app("""
        async def main():
            say("STARTED")
            sys.stdin.readline()                      # the test has looked
            say("SENT", aiorun.notify_ready("serving on :8080"))
            await asyncio.sleep(3600)
        run(main(), notify_ready_on_start=False)
    """, env=receiver.env, stdin=True)
    a.wait_line("STARTED")
    receiver.wait_for("STATUS=starting")
    a.write("go\n")
    a.wait_line("SENT True")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    msgs = receiver.without_pings()
    assert msgs[:3] == ["STATUS=starting", "READY=1\nSTATUS=serving on :8080",
                        "STOPPING=1\nSTATUS=stopping: SIGTERM received"], msgs
    assert sum(m.startswith("READY=1") for m in msgs) == 1


def test_ready_is_sent_only_once_the_main_coroutine_has_started(app, receiver):
    # The main coroutine sends a marker of its own on its first step; READY
    # must come after it.
    a = app(f"""
        import socket
        async def main():
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            addr = os.environ["NOTIFY_SOCKET"]
            s.sendto(b"MAIN=started", "\\0" + addr[1:] if addr[0] == "@" else addr)
            say("READY")
            await asyncio.sleep(3600)
        run(main())
    """, env=receiver.env)
    a.wait_line("READY")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    msgs = receiver.without_pings()
    assert msgs.index("MAIN=started") < msgs.index("READY=1\nSTATUS=running"), msgs


def test_watchdog_pings_come_from_the_loop_and_stop_while_it_is_blocked(app, receiver):
    # WATCHDOG_USEC=100 ms: a ping every 50 ms while the loop runs.  The app
    # marks a window in which it lets the loop run, then one in which it
    # blocks the loop for as long; pings come in the first and none in the
    # second.
    env = dict(receiver.env, WATCHDOG_USEC="100000", WATCHDOG_PID=None)
    a = app("""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        addr = os.environ["NOTIFY_SOCKET"]
        addr = "\\0" + addr[1:] if addr[0] == "@" else addr
        async def main():
            s.sendto(b"MARK=free", addr)
            free_at = time.monotonic()
            await asyncio.sleep(1.0)
            say("FREE FOR", time.monotonic() - free_at)
            s.sendto(b"MARK=blocked", addr)
            time.sleep(1.0)
            s.sendto(b"MARK=end", addr)
            say("READY")
            await asyncio.sleep(3600)
        run(main())
    """, env=env)
    free_for = float(a.wait_prefix("FREE FOR").split()[-1])
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    receiver.wait_for("STATUS=stopped")
    msgs = receiver.messages
    free, blocked, end = (msgs.index(f"MARK={m}") for m in ("free", "blocked", "end"))
    pings_free = msgs[free:blocked].count("WATCHDOG=1")
    pings_blocked = msgs[blocked:end].count("WATCHDOG=1")
    # One ping per 50 ms at most (the timer is re-armed after each); a busy
    # machine delays timers, so from below only "several" is asserted.
    assert 5 <= pings_free <= free_for / 0.05 + 1, (free_for, msgs)
    assert pings_blocked == 0, msgs


def test_watchdog_pid_of_another_process_means_no_pings(app, receiver):
    env = dict(receiver.env, WATCHDOG_USEC="20000", WATCHDOG_PID=str(os.getpid()))
    a = app("""
        async def main():
            await asyncio.sleep(0.3)
            say("READY")
            await asyncio.sleep(3600)
        run(main())
    """, env=env)
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    assert "READY=1\nSTATUS=running" in receiver.without_pings()
    assert "WATCHDOG=1" not in receiver.messages


def test_no_notify_socket_means_nothing_sent_and_notify_ready_says_false(app):
    a = app("""
        async def main():
            say("SENT", aiorun.notify_ready())
            asyncio.get_running_loop().stop()
        run(main())
    """, env={"NOTIFY_SOCKET": None})
    r = a.finish()
    assert r.returncode == 0
    assert r.stdout == ["SENT False"]


@pytest.mark.parametrize("value", ["vsock:2:1234", "relative/path", "@"])
def test_an_unusable_notify_socket_is_a_warning_not_a_failure(app, value):
    a = app("""
        async def main():
            asyncio.get_running_loop().stop()
        run(main())
        say("SENT", aiorun.notify_ready())
    """, env={"NOTIFY_SOCKET": value})
    r = a.finish()
    assert r.returncode == 0, r
    assert any(m.startswith(f"environment variable NOTIFY_SOCKET='{value}'")
               and m.endswith("no notifications are sent") for m in r.messages), r
    # notify_ready() never raises for a delivery problem: it says what happened.
    assert r.stdout == ["SENT False"], r
    assert f"WARNING:notify_ready(): READY=1 not delivered: environment variable " \
           f"NOTIFY_SOCKET='{value}'" in "\n".join(r.log), r


def test_notify_ready_says_when_the_receiver_is_gone_and_the_app_goes_on(app, tmp_path):
    # The systemd guide's own pattern (notify_ready() once the server listens) must
    # not kill main() when systemd's socket has gone away.
    a = app("""
        async def main():
            say("SENT", aiorun.notify_ready("serving"))
            say("main goes on")
            asyncio.get_running_loop().stop()
        run(main(), notify_ready_on_start=False)
    """, env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens"), "WATCHDOG_USEC": None})
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["SENT False", "main goes on"], r
    assert any(l.startswith("WARNING:notify_ready(): READY=1 not delivered: the socket ")
               for l in r.log), r


def test_a_receiver_that_went_away_does_not_disturb_the_run(app, tmp_path):
    a = app(SLEEPER, env={"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    a.wait_line("READY")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert "Traceback" not in r.stderr_text


@pytest.mark.parametrize("value, error", [
    (5, TypeError), (b"x", TypeError), ("two\nlines", ValueError), ("nul\0", ValueError)])
def test_notify_ready_status_is_checked(value, error):
    with pytest.raises(error, match="notify_ready\\(\\) argument 'status'"):
        aiorun.notify_ready(value)


@pytest.mark.parametrize("value", [None, "yes", 1.0])
def test_notify_ready_on_start_must_be_a_flag(value):
    with pytest.raises(TypeError, match="'notify_ready_on_start' must be bool"):
        aiorun.run(notify_ready_on_start=value)


def test_a_loop_that_outlives_run_pings_no_more(app, receiver):
    env = dict(receiver.env, WATCHDOG_USEC="40000")
    a = app("""
        loop = asyncio.new_event_loop()
        async def main():
            await asyncio.sleep(0.2)
            asyncio.get_running_loop().stop()
        run(main(), loop=loop)
        loop.run_until_complete(asyncio.sleep(0.5))   # 25 ping intervals
        say("DONE")
    """, env=env)
    r = a.finish()
    assert r.stdout == ["DONE"], r
    receiver.wait_for("STATUS=stopped")
    msgs = receiver.messages
    assert "WATCHDOG=1" in msgs[:msgs.index("STATUS=stopped")]
    assert msgs[-1] == "STATUS=stopped", msgs


def test_notify_ready_says_when_the_socket_is_full(app, tmp_path):
    # A receiver that reads nothing: its queue fills, and a datagram that
    # does not fit is dropped (sd_notify would block the loop there).
    path = str(tmp_path / "full.sock")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    filler.setblocking(False)
    try:
        while True:
            filler.sendto(b"x" * 512, path)
    except BlockingIOError:
        pass
    try:
        r = app("""
            say("SENT", aiorun.notify_ready("serving"))
        """, env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": None}).finish()
    finally:
        filler.close()
        receiver.close()
    assert r.returncode == 0, r
    assert r.stdout == ["SENT False"], r
    assert any("READY=1 not delivered: the socket " in l and "is full" in l
               for l in r.log), r


def test_the_drain_phase_extends_by_drain_delay_and_the_rest_by_the_task_timeout(app, receiver):
    a = app("""
        async def main():
            asyncio.get_running_loop().stop()
        run(main(), drain_delay=2, timeout_task_shutdown=10)
    """, env=receiver.env)
    assert a.finish().returncode == 0
    messages = receiver.without_pings()
    assert "STATUS=shutdown: letting tasks finish\nEXTEND_TIMEOUT_USEC=7000000" in messages
    assert "STATUS=shutdown: shutting down the executor\nEXTEND_TIMEOUT_USEC=15000000" \
        in messages, messages


def test_a_helper_thread_run_says_nothing_to_systemd(app, receiver):
    # The main thread's run() owns the service: a run() on a helper thread,
    # started before it is ready and ended while it serves, sends nothing
    # (no READY=1 of its own, no STOPPING=1 that systemd would take as a
    # stop request, no pings).
    env = dict(receiver.env, WATCHDOG_USEC="100000")
    a = app("""
        helper_may_end = threading.Event()
        def helper():
            async def work():
                say("HELPER RUNNING")
                await asyncio.get_running_loop().run_in_executor(None, helper_may_end.wait)
                asyncio.get_running_loop().stop()
            run(work())
            say("HELPER DONE")
        t = threading.Thread(target=helper)
        t.start()
        async def main():
            await asyncio.sleep(0.3)       # the helper runs meanwhile
            say("MAIN READY")
            sys.stdin.readline()
            helper_may_end.set()
            await asyncio.get_running_loop().run_in_executor(None, t.join)
            say("SERVING ON")
            await asyncio.sleep(3600)
        run(main())
    """, env=env, stdin=True)
    a.wait_line("MAIN READY")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.write("go\n")
    a.wait_line("SERVING ON")
    before_stop = [m for m in receiver.messages if m != "WATCHDOG=1"]
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout[:2] == ["HELPER RUNNING", "MAIN READY"] or \
        r.stdout[:2] == ["MAIN READY", "HELPER RUNNING"], r.stdout
    assert "HELPER DONE" in r.stdout
    # While the main run() served, the helper's end said nothing.
    assert before_stop == ["STATUS=starting", "READY=1\nSTATUS=running"], before_stop
    msgs = receiver.without_pings()
    assert msgs.count("READY=1\nSTATUS=running") == 1
    assert sum(m.startswith("STOPPING=1") for m in msgs) == 1
    assert msgs.count("STATUS=stopped") == 1
    assert msgs[2] == "STOPPING=1\nSTATUS=stopping: SIGTERM received", msgs


def test_two_runs_in_sequence_stop_the_service_once(app, receiver):
    # The first run() ends because the app stopped its loop: the service
    # goes on with the second, so no STOPPING=1 until the signal that
    # stops the second, and no READY=1 after it.
    a = app("""
        async def first():
            say("FIRST")
            asyncio.get_running_loop().stop()
        run(first())
        say("FIRST DONE")
        sys.stdin.readline()
        async def second():
            say("SECOND")
            await asyncio.sleep(3600)
        run(second())
        say("AFTER")
    """, env=receiver.env, stdin=True)
    a.wait_line("FIRST DONE")
    receiver.wait_for("STATUS=stopped")
    a.write("go\n")
    a.wait_line("SECOND")
    receiver.wait_for("READY=1\nSTATUS=running")
    with receiver.arrived:
        assert receiver.arrived.wait_for(
            lambda: receiver.messages.count("READY=1\nSTATUS=running") == 2, 30)
    assert not any(m.startswith("STOPPING=1") for m in receiver.messages)
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["FIRST", "FIRST DONE", "SECOND", "AFTER"]
    receiver.wait_for("STOPPING=1\nSTATUS=stopping: SIGTERM received")
    msgs = [m for m in receiver.messages if m != "WATCHDOG=1"]
    stopping = msgs.index("STOPPING=1\nSTATUS=stopping: SIGTERM received")
    assert sum(m.startswith("STOPPING=1") for m in msgs) == 1
    assert not any(m.startswith("READY=1") for m in msgs[stopping:]), msgs


def test_after_a_signal_no_later_run_says_ready(app, receiver):
    # A run() stopped by SIGTERM told systemd the service is stopping; a
    # run() the app starts afterwards (its clean-up, say) must not take
    # that back with READY=1.
    # (A handshake between the runs: the kernel queues only a few
    # datagrams, and a burst of two runs' messages could lose some.)
    a = app("""
        async def first():
            say("FIRST")
            await asyncio.sleep(3600)
        run(first())
        say("FIRST DONE")
        sys.stdin.readline()
        async def cleanup():
            await asyncio.sleep(0)
            say("CLEANUP")
            asyncio.get_running_loop().stop()
        run(cleanup())
    """, env=receiver.env, stdin=True)
    a.wait_line("FIRST")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.send(signal.SIGTERM)
    a.wait_line("FIRST DONE")
    receiver.wait_for("STATUS=stopped")
    a.write("go\n")
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["FIRST", "FIRST DONE", "CLEANUP"]
    with receiver.arrived:
        assert receiver.arrived.wait_for(
            lambda: receiver.messages.count("STATUS=stopped") == 2, 30), receiver.messages
    msgs = [m for m in receiver.messages if m != "WATCHDOG=1"]
    assert [m for m in msgs if m.startswith("READY=1")] == ["READY=1\nSTATUS=running"]


def test_without_a_task_timeout_the_phases_ask_for_65_seconds(app, receiver):
    a = app("""
        async def worker():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise
        async def main():
            asyncio.get_running_loop().create_task(worker())
            say("READY")
            await asyncio.sleep(3600)
        run(main(), timeout_task_shutdown=None)
    """, env=receiver.env)
    a.wait_line("READY")
    receiver.wait_for("READY=1\nSTATUS=running")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    phases = [m for m in receiver.without_pings() if m.startswith("STATUS=shutdown:")]
    assert phases and all(m.endswith("\nEXTEND_TIMEOUT_USEC=65000000") for m in phases), phases


def test_a_signal_before_main_has_started_means_no_ready_after_stopping(app, receiver):
    # The signal comes in the loop's first turn, before the main task's
    # first step and the READY=1 queued behind it.
    a = app("""
        loop = asyncio.new_event_loop()
        loop.call_soon(os.kill, os.getpid(), signal.SIGTERM)
        async def main():
            say("main started")
            await asyncio.sleep(3600)
        run(main(), loop=loop)
        say("returned")
    """, env=receiver.env)
    r = a.finish()
    assert r.returncode == 0, r
    msgs = receiver.without_pings()
    stopping = msgs.index("STOPPING=1\nSTATUS=stopping: SIGTERM received")
    assert not any(m.startswith("READY=1") for m in msgs[stopping:]), msgs


def test_notify_ready_after_stopping_is_not_sent(app, receiver):
    a = app("""
        async def main():
            say("READY")
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                say("SENT", aiorun.notify_ready("too late"))
                raise
        run(main(), notify_ready_on_start=False)
    """, env=receiver.env)
    a.wait_line("READY")
    receiver.wait_for("STATUS=starting")
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["READY", "SENT False"], r
    assert any("READY=1 not delivered: STOPPING=1 was sent already" in l
               for l in r.stderr), r
    assert not any(m.startswith("READY=1") for m in receiver.without_pings())
