"""Wall-clock timing of jitted JAX calls, shared by the demo and the benchmarks."""

from __future__ import annotations

import math
import statistics
import time

import jax


def timed_calls_ms(fn, *args, warmup: int = 2, iters: int = 5, min_total_ms: float = 0.0,
                   max_iters: int = 200, warmup_ms: float = 0.0, settle: float = 0.0,
                   settle_window_ms: float = 250.0, max_warmup_ms: float = 0.0,
                   min_sample_ms: float = 0.0) -> list[float]:
  """Milliseconds per call of ``fn(*args)``: the samples of :func:`timed_samples_ms`."""
  return timed_samples_ms(fn, *args, warmup=warmup, iters=iters, min_total_ms=min_total_ms,
                          max_iters=max_iters, warmup_ms=warmup_ms, settle=settle,
                          settle_window_ms=settle_window_ms, max_warmup_ms=max_warmup_ms,
                          min_sample_ms=min_sample_ms)[0]


def timed_samples_ms(fn, *args, warmup: int = 2, iters: int = 5, min_total_ms: float = 0.0,
                     max_iters: int = 200, warmup_ms: float = 0.0, settle: float = 0.0,
                     settle_window_ms: float = 250.0, max_warmup_ms: float = 0.0,
                     min_sample_ms: float = 0.0) -> tuple[list[float], int]:
  """(times, calls_per_sample): ``iters`` timed samples of ``fn(*args)`` after ``warmup``
  calls, in milliseconds per call. Each sample is ``calls_per_sample`` calls issued back to
  back and synchronised once at the end (``block_until_ready``), so the times include the
  device work; with ``min_sample_ms`` 0 (the default) that is one call, else as many as make a
  sample last about ``min_sample_ms`` at the warm-up's speed: a call of a millisecond or two,
  synchronised alone, also times the host's dispatch, the wait for the result and the GPU's
  idle gap between calls, and their jitter (docs/PERFORMANCE.md, "How it is measured").

  Samples go on past ``iters`` until they add up to ``min_total_ms`` of calls (at most
  ``max_iters`` samples): a call of a millisecond or two is otherwise timed a handful of times,
  and one slow call (host jitter, a clock change) moves the median of so few.

  Warm-up calls (one at a time) go on past ``warmup`` until they add up to ``warmup_ms`` (at
  most ``max_iters`` calls): on a GPU that was idle, the first tenths of a second of load can
  run faster than what follows (presumably a higher clock than it holds under sustained load),
  so a median of a few calls right after a short warm-up can land anywhere between the two.
  With ``settle`` > 0 the warm-up then goes on, in windows of at least ``settle_window_ms``
  (and 3 calls), until the median call of a window is within ``settle`` (relative) of the
  window's before, or the warm-up reaches ``max_warmup_ms``: after the idle seconds of a
  compile a GPU can also take seconds to reach the speed it keeps (10% over 1.2 s seen)."""
  spent, calls, last = 0.0, 0, []

  def sample(n: int) -> float:
    t0 = time.perf_counter()
    out = None
    for _ in range(n):
      out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) * 1e3 / n

  while calls < warmup or (spent < warmup_ms and calls < max_iters):
    last.append(sample(1))
    spent += last[-1]
    calls += 1
  if settle > 0:
    previous = None
    while spent < max_warmup_ms:
      window = []
      while sum(window) < settle_window_ms or len(window) < 3:
        window.append(sample(1))
      spent += sum(window)
      last = window
      current = statistics.median(window)
      if previous is not None and abs(current - previous) <= settle * current:
        break
      previous = current
  per_sample = 1
  if min_sample_ms > 0:
    # The warm-up's last calls say how long one takes (one call first where there was none).
    typical = statistics.median(last[-5:]) if last else sample(1)
    per_sample = max(1, math.ceil(min_sample_ms / max(typical, 1e-3)))
  times = []
  while len(times) < iters or (sum(times) * per_sample < min_total_ms
                                and len(times) < max_iters):
    times.append(sample(per_sample))
  return times, per_sample


def median_ms(fn, *args, warmup: int = 2, iters: int = 5, warmup_ms: float = 0.0) -> float:
  """Median of :func:`timed_calls_ms`."""
  return statistics.median(timed_calls_ms(fn, *args, warmup=warmup, iters=iters,
                                          warmup_ms=warmup_ms))
