"""Socket activation and the fd store, as systemd does them: the fds handed
over from 3 on with LISTEN_PID/LISTEN_FDS/LISTEN_FDNAMES (a launcher here
does what systemd does before exec), and FDSTORE=1 messages with the fd
passed as SCM_RIGHTS to a NOTIFY_SOCKET this test reads.  Every app is a
real child process with real sockets.
"""
import array
import os
import shutil
import subprocess
import socket
import sys
import textwrap
import threading

import pytest

from conftest import PRELUDE, App

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="systemd is POSIX only")

# What systemd does between fork and exec: the fds to 3, 4, ... (through
# high numbers first, so none is overwritten), LISTEN_PID = this pid.
LAUNCHER = textwrap.dedent("""
    import fcntl, os, sys
    sources = [int(fd) for fd in sys.argv[1].split(",") if fd]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i)
        os.close(fd)
    if os.environ.get("LISTEN_PID") == "self":
        os.environ["LISTEN_PID"] = str(os.getpid())
    os.execv(sys.executable, [sys.executable] + sys.argv[2:])
""")


def activated(tmp_path, body, fds, names=None, env=None, count=None, name="app.py"):
    """An app started the way systemd starts a socket-activated service."""
    script = tmp_path / name
    script.write_text(PRELUDE + textwrap.dedent(body))
    full_env = {"LISTEN_PID": "self", "LISTEN_FDS": str(len(fds) if count is None else count)}
    if names is not None:
        full_env["LISTEN_FDNAMES"] = names
    full_env.update(env or {})
    numbers = [f.fileno() if hasattr(f, "fileno") else f for f in fds]
    return App([sys.executable, "-c", LAUNCHER, ",".join(map(str, numbers)), str(script)],
               cwd=str(tmp_path), env=full_env, pass_fds=numbers)


@pytest.fixture
def listener():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield sock
    sock.close()


def test_a_passed_listening_socket_serves_under_run(tmp_path, listener):
    a = activated(tmp_path, """
        import fcntl, socket, subprocess
        socks = aiorun.listen_sockets()
        sock, = socks["web"]
        say("FAMILY", sock.family == socket.AF_INET, sock.type == socket.SOCK_STREAM,
            sock.getblocking())
        say("CLOEXEC", bool(fcntl.fcntl(sock.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
        say("ENV", [k for k in os.environ if k.startswith("LISTEN_")])
        child = subprocess.run([sys.executable, "-c",
                                "import os; print(sorted(k for k in os.environ if k.startswith('LISTEN_')))"],
                               capture_output=True, text=True)
        say("CHILD", child.stdout.strip())
        say("SAME", aiorun.listen_sockets()["web"][0] is sock, aiorun.listen_fds())

        async def handle(reader, writer):
            writer.write(b"served by " + str(os.getpid()).encode() + b"\\n")
            await writer.drain()
            writer.close()

        async def main():
            await asyncio.start_server(handle, sock=sock, backlog=socket.SOMAXCONN)
            say("SERVING")

        run(main())
    """, [listener], names="web")
    a.wait_line("SERVING")
    with socket.create_connection(listener.getsockname(), timeout=10) as c:
        reply = c.makefile().readline()
    a.send(2)
    r = a.finish()
    assert r.returncode == 0, r
    assert reply == f"served by {a.proc.pid}\n"
    assert r.stdout[:5] == ["FAMILY True True False", "CLOEXEC True", "ENV []", "CHILD []",
                            "SAME True {'web': [3]}"], r


def test_names_group_fds_and_a_non_socket_is_left_to_listen_fds(tmp_path, listener):
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "unix.sock"))
    unix.listen(1)
    r_pipe, w_pipe = os.pipe()
    a = activated(tmp_path, """
        import socket
        fds = aiorun.listen_fds()
        say("FDS", sorted(fds.items()))
        socks = aiorun.listen_sockets()
        say("SOCKS", sorted((name, [s.family.name for s in l]) for name, l in socks.items()))
    """, [listener, unix, r_pipe], names="web:web:state")
    r = a.finish()
    unix.close()
    os.close(r_pipe)
    os.close(w_pipe)
    assert r.returncode == 0, r
    assert r.stdout == ["FDS [('state', [5]), ('web', [3, 4])]",
                        "SOCKS [('state', []), ('web', ['AF_INET', 'AF_UNIX'])]"], r
    assert any("listen_sockets(): fd 5 (named 'state') is not a socket; listen_fds() has it"
               in line for line in r.stderr), r


