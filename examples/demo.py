"""The README demo: the echo server and client of examples/, then a SIGINT
to the server, showing the graceful shutdown transcript."""
import os
import signal
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def example(*names):
    return [sys.executable, "-u", os.path.join(HERE, "with_logging.py"),
            *[os.path.join(HERE, n) for n in names]]


def main():
    server = subprocess.Popen(example("echo_server.py"), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    assert server.stdout is not None
    print("$ python echo_server.py")
    for line in server.stdout:
        print(line, end="")
        if line.startswith("Serving on"):
            break
    else:
        sys.exit("the server did not start")

    client = subprocess.run(example("echo_client.py"), capture_output=True, text=True,
                            timeout=30)
    for line in server.stdout:
        print(line, end="")
        if line.startswith("Close the client socket"):
            break
    print("^C  (SIGINT sent to the server)")
    server.send_signal(signal.SIGINT)
    rest, _ = server.communicate(timeout=30)
    print(rest, end="")
    print(f"[server exit code {server.returncode}]")
    print("\n$ python echo_client.py")
    print(client.stdout + client.stderr, end="")
    print(f"[client exit code {client.returncode}]")
    return 0 if server.returncode == 0 and client.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
