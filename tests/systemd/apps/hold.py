"""A connection that outlives restarts: it says HOLD, then asks which
process serves it now (one line, answered with that process's pid).

    python hold.py PORT UNIT N   N times: systemctl restart UNIT, then ask;
                                 prints the pids as one JSON list
    python hold.py PORT          asks once per line read on stdin, and
                                 prints each answer (the test restarts)
"""
import json
import socket
import subprocess
import sys

port = int(sys.argv[1])
conn = socket.create_connection(("127.0.0.1", port), timeout=30)
lines = conn.makefile("rb")
conn.sendall(b"HOLD\n")
first = int(lines.readline())
if len(sys.argv) > 2:
    unit, n = sys.argv[2], int(sys.argv[3])
    pids = [first]
    for _ in range(n):
        subprocess.run(["systemctl", "restart", unit], check=True)
        conn.sendall(b"which\n")
        pids.append(int(lines.readline()))
    print(json.dumps(pids), flush=True)
else:
    print(first, flush=True)
    for _ in sys.stdin:
        conn.sendall(b"which\n")
        print(int(lines.readline()), flush=True)
