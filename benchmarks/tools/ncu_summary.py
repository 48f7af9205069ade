"""Summarizes Nsight Compute CSV exports: per kernel, its duration, the top metrics of the
details page that name stalls, throughput or occupancy; then the SASS lines with the most
warp-stall samples.

  python -m benchmarks.tools.ncu_summary details.csv [source.csv]

The exports come from a report of benchmarks.tools.profile_step (see there), e.g.
  ncu --import step.ncu-rep --page details --csv > details.csv
  ncu --import step.ncu-rep --page source --csv --print-source sass > source.csv
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

KEYS = ("Duration", "Throughput", "Stall", "Occupancy", "Registers", "Warp Cycles",
        "Issued", "Eligible", "Active Warps", "Shared Memory", "L2 Hit", "Bank", "pipe",
        "Pipe", "issue_active", "Issue Slots", "IPC")


def details(path):
  rows = list(csv.DictReader(open(path, newline="")))
  by_kernel = defaultdict(list)
  for r in rows:
    by_kernel[(r.get("ID"), r.get("Kernel Name", "")[:80])].append(r)
  for (kid, name), rs in by_kernel.items():
    print(f"\n## kernel {kid}: {name}")
    for r in rs:
      metric = r.get("Metric Name", "")
      if any(k.lower() in metric.lower() for k in KEYS):
        print(f"  {r.get('Section Name', '')[:24]:24} {metric[:60]:60} {r.get('Metric Value', '')} "
              f"{r.get('Metric Unit', '')}")


def source(path, top=45):
  """Per kernel of the source page: the stall reasons over all its samples, then its ``top``
  SASS lines by samples with their two largest stall reasons."""
  blocks = []
  for ln in open(path, newline="").read().splitlines():
    if ln.startswith('"Kernel Name"'):
      blocks.append([ln])
    elif blocks:
      blocks[-1].append(ln)
  for blk in blocks:
    name = next(csv.reader(blk[:1]))[1]
    rows = list(csv.reader(blk[1:]))
    if not rows:
      continue
    col = {h: i for i, h in enumerate(rows[0])}
    body = rows[1:]
    stalls = [h for h in rows[0] if h.startswith("stall_") and "Not Issued" not in h]

    def val(r, c):
      try:
        return float(r[col[c]] or 0)
      except (ValueError, IndexError, KeyError):
        return 0.0
    key = "Warp Stall Sampling (All Samples)"
    total = sum(val(r, key) for r in body)
    print(f"\n## {name}: {total:.0f} samples over {len(body)} SASS lines")
    if not total:
      continue
    for c in sorted(stalls, key=lambda c: -sum(val(r, c) for r in body))[:8]:
      print(f"  {c:24} {sum(val(r, c) for r in body) / total * 100:5.1f}%")
    order = sorted(range(len(body)), key=lambda i: -val(body[i], key))
    for i in order[:top]:
      r = body[i]
      why = sorted(((val(r, c), c) for c in stalls), reverse=True)[:2]
      print(f"  line {i:5d} {val(r, key) / total * 100:5.1f}%  {r[col['Source']].strip()[:70]:70} "
            + " ".join(f"{c[6:]}={v / total * 100:.1f}" for v, c in why if v))


if __name__ == "__main__":
  details(sys.argv[1])
  if len(sys.argv) > 2:
    source(sys.argv[2])
