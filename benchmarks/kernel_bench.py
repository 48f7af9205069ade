"""Kernel benchmark: the STA paper's Table 2 for the jsta kernels beside cuDNN dense, in one run.

    python -m benchmarks.kernel_bench --out ./out                     # paper shape on a GPU
    python -m benchmarks.kernel_bench --shape wan14b_720p --out ./out # another benchmarks.shapes
    python -m benchmarks.kernel_bench --quick --backends xla          # tiny shape, any device

For every (backend, window, mode) it checks the result against the float32 reference on sampled
query rows (the output; for fwd+bwd the gradients of those rows), then times it (warm-up,
median). Modes: fwd, fwdbwd, and fwd:PRECISION for the op's 8-bit forwards (e.g.
fwd:qk_int8, fwd:int8 and fwd:fp8, on a GPU by default; rows only for backends that have one,
with the worst row's error and the speedup over the same backend's fwd). TFLOP/s counts only
attended pairs: 4 * attended pairs * head_dim (summed over heads) for the forward, 3.5x that for
fwd+bwd.
Writes kernel_bench.json (GPU name, JAX version, date) and kernel_bench.png (latency vs
sparsity) into --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

import jax
import jax.numpy as jnp

import jsta
from benchmarks import shapes as shapes_lib
from benchmarks.common import (WINDOWS_HELP, Record, device_name, forward_error,
                               forward_row_errors, grad_errors, parse_windows, random_inputs,
                               run_meta, sample_rows, timed)

PEAK_BF16_TFLOPS = 989.0  # H100 / H200 SXM dense bf16
PAPER_WINDOWS = "3,3,3;5,5,5;dense"   # the paper's Table 2


def run(shape: shapes_lib.BenchShape, windows, backends, modes, warmup, iters, check_rows,
        seed=0, record: Record | None = None):
  record = record or Record(None, {})
  q, k, v, do = random_inputs(shape, seed=seed)
  base = shape.spec()
  s = base.seq_len
  scale = shape.head_dim ** -0.5
  rows = sample_rows(base, check_rows, seed)
  dense_flops = 4 * s * s * shape.head_dim * shape.heads * shape.batch

  for backend in backends:
    for window in windows:
      spec = shape.spec(window)
      flops = spec.flops(shape.head_dim, shape.heads) * shape.batch
      for mode in modes:
        if backend == "cudnn" and window != "dense":
          continue
        precision = mode.split(":", 1)[1] if mode.startswith("fwd:") else "default"
        if precision != "default" and (backend == "cudnn" or not _has_8bit(
            shape, spec, backend, precision)):
          continue
        row = dict(backend=backend, window=list(spec.window), window_tokens=[
            w * t for w, t in zip(spec.window, shape.tile)], sparsity=spec.sparsity(), mode=mode)
        try:
          if backend == "cudnn":
            attn = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
            row["sparsity"] = 0.0
            fl = dense_flops
          else:
            attn = lambda q, k, v, spec=spec, backend=backend: jsta.sliding_tile_attention(
                q, k, v, spec, backend=backend,
                precision=None if precision == "default" else precision)
            fl = flops
          if mode.startswith("fwd") and mode != "fwdbwd":
            fn = jax.jit(attn)
            args = (q, k, v)
            out = fn(*args)
            if precision != "default":
              row.update(forward_row_errors(out, q, k, v, spec, rows, scale))
            elif backend != "cudnn":
              row["rel_l2_err"] = forward_error(out, q, k, v, spec, rows, scale)
          else:
            fn = jax.jit(jax.grad(lambda q, k, v, do: jnp.vdot(attn(q, k, v).astype(jnp.float32),
                                                                 do.astype(jnp.float32)),
                                  argnums=(0, 1, 2)))
            args = (q, k, v, do)
            grads = fn(*args)
            row["finite"] = bool(all(bool(jnp.isfinite(g).all()) for g in grads))
            del grads
            if backend != "cudnn":
              row["grad_rel_l2_err"] = list(grad_errors(
                  lambda d: fn(q, k, v, d), q, k, v, do, spec, rows, scale))
            fl = 3.5 * fl
          row.update(timed(fn, *args, flops=fl, warmup=warmup, iters=iters))
          row["mfu"] = row["tflops"] / PEAK_BF16_TFLOPS
        except Exception as e:  # one failing config must not lose the others
          row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
          traceback.print_exc()
        record.add(row)

  # Speedup and kernel efficiency against cuDNN dense of the same run and mode (8-bit rows:
  # against the dense forward), and the 8-bit rows' speedup over their backend's forward.
  results = record.rows
  base_mode = lambda m: "fwd" if m.startswith("fwd:") else m
  for mode in modes:
    ref = [r for r in results if r["backend"] == "cudnn" and r["mode"] == base_mode(mode)
           and "ms" in r]
    if not ref:
      continue
    for r in results:
      if r["mode"] == mode and "ms" in r:
        r["speedup_vs_cudnn"] = ref[0]["ms"] / r["ms"]
        r["efficiency_vs_cudnn"] = r["tflops"] / ref[0]["tflops"]
  for r in results:
    if r["mode"].startswith("fwd:") and "ms" in r:
      bf = [x for x in results if x["mode"] == "fwd" and x["backend"] == r["backend"]
            and x["window"] == r["window"] and "ms" in x]
      if bf:
        r["speedup_vs_fwd"] = bf[0]["ms"] / r["ms"]
  record.save()
  return results


def _has_8bit(shape, spec, backend: str, precision: str) -> bool:
  """Whether ``backend`` runs the op's 8-bit ``precision`` on this input (a plan is made)."""
  try:
    jsta.make_plan(spec, shape.heads, shape.head_dim, jnp.dtype(shape.dtype), backend=backend,
                   precision=precision)
  except ValueError:
    return False
  return True


