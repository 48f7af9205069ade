"""One fwd+bwd step of the op for Nsight Compute: compiles and warms up, then runs one step
between cuProfilerStart/Stop (run under ``ncu --profile-from-start off``). Paper latent and
tile, window (3,3,3), head_dim 128, bf16, ``--heads`` heads (default 8, a third of the paper's,
to keep the replays short)."""

from __future__ import annotations

import argparse
import ctypes

import jax
import jax.numpy as jnp

import jsta
from pallas_kernels.mosaic_bench import paper_inputs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--heads", type=int, default=8)
  args = ap.parse_args()
  spec = jsta.STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  q, k, v, w = paper_inputs(args.heads)

  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, spec, backend="pallas_mosaic")
    return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for _ in range(2):
    jax.block_until_ready(grad(q, k, v))
  cuda = ctypes.CDLL("libcuda.so.1")
  cuda.cuProfilerStart()
  jax.block_until_ready(grad(q, k, v))
  cuda.cuProfilerStop()


if __name__ == "__main__":
  main()
