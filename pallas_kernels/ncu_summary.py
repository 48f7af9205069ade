"""Summarizes Nsight Compute CSV exports: per kernel, its duration, the top metrics of the
details page that name stalls, throughput or occupancy; then the SASS lines with the most
warp-stall samples. Usage: python3 -m pallas_kernels.ncu_summary details.csv [source.csv]"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict

KEYS = ("Duration", "Throughput", "Stall", "Occupancy", "Registers", "Warp Cycles",
        "Issued", "Eligible", "Active Warps", "Shared Memory", "L2 Hit", "Bank")


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
  lines = open(path, newline="").read().splitlines()
  # The source page may hold several kernels, each with its own header line.
  blocks, cur = [], []
  for ln in lines:
    if ln.startswith('"#"') or ln.startswith("# ") or ln.startswith('"Address"') or (
        ln.startswith('"') and "Source" in ln and "Address" in ln):
      if cur:
        blocks.append(cur)
      cur = [ln]
    elif cur:
      cur.append(ln)
    else:
      print(ln[:200])
  if cur:
    blocks.append(cur)
  for blk in blocks:
    rd = list(csv.reader(blk))
    hdr = rd[0]
    print("\n# columns:", hdr[:40])
    col = next((i for i, h in enumerate(hdr) if "Sampling (All" in h), None)
    if col is None:
      col = next((i for i, h in enumerate(hdr) if "Sampl" in h), None)
    if col is None:
      continue
    src = next((i for i, h in enumerate(hdr) if h in ("Source", "# Source")), 1)

    def val(r):
      try:
        return float(r[col])
      except (ValueError, IndexError):
        return 0.0
    body = rd[1:]
    total = sum(val(r) for r in body) or 1.0
    print(f"total samples {total:.0f} over {len(body)} lines; top {top}:")
    for r in sorted(body, key=val, reverse=True)[:top]:
      print(f"  {val(r) / total * 100:5.1f}%  {r[0][:8]:8} {r[src][:110]}")


if __name__ == "__main__":
  details(sys.argv[1])
  if len(sys.argv) > 2:
    source(sys.argv[2])
