"""The health endpoint (run(health=...)): /readyz and /livez answered by a C
thread, on real sockets, from apps run in child processes.  Each step is a
handshake: a line the app prints, a line this test writes, an answer read.
Latencies are measured by the benchmark (bench/health.py), not here."""
import errno
import os
import re
import signal
import socket
import sys
import time

import pytest

from conftest import FREE_THREADED, PYPY

pytestmark = pytest.mark.skipif(sys.platform == "win32",
                                reason="the health endpoint is POSIX only")


def endpoint(a):
    """Where the app's endpoint listens, from its INFO line: (host, port) or
    a unix socket path."""
    line = a.wait_log("Health endpoint on ")
    m = re.search(r"Health endpoint on (?:http://\[?([0-9a-f.:]+)\]?:(\d+)|(\S+)): ", line)
    assert m, line
    return (m.group(1), int(m.group(2))) if m.group(2) else m.group(3)


def connect(where, timeout=10):
    family = socket.AF_UNIX if isinstance(where, str) else (
        socket.AF_INET6 if ":" in where[0] else socket.AF_INET)
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(where)
    return s


def exchange(where, data):
    """Send data as is; return everything the endpoint sent before closing."""
    with connect(where) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def get(where, path, method="GET"):
    """(status, headers, body) of one request."""
    raw = exchange(where, f"{method} {path} HTTP/1.1\r\nHost: probe\r\n\r\n".encode())
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(l.split(": ", 1) for l in lines[1:])
    return status, headers, body.decode()


def poll_until(where, path, predicate, what, timeout=30):
    """Ask again until predicate(status, body) holds (a bound on a hang)."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        status, _, body = get(where, path)
        seen = (status, body)
        if predicate(status, body):
            return seen
        time.sleep(0.02)
    raise AssertionError(f"{what}: last answer {seen}")


IDLE = """
    async def main():
        say("STARTED")
        await asyncio.sleep(1000)

    run(main(), {args})
"""


def idle_app(app, args, **kw):
    """An app that only idles under run(args); (app, endpoint) once started."""
    a = app(IDLE.format(args=args), **kw)
    where = endpoint(a)
    a.wait_line("STARTED")
    return a, where


SERVING = """
    async def main():
        say("SERVING")
        loop = asyncio.get_running_loop()
        while True:
            line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
            if not line:
                return
            if line == "ready":
                aiorun.notify_ready()
                say("READY CALLED")
            elif line.startswith("sleep "):
                # Blocked on the loop's thread, GIL let go, until the test
                # writes a byte to the FIFO: no race with a timer.
                fd = os.open(line.split(" ", 1)[1], os.O_RDWR)
                say("SLEEPING")
                os.read(fd, 1)
                os.close(fd)
                say("WOKE")
            elif line.startswith("hold "):
                import ctypes
                fd = os.open(line.split(" ", 1)[1], os.O_RDWR)
                buf = ctypes.create_string_buffer(1)
                # A signal for the process lands on another thread, as it
                # may in any app; here it would cut the read short (EINTR).
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
                say("HOLDING")
                ctypes.PyDLL(None).read(fd, buf, 1)   # blocks holding the GIL
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
                os.close(fd)
                say("RELEASED")
