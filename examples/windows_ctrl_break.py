# Windows only: start an aiorun app in a new process group, then stop it
# with CTRL_BREAK_EVENT, the way Windows stops a console app.  Not runnable
# on POSIX.
import os
import signal
import subprocess as sp
import sys
import time

assert sys.platform == 'win32', 'this example is for Windows'

app = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'hello.py')
proc = sp.Popen(
    [sys.executable, app],
    stdout=sp.PIPE,
    stderr=sp.STDOUT,
    creationflags=sp.CREATE_NEW_PROCESS_GROUP
)
print(proc.pid)
time.sleep(2)
os.kill(proc.pid, signal.CTRL_BREAK_EVENT)
print(proc.communicate(timeout=30)[0].decode())
print('exit code', proc.returncode)
