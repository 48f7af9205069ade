"""Device benchmark of the pallas_mosaic kernels at the STA paper shape, beside cuDNN dense.

batch 1, latent (30, 48, 80), tile (6, 8, 8) = 115,200 tokens, 24 heads, head_dim 128, bf16.
Prints a table last; writes JSON to $OUT/bench.json when OUT is set. Usage:
  python3 -m pallas_kernels.mosaic_bench [--quick]
"""

from __future__ import annotations

import json  # noqa: I001
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta import mask as mask_lib
from jsta.timing import timed_calls_ms
from pallas_kernels import mosaic_sta as ms

B, H, D = 1, 24, 128
LATENT, TILE = (30, 48, 80), (6, 8, 8)


class _Skip(Exception):
  """A section left out by --min."""


def bench(fn, *args, iters=7, warmup=2):
  """(median, min) of the timed calls, in ms."""
  ts = timed_calls_ms(fn, *args, warmup=warmup, iters=iters)
  return float(np.median(ts)), float(np.min(ts))


class BenchLog:
  """Rows of a device bench: each printed as it comes (name, ms, TFLOP/s from ``flops``, a
  note), a markdown table at the end, and JSON in $OUT. ``rows`` are dicts; ``meta`` heads
  the JSON."""

  def __init__(self):
    self.meta = {"device": str(jax.devices()[0]), "jax": jax.__version__,
                 "date": time.strftime("%Y-%m-%d")}
    self.rows = []

  def log(self, name, ms_, flops, extra=""):
    tf = flops / (ms_ * 1e-3) / 1e12 if flops else float("nan")
    # Wall-clock stamp: lines a row up with a clock/power log taken beside the bench.
    self.rows.append({"name": name, "ms": ms_, "tflops": tf, "extra": extra,
                      "wall": time.time()})
    print(f"{name}: {ms_:.2f} ms, {tf:.0f} TFLOP/s {extra}", flush=True)

  def finish(self, filename, results=None):
    """Writes ``results`` (default: meta + rows) to $OUT/filename when OUT is set, then
    prints the table."""
    out_dir = os.environ.get("OUT")
    if out_dir:
      with open(os.path.join(out_dir, filename), "w") as f:
        json.dump(results if results is not None else {**self.meta, "rows": self.rows}, f,
                  indent=1)
    print("\n| what | ms | TFLOP/s | note |\n|---|---|---|---|")
    for r in self.rows:
      print(f"| {r['name']} | {r['ms']:.2f} | {r['tflops']:.0f} | {r['extra']} |")


def paper_inputs(heads: int = H, seq: int = int(np.prod(LATENT))):
  """(q, k, v, do): [1, seq, heads, 128] bf16 standard normals, the same in every bench."""
  ks = jax.random.split(jax.random.key(0), 4)
  shape = (B, seq, heads, D)
  return tuple(jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in ks)


