"""Device timing of the pallas_mosaic forward variants at the STA paper shape, beside cuDNN.

batch 1, latent (30, 48, 80), tile (6, 8, 8), 24 heads, head_dim 128, bf16. Every timed
kernel is checked on 512 query rows against a float32 reference; a medium text-padded case
checks each variant's key mask. Usage:
  python3 -m pallas_kernels.mosaic_fwd_bench [--variants overlap,unpadded,general]
      [--windows 3x3x3,5x5x5,5x7x11] [--stages 2] [--schedule-barrier 1,0] [--no-cudnn]
      [--no-padded-check] [--experiments overlap:static_kv,...] [--blocks-fastest 1,0]
Prints a table last; JSON to $OUT/fwd_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from pallas_kernels import mosaic_sta as ms
from jsta.timing import timed_calls_ms
from pallas_kernels.mosaic_bench import BenchLog, check_rows

B, H, D = 1, 24, 128
LATENT, TILE = (30, 48, 80), (6, 8, 8)


def _check_padded(variant: str) -> float:
  """Relative L2 error of a text-padded, per-head-window case vs the float32 reference."""
  spec = jsta.STASpec((5, 14, 16), (2, 8, 8), ((3, 1, 3), (1, 3, 1)), text_len=20,
                      text_max_len=64)
  sched = jsta.block_schedule(spec, 2, 128, 128)
  ks = jax.random.split(jax.random.key(1), 3)
  shape = (1, sched.seq_len, 2, D)
  q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(jnp.bfloat16) for kk in ks)
  cfg = ms.MosaicConfig(forward_variant=variant)
  o, _ = ms.forward(q, k, v, sched, D ** -0.5, cfg)
  f32 = lambda x: x.astype(jnp.float32)
  ro, _ = jsta.xla_backend.forward(f32(q), f32(k), f32(v), sched, D ** -0.5)
  rows = sched.query_valid
  a, b = np.asarray(o, np.float32)[:, rows], np.asarray(ro, np.float32)[:, rows]
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _calls(ts) -> str:
  """Every timed call, in order (the spread and any bimodality show here)."""
  return "calls " + "/".join(f"{t:.1f}" for t in ts)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--variants", default="overlap,unpadded,general")
  ap.add_argument("--windows", default="3x3x3,5x5x5,5x7x11")
  ap.add_argument("--stages", default="2")
  ap.add_argument("--no-cudnn", action="store_true")
  ap.add_argument("--no-padded-check", action="store_true")
  ap.add_argument("--schedule-barrier", default="1", help="1 and/or 0 (ping-pong on/off)")
  ap.add_argument("--blocks-fastest", default="1",
                  help="1 and/or 0: MosaicConfig.blocks_fastest (CTA launch order)")
  ap.add_argument("--experiments", default="",
                  help="overlap-forward runs with ablations, comma-separated overlap:a+b "
                       "(e.g. overlap:static_kv), timed at every window")
  args = ap.parse_args()
  blog = BenchLog()
  log = blog.log

  variants = args.variants.split(",")
  for variant in variants:
    if variant == "unpadded" or args.no_padded_check:
      continue
    try:
      log(f"check_padded_{variant}", 0.0, 0, f"relL2 {_check_padded(variant):.2e}")
    except Exception as e:  # noqa: BLE001
      traceback.print_exc()
      log(f"check_padded_{variant}", 0.0, 0, f"ERROR {e!r}"[:300])

  S = int(np.prod(LATENT))
  ks = jax.random.split(jax.random.key(0), 3)
  q, k, v = (jax.random.normal(kk, (B, S, H, D), jnp.float32).astype(jnp.bfloat16) for kk in ks)
  scale = D ** -0.5
  if not args.no_cudnn:
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    ts = timed_calls_ms(dense, q, k, v, iters=5)
    log("cudnn_dense_fwd", float(np.median(ts)), 4 * S * S * D * H, _calls(ts))
  rows = np.concatenate([np.arange(0, 256), np.arange(S // 2, S // 2 + 128),
                         np.arange(S - 128, S)])
  for wtxt in args.windows.split(","):
    window = tuple(int(x) for x in wtxt.split("x"))
    spec = jsta.STASpec(LATENT, TILE, window)
    sched = jsta.block_schedule(spec, H, 128, 128)
    for variant in variants:
      for stages, sb, bf in ((st, sb, bf) for st in map(int, args.stages.split(","))
                             for sb in map(int, args.schedule_barrier.split(","))
                             for bf in map(int, args.blocks_fastest.split(","))):
        name = (f"fwd_{wtxt}_{variant}_s{stages}" + ("" if sb else "_nosb")
                + ("" if bf else "_headsfast"))
        try:
          cfg = ms.MosaicConfig(forward_variant=variant, max_concurrent_steps=stages,
                                use_schedule_barrier=bool(sb), blocks_fastest=bool(bf))
          fn = jax.jit(lambda q, k, v, cfg=cfg, sched=sched: ms.forward(q, k, v, sched, scale,
                                                                        cfg))
          ts = timed_calls_ms(fn, q, k, v, iters=5)
          o, _ = fn(q, k, v)
          err = check_rows(spec, q, k, v, o, rows, scale)
          log(name, float(np.median(ts)), spec.flops(D, H), f"relerr={err:.2e} {_calls(ts)}")
        except Exception as e:  # noqa: BLE001
          traceback.print_exc()
          log(name, 0.0, 0, f"ERROR {e!r}"[:300])
    for exp in filter(None, args.experiments.split(",")):
      from pallas_kernels.mosaic_sta_fwd_overlap import forward_overlap_jit
      _, _, abl = exp.partition(":")
      ablate = frozenset(a for a in abl.split("+") if a)
      try:
        ops = ms._schedule_operands(sched)
        fn = jax.jit(lambda q, k, v, ablate=ablate, ops=ops, sched=sched: forward_overlap_jit(
            q, k, v, *ops, scale=scale, config=ms.MosaicConfig(), masked=sched.has_masked_keys,
            ablate=ablate))
        ts = timed_calls_ms(fn, q, k, v, iters=5)
        log(f"exp_fwd_{wtxt}_{exp}", float(np.median(ts)), spec.flops(D, H), _calls(ts))
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        log(f"exp_fwd_{wtxt}_{exp}", 0.0, 0, f"ERROR {e!r}"[:300])

  blog.finish("fwd_bench.json")


if __name__ == "__main__":
  main()
