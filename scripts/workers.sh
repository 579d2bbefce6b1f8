# Sourced by the test scripts: pytest's options to spread the suite over
# worker processes (pytest-xdist).  The tests spend most of their time
# waiting on child processes (a run of the suite uses about a third of one
# core), so four workers on two cores take a third of the time.
#   AIORUN_TEST_WORKERS=0 scripts/test     in one process, as before
PYTEST_WORKERS=(-n "${AIORUN_TEST_WORKERS:-4}")
