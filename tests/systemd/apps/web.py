"""A small HTTP/1.0 server for restarts under load, on the socket systemd
passes it (aiorun-web.socket, named "web"), or on a port of its own when
started without one (aiorun-web-bound.service, the baseline).

GET answers "200 OK", this process's pid and the greeting its last reload
read from /run/aiorun-web.greeting ("fail" there makes the reload fail).  A client that sends HOLD
keeps its connection: the server puts it in systemd's fd store, answers each
line with the pid, and the next process takes it back from the store, so the
connection outlives every restart.  On SIGTERM it stops accepting, lets the
requests in flight finish and leaves the held connections open.
"""
import asyncio
import os
import socket
import sys

import aiorun

PID = str(os.getpid()).encode()
GREETING_FILE = "/run/aiorun-web.greeting"
held = set()
greeting = [b"hello"]


async def reload():
    """SIGHUP (Type=notify-reload): the greeting from its file."""
    with open(GREETING_FILE, "rb") as f:
        new = f.read().strip()
    if new == b"fail":
        raise ValueError("the greeting file says fail")
    await asyncio.sleep(0.2)   # a reload that takes a while, while serving
    greeting[0] = new


async def serve_held(reader, writer, name):
    """Each line of a held connection is answered with this pid, until the
    client goes; the shutdown leaves the connection to the next process."""
    task = asyncio.current_task()
    held.add(task)
    try:
        while True:
            line = await reader.readline()
            if not line:
                aiorun.remove_stored_fd(name)
                writer.close()
                return
            writer.write(PID + b"\n")
            await writer.drain()
    finally:
        held.discard(task)


async def handle(reader, writer):
    first = await reader.readline()
    if first.startswith(b"HOLD"):
        conn = writer.get_extra_info("socket")
        name = f"held-{conn.fileno()}-{PID.decode()}"
        aiorun.store_fd(conn.fileno(), name, poll=False)
        writer.write(PID + b"\n")
        await writer.drain()
        await serve_held(reader, writer, name)
        return
    while (await reader.readline()).strip():
        pass   # the headers
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + PID + b" "
                 + greeting[0] + b"\n")
    await writer.drain()
    writer.close()


async def resume(conn, name):
    reader, writer = await asyncio.open_connection(sock=conn)
    await serve_held(reader, writer, name)


async def main():
    passed = aiorun.listen_sockets()
    for name, socks in passed.items():
        if name.startswith("held-"):
            for conn in socks:
                asyncio.get_running_loop().create_task(resume(conn, name))
    if "web" in passed:
        sock = passed["web"][0]
    else:
        sock = socket.create_server(("127.0.0.1", int(sys.argv[1])),
                                    backlog=socket.SOMAXCONN)
        sock.setblocking(False)
    # backlog: asyncio listens again, and would cut systemd's to 100.
    server = await asyncio.start_server(handle, sock=sock, backlog=socket.SOMAXCONN)
    aiorun.notify_ready("serving")
    await aiorun.shutdown_event().wait()
    server.close()              # accept no more: the socket stays systemd's
    for task in list(held):     # held connections wait for the next process
        task.cancel()


# Held connections end by cancellation, which closes only this process's
# copy: systemd's store keeps the connection open.
aiorun.run(main(), notify_ready_on_start=False, drain_delay=10, cancel_main_first=True,
           reload_callback=reload)
