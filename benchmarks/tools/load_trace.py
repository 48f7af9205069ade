"""Call times of one program under sustained load, call by call: how long a GPU takes to reach
the speed it keeps, and whether a heavy program before it changes that speed.

  python -m benchmarks.tools.load_trace --shape paper --out trace.json
  python -m benchmarks.tools.clock_log run clock.csv -- python -m benchmarks.tools.load_trace ...

Phases, in order, each a stretch of back-to-back synchronised calls (after one compile and
one call of each program): ``idle`` seconds of nothing (what a compile and a reference check
leave before a bench row's timing), ``--seconds`` of the jsta forward (the op, "auto"), then
``--heat-seconds`` of cuDNN dense attention at the same shape (the heavy row a bench times
next to it), then ``--seconds`` of the jsta forward again. Every call's wall stamp and time go
to the JSON (``wall`` lines up with the clock log's samples); the table gives each phase's
medians over windows of ``--window-ms``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax

import jsta
from benchmarks import shapes as shapes_lib
from benchmarks.common import random_inputs, run_meta


def calls_for(fn, args, seconds: float) -> list[tuple[float, float]]:
  """[(wall at the call's end, ms)] of back-to-back synchronised calls for ``seconds``."""
  out, end = [], time.perf_counter() + seconds
  while time.perf_counter() < end or not out:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append((time.time(), (time.perf_counter() - t0) * 1e3))
  return out


def windows(calls, window_ms: float) -> list[tuple[float, float, int]]:
  """[(seconds since the phase's start, median ms, calls)] per window of ``window_ms``."""
  if not calls:
    return []
  start = calls[0][0] - calls[0][1] / 1e3
  rows, current, edge = [], [], window_ms
  for wall, ms in calls:
    current.append(ms)
    if (wall - start) * 1e3 >= edge:
      rows.append((round(wall - start, 3), statistics.median(current), len(current)))
      current, edge = [], edge + window_ms
  if current:
    rows.append((round(calls[-1][0] - start, 3), statistics.median(current), len(current)))
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shape", default="paper", help="a shape of benchmarks.shapes")
  p.add_argument("--seconds", type=float, default=8.0, help="each jsta phase's length")
  p.add_argument("--heat-seconds", type=float, default=4.0,
                 help="the cuDNN dense phase's length (0: none)")
  p.add_argument("--idle", type=float, default=3.0, help="seconds idle before the first phase")
  p.add_argument("--window-ms", type=float, default=1000.0)
  p.add_argument("--out", default=None, help="JSON path")
  a = p.parse_args(argv)
  if a.seconds <= 0 or a.heat_seconds < 0 or a.idle < 0 or a.window_ms <= 0:
    p.error("--seconds and --window-ms must be > 0, --heat-seconds and --idle >= 0")
  shape = shapes_lib.get(a.shape)  # ValueError naming the known shapes
  spec = shape.spec()
  q, k, v, _ = random_inputs(shape)
  sta = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec))
  n = spec.video_len + spec.text_len
  impl = "cudnn" if jax.default_backend() == "gpu" else None  # None: XLA's, for a CPU run
  dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation=impl))
  dense_args = tuple(x[:, :n] for x in (q, k, v))
  jax.block_until_ready(sta(q, k, v))
  if a.heat_seconds:
    jax.block_until_ready(dense(*dense_args))
  phases = []
  time.sleep(a.idle)
  phases.append(("jsta", calls_for(sta, (q, k, v), a.seconds)))
  if a.heat_seconds:
    phases.append(("cudnn_dense", calls_for(dense, dense_args, a.heat_seconds)))
    phases.append(("jsta_after_dense", calls_for(sta, (q, k, v), a.seconds)))
  record = dict(meta=run_meta() | dict(shape=a.shape, idle_s=a.idle),
                phases=[dict(name=name, calls=calls) for name, calls in phases])
  if a.out:
    with open(a.out, "w") as f:
      json.dump(record, f)
  print(f"{shape.describe()}; idle {a.idle} s first")
  print("| phase | s since start | median ms | calls |")
  print("|---|---|---|---|")
  for name, calls in phases:
    for t, ms, count in windows(calls, a.window_ms):
      print(f"| {name} | {t:.2f} | {ms:.3f} | {count} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
