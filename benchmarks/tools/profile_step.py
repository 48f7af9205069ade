"""One fwd+bwd step of the op (``--mode fwd``: its forward alone) for Nsight Compute: compiles
and warms up, then runs one step between cuProfilerStart/Stop. A benchmarks.shapes shape
(default paper) with ``--heads`` heads (default 8, a third of the paper's, to keep the replays
short) and its window unless ``--window`` is given; ``--precision`` with ``--mode fwd``: an
8-bit forward, its quantization passes included.

  ncu --profile-from-start off --section WarpStateStats --section SourceCounters ... \\
      -o step python -m benchmarks.tools.profile_step [--shape paper] [--heads 8]

then ``benchmarks.tools.ncu_summary`` on the report's CSV pages.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses

import jax
import jax.numpy as jnp

import jsta
from benchmarks import shapes as shapes_lib
from benchmarks.common import parse_set_fields, parse_windows, random_inputs


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--window", default=None, help="one window in tiles, e.g. 3,3,3 or dense")
  ap.add_argument("--backend", default="pallas_mosaic")
  ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                  help="a field of the Hopper backend (pallas_kernels.mosaic.MosaicBackend), "
                       "e.g. overlap_exp=True; repeatable; implies --backend pallas_mosaic")
  ap.add_argument("--mode", default="fwdbwd", choices=("fwd", "fwdbwd"),
                  help="the op's forward alone, or its gradient (forward and backward kernels)")
  ap.add_argument("--precision", default=None, choices=jsta.ops.QUANTIZED_PRECISIONS,
                  help="an 8-bit forward (--mode fwd): its quantization passes run as XLA "
                       "kernels beside the Mosaic GPU one (ncu --kernel-name to see them)")
  args = ap.parse_args(argv)
  if args.precision and args.mode != "fwd":
    ap.error("--precision runs a forward for inference: give --mode fwd")
  shape = dataclasses.replace(shapes_lib.get(args.shape), heads=args.heads)
  spec = shape.spec(parse_windows(args.window)[0] if args.window else None)
  q, k, v, w = random_inputs(shape)
  impl = backend_with_fields(args.set) if args.set else args.backend

  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, spec, implementation=impl)
    return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32))

  if args.mode == "fwd":
    step = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(
        q, k, v, spec, implementation=impl, precision=args.precision))
  else:
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for _ in range(2):
    jax.block_until_ready(step(q, k, v))
  cuda = ctypes.CDLL("libcuda.so.1")
  cuda.cuProfilerStart()
  jax.block_until_ready(step(q, k, v))
  cuda.cuProfilerStop()


def backend_with_fields(items):
  """MosaicBackend with ``FIELD=VALUE`` items (values as Python literals) as its fields."""
  from pallas_kernels.mosaic.backend import MosaicBackend
  return MosaicBackend(**parse_set_fields(items, MosaicBackend))


if __name__ == "__main__":
  main()
