#!/usr/bin/env bash
# Sets everything up, then runs the test suite on CPU with 8 fake devices (see tests/conftest.py).
# Extra args go to pytest, e.g. bash launch/test.sh -k vit
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
workers="${IV2_TEST_WORKERS:-$(nproc)}"
rc=0
# loadgroup: the multi-host chains share one worker (tests/test_multihost.py says why)
.venv/bin/python -m pytest -n "$workers" --dist loadgroup tests "$@" || rc=$?
[ "$rc" -eq 5 ] && { echo "no tests collected"; rc=0; }
exit "$rc"