"""


def fifo(tmp_path, name):
    """A FIFO the app blocks on until release() writes to it."""
    path = tmp_path / name
    os.mkfifo(path)
    return str(path)


def release(path):
    # Never a wait: with no reader left (the app gone), ENXIO, not a hang.
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def stop(a, sig=signal.SIGTERM):
    a.proc.stdin.close()
    a.proc.stdin = None
    a.send(sig)
    return a.finish()


def test_readyz_follows_the_app_and_turns_503_before_the_drain(app):
    a = app(SERVING + """
    async def worker():
        try:
            await asyncio.sleep(1000)
        except asyncio.CancelledError:
            say("CANCELLED")
            raise

    async def both():
        asyncio.ensure_future(worker())
        await main()

    run(both(), health=":0", notify_ready_on_start=False, drain_delay=3)
    """, stdin=True)
    where = endpoint(a)
    a.wait_line("SERVING")
    assert get(where, "/readyz")[::2] == (503, "starting\n")
    a.write("ready\n")
    a.wait_line("READY CALLED")
    status, headers, body = get(where, "/readyz")
    assert (status, body) == (200, "ready\n")
    assert headers["Connection"] == "close"
    assert headers["Content-Length"] == str(len(body))
    a.send(signal.SIGTERM)
    poll_until(where, "/readyz", lambda s, b: s == 503, "readyz after SIGTERM")
    # The drain (3 s) is under way: nothing has been cancelled yet.
    assert "CANCELLED" not in a.stdout_lines and a.proc.poll() is None
    assert get(where, "/readyz")[::2] == (503, "stopping\n")
    assert get(where, "/livez")[0] == 200   # stopping is not dead
    a.proc.stdin.close()
    a.proc.stdin = None
    r = a.finish()
    assert r.returncode == 0
    assert "CANCELLED" in r.stdout
    with pytest.raises(ConnectionRefusedError):
        connect(where)   # gone once run() has returned


def test_readyz_turns_ready_when_the_main_coroutine_has_started(app):
    a, where = idle_app(app, 'health=":0"')
    poll_until(where, "/readyz", lambda s, b: s == 200, "ready after start")
    a.send(signal.SIGINT)
    assert a.finish().returncode == 0


@pytest.mark.skipif(PYPY, reason="on PyPy, a ctypes call does not hold a GIL the same way")
def test_livez_tells_a_held_gil_from_a_blocked_loop_from_a_healthy_one(app, tmp_path):
    a = app(SERVING + """
    run(main(), health=":0", liveness_timeout=1)
    """, stdin=True)
    where = endpoint(a)
    a.wait_line("SERVING")
    status, body = poll_until(where, "/livez", lambda s, b: s == 200, "healthy")
    assert re.fullmatch(r"alive: the loop ran \d+\.\d s ago\n", body)

    blocker = fifo(tmp_path, "block")
    a.write(f"sleep {blocker}\n")
    a.wait_line("SLEEPING")
    status, body = poll_until(where, "/livez", lambda s, b: s == 503, "sleep on the loop")
    assert re.fullmatch(r"the loop has not run for \d+\.\d s.*\n", body)
    assert "held the GIL" not in body
    if not FREE_THREADED:
        assert "lets the GIL go" in body
    release(blocker)
    a.wait_line("WOKE")
    poll_until(where, "/livez", lambda s, b: s == 200, "healthy again")

    if not FREE_THREADED:
        holder = fifo(tmp_path, "hold")
        a.write(f"hold {holder}\n")
        a.wait_line("HOLDING")
        status, body = poll_until(where, "/livez", lambda s, b: "GIL for" in b,
                                  "a call that holds the GIL")
        assert status == 503
        assert re.fullmatch(r"the loop has not run for \d+\.\d s: a call has held the "
                            r"GIL for \d+\.\d s without letting it go\n", body)
        assert "RELEASED" not in a.stdout_lines   # answered while the GIL was held
        release(holder)
        a.wait_line("RELEASED")
        poll_until(where, "/livez", lambda s, b: s == 200, "healthy after the hold")
    assert stop(a).returncode == 0


def test_requests_other_than_the_two_probes(app):
    a, where = idle_app(app, 'health="127.0.0.1:0"')
    assert get(where, "/")[0] == 404
    assert get(where, "/readyz/x")[0] == 404
    status, headers, _ = get(where, "/readyz", method="POST")
    assert status == 405 and headers["Allow"] == "GET, HEAD"
    raw = exchange(where, b"HEAD /livez HTTP/1.1\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and raw.endswith(b"\r\n\r\n")
    assert exchange(where, b"GET /livez?verbose=1 HTTP/1.0\n\n").startswith(
        b"HTTP/1.1 200 ")
    for garbage in (b"\r\n\r\n", b"GET\r\n\r\n", b"GET /readyz\r\n\r\n",
                    b"GET /readyz HTTP/2.0\r\n\r\n", b"\x00\xff\xfe junk\r\n\r\n",
                    b"GET  /readyz HTTP/1.1\r\n\r\n"):
        assert exchange(where, garbage).startswith(b"HTTP/1.1 400 "), garbage
    big = b"GET /readyz HTTP/1.1\r\nX-Big: " + b"a" * 8000 + b"\r\n\r\n"
    try:
        answer = exchange(where, big)
    except ConnectionResetError:
        answer = b"HTTP/1.1 431 (reset before it was read)"
    assert answer.startswith(b"HTTP/1.1 431 ")
    # A client that sends nothing is closed without an answer...
    with connect(where) as idle:
        assert idle.recv(100) == b""
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


def test_idle_connections_do_not_keep_a_probe_waiting(app):
    a, where = idle_app(app, 'health=":0"')
    poll_until(where, "/readyz", lambda s, b: s == 200, "ready")
    idle = [connect(where) for _ in range(300)]   # more than the endpoint keeps
    for s in idle[:100]:
        s.sendall(b"GET /readyz HTTP/1.1\r\nX-Slow: ")   # a slowloris start
    try:
        assert get(where, "/livez")[0] == 200
        assert get(where, "/readyz")[0] == 200
    finally:
        for s in idle:
            s.close()
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


def test_a_unix_socket_endpoint_is_made_and_removed(app, tmp_path):
    path = tmp_path / "health.sock"
    path_str = str(path)
    # A socket file a dead process left behind is taken over.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path_str)
    stale.close()
    a = app(f"""
    import pathlib
    async def main():
        say("STARTED")
        await asyncio.sleep(1000)

    run(main(), health=pathlib.Path({path_str!r}))
    """)
    assert endpoint(a) == path_str
    a.wait_line("STARTED")
    poll_until(path_str, "/readyz", lambda s, b: s == 200, "ready")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    assert not path.exists()


def test_a_unix_socket_another_process_answers_on_is_left_alone(app, tmp_path):
    path = str(tmp_path / "taken.sock")
    taken = socket.socket(socket.AF_UNIX)
    taken.bind(path)
    taken.listen()
    try:
        r = app(f"""
        async def main():
            say("NEVER")
        run(main(), health={path!r})
        """).finish()
    finally:
        taken.close()
    assert r.returncode == 1
    assert "NEVER" not in r.stdout
    assert (f"OSError: [Errno {errno.EADDRINUSE}] health endpoint: cannot listen on "
            f"'{path}': Address already in use") in r.stderr_text


def test_a_port_in_use_fails_run_before_the_app_starts(app):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        r = app(f"""
        async def main():
            say("NEVER")
        try:
            run(main(), health="127.0.0.1:{port}")
        except OSError as e:
            say("OSError", e.errno == __import__("errno").EADDRINUSE, e)
        """).finish()
    finally:
        busy.close()
    assert r.returncode == 0
    assert r.stdout == [f"OSError True [Errno {errno.EADDRINUSE}] health endpoint: "
                        f"cannot listen on "
                        f"'127.0.0.1:{port}': Address already in use"]
    assert "coroutine 'main' was never awaited" not in r.stderr_text


@pytest.mark.parametrize("value, error", [
    ("1.5", "TypeError: run() argument 'health' must be str, int, os.PathLike or None, "
            "not float"),
    ("True", "TypeError: run() argument 'health' must be str, int"),
    ("b'x'", "TypeError: run() argument 'health' must be str, int"),
    ("70000", "ValueError: run() argument 'health' must be a port from 0 to 65535"),
    ("-1", "ValueError: run() argument 'health' must be a port from 0 to 65535"),
    ("'localhost'", "ValueError: run() argument 'health' must be 'HOST:PORT'"),
    ("'h:99999'", "ValueError: run() argument 'health' must be 'HOST:PORT'"),
    ("'::1:80'", "ValueError: run() argument 'health' must be 'HOST:PORT'"),
    ("'1.2.3.4:8x'", "ValueError: run() argument 'health' must be 'HOST:PORT'"),
    ("'a\\x00b:1'", "ValueError: run() argument 'health' must be 'HOST:PORT'"),
])
def test_a_bad_address_is_refused_naming_the_parameter(app, value, error):
    r = app(f"""
    async def main():
        say("NEVER")
    try:
        run(main(), health={value})
    except Exception as e:
        say(f"{{type(e).__name__}}: {{e}}")
    """).finish()
    assert r.returncode == 0
    assert len(r.stdout) == 1 and r.stdout[0].startswith(error), r.stdout
    assert "never awaited" not in r.stderr_text


@pytest.mark.parametrize("value, error", [
    ("0", "ValueError: run() argument 'liveness_timeout' must be a number of seconds "
          ">= 0.05 (the heartbeat's pace), not 0"),
    ("-1", "ValueError: run() argument 'liveness_timeout' must be a number of seconds"),
    ("0.01", "ValueError: run() argument 'liveness_timeout' must be a number of seconds"),
    ("float('nan')", "ValueError: run() argument 'liveness_timeout'"),
    ("'5'", "TypeError: run() argument 'liveness_timeout' must be a number of seconds"),
    ("True", "TypeError: run() argument 'liveness_timeout' must be a number of seconds"),
])
def test_a_bad_liveness_timeout_is_refused_naming_the_parameter(app, value, error):
    r = app(f"""
    async def main():
        say("NEVER")
    try:
        run(main(), health=":0", liveness_timeout={value})
    except Exception as e:
        say(f"{{type(e).__name__}}: {{e}}")
    """).finish()
    assert len(r.stdout) == 1 and r.stdout[0].startswith(error), r.stdout


@pytest.mark.parametrize("env, error", [
    ({"AIORUN_HEALTH": "nowhere"},
     "ValueError: environment variable AIORUN_HEALTH must be 'HOST:PORT'"),
    ({"AIORUN_HEALTH": ":0", "AIORUN_LIVENESS_TIMEOUT": "soon"},
     "ValueError: environment variable AIORUN_LIVENESS_TIMEOUT must be a number"),
])
def test_bad_environment_variables_are_refused_naming_them(app, env, error):
    r = app("""
    async def main():
        say("NEVER")
    try:
        run(main())
    except Exception as e:
        say(f"{type(e).__name__}: {e}")
    """, env=env).finish()
    assert len(r.stdout) == 1 and r.stdout[0].startswith(error), r.stdout


def test_the_environment_turns_it_on_for_an_app_that_says_nothing(app):
    a = app("""
    async def main():
        say("STARTED")
        await asyncio.sleep(1000)
    run(main())
    """, env={"AIORUN_HEALTH": "127.0.0.1:0", "AIORUN_LIVENESS_TIMEOUT": "0.5"})
    where = endpoint(a)
    a.wait_line("STARTED")
    assert get(where, "/livez")[0] == 200
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


def test_only_the_run_that_owns_the_process_serves_it(app):
    """A helper thread's run() beside the main one: asking it for an endpoint
    is an error, the environment does not apply to it, and its end leaves the
    main run()'s endpoint serving."""
    a = app("""
    def helper(asked):
        async def idle():
            say("HELPER STARTED", asked)
            await asyncio.sleep(0.2)
            asyncio.get_running_loop().stop()
        try:
            run(idle(), **({"health": ":0"} if asked else {}))
            say("HELPER RETURNED", asked)
        except ValueError as e:
            say("HELPER REFUSED", e)

    async def main():
        say("STARTED")
        for asked in (True, False):
            t = threading.Thread(target=helper, args=(asked,))
            t.start()
            await asyncio.get_running_loop().run_in_executor(None, t.join)
        say("HELPERS DONE")
        await asyncio.sleep(1000)

    run(main())
    """, env={"AIORUN_HEALTH": "127.0.0.1:0"})
    where = endpoint(a)
    a.wait_line("HELPERS DONE")
    assert get(where, "/readyz")[0] == 200
    a.send(signal.SIGTERM)
    r = a.finish()
    assert r.returncode == 0
    assert "HELPER REFUSED run() argument 'health' needs run() in the main thread" in r.stdout
    assert "HELPER RETURNED False" in r.stdout
    assert sum("Health endpoint on" in l for l in r.stderr) == 1