def check_rows(spec, q, k, v, o, rows, scale):
  """Relative L2 error of o on query ``rows`` vs a float32 reference of those rows."""
  tm = mask_lib.tile_mask(spec, spec.window)               # [ntiles, ntiles]
  tsz = spec.tile_size
  f32 = jnp.float32
  allowed = jnp.asarray(np.repeat(tm[rows // tsz], tsz, axis=1))   # [r, S]
  qs = q[0, rows].astype(f32)                              # [r, H, D]
  s = jnp.einsum("rhd,shd->hrs", qs, k[0].astype(f32), precision="highest") * scale
  s = jnp.where(allowed[None], s, -jnp.inf)
  p = jax.nn.softmax(s, axis=-1)
  ref = jnp.einsum("hrs,shd->rhd", p, v[0].astype(f32), precision="highest")
  got = o[0, rows].astype(f32)
  return float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))


def main():
  quick = "--quick" in sys.argv
  minimal = "--min" in sys.argv      # one forward config of (3,3,3) and the op's fwd+bwd
  results = {"device": str(jax.devices()[0])}
  blog = BenchLog()
  S = int(np.prod(LATENT))
  q, k, v, do = paper_inputs()
  scale = D ** -0.5

  def log(name, ms_, flops, extra=""):
    blog.log(name, ms_, flops, extra)
    results[name] = {k: v for k, v in blog.rows[-1].items() if k != "name"}

  # cuDNN dense
  try:
    if minimal:
      raise _Skip
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    t, _ = bench(dense, q, k, v, iters=5)
    log("cudnn_dense_fwd", t, 4 * S * S * D * H)
  except _Skip:
    pass
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    results["cudnn_error"] = repr(e)

  for window in ((3, 3, 3),) if minimal else ((3, 3, 3), (5, 5, 5)):
    spec = jsta.STASpec(LATENT, TILE, window)
    flops = spec.flops(D, H)
    wname = "x".join(map(str, window))
    configs = [ms.MosaicConfig(block_kv=128, max_concurrent_steps=2),
               ms.MosaicConfig(block_kv=64, max_concurrent_steps=4),
               ms.MosaicConfig(block_kv=128, max_concurrent_steps=2, use_schedule_barrier=False)]
    if quick or minimal:
      configs = configs[:1]
    for cfg in configs:
      tag = f"bk{cfg.block_kv}_s{cfg.max_concurrent_steps}_sb{int(cfg.use_schedule_barrier)}"
      try:
        sched = jsta.block_schedule(spec, H, cfg.block_q, cfg.block_kv)
        ops = ms._schedule_operands(sched)
        fn = jax.jit(lambda q, k, v, *o, cfg=cfg: ms._forward_call(
            q, k, v, *o, scale=scale, config=cfg, masked=sched.has_masked_keys))
        t, _ = bench(fn, q, k, v, *ops)
        o, _ = fn(q, k, v, *ops)
        rows = np.concatenate([np.arange(0, 256), np.arange(S // 2, S // 2 + 128),
                               np.arange(S - 128, S)])
        err = check_rows(spec, q, k, v, o, rows, scale)
        log(f"sta_fwd_{wname}_{tag}", t, flops, f"relerr={err:.2e}")
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        results[f"sta_fwd_{wname}_{tag}_error"] = repr(e)[:2000]

  # fwd+bwd (3,3,3) through the public op, and the backward kernels alone.
  spec = jsta.STASpec(LATENT, TILE, (3, 3, 3))
  flops = spec.flops(D, H)
  try:
    def loss(q, k, v):
      o = jsta.sliding_tile_attention(q, k, v, spec, backend="pallas_mosaic")
      return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    t, _ = bench(g, q, k, v, iters=5)
    log("sta_fwdbwd_3x3x3_op", t, 3.5 * flops)
    if minimal:
      raise _Skip
    sched = jsta.block_schedule(spec, H, 128, 128)
    o, lse = ms.BACKEND.forward(q, k, v, sched, scale)
    bw = jax.jit(lambda q, k, v, o, lse, do: ms.BACKEND.backward(q, k, v, o, lse, do, sched, scale))
    t, _ = bench(bw, q, k, v, o, lse, do, iters=5)
    log("sta_bwd_3x3x3_kernels", t, 2.5 * flops)
    f32 = jnp.float32
    delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
    dlt = jax.jit(lambda o, do: jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32)))
    t, _ = bench(dlt, o, do)
    log("delta_einsum", t, 0)
    cfg = ms.BACKEND.config(128, 128, D)
    dq = jax.jit(lambda *a: ms._dq_call(*a, scale=scale, config=cfg, masked=False))
    t, _ = bench(dq, q, k, v, do, lse, delta, *ms._schedule_operands(sched))
    log("sta_dq_3x3x3", t, 1.5 * flops)
    _, t_ops = ms.transposed_operands(sched)
    dkv = jax.jit(lambda *a: ms._dkdv_call(*a, scale=scale, block_q=128, block_kv=128,
                                           config=cfg, masked=False))
    t, _ = bench(dkv, q, k, v, do, lse, delta, *t_ops)
    log("sta_dkdv_3x3x3", t, 2.0 * flops)
  except _Skip:
    pass
  except Exception as e:  # noqa: BLE001
    traceback.print_exc()
    results["fwdbwd_error"] = repr(e)[:2000]

  blog.finish("bench.json", results)


if __name__ == "__main__":
  main()
