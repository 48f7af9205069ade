"""Sliding tile attention against full attention on random data: ``jsta-demo``.

Also ``python -m jsta.demo``.

On a GPU it runs the STA paper's kernel shape (HunyuanVideo 720p: latent (30, 48, 80), tile
(6, 8, 8), window (3, 3, 3) tiles = (18, 24, 24) tokens, 24 heads, head_dim 128, bf16); elsewhere
a small video latent with text tokens in float32 (``--config tiny``: a smaller one, for a smoke
test). It prints the sparsity, the error of STA against a float32 masked reference (the whole
output on small shapes; a sample of query blocks on large ones), and forward timings (compile +
warm-up, then the median of timed calls, alternating with the full attention's) beside full
(dense) attention, and why when STA is not the faster.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta.reference import reference_attention_rows


@dataclasses.dataclass(frozen=True)
class DemoConfig:
  latent: tuple[int, ...]
  tile: tuple[int, ...]
  window: tuple[int, ...]
  heads: int
  head_dim: int
  dtype: str
  text_len: int = 0
  text_max_len: int = 0
  batch: int = 1

  def spec(self) -> jsta.STASpec:
    return jsta.STASpec(self.latent, self.tile, self.window, self.text_len, self.text_max_len)


TINY = DemoConfig((4, 8, 8), (2, 4, 4), (1, 1, 1), heads=2, head_dim=16, dtype="float32",
                  text_len=3, text_max_len=5)
SMALL = DemoConfig((8, 16, 16), (2, 4, 4), (3, 3, 3), heads=4, head_dim=64, dtype="float32",
                   text_len=20, text_max_len=32)
PAPER = DemoConfig((30, 48, 80), (6, 8, 8), (3, 3, 3), heads=24, head_dim=128, dtype="bfloat16")
CONFIGS = {"tiny": TINY, "small": SMALL, "paper": PAPER}

# Above this many tokens the float32 check uses sampled query blocks, not the whole output.
FULL_CHECK_MAX_SEQ = 8192


def full_attention(q, k, v, spec: jsta.STASpec):
  """Dense attention over all valid keys (padded latent tokens and text slots masked)."""
  if not (spec.is_padded or spec.text_len < spec.text_max_len):
    # cuDNN flash attention on a GPU for half types (XLA would build the [seq, seq] logits).
    on_gpu_half = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn" if on_gpu_half else None)
  key_valid = jnp.asarray(jsta.token_valid(spec))
  return jax.nn.dot_product_attention(q, k, v, mask=key_valid[None, None, None, :])


def time_ms(fns: dict, args, iters: int) -> dict[str, tuple[float, float]]:
  """{name: (first call incl. compile in ms, median ms per call)} of each jitted fn in ``fns``.

  After the first calls and one warm-up, ``iters`` rounds call every fn in turn, so that a
  change in the machine's load hits all of them alike; a fast call is repeated within a sample
  until the sample lasts about 5 ms (one sub-millisecond call is mostly timer noise)."""
  first, repeats = {}, {}
  for name, fn in fns.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first[name] = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    repeats[name] = max(1, min(1000, int(5.0 / max((time.perf_counter() - t0) * 1e3, 1e-3))))
  samples = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(repeats[name]):
        out = fn(*args)
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - t0) * 1e3 / repeats[name])
  return {name: (first[name], float(np.median(samples[name]))) for name in fns}


def slower_reason(spec: jsta.STASpec, platform: str,
                  larger: str = "try --config small") -> str:
  """Why STA may not beat full attention at this shape, in one line; ``larger`` says where to
  look for a larger shape."""
  if spec.sparsity() == 0:
    return ("the window covers the whole volume (0% sparse): STA skips no block and does full "
            "attention's work plus its schedule's gathers")
  if spec.seq_len < 1024:
    return (f"at {spec.seq_len} tokens both calls take about a millisecond or less: fixed "
            f"per-call costs, not the attention's FLOPs, set the time (STA's advantage grows "
            f"with the sequence; {larger})")
  return (f"on {platform} at this shape the block-sparse gathers cost more than the "
          f"{spec.sparsity():.0%} of skipped tile pairs save")


def check_rows(spec: jsta.STASpec, block: int) -> np.ndarray:
  """Query positions of a few whole query blocks: the first (an edge tile), one in the middle of
  the video tokens, and the last video block; plus the text slots if there are any."""
  nv = spec.padded_video_len
  starts = sorted({0, (nv // 2) // block * block, nv - block})
  rows = [np.arange(s, s + block) for s in starts]
  if spec.text_max_len:
    rows.append(np.arange(nv, spec.seq_len))
  return np.concatenate(rows)


def run(config: DemoConfig, backend: str = "auto", iters: int = 5, seed: int = 0) -> dict:
  spec = config.spec()
  dtype = jnp.dtype(config.dtype)
  shape = (config.batch, spec.seq_len, config.heads, config.head_dim)
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in (kq, kk, kv))

  plan = jsta.make_plan(spec, config.heads, config.head_dim, dtype, backend=backend)
  dev = jax.devices()[0]
  print(f"device: {getattr(dev, 'device_kind', dev.platform)} ({dev.platform}), "
        f"backend: {plan.backend}, blocks: {plan.block_q}x{plan.block_kv}")
  print(f"latent {spec.latent_shape}, tile {spec.tile_shape} -> tiles {spec.num_tiles}, "
        f"window {spec.window} tiles = "
        f"{tuple(w * t for w, t in zip(spec.window, spec.tile_shape))} tokens")
  print(f"tokens: {spec.video_len} video + {spec.text_len}/{spec.text_max_len} text = "
        f"seq {spec.seq_len}; batch {config.batch}, heads {config.heads}, "
        f"head_dim {config.head_dim}, {dtype.name}")
  print(f"sparsity (video tiles): {spec.sparsity():.2%}")

  sta = jax.jit(lambda a, b, c: jsta.sliding_tile_attention(a, b, c, spec, backend=plan.backend))
  full = jax.jit(lambda a, b, c: full_attention(a, b, c, spec))
  times = time_ms({"sta": sta, "full": full}, (q, k, v), iters)
  (sta_first, sta_ms), (full_first, full_ms) = times["sta"], times["full"]
  flops_sta = spec.flops(config.head_dim, config.heads) * config.batch
  n = spec.video_len + spec.text_len
  flops_full = 4 * n * n * config.head_dim * config.heads * config.batch
  print(f"forward, median of {iters} (first call incl. compile):")
  print(f"  STA  {sta_ms:10.2f} ms  ({sta_first:.0f} ms)  "
        f"{flops_sta / sta_ms / 1e9:9.3f} TFLOP/s")
  print(f"  full {full_ms:10.2f} ms  ({full_first:.0f} ms)  "
        f"{flops_full / full_ms / 1e9:9.3f} TFLOP/s")
  print(f"  speedup {full_ms / sta_ms:.2f}x")
  if sta_ms > full_ms:
    print(f"  STA is not faster here: {slower_reason(spec, dev.platform)}")

  # Error against the float32 masked reference (what STA must compute).
  if spec.seq_len <= FULL_CHECK_MAX_SEQ:
    rows = np.arange(spec.seq_len)
    what = "all queries"
  else:
    rows = check_rows(spec, plan.block_q)
    what = f"{rows.size} queries of {rows.size // plan.block_q} query blocks"
  got = np.asarray(sta(q, k, v)[:, rows], np.float32)
  ref = np.asarray(reference_attention_rows(q, k, v, spec, rows))
  max_err = float(np.abs(got - ref).max())
  rel_l2 = float(np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30))
  print(f"STA vs float32 masked reference ({what}): max |err| {max_err:.3e}, "
        f"rel L2 {rel_l2:.3e}, finite: {bool(np.isfinite(got).all())}")
  return dict(backend=plan.backend, sparsity=spec.sparsity(), max_err=max_err, rel_l2=rel_l2,
              sta_ms=sta_ms, full_ms=full_ms)


def main(argv=None) -> int:
  """``jsta-demo`` / ``python -m jsta.demo``; returns the exit status (0). Bad options (an
  unknown backend, one that does not support the config) end in SystemExit(2) with one line."""
  parser = argparse.ArgumentParser(prog="jsta-demo", description=__doc__.splitlines()[0],
                                   formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("--config", choices=["auto", *CONFIGS], default="auto",
                      help="auto: 'paper' on a GPU, 'small' elsewhere; 'tiny': a smoke test")
  parser.add_argument("--backend", default="auto",
                      help="auto, xla, pallas_triton or pallas_mosaic")
  parser.add_argument("--iters", type=int, default=5, help="timed calls (>= 1)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the random q, k, v, in [0, 2**32)")
  args = parser.parse_args(argv)
  if args.iters < 1:
    parser.error(f"--iters must be >= 1, got {args.iters}")
  # jax.random.key keeps the low 32 bits (2**32 was seed 0) and overflows beyond 64.
  if not 0 <= args.seed < 2 ** 32:
    parser.error(f"--seed must be in [0, 2**32), got {args.seed}")
  name = args.config
  if name == "auto":
    name = "paper" if jax.default_backend() == "gpu" else "small"
  config = CONFIGS[name]
  try:  # the same checks run() makes first, as a usage error here
    jsta.make_plan(config.spec(), config.heads, config.head_dim, config.dtype,
                   backend=args.backend)
  except ValueError as e:
    parser.error(f"--backend {args.backend} with --config {name}: {e}")
  run(config, backend=args.backend, iters=args.iters, seed=args.seed)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
