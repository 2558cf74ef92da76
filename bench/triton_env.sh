#!/usr/bin/env bash
# Builds the Triton anchor's own virtualenv (never a project dependency) and prints its python.
#
#     bash bench/triton_env.sh            # creates bench/.triton-venv once, then prints its python
#     python bench/bench_vs_triton.py --triton-python "$(bash bench/triton_env.sh | tail -1)"
#
# nvidia-pytriton ships a tritonserver binary and a Python backend stub that links against
# libpython3.X.so: the interpreter that builds the venv must be a shared-library build (pyenv's
# 3.11 is), and its lib/ must be on LD_LIBRARY_PATH when the server starts. bench_vs_triton.py
# sets that itself from the venv's base_prefix; `triton_env.sh --check` starts an identity
# model once to prove the install works here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="${TRITON_VENV:-$HERE/.triton-venv}"
PYTHON="${PYTHON:-python3.11}"

if ! "$PYTHON" -c 'import sysconfig, sys; sys.exit(0 if sysconfig.get_config_var("Py_ENABLE_SHARED") else 1)'; then
    echo "triton_env: $PYTHON is not built with --enable-shared; tritonserver's python backend needs libpython" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" >&2
    "$VENV/bin/python" -m pip install --quiet nvidia-pytriton numpy 'tritonclient[all]' >&2
fi

LIBDIR="$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)')/lib"
# The stub for this venv's Python version must find its libpython (ldd says "not found" otherwise).
VERSION="$("$VENV/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
STUB="$("$VENV/bin/python" -c 'import pytriton, pathlib; print(pathlib.Path(pytriton.__file__).parent)')/tritonserver/python_backend_stubs/$VERSION/triton_python_backend_stub"
if [ ! -x "$STUB" ]; then
    echo "triton_env: PyTriton has no Python backend stub for Python $VERSION ($STUB)" >&2
    exit 1
fi
if LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$STUB" | grep -q "not found"; then
    echo "triton_env: $STUB is missing libraries even with $LIBDIR on LD_LIBRARY_PATH:" >&2
    LD_LIBRARY_PATH="$LIBDIR" ldd "$STUB" | grep "not found" >&2
    exit 1
fi
if [ "${1:-}" = "--check" ]; then
    LD_LIBRARY_PATH="$LIBDIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
        "$VENV/bin/python" "$HERE/triton_identity.py" --check >&2
fi
echo "$VENV/bin/python"
