"""Run an example with the aiorun logger shown on stderr.

    python examples/with_logging.py [--debug] [--levels] SCRIPT [ARGS...]

--debug shows DEBUG lines too; --levels prefixes each line with
LEVEL:logger: (the format the tests and the differential check read).
"""
import logging
import runpy
import sys

args = sys.argv[1:]
level = logging.INFO
fmt = "%(message)s"
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag == "--debug":
        level = logging.DEBUG
    elif flag == "--levels":
        fmt = "%(levelname)s:%(name)s:%(message)s"
    else:
        sys.exit(f"unknown option {flag}")
if not args:
    sys.exit(__doc__)
logging.basicConfig(level=level, format=fmt, stream=sys.stderr)
sys.argv = args
runpy.run_path(args[0], run_name="__main__")
