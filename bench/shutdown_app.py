"""One side of the shutdown-latency benchmark, run as a child of bench/run.py.

    python shutdown_app.py SIDE LOOP KIND N

SIDE  ours | original   run() of the aiorun installed in this interpreter
      floor             a minimal hand-written stdlib shutdown
LOOP  asyncio | uvloop
KIND  idle     N tasks, a mix of asyncio.sleep, a bare future and a
               Queue.get on a queue of each task's own
      streams  N tasks, each reading a stream on a socket pair of its own

It starts the tasks, lets each run to its first await, then prints
"ready" and waits.  The parent sends SIGTERM and reads back one line,
"ended <CLOCK_MONOTONIC seconds>", printed as run() (or the floor's
equivalent) returns; it times the process exit itself.
"""
import asyncio
import os
import signal
import socket
import sys
import time


def keep(task):
    TASKS.add(task)
    task.add_done_callback(TASKS.discard)


async def idle_task(kind):
    if kind == 0:
        await asyncio.sleep(3600)
    elif kind == 1:
        await asyncio.get_running_loop().create_future()
    else:
        await asyncio.Queue().get()


# Strong references, the way asyncio's documentation asks services to keep
# them: a task waiting on a future or a queue that nothing else holds is
# garbage, and the collector would destroy it ("Task was destroyed but it
# is pending!").  Each task leaves the set when it ends.
TASKS = set()
PEERS = []  # the other ends, kept open so that no read ever completes


async def stream_task(sock):
    reader, _writer = await asyncio.open_connection(sock=sock)
    await reader.read(1)


async def start(kind, n):
    if kind == "idle":
        for i in range(n):
            keep(asyncio.ensure_future(idle_task(i % 3)))
    else:
        for _ in range(n):
            ours, theirs = socket.socketpair()
            PEERS.append(theirs)
            keep(asyncio.ensure_future(stream_task(ours)))
    # Two turns of the loop: every task reaches its first await (a stream
    # task needs the second for open_connection's own await).
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    print("ready", flush=True)


def floor(loop_kind, kind, n):
    """The least a correct shutdown does: stop on the signal, cancel every
    task, wait for them all, close the loop."""
    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.create_task(start(kind, n))
    loop.run_forever()
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.close()


def main():
    side, loop_kind, kind, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    if side == "floor":
        floor(loop_kind, kind, n)
    else:
        from aiorun import run
        run(start(kind, n), use_uvloop=loop_kind == "uvloop")
    print("ended", time.clock_gettime(time.CLOCK_MONOTONIC), flush=True)


if __name__ == "__main__":
    main()
