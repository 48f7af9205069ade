"""Wall-clock timing of jitted JAX calls, shared by the demo and the benchmarks."""

from __future__ import annotations

import statistics
import time

import jax


def timed_calls_ms(fn, *args, warmup: int = 2, iters: int = 5, min_total_ms: float = 0.0,
                   max_iters: int = 200, warmup_ms: float = 0.0, settle: float = 0.0,
                   settle_window_ms: float = 250.0, max_warmup_ms: float = 0.0) -> list[float]:
  """Times ``iters`` calls of ``fn(*args)`` after ``warmup`` calls; each call is synchronised
  (``block_until_ready``), so the times include the device work. Returns milliseconds.

  Calls go on past ``iters`` until the timed calls add up to ``min_total_ms`` (at most
  ``max_iters`` calls): a call of a millisecond or two is otherwise timed a handful of times,
  and one slow call (host jitter, a clock change) moves the median of so few.

  Warm-up calls go on past ``warmup`` until they add up to ``warmup_ms`` (at most
  ``max_iters`` calls): on a GPU that was idle, the first tenths of a second of load can run
  faster than what follows (presumably a higher clock than it holds under sustained load), so
  a median of a few calls right after a short warm-up can land anywhere between the two.
  With ``settle`` > 0 the warm-up then goes on, in windows of at least ``settle_window_ms``
  (and 3 calls), until the median call of a window is within ``settle`` (relative) of the
  window's before, or the warm-up reaches ``max_warmup_ms``: after the idle seconds of a
  compile a GPU can also take seconds to reach the speed it keeps (10% over 1.2 s seen)."""
  spent, calls = 0.0, 0

  def call() -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return (time.perf_counter() - t0) * 1e3

  while calls < warmup or (spent < warmup_ms and calls < max_iters):
    spent += call()
    calls += 1
  if settle > 0:
    previous = None
    while spent < max_warmup_ms:
      window = []
      while sum(window) < settle_window_ms or len(window) < 3:
        window.append(call())
      spent += sum(window)
      current = statistics.median(window)
      if previous is not None and abs(current - previous) <= settle * current:
        break
      previous = current
  times = []
  while len(times) < iters or (sum(times) < min_total_ms and len(times) < max_iters):
    times.append(call())
  return times


def median_ms(fn, *args, warmup: int = 2, iters: int = 5, warmup_ms: float = 0.0) -> float:
  """Median of :func:`timed_calls_ms`."""
  return statistics.median(timed_calls_ms(fn, *args, warmup=warmup, iters=iters,
                                          warmup_ms=warmup_ms))
