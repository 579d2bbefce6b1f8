"""python -m aiorun [options] module:function [args]: the command line.
Its logic is in the extension (cli.c); this file only hands it the arguments."""
import sys

from ._aiorun import _main

sys.exit(_main(sys.argv[1:]))
