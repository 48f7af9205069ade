"""Wall-clock timing of jitted JAX calls, shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def timed_calls_ms(fn, *args, warmup: int = 2, iters: int = 5, min_total_ms: float = 0.0,
                   max_iters: int = 200) -> list[float]:
  """Times ``iters`` calls of ``fn(*args)`` after ``warmup`` calls; each call is synchronised
  (``block_until_ready``), so the times include the device work. Returns milliseconds.

  Calls go on past ``iters`` until the timed calls add up to ``min_total_ms`` (at most
  ``max_iters`` calls): a call of a millisecond or two is otherwise timed a handful of times,
  and one slow call (host jitter, a clock change) moves the median of so few."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  while len(times) < iters or (sum(times) < min_total_ms and len(times) < max_iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) * 1e3)
  return times


def median_ms(fn, *args, warmup: int = 2, iters: int = 5) -> float:
  """Median of :func:`timed_calls_ms`."""
  return statistics.median(timed_calls_ms(fn, *args, warmup=warmup, iters=iters))
