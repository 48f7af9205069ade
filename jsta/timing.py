"""Wall-clock timing of jitted JAX calls, shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def timed_calls_ms(fn, *args, warmup: int = 2, iters: int = 5) -> list[float]:
  """Times ``iters`` calls of ``fn(*args)`` after ``warmup`` calls; each call is synchronised
  (``block_until_ready``), so the times include the device work. Returns milliseconds."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return times


def median_ms(fn, *args, warmup: int = 2, iters: int = 5) -> float:
  """Median of :func:`timed_calls_ms`."""
  return statistics.median(timed_calls_ms(fn, *args, warmup=warmup, iters=iters))
