"""A connection that outlives restarts: HOLD, then after each of N
`systemctl restart UNIT` one line, answered by the pid of the process that
serves the connection now.  Prints the pids as one JSON list.

    python hold.py PORT UNIT N
"""
import json
import socket
import subprocess
import sys

port, unit, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
conn = socket.create_connection(("127.0.0.1", port), timeout=30)
lines = conn.makefile("rb")
conn.sendall(b"HOLD\n")
pids = [int(lines.readline())]
for _ in range(n):
    subprocess.run(["systemctl", "restart", unit], check=True)
    conn.sendall(b"which\n")
    pids.append(int(lines.readline()))
print(json.dumps(pids), flush=True)
