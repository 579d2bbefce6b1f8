# Sourced by scripts/test and scripts/wheels.
#   find_python MINOR
# prints a CPython of that minor version (GIL build) that can make a venv
# with pip, looked for under pyenv, as /usr/bin/pythonX.Y, as pythonX.Y on
# PATH and as python3 on PATH, in that order; prints nothing if there is none.
#   find_python 3.13t
# the same for a free-threaded build: the one scripts/test-freethreaded
# builds (AIORUN_FT_PREFIX), else python3.13t on PATH.
PYENV_ROOT="${PYENV_ROOT:-$HOME/.pyenv}"

# The first of the candidates that is CPython MINOR (3.13, or 3.13t for a
# free-threaded build, which is a platform of its own) and can make a venv.
first_usable() {
    local minor=$1 candidate
    shift
    local gil_disabled=0
    [ "${minor%t}" != "$minor" ] && gil_disabled=1
    for candidate in "$@"; do
        [ -n "$candidate" ] && [ -x "$candidate" ] || continue
        [ "$("$candidate" -c 'import sys, sysconfig
print("%d.%d%s" % (sys.version_info[0], sys.version_info[1],
                   "t" if sysconfig.get_config_var("Py_GIL_DISABLED") else ""))' 2>/dev/null)" \
            = "$minor" ] || continue
        "$candidate" -c 'import ensurepip, venv' 2>/dev/null || continue
        echo "$candidate"
        return
    done
}

find_python() {
    local minor=$1 candidate
    if [ "${minor%t}" != "$minor" ]; then
        local prefix=${AIORUN_FT_PREFIX:-$HOME/.cache/aiorun/python$minor}
        first_usable "$minor" "$prefix/bin/python$minor" \
            "$(command -v "python$minor" 2>/dev/null || true)"
        return
    fi
    # pyenv: the newest patch release of this minor version.
    candidate=$(ls -d "$PYENV_ROOT"/versions/"$minor".* 2>/dev/null | grep -E "/$minor\.[0-9]+$" \
                | sort -V | tail -1)
    first_usable "$minor" "${candidate:+$candidate/bin/python}" "/usr/bin/python$minor" \
        "$(command -v "python$minor" 2>/dev/null || true)" \
        "$(command -v python3 2>/dev/null || true)"
}
