# Sourced by scripts/sanitize, scripts/memcheck and scripts/debug-python:
#   build_copy PYTHON [VAR=VALUE ...]
# builds the extension with PYTHON in a temporary copy of the tree (the
# working tree's own build stays untouched), with the given variables set
# (AIORUN_EXTRA_CFLAGS, AIORUN_DEBUG_BUILD, ...).  Sets $build to the copy,
# whose src/ goes on PYTHONPATH, and removes it on exit.
build_copy() {
    local python=$1
    shift
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    cp -r setup.py pyproject.toml README.md src "$build"/
    rm -f "$build"/src/aiorun/*.so
    (cd "$build" && env AIORUN_STRICT_BUILD=1 "$@" "$python" setup.py -q build_ext -i 2>&1 | grep -v -i beta || true)
    ls "$build"/src/aiorun/_aiorun*.so >/dev/null
}