def test_runs_in_sequence_each_start_not_ready(app):
    a = app("""
    async def second():
        say("SECOND")
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        aiorun.notify_ready()
        say("SECOND READY")
        await asyncio.sleep(1000)

    async def stop_soon():
        say("FIRST")
        await asyncio.sleep(0)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        asyncio.get_running_loop().stop()

    run(stop_soon(), health=":0")
    say("BETWEEN")
    run(second(), health=":0", notify_ready_on_start=False)
    """, stdin=True)
    first = endpoint(a)
    a.wait_line("FIRST")
    poll_until(first, "/readyz", lambda s, b: s == 200, "first ready")
    a.write("stop\n")
    a.wait_line("BETWEEN")
    second = endpoint(a)
    a.wait_line("SECOND")
    assert get(second, "/readyz")[::2] == (503, "starting\n")
    a.write("go\n")
    a.wait_line("SECOND READY")
    assert get(second, "/readyz")[0] == 200
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_lets_go_of_the_socket(app):
    a = app("""
    async def main():
        pid = os.fork()
        if pid == 0:
            # the child outlives its parent's run() a while
            time.sleep(3)
            os._exit(0)
        say("FORKED", pid)
        await asyncio.sleep(1000)

    run(main(), health=":0")
    """)
    where = endpoint(a)
    child = int(a.wait_prefix("FORKED").split()[1])
    poll_until(where, "/readyz", lambda s, b: s == 200, "ready")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    try:
        with pytest.raises(ConnectionRefusedError):
            connect(where)   # the child alive, the port free
        os.kill(child, 0)    # still there: this proved something
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_cli_options(app, tmp_path):
    (tmp_path / "svc.py").write_text(
        "import asyncio\n"
        "async def main():\n"
        "    print('STARTED', flush=True)\n"
        "    await asyncio.sleep(1000)\n")
    from conftest import App
    a = App([sys.executable, "-m", "aiorun", "--health", "127.0.0.1:0",
             "--liveness-timeout", "2", "svc:main"], cwd=str(tmp_path))
    try:
        line = a.wait_log("Health endpoint on ")
        port = int(re.search(r":(\d+): GET", line).group(1))
        a.wait_line("STARTED")
        poll_until(("127.0.0.1", port), "/readyz", lambda s, b: s == 200, "ready")
        a.send(signal.SIGTERM)
        assert a.finish().returncode == 0
    finally:
        a.kill()


