#!/usr/bin/env bash
# Runs the test suite (GPU tests are skipped without a GPU) on PYTEST_WORKERS processes
# (pytest-xdist, default 2; 0 runs in this process). Extra arguments go to pytest.
# Each worker takes whole test files (--dist loadfile), in file order: a file's module fixtures
# and the programs its tests compile (most of the suite's time on a CPU) are built once, not
# once per worker.
set -euo pipefail
source "$(dirname "$0")/env.sh"
rc=0
"$PY" -m pytest -q -n "${PYTEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder tests "$@" \
  || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
fi
exit "$rc"
