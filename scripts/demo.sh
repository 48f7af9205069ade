#!/usr/bin/env bash
# Quick start: STA against full attention on random data (small shape on CPU, the paper's
# shape on a GPU). Extra arguments go to `python -m jsta.demo` (see --help).
set -euo pipefail
source "$(dirname "$0")/env.sh"
exec "$PY" -m jsta.demo "$@"
