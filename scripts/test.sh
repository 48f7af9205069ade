#!/usr/bin/env bash
# Runs the test suite (GPU tests are skipped without a GPU) on PYTEST_WORKERS processes
# (pytest-xdist, default 2; 0 runs in this process). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
rc=0
"$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" tests "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