def table(results) -> str:
  """One line per row; err: the output's (fwd) or the largest gradient's (fwd+bwd) relative L2
  error on the sampled rows."""
  lines = [f"{'backend':14} {'window(tok)':13} {'sparsity':>8} {'mode':11} {'ms':>9} "
           f"{'TFLOP/s':>8} {'MFU':>6} {'eff':>6} {'speedup':>8} {'err':>8}"]
  for r in results:
    w = "x".join(str(x) for x in r["window_tokens"])
    if "ms" not in r:
      lines.append(f"{r['backend']:14} {w:13} {r['sparsity']:8.2%} {r['mode']:11} ERROR "
                   f"{r.get('error', '')[:60]}")
      continue
    err = r.get("rel_l2_err", max(r.get("grad_rel_l2_err", [float("nan")])))
    lines.append(
        f"{r['backend']:14} {w:13} {r['sparsity']:8.2%} {r['mode']:11} {r['ms']:9.2f} "
        f"{r['tflops']:8.1f} {r['mfu']:6.1%} {r.get('efficiency_vs_cudnn', float('nan')):6.1%} "
        f"{r.get('speedup_vs_cudnn', float('nan')):8.2f} {err:8.1e}")
  return "\n".join(lines)


def plot(results, path):
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4), layout="constrained")   # no pyplot: the caller's backend stays
  ax = fig.subplots()
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
  fig.savefig(path, dpi=120)


