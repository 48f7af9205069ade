"""Device check and timing of the pallas_mosaic backward variants (fused vs split).

1. Correctness: gradients of both variants against the float32 reference at medium shapes
   (unpadded; text + padded latent + per-head windows), head_dim 128, bf16.
2. Paper shape (batch 1, latent (30, 48, 80), tile (6, 8, 8), 24 heads, head_dim 128, bf16),
   window (3, 3, 3): backward alone for each variant, and fwd+bwd through the public op
   (default config). Sections listed in --sections (default: check,bwd,op).
Prints a table last; JSON to $OUT/bwd_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from pallas_kernels import mosaic_sta as ms
from pallas_kernels.mosaic_bench import BenchLog, bench, paper_inputs

B, H, D = 1, 24, 128
LATENT, TILE = (30, 48, 80), (6, 8, 8)


def _rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_case(spec, heads, variant, seed=0):
  """Max relative L2 error of (dq, dk, dv) vs the float32 reference, and its parts."""
  sched = jsta.block_schedule(spec, heads, 128, 128)
  ks = jax.random.split(jax.random.key(seed), 4)
  shape = (1, sched.seq_len, heads, D)
  q, k, v, do = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in ks)
  do = do * jnp.asarray(sched.query_valid, jnp.bfloat16)[None, :, None, None]
  scale = D ** -0.5
  f32 = lambda x: x.astype(jnp.float32)
  ro, rlse = jsta.xla_backend.forward(f32(q), f32(k), f32(v), sched, scale)
  rg = jsta.xla_backend.backward(f32(q), f32(k), f32(v), ro, rlse, f32(do), sched, scale)
  cfg = ms.MosaicConfig(backward_variant=variant)
  o, lse = ms.forward(q, k, v, sched, scale, cfg)
  g = ms.backward(q, k, v, o, lse, do, sched, scale, cfg)
  errs = [_rel(a, b) for a, b in zip(g, rg)]
  return max(errs), errs


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sections", default="check,bwd,op")
  ap.add_argument("--variants", default="fused,split",
                  help="backward variants: fused, split")
  ap.add_argument("--blocks-fastest", default="1",
                  help="1 and/or 0: MosaicConfig.blocks_fastest (CTA launch order), bwd section")
  ap.add_argument("--op-rounds", type=int, default=1,
                  help="interleaved rounds of the op section (one fwd+bwd timing per variant)")
  ap.add_argument("--bwd-stages", default="2",
                  help="MosaicConfig.bwd_max_concurrent_steps values for the bwd section")
  ap.add_argument("--experiments", default="",
                  help="fused kernel runs timed at the paper shape, comma-separated "
                       "fused[:ablation+ablation][@start_stride][#compute_registers], e.g. "
                       "fused,fused:no_reduce,fused@1,fused#232")
  args = ap.parse_args()
  sections = args.sections.split(",")
  variants = args.variants.split(",")
  blog = BenchLog()
  log = blog.log

  if "check" in sections:
    cases = {
        "unpadded_3x3x3": (jsta.STASpec((6, 16, 16), (2, 8, 8), (3, 3, 3)), 2),
        "text_padded_perhead": (jsta.STASpec((5, 14, 16), (2, 8, 8), ((3, 1, 3), (1, 3, 1)),
                                             text_len=20, text_max_len=64), 2),
    }
    for name, (spec, heads) in cases.items():
      for variant in variants:
        try:
          t0 = time.time()
          worst, errs = check_case(spec, heads, variant)
          ok = worst < 2e-2
          log(f"check_{name}_{variant}", 0.0, 0,
              f"{'OK' if ok else 'FAIL'} dq/dk/dv relL2 {errs[0]:.1e}/{errs[1]:.1e}/{errs[2]:.1e}"
              f" ({time.time() - t0:.0f}s)")
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          log(f"check_{name}_{variant}", 0.0, 0, f"ERROR {e!r}"[:300])

  spec = jsta.STASpec(LATENT, TILE, (3, 3, 3))
  flops = spec.flops(D, H)
  q, k, v, do = paper_inputs()
  scale = D ** -0.5
  sched = jsta.block_schedule(spec, H, 128, 128)

  if "bwd" in sections:
    o, lse = ms.BACKEND.forward(q, k, v, sched, scale)
    grads = {}
    for variant, bf, st in ((va, bf, st) for va in variants
                            for bf in map(int, args.blocks_fastest.split(","))
                            for st in map(int, args.bwd_stages.split(","))):
      name = (f"bwd_3x3x3_{variant}" + ("" if bf else "_headsfast")
              + ("" if st == 2 else f"_s{st}"))
      try:
        cfg = ms.MosaicConfig(backward_variant=variant, blocks_fastest=bool(bf),
                              bwd_max_concurrent_steps=st)
        bw = jax.jit(lambda q, k, v, o, lse, do, cfg=cfg:
                     ms.backward(q, k, v, o, lse, do, sched, scale, cfg))
        t, _ = bench(bw, q, k, v, o, lse, do, iters=5)
        grads[variant] = bw(q, k, v, o, lse, do)
        extra = ""
        if "split" in grads and variant != "split":
          extra = "vs split relL2 " + "/".join(
              f"{_rel(a, b):.1e}" for a, b in zip(grads[variant], grads["split"]))
        log(name, t, 2.5 * flops, extra)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        log(name, 0.0, 0, f"ERROR {e!r}"[:300])
    if "fused" in grads and "split" in grads:
      errs = [_rel(a, b) for a, b in zip(grads["fused"], grads["split"])]
      log("bwd_fused_vs_split", 0.0, 0, "relL2 " + "/".join(f"{e:.1e}" for e in errs))

  if args.experiments:
    from pallas_kernels import mosaic_sta_backward as fb
    o, lse = ms.BACKEND.forward(q, k, v, sched, scale)
    bkd, t_ops = ms.transposed_operands(sched)
    ref = None
    for exp in args.experiments.split(","):
      exp_name, _, regs = exp.partition("#")
      exp_name, _, stride = exp_name.partition("@")
      kernel, _, abl = exp_name.partition(":")
      if kernel != "fused":
        raise ValueError(f"experiments run the fused kernel: {exp!r} must start with 'fused'")
      ablate = frozenset(a for a in abl.split("+") if a)
      kw = dict(start_stride=int(stride)) if stride else {}
      if regs:
        compute = int(regs)
        kw["registers"] = (compute, 168 * 3 - 2 * compute)   # 168 per thread at launch
      try:
        fn = jax.jit(lambda q, k, v, o, lse, do, ablate=ablate, kw=kw: fb.fused_backward_jit(
            q, k, v, o, lse, do, *t_ops, scale=scale, config=ms.MosaicConfig(), block_q=128,
            block_kv=bkd, masked=False, ablate=ablate, **kw))
        t, _ = bench(fn, q, k, v, o, lse, do, iters=5)
        g = fn(q, k, v, o, lse, do)
        if ref is None and not ablate and not kw:
          ref = g
        extra = "" if ref is None else "vs first relL2 " + "/".join(
            f"{_rel(a, b):.1e}" for a, b in zip(g, ref))
        log(f"exp_bwd_{exp}", t, 2.5 * flops, extra)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        log(f"exp_bwd_{exp}", 0.0, 0, f"ERROR {e!r}"[:300])

  if "op" in sections:
    # fwd+bwd through the public op, once per backward variant, in interleaved rounds (this
    # machine drifts by several percent between minutes). Each variant is a registered copy
    # of the pallas_mosaic backend whose paper-shape config picks that backward.
    import dataclasses
    from jsta import ops
    fns = {}
    for variant in variants:
      name = f"pallas_mosaic_{variant}_bwd"
      cfg = ms.MosaicConfig(max_concurrent_steps=ms.default_stages(128, 128, D),
                            backward_variant=variant)
      ops._BACKENDS[name] = dataclasses.replace(ms.BACKEND, configs=(((128, 128, D), cfg),))

      def loss(q, k, v, name=name):
        o = jsta.sliding_tile_attention(q, k, v, spec, backend=name)
        return jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32))
      fns[variant] = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    for rnd in range(args.op_rounds):
      for variant, g in fns.items():
        try:
          t, _ = bench(g, q, k, v, iters=5)
          log(f"fwdbwd_3x3x3_op_{variant}_r{rnd}", t, 3.5 * flops)
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          log(f"fwdbwd_3x3x3_op_{variant}_r{rnd}", 0.0, 0, f"ERROR {e!r}"[:300])
    fw = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec,
                                                             backend="pallas_mosaic"))
    t, _ = bench(fw, q, k, v, iters=5)
    log("fwd_3x3x3_op", t, flops)

  blog.finish("bwd_bench.json")


if __name__ == "__main__":
  main()
