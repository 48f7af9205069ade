"""SM clock and power beside a device bench: which timed rows ran throttled.

  python -m benchmarks.tools.clock_log run LOG.csv -- CMD ...   # CMD with nvidia-smi sampling
  python -m benchmarks.tools.clock_log summary LOG.csv BENCH.json

``run`` samples clocks, power, temperature and the active clock-event reasons every 50 ms
into LOG.csv while CMD runs. ``summary`` splits the log at the bench rows' wall stamps (rows of
``benchmarks.common.Record`` carry ``wall``: when the row was added) and prints, per row, the
median and lowest SM clock and the median power over the time since the previous row (compile
and warm-up included), then the median SM clock and power over the row's timed calls alone
(the seconds of its ``ms_all`` samples before its stamp: a row is added right after its
last timed call) and
the row's median time in millions of SM cycles at that clock (ms x MHz / 1000). Under a power
cap the clock, not the kernel, moves most between runs and machines: the cycles compare across
them where milliseconds do not (docs/PERFORMANCE.md, "How it is measured").
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
  # (The shapes bench's rows name their shape and an 8-bit row its precision.)
  return " ".join(str(row[k]) for k in ("shape", "backend", "window", "mode", "precision")
                  if row.get(k) not in (None, ""))


def timed_window(row: dict, samples) -> list:
  """The samples taken during ``row``'s timed calls: the ``sum(ms_all)`` seconds (times its
  ``calls_per_sample``, plus 20 ms for the calls' host overhead) before its wall stamp; []
  without ``ms_all`` or ``wall``."""
  wall, times = row.get("wall"), row.get("ms_all")
  if wall is None or not times:
    return []
  start = wall - sum(times) * row.get("calls_per_sample", 1) / 1e3 - 0.02
  return [s for s in samples if start <= s[0] <= wall]


def summary(log_path: str, bench_json: str) -> None:
  samples = _read(log_path)
  with open(bench_json) as f:
    bench = json.load(f)
  rows = bench.get("results", bench.get("rows", []))
  print("| row | ms | SM MHz median / min | W median | reasons | timed: SM MHz / W | "
        "M cycles |\n|---|---|---|---|---|---|---|")
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
    ms = r.get("ms", float("nan"))
    timed = timed_window(r, samples)
    if timed:
      t_clk = float(np.median([s[1] for s in timed]))
      t_pw = float(np.median([s[2] for s in timed]))
      timed_cols = f"{t_clk:.0f} / {t_pw:.0f} | {ms * t_clk / 1e3:.2f}"
    else:
      timed_cols = "- | -"
    print(f"| {_row_name(r)} | {ms:.1f} | {np.median(clk):.0f} / "
          f"{clk.min():.0f} | {np.median(pw):.0f} | {' '.join(reasons)} | {timed_cols} |")


if __name__ == "__main__":
  if sys.argv[1] == "run":
    sep = sys.argv.index("--")
    sys.exit(run(sys.argv[2], sys.argv[sep + 1:]))
  summary(sys.argv[2], sys.argv[3])