def register_option_backend(name: str) -> None:
  """Registers ``pallas_mosaic:F+G`` (the Hopper backend with its bool options F and G on,
  e.g. ``pallas_mosaic:overlap_exp``; ``no_F`` turns F off, e.g.
  ``pallas_mosaic:no_forward_192_keys``; options whose default is "auto" too, e.g.
  ``pallas_mosaic:no_persistent``) as a backend of that name, so the op runs it as it runs
  the built-in ones; other names are left as they are."""
  base, sep, opts = name.partition(":")
  if not sep:
    return
  from pallas_kernels.mosaic import backend as mosaic_backend
  fields = {f.name: f.default for f in dataclasses.fields(mosaic_backend.MosaicBackend)}
  if base != "pallas_mosaic":
    raise ValueError(f"{name!r}: options are for pallas_mosaic only")
  values = {}
  for opt in opts.split("+"):
    field, on = (opt[3:], False) if opt.startswith("no_") and opt not in fields else (opt, True)
    default = fields.get(field)
    if (not (isinstance(default, bool) or default == "auto")
        or field in ("interpret", "device_check")):
      raise ValueError(f"{name!r}: {opt!r} is not a bool option of MosaicBackend")
    values[field] = on
  impl = dataclasses.replace(mosaic_backend.BACKEND, **values)
  jsta.register_backend(name, lambda: impl)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES),
                 help="a benchmarks.shapes shape (default: paper)")
  p.add_argument("--quick", action="store_true", help="--shape quick (tiny float32, CPU)")
  p.add_argument("--backends", default=None,
                 help="comma list of cudnn,pallas_mosaic,pallas_triton,xla (default: GPU ones); "
                      "pallas_mosaic:F+G is pallas_mosaic with its bool options F and G on "
                      "(no_F: off), e.g. pallas_mosaic:no_forward_192_keys")
  p.add_argument("--windows", default=None,
                 help=f"{WINDOWS_HELP} (default: {PAPER_WINDOWS!r} for the paper shape, the "
                      "shape's window and dense otherwise)")
  p.add_argument("--modes", default=None,
                 help="comma list of fwd, fwdbwd, fwd:PRECISION (an 8-bit precision of the op); "
                      "default: fwd,fwdbwd,fwd:qk_int8,fwd:int8,fwd:fp8 on a GPU, fwd,fwdbwd "
                      "elsewhere")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--check-rows", type=int, default=256)
  p.add_argument("--out", default="out")
  p.add_argument("--tag", default="kernel_bench", help="file names: TAG.json, TAG.png")
  a = p.parse_args(argv)
  shape = shapes_lib.get("quick" if a.quick else a.shape)
  on_gpu = jax.devices()[0].platform == "gpu"
  backends = a.backends.split(",") if a.backends else (
      ["cudnn", "pallas_mosaic", "pallas_triton"] if on_gpu else ["xla"])
  for name in backends:
    try:
      register_option_backend(name)
    except ValueError as e:
      p.error(f"--backends: {e}")
  if a.windows is None:
    a.windows = (PAPER_WINDOWS if shape.name == "paper"
                 else f"{','.join(map(str, shape.window))};dense")
  windows = parse_windows(a.windows)
  meta = run_meta(shape, flops_note="4*attended_pairs*head_dim summed over heads (fwd); "
                                    "fwd+bwd = 3.5x fwd")
  record = Record(os.path.join(a.out, f"{a.tag}.json"), meta)
  default_modes = "fwd,fwdbwd,fwd:qk_int8,fwd:int8,fwd:fp8" if on_gpu else "fwd,fwdbwd"
  modes = (a.modes or default_modes).split(",")
  for mode in modes:
    if mode.startswith("fwd:") and mode[4:] in jsta.ops.QUANTIZED_PRECISIONS:
      continue
    if mode not in ("fwd", "fwdbwd"):
      p.error(f"--modes: unknown mode {mode!r} (fwd, fwdbwd, or fwd:P for P in "
              f"{', '.join(jsta.ops.QUANTIZED_PRECISIONS)})")
  results = run(shape, windows, backends, modes, a.warmup, a.iters, a.check_rows,
                record=record)
  try:
    plot(results, os.path.join(a.out, f"{a.tag}.png"))
  except Exception as e:
    print("plot failed:", e, file=sys.stderr)
  print(f"\n{meta['gpu']}  JAX {meta['jax']}  {meta['date']}  {shape.describe()}")
  print(table(results))
  return results


if __name__ == "__main__":
  main()
