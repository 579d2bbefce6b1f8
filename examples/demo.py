"""make demo: the echo server and client of examples/, then Ctrl-C (SIGINT)
to the server, showing its graceful shutdown.  Both run with the aiorun log
shown; each line is printed as it is read, marked with its process (the
two processes' lines may interleave a little out of order; each one's own
lines are in order)."""
import os
import platform
import signal
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
print_lock = threading.Lock()


def say(who, line):
    with print_lock:
        print(f"{who:>6} | {line}", flush=True)


def start(who, name):
    proc = subprocess.Popen([sys.executable, "-u", os.path.join(HERE, "with_logging.py"),
                             os.path.join(HERE, name)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []

    def read():
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            say(who, lines[-1])

    reader = threading.Thread(target=read)
    reader.start()
    return proc, reader, lines


def wait_for(lines, prefix, proc, timeout=30.0):
    """Until a line starting with prefix was read, the process ended, or timeout."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(prefix) for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def main():
    print(f"Python {platform.python_version()} ({sys.executable})")
    print("$ python examples/echo_server.py   and then   $ python examples/echo_client.py\n")
    server, server_reader, server_lines = start("server", "echo_server.py")
    if not wait_for(server_lines, "Serving on", server):
        server.kill()
        sys.exit("the server did not start")
    client, client_reader, _ = start("client", "echo_client.py")
    client.wait(timeout=30)
    client_reader.join()
    wait_for(server_lines, "Close the client socket", server)
    say("server", "^C  (SIGINT)")
    server.send_signal(signal.SIGINT)
    server.wait(timeout=30)
    server_reader.join()
    print(f"\nexit codes: server {server.returncode}, client {client.returncode}")
    return 0 if server.returncode == 0 and client.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