def test_without_names_each_fd_is_unknown(tmp_path, listener):
    a = activated(tmp_path, """
        say(aiorun.listen_fds())
    """, [listener])
    r = a.finish()
    assert r.stdout == ["{'unknown': [3]}"], r


def test_not_activated_gives_nothing(app):
    r = app("""
        say(aiorun.listen_fds(), aiorun.listen_sockets())
    """, env={"LISTEN_PID": None, "LISTEN_FDS": None}).finish()
    assert r.stdout == ["{} {}"], r


def test_variables_for_another_process_are_left_alone(tmp_path, listener):
    a = activated(tmp_path, """
        import fcntl
        say(aiorun.listen_fds(), os.environ["LISTEN_PID"], os.environ["LISTEN_FDS"])
        say("CLOEXEC", bool(fcntl.fcntl(3, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
    """, [listener], env={"LISTEN_PID": "1"})
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["{} 1 1", "CLOEXEC False"], r
    assert any("LISTEN_PID=1 names another process" in line for line in r.stderr), r


@pytest.mark.parametrize("env, count, message", [
    ({"LISTEN_PID": "-5"}, None, "environment variable LISTEN_PID='-5' is not a process id"),
    ({"LISTEN_PID": "12x"}, None, "environment variable LISTEN_PID='12x' is not a process id"),
    ({}, "abc", "environment variable LISTEN_FDS='abc' is not a number of fds"),
    ({}, "-1", "environment variable LISTEN_FDS='-1' is not a number of fds"),
    ({}, "99999999999999999999", "is not a number of fds"),
    ({}, "3", "environment variable LISTEN_FDS=3 names fd 4, which is not open"),
    ({"LISTEN_FDNAMES": "a:b"}, None,
     "environment variable LISTEN_FDNAMES has 2 names for LISTEN_FDS=1 fds"),
])
def test_malformed_variables_are_a_value_error_and_nothing_is_taken(tmp_path, listener, env,
                                                                    count, message):
    a = activated(tmp_path, """
        for attempt in range(2):
            try:
                aiorun.listen_sockets()
            except ValueError as e:
                say("ValueError:", e)
        say("KEPT", "LISTEN_FDS" in os.environ)
    """, [listener], env=env, count=count)
    r = a.finish()
    assert r.returncode == 0, r
    assert len(r.stdout) == 3 and r.stdout[0] == r.stdout[1], r
    assert message in r.stdout[0], r
    assert r.stdout[2] == "KEPT True"


def test_listen_pid_without_listen_fds(app):
    r = app("""
        os.environ["LISTEN_PID"] = str(os.getpid())
        try:
            aiorun.listen_fds()
        except ValueError as e:
            say(e)
    """, env={"LISTEN_FDS": None}).finish()
    assert r.stdout == ["environment variable LISTEN_PID is set but LISTEN_FDS is not"], r


