"""SM clock and power beside a device bench: which timed rows ran throttled.

  python -m benchmarks.tools.clock_log run LOG.csv -- CMD ...   # CMD with nvidia-smi sampling
  python -m benchmarks.tools.clock_log summary LOG.csv BENCH.json

``run`` samples clocks, power, temperature and the active clock-event reasons every 50 ms
into LOG.csv while CMD runs. ``summary`` splits the log at the bench rows' wall stamps (rows of
``benchmarks.common.Record`` carry ``wall``: when the row was added) and prints, per row, the
median and lowest SM clock and the median power over the time since the previous row.
"""

from __future__ import annotations

import csv
import datetime
import json
import subprocess
import sys

import numpy as np

_FIELDS = "timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_event_reasons.active"


def run(log_path: str, cmd: list[str]) -> int:
  """Runs ``cmd`` with nvidia-smi sampling into ``log_path``; returns cmd's exit status. Where
  nvidia-smi is missing, cmd runs unsampled (an empty log) and a line on stderr says so."""
  with open(log_path, "w") as f:
    try:
      smi = subprocess.Popen(["nvidia-smi", f"--query-gpu={_FIELDS}",
                              "--format=csv,noheader,nounits", "-lms", "50"], stdout=f)
    except FileNotFoundError:
      print("clock_log: no nvidia-smi here, running without clock samples", file=sys.stderr)
      return subprocess.call(cmd)
    try:
      return subprocess.call(cmd)
    finally:
      smi.terminate()
      smi.wait()


def _read(log_path: str):
  rows = []
  with open(log_path) as f:
    for r in csv.reader(f):
      if len(r) < 6:
        continue
      try:
        t = datetime.datetime.strptime(r[0].strip(), "%Y/%m/%d %H:%M:%S.%f").timestamp()
        rows.append((t, float(r[1]), float(r[3]), float(r[4]), r[5].strip()))
      except ValueError:
        continue
  return rows


def _row_name(row: dict) -> str:
  if "name" in row:
    return f"{row['name']} {row.get('window', '')}".strip()
  return " ".join(str(row.get(k, "")) for k in ("backend", "window", "mode"))


def summary(log_path: str, bench_json: str) -> None:
  samples = _read(log_path)
  with open(bench_json) as f:
    bench = json.load(f)
  rows = bench.get("results", bench.get("rows", []))
  print("| row | ms | SM MHz median / min | W median | reasons |\n|---|---|---|---|---|")
  prev = samples[0][0] - 1.0 if samples else 0.0
  for r in rows:
    wall = r.get("wall")
    if wall is None:
      continue
    seg = [s for s in samples if prev < s[0] <= wall]   # each sample in one row only
    prev = wall
    if not seg:
      continue
    clk = np.array([s[1] for s in seg])
    pw = np.array([s[2] for s in seg])
    reasons = sorted({s[4] for s in seg})
    print(f"| {_row_name(r)} | {r.get('ms', float('nan')):.1f} | {np.median(clk):.0f} / "
          f"{clk.min():.0f} | {np.median(pw):.0f} | {' '.join(reasons)} |")


if __name__ == "__main__":
  if sys.argv[1] == "run":
    sep = sys.argv.index("--")
    sys.exit(run(sys.argv[2], sys.argv[sep + 1:]))
  summary(sys.argv[2], sys.argv[3])
