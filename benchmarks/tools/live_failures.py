"""A pytest plugin that writes each failing test's report to a file the moment it fails
(``-p benchmarks.tools.live_failures``, file from ``$JSTA_FAILURE_LOG``, default
``failures.log``): a GPU test run cut short by its time limit still says what failed and why,
while pytest's own summary only comes at the end (with xdist, from the controller)."""

from __future__ import annotations

import os


def pytest_runtest_logreport(report):
  if report.failed:
    with open(os.environ.get("JSTA_FAILURE_LOG", "failures.log"), "a") as f:
      f.write(f"==== {report.nodeid} ({report.when}, {report.duration:.1f} s)\n")
      f.write(str(report.longrepr)[-6000:] + "\n")