def test_a_huge_liveness_timeout_means_never_stale(app):
    a, where = idle_app(app, 'health=":0", liveness_timeout=float("inf")')
    assert get(where, "/livez")[0] == 200
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


def test_head_gets_no_body_whatever_the_answer(app):
    a, where = idle_app(app, 'health=":0"')
    for request, status in ((b"HEAD /nope HTTP/1.1\r\n\r\n", b"404"),
                            (b"HEAD /readyz HTTP/3\r\n\r\n", b"400")):
        raw = exchange(where, request)
        assert raw.startswith(b"HTTP/1.1 " + status) and raw.endswith(b"\r\n\r\n"), raw
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


def test_a_unix_socket_whose_owner_does_not_accept_is_in_use_not_a_hang(app, tmp_path):
    path = str(tmp_path / "busy.sock")
    owner = socket.socket(socket.AF_UNIX)
    owner.bind(path)
    owner.listen(0)
    queued = []
    try:
        while True:   # fill its backlog: a new connect would block
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(path)
            except BlockingIOError:
                c.close()
                break
            queued.append(c)
        r = app(f"""
        async def main():
            say("NEVER")
        try:
            run(main(), health={path!r})
        except OSError as e:
            say("OSError", e.errno == __import__("errno").EADDRINUSE)
        """).finish()
    finally:
        for c in queued:
            c.close()
        owner.close()
    assert r.stdout == ["OSError True"]


