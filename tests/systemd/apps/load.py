"""Load for restarts: threads that each open a new connection per request
to 127.0.0.1:PORT without pause and count how each attempt ended, until the
file STOP exists; then one JSON line of counts and the longest time without
a successful request.

    python load.py PORT STOP [THREADS]
"""
import json
import os
import socket
import sys
import threading
import time

port, stop = int(sys.argv[1]), sys.argv[2]
threads = int(sys.argv[3]) if len(sys.argv) > 3 else 8
counts = {"attempts": 0, "ok": 0, "refused": 0, "reset": 0, "no_response": 0,
          "timeout": 0, "other": 0}
lock = threading.Lock()
last_ok = [None]
longest_gap = [0.0]


def one():
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = s.recv(64)
            return "ok" if data.startswith(b"HTTP/1.") and data[8:13] == b" 200 " \
                else "no_response"
    except ConnectionRefusedError:
        return "refused"
    except ConnectionResetError:
        return "reset"
    except socket.timeout:
        return "timeout"
    except OSError:
        return "other"


def worker():
    while not os.path.exists(stop):
        outcome = one()
        now = time.monotonic()
        with lock:
            counts["attempts"] += 1
            counts[outcome] += 1
            if outcome == "ok":
                if last_ok[0] is not None:
                    longest_gap[0] = max(longest_gap[0], now - last_ok[0])
                last_ok[0] = now


pool = [threading.Thread(target=worker) for _ in range(threads)]
for t in pool:
    t.start()
for t in pool:
    t.join()
counts["longest_gap_ms"] = round(longest_gap[0] * 1000, 1)
print(json.dumps(counts), flush=True)
