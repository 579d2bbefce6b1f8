# make demo            the echo server and client of examples/, stopped by SIGINT
# make test            build and test on every CPython 3.9-3.15 this machine has
#                      (see scripts/test)
# make test-newest     the same on 3.14 and 3.15 from Debian unstable (debootstrap, cached)
# make test-pypy       the same on Debian's PyPy (pypy3, Python 3.9)
# make test-freethreaded  the same on a free-threaded CPython 3.13t with the
#                      GIL off, plus the threads stress test (the 3.13t is
#                      built from Debian's source once, ~4 min, and cached)
# make docs            the documentation site into build/docs (Sphinx, furo;
#                      warnings are errors), from PyPI into .venvs/docs
# make reliability     the quick reliability set CI runs (docs/reliability.md)
# make bench           this aiorun against aiorun 2025.1.1 and bare asyncio:
#                      writes bench/RESULTS.md and bench/shutdown.png (~30 min)
# make bench-smoke     the same at tiny sizes, one run, writes nothing (CI)
# make wheels          an sdist and a manylinux wheel per CPython into dist/,
#                      each smoke-tested in a fresh venv without a compiler
# make test-systemd    under a real systemd: Debian bookworm (252) and trixie (257)
#                      roots booted with systemd-nspawn (cached), the systemd guide's units driven with
#                      systemctl and journalctl (as root)
# make test-haproxy    the drain behind Debian's haproxy: no request lost with
#                      drain_delay=2, against drain_delay=0 (writes bench/haproxy.md)
# make bench-health    the health endpoint's latency under load, during a call
#                      that holds the GIL, and the app's latency while the
#                      endpoint is abused (writes bench/health.md)
# make tsan            the threads stress test under ThreadSanitizer on a
#                      3.13t built with it (~10 min once, cached; not in CI)
# make deadline-bound how far past shutdown_deadline=1 each way of hanging
#                      ends (bench/deadline.py); fails past the bound
# make sanitize | memcheck | refleak | nomemory | storm | startup-window | fuzz
#                      one each; long versions: make storm TRIALS=500,
#                      make refleak REPS=100, make nomemory STEP=1,
#                      make fuzz EXAMPLES=5000 SEED=7 (the re-entrancy fuzzer;
#                      under the sanitizers: make fuzz-sanitize EXAMPLES=...)
PYTHON ?= python3
PY311 = .venvs/py3.11/bin/python
TRIALS ?= 100
REPS ?= 30
STEP ?= 1
EXAMPLES ?= 300
SEED ?= 1

.PHONY: deadline-bound demo docs test test-newest test-pypy test-freethreaded test-systemd test-haproxy bench-health tsan wheels bench bench-smoke clean reliability sanitize memcheck refleak nomemory storm startup-window fuzz fuzz-sanitize

demo:
	@[ -x .venvs/demo/bin/python ] || $(PYTHON) -m venv .venvs/demo
	@.venvs/demo/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
	@.venvs/demo/bin/python examples/demo.py

docs:
	@[ -x .venvs/docs/bin/python ] || $(PYTHON) -m venv .venvs/docs
	.venvs/docs/bin/python -m pip install -q --disable-pip-version-check -r docs/requirements.txt
	.venvs/docs/bin/python -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
	rm -rf build/docs
	.venvs/docs/bin/python -m sphinx -W --keep-going -n -q -b html docs build/docs
	@echo "the site: build/docs/index.html"

test:
	scripts/test

test-newest:
	scripts/test-newest

$(PY311):
	scripts/test 3.11

sanitize: $(PY311)
	scripts/sanitize

memcheck: $(PY311)
	scripts/memcheck

refleak:
	REFLEAK_REPS=$(REPS) scripts/debug-python tests/leaks/refleak.py

# Fails the n-th allocation for every STEP-th n; the C stacks of the failed
# allocation and of any crash (tests/reliability/failalloc.c) tell whose code it was.
nomemory:
	scripts/debug-python tests/reliability/nomemory.py --step $(STEP)

storm: $(PY311)
	$(PY311) tests/reliability/storm.py --trials $(TRIALS)
	$(PY311) tests/reliability/storm.py --trials $(TRIALS) --uvloop

deadline-bound: $(PY311)
	$(PY311) bench/deadline.py --runs 3 --deadline 1

startup-window: $(PY311)
	$(PY311) tests/reliability/startup_window.py --trials $$(( $(TRIALS) * 4 ))

fuzz: $(PY311)
	AIORUN_FUZZ_EXAMPLES=$(EXAMPLES) AIORUN_FUZZ_SEED=$(SEED) \
	    $(PY311) -m pytest -q -p no:cacheprovider tests/test_fuzz_reentrancy.py

fuzz-sanitize: $(PY311)
	AIORUN_FUZZ_EXAMPLES=$(EXAMPLES) AIORUN_FUZZ_SEED=$(SEED) \
	    PYTEST_ARGS="tests/test_fuzz_reentrancy.py" scripts/sanitize

bench:
	scripts/bench

bench-smoke:
	scripts/bench --smoke

wheels:
	scripts/wheels

test-pypy:
	scripts/test-pypy

test-freethreaded:
	scripts/test-freethreaded

tsan:
	scripts/tsan

test-haproxy:
	scripts/test-haproxy

bench-health: $(PY311)
	AIORUN_STRICT_BUILD=1 $(PY311) -m pip install -q --disable-pip-version-check --force-reinstall --no-deps .
	$(PY311) bench/health.py --write bench/health.md

test-systemd:
	scripts/test-systemd
	AIORUN_SYSTEMD_SUITE=trixie scripts/test-systemd

reliability:
	$(MAKE) sanitize
	$(MAKE) refleak REPS=12
	$(MAKE) nomemory STEP=11
	$(MAKE) storm TRIALS=5
	$(MAKE) startup-window TRIALS=25
	$(MAKE) deadline-bound

clean:
	rm -rf build .venvs src/*.egg-info src/aiorun/*.so
