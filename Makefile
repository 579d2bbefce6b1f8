# make demo   the echo server and client of the seeds, stopped by SIGINT
# make test   build and test on every CPython 3.9-3.13 (see scripts/test)
PYTHON ?= python3

.PHONY: demo test clean

demo:
	@[ -x .venvs/demo/bin/python ] || $(PYTHON) -m venv .venvs/demo
	@.venvs/demo/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
	@.venvs/demo/bin/python examples/demo.py

test:
	scripts/test

clean:
	rm -rf build .venvs src/*.egg-info src/aiorun/*.so