def test_a_path_object_without_a_slash_is_a_unix_socket(app, tmp_path):
    a = app("""
    import pathlib
    async def main():
        say("STARTED")
        await asyncio.sleep(1000)
    run(main(), health=pathlib.Path("h.sock"))
    """)
    assert endpoint(a) == str(tmp_path / "h.sock")   # shown absolute
    a.wait_line("STARTED")
    poll_until(str(tmp_path / "h.sock"), "/readyz", lambda s, b: s == 200, "ready")
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    assert not (tmp_path / "h.sock").exists()


def test_a_stray_liveness_variable_does_not_break_a_run_without_the_endpoint(app):
    r = app("""
    async def main():
        asyncio.get_running_loop().stop()
    run(main())
    say("RETURNED")
    """, env={"AIORUN_LIVENESS_TIMEOUT": "10s"}).finish()
    assert r.returncode == 0 and r.stdout == ["RETURNED"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_while_the_endpoint_starts_lets_go_of_the_socket(app):
    # Forked by a logging handler on the endpoint's own INFO line: before
    # run() has listed its loop, so only the owner leads the hook to it.
    a = app("""
    children = []
    class ForkOnLine(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("Health endpoint on") and not children:
                pid = os.fork()
                if pid == 0:
                    time.sleep(3)
                    os._exit(0)
                children.append(pid)
    logging.getLogger("aiorun").addHandler(ForkOnLine())

    async def main():
        say("FORKED", children[0])
        await asyncio.sleep(1000)

    run(main(), health=":0")
    """)
    where = endpoint(a)
    child = int(a.wait_prefix("FORKED").split()[1])
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    try:
        with pytest.raises(ConnectionRefusedError):
            connect(where)
        os.kill(child, 0)
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.skipif(PYPY, reason="on PyPy, a ctypes call does not hold a GIL the same way")
def test_readyz_turns_at_the_signal_even_while_a_call_holds_the_gil(app, tmp_path):
    a = app(SERVING + """
    run(main(), health=":0")
    """, stdin=True)
    where = endpoint(a)
    a.wait_line("SERVING")
    poll_until(where, "/readyz", lambda s, b: s == 200, "ready")
    holder = fifo(tmp_path, "hold")
    a.write(f"hold {holder}\n")
    a.wait_line("HOLDING")
    a.send(signal.SIGTERM)   # Python's handler cannot run before the call returns
    poll_until(where, "/readyz", lambda s, b: s == 503, "readyz after SIGTERM")
    assert "RELEASED" not in a.stdout_lines
    release(holder)
    a.proc.stdin.close()
    a.proc.stdin = None
    assert a.finish().returncode == 0


def test_a_burst_of_waiting_probes_is_answered_in_full(app):
    a, where = idle_app(app, 'health=":0"')
    poll_until(where, "/readyz", lambda s, b: s == 200, "ready")
    a.send(signal.SIGSTOP)   # the requests pile up, complete, in the backlog
    socks = []
    try:
        for _ in range(100):
            s = connect(where)
            s.sendall(b"GET /livez HTTP/1.1\r\n\r\n")
            socks.append(s)
        a.send(signal.SIGCONT)
        answers = []
        for s in socks:
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            answers.append(data.split(b" ", 2)[1] if data else b"none")
    finally:
        a.send(signal.SIGCONT)
        for s in socks:
            s.close()
    assert answers == [b"200"] * 100
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0


def test_a_relative_unix_path_is_removed_after_a_chdir(app, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    a = app("""
    async def main():
        os.chdir("elsewhere")
        say("MOVED")
        await asyncio.sleep(1000)
    run(main(), health="./rel.sock")
    """)
    endpoint(a)
    a.wait_line("MOVED")
    assert (tmp_path / "rel.sock").exists()
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
    assert not (tmp_path / "rel.sock").exists()


def test_a_loop_that_refuses_the_heartbeat_fails_run_cleanly(app):
    r = app("""
    class Refusing(asyncio.SelectorEventLoop):
        def call_later(self, delay, callback, *args, **kwargs):
            if getattr(callback, "__name__", "") == "_health_beat":
                raise RuntimeError("call_later refused")
            return super().call_later(delay, callback, *args, **kwargs)

    async def main():
        say("NEVER")
    loop = Refusing()
    try:
        run(main(), loop=loop, health=":0")
    except RuntimeError as e:
        say("raised", e)
    loop.close()
    """).finish()
    assert r.stdout == ["raised call_later refused"]
    assert "never awaited" not in r.stderr_text
    assert "Task was destroyed" not in r.stderr_text


@pytest.mark.parametrize("args, message", [
    (["--health", "nowhere"], "argument --health: run() argument 'health' must be"),
    (["--liveness-timeout", "0.001"], "argument --liveness-timeout: run() argument "
                                      "'liveness_timeout' must be a number of seconds"),
    (["--shutdown-report", ""], "argument --shutdown-report: must be a path"),
])
def test_the_cli_refuses_bad_values_as_usage_errors(tmp_path, args, message):
    from conftest import App
    (tmp_path / "svc.py").write_text("async def main():\n    pass\n")
    r = App([sys.executable, "-m", "aiorun", *args, "svc:main"], cwd=str(tmp_path)).finish()
    assert r.returncode == 2, r
    assert any(message in line for line in r.stderr), r.stderr


def test_livez_stays_alive_through_a_shutdown_that_waits(app):
    a = app("""
    async def main():
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, time.sleep, 3)   # the executor's shutdown waits
        say("STARTED")
        await asyncio.sleep(1000)
    run(main(), health=":0", liveness_timeout=0.5)
    """)
    where = endpoint(a)
    a.wait_line("STARTED")
    a.send(signal.SIGTERM)
    status, body = poll_until(where, "/livez", lambda s, b: "(executor)" in b,
                              "livez during the executor's shutdown")
    assert status == 200
    assert re.fullmatch(r"alive: shutting down \(executor\); the loop ran \d+\.\d s ago\n",
                        body)
    assert a.finish().returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_endpoint_under_abuse_keeps_answering_with_bounded_memory(app):
    # The bench's abuse (make bench-health), small enough for every run of
    # the suite, the sanitizers' included: thousands of connections held,
    # garbage, oversized headers and slowloris starts, then a probe.
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096 + 256)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    a, where = idle_app(app, 'health=":0"')
    poll_until(where, "/readyz", lambda s, b: s == 200, "ready")

    def rss_kib():
        for line in open(f"/proc/{a.proc.pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

    held = []
    try:
        before = rss_kib()
        for _ in range(min(4000, wanted - 256)):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(where)
            except BlockingIOError:
                pass
            held.append(s)
        for i in range(200):
            try:
                exchange(where, bytes((i * 7 + j) % 256 for j in range(300)) + b"\r\n\r\n")
                exchange(where, b"GET /livez HTTP/1.1\r\nX: " + b"a" * 16384)
            except OSError:
                pass   # a reset for the oversized one is the kernel's business
        for s in held[:100]:
            try:
                s.send(b"GET /readyz HTTP/1.1\r\nX-Slow: ")
            except OSError:
                pass
        assert get(where, "/livez")[0] == 200
        assert get(where, "/readyz")[0] == 200
        growth = rss_kib() - before
    finally:
        for s in held:
            s.close()
    assert growth < 8 * 1024, f"VmRSS grew by {growth} KiB"
    a.send(signal.SIGTERM)
    assert a.finish().returncode == 0
