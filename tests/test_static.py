"""Static checks of the repository's Python: no undefined name anywhere (pyflakes), so that a
code path no test runs (a benchmark's GPU-only branch, say) still cannot fail on a typo."""

from __future__ import annotations

import os

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import messages  # noqa: E402
from pyflakes import reporter as reporter_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("jsta", "pallas_kernels", "models", "benchmarks", "tests", "scripts")
# Errors, not style: names used but never bound, and code pyflakes cannot parse.
FATAL = (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport,
         messages.DuplicateArgument, messages.ReturnOutsideFunction,
         messages.YieldOutsideFunction, messages.ContinueOutsideLoop,
         messages.BreakOutsideLoop)


class _Collect(reporter_lib.Reporter):
  def __init__(self):
    super().__init__(None, None)
    self.found = []

  def flake(self, message):
    if isinstance(message, FATAL):
      self.found.append(str(message))

  def syntaxError(self, filename, msg, lineno, offset, text):
    self.found.append(f"{filename}:{lineno}: {msg}")

  def unexpectedError(self, filename, msg):
    self.found.append(f"{filename}: {msg}")


def test_no_undefined_names():
  paths = [os.path.join(ROOT, p) for p in PACKAGES if os.path.isdir(os.path.join(ROOT, p))]
  rep = _Collect()
  pyflakes_api.checkRecursive(paths, rep)
  assert not rep.found, "\n".join(rep.found)
