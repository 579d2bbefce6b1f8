# Sourced by scripts/test and scripts/wheels.
#   find_python MINOR
# prints a CPython of that minor version (GIL build) that can make a venv
# with pip, looked for under pyenv, as /usr/bin/pythonX.Y, as pythonX.Y on
# PATH and as python3 on PATH, in that order; prints nothing if there is none.
#   find_python 3.13t
# the same for a free-threaded build: the one scripts/test-freethreaded
# builds (AIORUN_FT_PREFIX), else python3.13t on PATH.
PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"

find_python() {
    local minor=$1 candidate
    local candidates=()
    if [ "${minor%t}" != "$minor" ]; then
        find_free_threaded_python "$minor"
        return
    fi
    # pyenv: the newest patch release of this minor version.
    candidate=$(ls -d "$PYENV_ROOT"/versions/"$minor".* 2>/dev/null | grep -E "/$minor\.[0-9]+$" \
                | sort -V | tail -1)
    [ -n "$candidate" ] && candidates+=("$candidate/bin/python")
    candidates+=("/usr/bin/python$minor")
    candidate=$(command -v "python$minor" 2>/dev/null || true)
    [ -n "$candidate" ] && candidates+=("$candidate")
    candidate=$(command -v python3 2>/dev/null || true)
    [ -n "$candidate" ] && candidates+=("$candidate")
    for candidate in "${candidates[@]}"; do
        [ -x "$candidate" ] || continue
        [ "$("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)" \
            = "$minor" ] || continue
        # A free-threaded build is a platform of its own, not this one.
        [ "$("$candidate" -c 'import sysconfig; print(sysconfig.get_config_var("Py_GIL_DISABLED") or 0)')" \
            = 0 ] || continue
        "$candidate" -c 'import ensurepip, venv' 2>/dev/null || continue
        echo "$candidate"
        return
    done
}


find_free_threaded_python() {
    local minor=${1%t} candidate
    local prefix=${AIORUN_FT_PREFIX:-$HOME/.cache/aiorun/python$minor""t}
    for candidate in "$prefix/bin/python${minor}t" "$(command -v "python${minor}t" 2>/dev/null || true)"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        [ "$("$candidate" -c 'import sysconfig; print(sysconfig.get_config_var("Py_GIL_DISABLED") or 0)' 2>/dev/null)" \
            = 1 ] || continue
        "$candidate" -c 'import ensurepip, venv' 2>/dev/null || continue
        echo "$candidate"
        return
    done
}
