"""Fingerprints of the Mosaic GPU modules the op lowers to, without source locations: a
refactor of the kernels' Python that keeps every fingerprint has not changed what runs on the
GPU. Lowers for CUDA on any machine (no GPU needed).

    python -m benchmarks.tools.mosaic_fingerprint > before.txt
    (edit the kernels)
    python -m benchmarks.tools.mosaic_fingerprint | diff before.txt -

One line per case: the case, then the sha256 prefix of each Mosaic GPU module of its program
(forward, or forward and backward kernels; the 8-bit forwards at head_dim 128), in lowering
order.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import re

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import core as mgpu_core

import jsta
from pallas_kernels.mosaic import backend as backend_lib

# Padded text, unpadded, blocks spanning 64-token tiles, spanning with ragged edges and text,
# 192-token tiles with per-head windows and text (gathered work items: the forward's; the
# dK/dV kernels' too in "tile192_paired"), 384-token tiles (the forward's 192-key steps).
SPECS = {
    "padded": jsta.STASpec((4, 8, 8), (2, 8, 8), (3, 1, 1), text_len=10, text_max_len=64),
    "unpadded": jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1)),
    "spanning": jsta.STASpec((2, 8, 32), (1, 8, 8), (1, 1, 3)),
    "spanning_ragged": jsta.STASpec((2, 10, 20), (1, 8, 8), (1, 1, 1), text_len=10,
                                    text_max_len=40),
    "tile192_gathered": jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                                     text_max_len=64),
    "tile192_paired": jsta.STASpec((9, 8, 16), (3, 8, 8), ((3, 1, 1), (1, 1, 3)), text_len=20,
                                   text_max_len=64),
    # The paper's 384-token tiles, nothing padded: the bf16 forward's 192-key steps at d128.
    "tile384": jsta.STASpec((6, 16, 16), (6, 8, 8), (1, 1, 3)),
}


@contextlib.contextmanager
def captured_fingerprints():
  """Within the block, the sha256 prefixes (12 hex digits) of every Mosaic GPU module lowered
  (printed without debug info and without their dump name, which counts the kernels lowered in
  this process), appended in lowering order to the list it yields."""
  found = []
  original = mgpu_core._run_serde_pass

  def record(module, *a, **k):
    if k.get("serialize"):
      text = re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', "",
                    module.operation.get_asm(enable_debug_info=False))
      found.append(hashlib.sha256(text.encode()).hexdigest()[:12])
    return original(module, *a, **k)

  mgpu_core._run_serde_pass = record
  try:
    yield found
  finally:
    mgpu_core._run_serde_pass = original


def module_fingerprints(fn, *args) -> list[str]:
  """:func:`captured_fingerprints` of jit(fn)'s CUDA lowering for ``args``."""
  with captured_fingerprints() as found:
    jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return found


QUANTIZED = ("qk_int8", "qk_int8_pv_fp8", "fp8", "int8")


def cases(specs=SPECS, head_dims=(64, 128), variants=("auto", "split")):
  """(name, fn, args) of the op's forward and gradient per spec, head_dim and backward, and
  at head_dim 128 the 8-bit forward of each precision."""
  for sname, spec in specs.items():
    for d in head_dims:
      x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, d), jnp.bfloat16)
      for variant in variants:
        impl = dataclasses.replace(backend_lib.BACKEND, device_check=False,
                                   backward_variant=variant)
        name = f"pallas_mosaic_fingerprint_{variant}"
        jsta.register_backend(name, lambda impl=impl: impl)
        op = lambda q, k, v, spec=spec, name=name: jsta.sliding_tile_attention(
            q, k, v, spec, implementation=name)
        loss = lambda q, k, v, op=op: jnp.sum(op(q, k, v).astype(jnp.float32))
        yield f"{sname} d{d} fwd", op, (x, x, x)
        yield f"{sname} d{d} {variant} grad", jax.grad(loss, argnums=(0, 1, 2)), (x, x, x)
      if d == 128:
        # The 8-bit forwards (inference only): one module per recipe.
        impl = dataclasses.replace(backend_lib.BACKEND, device_check=False)
        for precision in QUANTIZED:
          op = lambda q, k, v, spec=spec, precision=precision: jsta.sliding_tile_attention(
              q, k, v, spec, implementation=impl, precision=precision)
          yield f"{sname} d{d} {precision} fwd", op, (x, x, x)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--specs", default=",".join(SPECS), help="comma list of " + ",".join(SPECS))
  a = p.parse_args(argv)
  names = a.specs.split(",")
  if unknown := set(names) - set(SPECS):
    raise SystemExit(f"error: unknown specs {sorted(unknown)}; known: {', '.join(SPECS)}")
  seen = set()
  for name, fn, args in cases({n: SPECS[n] for n in names}):
    if name in seen:          # the forward does not depend on the backward variant
      continue
    seen.add(name)
    print(name, " ".join(module_fingerprints(fn, *args)), flush=True)


if __name__ == "__main__":
  main()