class FdStore:
    """What systemd does with FDSTORE=1: read each message with the fds it
    carries (SCM_RIGHTS) and keep both, in order."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.env = {"NOTIFY_SOCKET": path}
        self.messages = []
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        fds = array.array("i")
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * fds.itemsize))
            except OSError:
                return
            got = []
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[:len(payload) - len(payload) % a.itemsize])
                    got.extend(a)
            with self.cond:
                self.messages.append((data.decode(), got))
                self.cond.notify_all()

    def wait(self, n, timeout=30):
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.messages) >= n, timeout), self.messages
            return list(self.messages)

    def close(self):
        self.sock.close()
        for _, fds in self.messages:
            for fd in fds:
                os.close(fd)


@pytest.fixture
def store(tmp_path):
    s = FdStore(str(tmp_path / "notify.sock"))
    yield s
    s.close()


def same_file(a, b):
    sa, sb = os.fstat(a), os.fstat(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def test_store_fd_passes_the_fd_itself_and_remove_names_it(store, listener):
    a = App([sys.executable, "-c", PRELUDE + textwrap.dedent("""
        import socket
        sock = socket.socket(fileno=int(sys.argv[1]))
        say(aiorun.store_fd(sock, "web"), aiorun.store_fd(sock.fileno(), "web-nopoll", poll=False))
        say(aiorun.remove_stored_fd("web"))
        sock.detach()
    """), str(listener.fileno())], env=dict(store.env), pass_fds=[listener.fileno()])
    r = a.finish()
    assert r.returncode == 0, r
    assert r.stdout == ["True True", "True"], r
    messages = store.wait(3)
    assert [m for m, _ in messages] == ["FDSTORE=1\nFDNAME=web",
                                        "FDSTORE=1\nFDNAME=web-nopoll\nFDPOLL=0",
                                        "FDSTOREREMOVE=1\nFDNAME=web"]
    assert [len(fds) for _, fds in messages] == [1, 1, 0]
    assert same_file(messages[0][1][0], listener.fileno())


def test_the_store_off_says_so_and_sends_nothing(app, store):
    r = app("""
        import socket
        a, b = socket.socketpair()
        os.environ["FDSTORE"] = "0"
        say("OFF", aiorun.store_fd(a, "a"))
        os.environ["FDSTORE"] = "1"
        say("ON", aiorun.store_fd(a, "a"), aiorun.store_fd(b, "b"))
        del os.environ["FDSTORE"]     # systemd before 254: it cannot be asked
        say("UNKNOWN", aiorun.store_fd(a, "a"))
    """, env=store.env).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["OFF False", "ON True True", "UNKNOWN True"], r
    assert "store_fd(): FDSTORE=1 not delivered: the fd store is off " \
           "(FileDescriptorStoreMax= is 0): the fd is not kept" in r.stderr_text
    messages = store.wait(3)
    assert [m for m, _ in messages] == ["FDSTORE=1\nFDNAME=a", "FDSTORE=1\nFDNAME=b",
                                        "FDSTORE=1\nFDNAME=a"]


def test_without_notify_socket_store_fd_says_so(app):
    r = app("""
        import socket
        a, b = socket.socketpair()
        say(aiorun.store_fd(a, "a"), aiorun.remove_stored_fd("a"))
    """, env={"NOTIFY_SOCKET": None, "FDSTORE": None}).finish()
    assert r.returncode == 0, r
    assert r.stdout == ["False False"], r
    assert sum("NOTIFY_SOCKET is not set" in line for line in r.stderr) == 2, r


def test_bad_arguments_name_the_parameter(app):
    r = app("""
        import socket
        a, b = socket.socketpair()
        closed = os.dup(a.fileno()); os.close(closed)
        for args, kw in [((a, ""), {}), ((a, "x:y"), {}), ((a, "x\\ny"), {}), ((a, "é"), {}),
                         ((a, "x" * 256), {}), ((a, 5), {}), (("a", "x"), {}), ((-1, "x"), {}),
                         ((closed, "x"), {}), ((a, "x"), {"poll": 1}), ((a,), {})]:
            try:
                aiorun.store_fd(*args, **kw)
            except (TypeError, ValueError) as e:
                say(type(e).__name__, e)
        for name in ["", 3]:
            try:
                aiorun.remove_stored_fd(name)
            except (TypeError, ValueError) as e:
                say(type(e).__name__, e)
    """, env={"NOTIFY_SOCKET": None}).finish()
    assert r.returncode == 0, r
    out = r.stdout
    assert out[0] == "ValueError store_fd() argument 'name' must be 1 to 255 characters, not ''"
    assert out[1] == "ValueError store_fd() argument 'name' must be printable ASCII " \
                     "without ':', not 'x:y'"
    assert out[2].startswith("ValueError store_fd() argument 'name' must be printable ASCII")
    assert out[3].startswith("ValueError store_fd() argument 'name' must be printable ASCII")
    assert out[4].startswith("ValueError store_fd() argument 'name' must be 1 to 255")
    assert out[5] == "TypeError store_fd() argument 'name' must be str, not int"
    assert out[6].startswith("TypeError store_fd() argument 'fd' must be an fd")
    assert out[7].startswith("ValueError store_fd() argument 'fd' must be an fd")
    assert out[8].startswith("ValueError store_fd() argument 'fd' is ")
    assert out[8].endswith("which is not open")
    assert out[9] == "TypeError store_fd() argument 'poll' must be bool, not int"
    assert out[10].startswith("TypeError store_fd() missing required argument 'name'") \
        or "name" in out[10]
    assert out[11] == "ValueError remove_stored_fd() argument 'name' must be 1 to 255 " \
                      "characters, not ''"
    assert out[12] == "TypeError remove_stored_fd() argument 'name' must be str, not int"
    assert len(out) == 13, out


def test_a_stored_connection_survives_a_restart(tmp_path, store, listener):
    """The whole round: the first process accepts a client, stores the
    connection and exits; the store hands it to the next process by name,
    which answers on it.  The client never reconnects."""
    first = App([sys.executable, "-c", PRELUDE + textwrap.dedent("""
        import socket
        server = socket.socket(fileno=int(sys.argv[1]))
        conn, _ = server.accept()
        conn.sendall(b"hello from the first process\\n")
        say("STORED", aiorun.store_fd(conn, "client"))
        server.detach()
    """), str(listener.fileno())], env=dict(store.env), pass_fds=[listener.fileno()])
    client = socket.create_connection(listener.getsockname(), timeout=10)
    reader = client.makefile("rb")
    assert reader.readline() == b"hello from the first process\n"
    r = first.finish()
    assert r.stdout == ["STORED True"], r
    (message, fds), = store.wait(1)
    assert message == "FDSTORE=1\nFDNAME=client"
    second = activated(tmp_path, """
        conn, = aiorun.listen_sockets()["client"]

        async def main():
            reader, writer = await asyncio.open_connection(sock=conn)
            writer.write(b"hello from the second process\\n")
            await writer.drain()
            say("ECHO", (await reader.readline()).decode().strip())
            writer.close()
            asyncio.get_running_loop().stop()

        run(main())
    """, fds, names="client", env={"NOTIFY_SOCKET": None}, name="second.py")
    assert reader.readline() == b"hello from the second process\n"
    client.sendall(b"still the same connection\n")
    r2 = second.finish()
    client.close()
    assert r2.returncode == 0, r2
    assert r2.stdout == ["ECHO still the same connection"], r2


@pytest.mark.parametrize("server", ["create_server", "aiohttp"])
def test_the_passed_socket_serves_with_create_server_and_aiohttp(tmp_path, listener, server):
    if server == "aiohttp":
        pytest.importorskip("aiohttp")
    a = activated(tmp_path, """
        import socket
        sock, = aiorun.listen_sockets()["web"]
        SERVER = sys.argv[1]

        class Hello(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport

            def data_received(self, data):   # the request read, then answered
                self.transport.write(b"HTTP/1.0 200 OK\\r\\n\\r\\nhello "
                                     + str(os.getpid()).encode())
                self.transport.close()

        async def main():
            if SERVER == "create_server":
                await asyncio.get_running_loop().create_server(
                    Hello, sock=sock, backlog=socket.SOMAXCONN)
            else:
                from aiohttp import web
                async def hello(request):
                    return web.Response(text=f"hello {os.getpid()}")
                app = web.Application()
                app.router.add_get("/", hello)
                runner = web.AppRunner(app)
                await runner.setup()
                await web.SockSite(runner, sock, backlog=socket.SOMAXCONN).start()
            say("SERVING")

        run(main())
    """.replace("sys.argv[1]", repr(server)), [listener], names="web")
    a.wait_line("SERVING")
    with socket.create_connection(listener.getsockname(), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.0\r\n\r\n")
        reply = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            reply += chunk
    a.send(2)
    r = a.finish()
    assert r.returncode == 0, r
    assert reply.startswith(b"HTTP/1.") and reply.endswith(f"hello {a.proc.pid}".encode()), reply


def listen_backlog(port):
    """The backlog of the socket listening on 127.0.0.1:port, as the kernel
    has it (ss shows it as Send-Q of a listening socket)."""
    out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    return int(out[2])


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs ss (iproute2)")
@pytest.mark.parametrize("backlog, expected", [("socket.SOMAXCONN", 4096), ("None", 100)])
def test_the_backlog_systemd_set_survives_when_asyncio_is_given_it(tmp_path, backlog,
                                                                   expected):
    """asyncio listens again on a socket it is given; with backlog= it keeps
    the queue systemd made (Backlog=4096 here), without it the queue is cut
    to asyncio's 100: what the guide tells apps to pass."""
    if socket.SOMAXCONN < 4096 or int(open("/proc/sys/net/core/somaxconn").read()) < 4096:
        pytest.skip("the kernel caps backlogs below 4096 here")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    port = sock.getsockname()[1]
    assert listen_backlog(port) == 4096
    kwargs = "" if backlog == "None" else f", backlog={backlog}"
    a = activated(tmp_path, f"""
        import socket
        sock, = aiorun.listen_sockets()["web"]

        async def main():
            await asyncio.start_server(lambda r, w: None, sock=sock{kwargs})
            say("SERVING")

        run(main())
    """, [sock], names="web")
    a.wait_line("SERVING")
    try:
        assert listen_backlog(port) == expected
    finally:
        a.send(2)
        r = a.finish()
        sock.close()
    assert r.returncode == 0, r
