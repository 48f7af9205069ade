"""Forward autotuning of the Hopper kernels: time candidate :class:`MosaicConfig` s on the GPU
and keep the fastest (register it with ``MosaicBackend(configs=...)``)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from jsta.schedule import block_schedule
from jsta.spec import STASpec
from jsta.timing import median_ms
from pallas_kernels.mosaic.backend import forward
from pallas_kernels.mosaic.config import MosaicConfig, check


def default_candidates(spec: STASpec, head_dim: int) -> list[MosaicConfig]:
  """Key blocks of 128 and 64 rows at each pipeline depth, with and without the ping-pong of
  the compute warpgroups. Configs whose shared memory does not fit are skipped by
  :func:`autotune`."""
  del spec, head_dim
  out = []
  for bk in (128, 64):
    for stages in (2, 3, 4):
      for sb in (True, False):
        out.append(MosaicConfig(block_q=128, block_kv=bk, max_concurrent_steps=stages,
                                use_schedule_barrier=sb))
  return out


def time_forward(spec: STASpec, num_heads: int, head_dim: int, dtype, config: MosaicConfig, *,
                 batch: int = 1, iters: int = 5, warmup: int = 2, seed: int = 0) -> float:
  """Median forward time in milliseconds (random normal inputs, after warm-up)."""
  sched = block_schedule(spec, num_heads, config.block_q, config.block_kv)
  ks = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, sched.seq_len, num_heads, head_dim)
  q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks)
  fn = lambda q, k, v: forward(q, k, v, sched, head_dim ** -0.5, config)
  return float(median_ms(fn, q, k, v, warmup=warmup, iters=iters))


def autotune(spec: STASpec, num_heads: int, head_dim: int, dtype, batch: int = 1,
             candidates: Sequence[MosaicConfig] | None = None, iters: int = 5,
             verbose: bool = False) -> MosaicConfig:
  """Times the forward of each candidate config and returns the fastest.

  Configs that do not fit in shared memory ("exceeds available shared memory" at kernel build
  time) are skipped. Raises ValueError if no candidate runs.
  """
  check(spec, head_dim, dtype, 128, 128)
  candidates = (list(candidates) if candidates is not None
                else default_candidates(spec, head_dim))
  best, best_ms = None, float("inf")
  for cfg in candidates:
    try:
      ms = time_forward(spec, num_heads, head_dim, dtype, cfg, batch=batch, iters=iters)
    except Exception as e:  # noqa: BLE001 - only the shared-memory overflow is expected
      if "exceeds available shared memory" in str(e) or "shared memory" in str(e).lower():
        if verbose:
          print(f"autotune: {cfg} does not fit in shared memory")
        continue
      raise
    if verbose:
      print(f"autotune: {cfg}: {ms:.3f} ms")
    if ms < best_ms:
      best, best_ms = cfg, ms
  if best is None:
    raise ValueError("autotune: no candidate config fits in shared memory")
  return best
