#!/usr/bin/env bash
# Sets everything up, then runs the test suite on CPU with 8 fake devices (see tests/conftest.py).
# Extra args go to pytest, e.g. bash launch/test.sh -k vit
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
workers="${IV2_TEST_WORKERS:-$(nproc)}"
rc=0
.venv/bin/python -m pytest -n "$workers" tests "$@" || rc=$?
[ "$rc" -eq 5 ] && { echo "no tests collected"; rc=0; }
exit "$rc"
