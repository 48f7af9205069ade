# Sourced by scripts/demo.sh and scripts/test.sh: finds a Python >= 3.12, makes .venv in the repo
# root if it is missing, and installs the package there (editable, with the test extra, which
# includes the models extra: every README command, `python -m models.train` too, then works).
# Afterwards $PY is the venv's python and the working directory is the repo root (models/ and
# benchmarks/ are not installed; they import from there).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

_py_ok() {  # prints the interpreter's real path if it runs and is >= 3.12
  "$1" -c 'import sys; assert sys.version_info >= (3, 12); print(sys.executable)' 2>/dev/null
}

find_python() {
  local c exe
  # Names on PATH first (a pyenv shim for a version that is not selected fails to run: skipped).
  for c in python3.14 python3.13 python3.12 python3; do
    if command -v "$c" >/dev/null 2>&1 && exe=$(_py_ok "$c"); then echo "$exe"; return 0; fi
  done
  # Then pyenv's installed versions, newest first.
  for c in $(ls -d /root/.pyenv/versions/*/bin/python3 2>/dev/null | sort -V -r); do
    if exe=$(_py_ok "$c"); then echo "$exe"; return 0; fi
  done
  echo "error: no Python >= 3.12 found (tried python3.14..python3.12, python3," \
       "/root/.pyenv/versions/*/bin/python3)" >&2
  return 1
}

if [ ! -x .venv/bin/python ] || ! _py_ok .venv/bin/python >/dev/null; then
  base=$(find_python)
  echo "creating .venv with $base" >&2
  rm -rf .venv
  "$base" -m venv .venv
fi
PY=.venv/bin/python

# (Re)install when pyproject.toml changed since the last install into this venv, or when the
# installed distribution or a test/models dependency is missing (`import jsta` alone would pass
# from the repo root without any install).
stamp=.venv/.jsta-install-stamp
want=$(cksum pyproject.toml | cut -d' ' -f1)
installed_ok() {
  "$PY" -c 'import importlib.metadata as m; m.version("jsta"); import pytest, xdist, optax, tqdm, orbax.checkpoint, matplotlib' \
    2>/dev/null
}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! installed_ok; then
  echo "installing jsta (editable, [test]) into .venv" >&2
  "$PY" -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
