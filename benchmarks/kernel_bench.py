"""Kernel benchmark: the STA paper's Table 2 for our kernels beside cuDNN dense, in one run.

    python -m benchmarks.kernel_bench --out benchmarks/results            # paper shape on a GPU
    python -m benchmarks.kernel_bench --quick --backends xla               # tiny shape, any device

For every (backend, window, mode) it checks the output against a float32 reference on sampled query
rows, then times it (warm-up, median). TFLOP/s counts only attended pairs:
4 * attended pairs * head_dim (summed over heads) for the forward, 3.5x that for fwd+bwd.
Writes kernel_bench.json (GPU name, JAX version, date) and kernel_bench.png (latency vs sparsity).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta.reference import reference_attention_rows
from jsta.timing import timed_calls_ms

PEAK_BF16_TFLOPS = 989.0  # H100 SXM dense bf16


@dataclasses.dataclass(frozen=True)
class Shape:
  batch: int
  latent: tuple[int, ...]
  tile: tuple[int, ...]
  heads: int
  head_dim: int
  dtype: str = "bfloat16"


PAPER = Shape(1, (30, 48, 80), (6, 8, 8), 24, 128)
QUICK = Shape(1, (6, 16, 16), (2, 4, 4), 2, 64, "float32")


def device_name() -> str:
  d = jax.devices()[0]
  return getattr(d, "device_kind", d.platform)


def rel_l2(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(shape: Shape, windows, backends, modes, warmup, iters, check_rows, seed=0,
        on_row=lambda results: None):
  dtype = jnp.dtype(shape.dtype)
  full = jsta.full_window(shape.latent, shape.tile)
  results = []
  key = jax.random.key(seed)
  base = jsta.STASpec(shape.latent, shape.tile, full)
  s = base.seq_len
  kq, kk, kv, kd = jax.random.split(key, 4)
  qkv_shape = (shape.batch, s, shape.heads, shape.head_dim)
  q = jax.random.normal(kq, qkv_shape, dtype)
  k = jax.random.normal(kk, qkv_shape, dtype)
  v = jax.random.normal(kv, qkv_shape, dtype)
  do = jax.random.normal(kd, qkv_shape, dtype)
  scale = shape.head_dim ** -0.5
  rng = np.random.default_rng(seed)
  rows = np.sort(rng.choice(s, size=min(check_rows, s), replace=False))
  dense_flops = 4 * s * s * shape.head_dim * shape.heads * shape.batch

  for backend in backends:
    for window in windows:
      win = full if window == "dense" else tuple(window)
      spec = base.with_window(win)
      flops = spec.flops(shape.head_dim, shape.heads) * shape.batch
      for mode in modes:
        row = dict(backend=backend, window=list(win), window_tokens=[w * t for w, t in
                   zip(win, shape.tile)], sparsity=spec.sparsity(), mode=mode)
        if backend == "cudnn" and window != "dense":
          continue
        try:
          if backend == "cudnn":
            attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            row["sparsity"] = 0.0
            fl = dense_flops
          else:
            attn = lambda q, k, v, spec=spec, backend=backend: jsta.sliding_tile_attention(
                q, k, v, spec, backend=backend)
            fl = flops
          if mode == "fwd":
            fn = jax.jit(attn)
            args = (q, k, v)
            out = fn(*args)
            if backend != "cudnn":
              err = rel_l2(out[:, rows], reference_attention_rows(q, k, v, spec, rows, scale=scale))
              row["rel_l2_err"] = err
          else:
            fn = jax.jit(jax.grad(lambda q, k, v, do: jnp.vdot(attn(q, k, v).astype(jnp.float32),
                                                                 do.astype(jnp.float32)),
                                  argnums=(0, 1, 2)))
            args = (q, k, v, do)
            grads = fn(*args)
            row["finite"] = bool(all(bool(jnp.isfinite(g).all()) for g in grads))
            fl = 3.5 * fl
          times = timed_calls_ms(fn, *args, warmup=warmup, iters=iters)
          ms = statistics.median(times)
          row.update(ms=ms, ms_all=times, tflops=fl / ms / 1e9, mfu=fl / ms / 1e9 / PEAK_BF16_TFLOPS)
        except Exception as e:  # one failing config must not lose the others
          row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
          traceback.print_exc()
        print(json.dumps({k: v for k, v in row.items() if k != "ms_all"}), flush=True)
        results.append(row)
        on_row(results)

  # Speedup and kernel efficiency against cuDNN dense of the same run and mode.
  for mode in modes:
    ref = [r for r in results if r["backend"] == "cudnn" and r["mode"] == mode and "ms" in r]
    if not ref:
      continue
    for r in results:
      if r["mode"] == mode and "ms" in r:
        r["speedup_vs_cudnn"] = ref[0]["ms"] / r["ms"]
        r["efficiency_vs_cudnn"] = r["tflops"] / ref[0]["tflops"]
  return results


def table(results) -> str:
  lines = [f"{'backend':14} {'window(tok)':13} {'sparsity':>8} {'mode':6} {'ms':>9} {'TFLOP/s':>8} "
           f"{'MFU':>6} {'eff':>6} {'speedup':>8} {'err':>8}"]
  for r in results:
    w = "x".join(str(x) for x in r["window_tokens"])
    if "ms" not in r:
      lines.append(f"{r['backend']:14} {w:13} {r['sparsity']:8.2%} {r['mode']:6} ERROR "
                   f"{r.get('error', '')[:60]}")
      continue
    lines.append(
        f"{r['backend']:14} {w:13} {r['sparsity']:8.2%} {r['mode']:6} {r['ms']:9.2f} "
        f"{r['tflops']:8.1f} {r['mfu']:6.1%} {r.get('efficiency_vs_cudnn', float('nan')):6.1%} "
        f"{r.get('speedup_vs_cudnn', float('nan')):8.2f} {r.get('rel_l2_err', float('nan')):8.1e}")
  return "\n".join(lines)


def plot(results, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  for (backend, mode) in sorted({(r["backend"], r["mode"]) for r in results}):
    pts = sorted((r["sparsity"], r["ms"]) for r in results
                 if r["backend"] == backend and r["mode"] == mode and "ms" in r)
    if pts:
      ax.plot(*zip(*pts), marker="o", label=f"{backend} {mode}")
  ax.set_xlabel("sparsity")
  ax.set_ylabel("latency (ms)")
  ax.set_yscale("log")
  ax.set_title(f"STA kernels, {device_name()}")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="tiny float32 shape (CPU smoke test)")
  p.add_argument("--backends", default=None,
                 help="comma list of cudnn,pallas_mosaic,pallas_triton,xla (default: GPU ones)")
  p.add_argument("--windows", default="3,3,3;5,5,5;dense", help="windows in tiles, ';'-separated")
  p.add_argument("--modes", default="fwd,fwdbwd")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--check-rows", type=int, default=256)
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--tag", default="kernel_bench")
  a = p.parse_args(argv)
  shape = QUICK if a.quick else PAPER
  on_gpu = jax.devices()[0].platform == "gpu"
  backends = a.backends.split(",") if a.backends else (
      ["cudnn", "pallas_mosaic", "pallas_triton"] if on_gpu else ["xla"])
  windows = [w if w == "dense" else tuple(int(x) for x in w.split(","))
             for w in a.windows.split(";")]
  os.makedirs(a.out, exist_ok=True)
  meta = dict(gpu=device_name(), jax=jax.__version__, date=datetime.datetime.now(
      datetime.timezone.utc).isoformat(timespec="seconds"), shape=dataclasses.asdict(shape),
      flops_note="4*attended_pairs*head_dim summed over heads (fwd); fwd+bwd = 3.5x fwd")

  def save(results):  # after every row, so a run cut short keeps what it measured
    with open(os.path.join(a.out, f"{a.tag}.json"), "w") as f:
      json.dump(dict(meta=meta, results=results), f, indent=1)

  results = run(shape, windows, backends, a.modes.split(","), a.warmup, a.iters, a.check_rows,
                on_row=save)
  save(results)
  try:
    plot(results, os.path.join(a.out, f"{a.tag}.png"))
  except Exception as e:
    print("plot failed:", e, file=sys.stderr)
  print(f"\n{meta['gpu']}  JAX {meta['jax']}  {meta['date']}  shape {shape}")
  print(table(results))
  return results


if __name__ == "__main__":
  main()
