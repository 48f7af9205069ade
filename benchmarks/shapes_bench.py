"""Real-model shapes: jsta's STA (fwd and fwd+bwd through the op) beside cuDNN dense attention.

    python -m benchmarks.shapes_bench --out DIR                     # every shape, on a GPU
    python -m benchmarks.shapes_bench --shapes quick --iters 1      # a CPU smoke run

For each shape of :mod:`benchmarks.shapes` it checks the op's output and gradients against the
float32 reference on sampled valid query rows, then times it (warm-up, median), and times
cuDNN dense attention (``jax.nn.dot_product_attention(implementation="cudnn")``) at the real,
unpadded length (video tokens + valid text tokens): what a user of that model compares against.
The 8-bit forwards (``--precisions``, the op's ``precision=``; default "qk_int8,int8,fp8") get a row
each where the backend has one (pallas_mosaic), with their error (relative L2 and the worst
row's) and their speedup over the bf16 forward of the same run.
TFLOP/s count the attended pairs of real tokens only (``spec.flops``; fwd+bwd = 3.5x).
Writes shapes_bench.json (GPU, JAX version, date) and shapes_bench.png.
"""

from __future__ import annotations

import argparse
import sys
import traceback

import jax

import jsta
from benchmarks import shapes as shapes_lib
from benchmarks.common import (Record, forward_error, forward_row_errors, grad_errors,
                               random_inputs, run_meta, sample_rows, timed)

TABLE = ("paper", "paper_text", "wan14b_720p", "wan1_3b_480p", "hunyuan_544p", "image_2048")
# Shapes no model row has, for the same efficiency elsewhere (--shapes beyond): head_dim 64,
# short key lists, 128-token tiles.
BEYOND_TABLE = ("paper_d64", "wan14b_720p_w311", "tile128_720p")


def bench_shape(shape, record: Record, *, backend: str, modes, warmup: int, iters: int,
                check_rows: int, cudnn: bool, precisions=()) -> None:
  spec = shape.spec()
  q, k, v, do = random_inputs(shape)
  scale = shape.head_dim ** -0.5
  flops = spec.flops(shape.head_dim, shape.heads) * shape.batch
  plan = jsta.make_plan(spec, shape.heads, shape.head_dim, q.dtype, backend=backend)
  base = dict(shape=shape.name, backend=plan.backend, block_q=plan.block_q,
              block_kv=plan.block_kv, tokens=spec.video_len + spec.text_len,
              positions=spec.seq_len, sparsity=spec.sparsity())
  rows = sample_rows(spec, check_rows)
  op = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, backend=backend))
  if "fwd" in modes:
    err = forward_error(op(q, k, v), q, k, v, spec, rows, scale)
    record.add(base | dict(mode="fwd", rel_l2_err=err) | timed(op, q, k, v, flops=flops,
                                                                warmup=warmup, iters=iters))
  bf16_ms = record.rows[-1].get("ms") if "fwd" in modes else None
  for precision in precisions:
    row = base | dict(mode="fwd", precision=precision)
    try:
      jsta.make_plan(spec, shape.heads, shape.head_dim, q.dtype, backend=backend,
                     precision=precision)
    except ValueError as e:
      record.add(row | dict(skipped=str(e)[:300]))
      continue
    op8 = jax.jit(lambda q, k, v, p=precision: jsta.sliding_tile_attention(
        q, k, v, spec, backend=backend, precision=p))
    o8 = op8(q, k, v)
    row |= forward_row_errors(o8, q, k, v, spec, rows, scale)
    row |= timed(op8, q, k, v, flops=flops, warmup=warmup, iters=iters)
    if bf16_ms:
      row["speedup_vs_bf16"] = bf16_ms / row["ms"]
    record.add(row)
  if "fwdbwd" in modes:
    def fwd_bwd(q, k, v, do):
      o, vjp = jax.vjp(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec,
                                                                   backend=backend), q, k, v)
      return vjp(do)
    fb = jax.jit(fwd_bwd)
    errs = grad_errors(lambda d: fb(q, k, v, d), q, k, v, do, spec, rows, scale)
    record.add(base | dict(mode="fwdbwd", grad_rel_l2_err=dict(zip(("dq", "dk", "dv"), errs)))
               | timed(fb, q, k, v, do, flops=3.5 * flops, warmup=warmup, iters=iters))
  if cudnn:
    n = spec.video_len + spec.text_len
    dense = dict(shape=shape.name, backend="cudnn_dense", tokens=n, sparsity=0.0)
    cq, ck, cv, cdo = (x[:, :n] for x in (q, k, v, do))
    dense_flops = 4 * n * n * shape.head_dim * shape.heads * shape.batch
    attend = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if "fwd" in modes:
      record.add(dense | dict(mode="fwd") | timed(jax.jit(attend), cq, ck, cv,
                                                  flops=dense_flops, warmup=warmup, iters=iters))
    if "fwdbwd" in modes:
      fb = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
      record.add(dense | dict(mode="fwdbwd") | timed(fb, cq, ck, cv, cdo, flops=3.5 * dense_flops,
                                                     warmup=warmup, iters=iters))


def table(rows) -> str:
  """One line per shape: jsta fwd / fwd+bwd (ms, TFLOP/s) beside cuDNN dense, and the first
  8-bit forward (ms, speedup over bf16, error) where it ran."""
  by = {(r["shape"], r["backend"] == "cudnn_dense", r["mode"]): r for r in rows
        if "ms" in r and "precision" not in r}
  q8 = {}
  for r in rows:
    if "ms" in r and "precision" in r:
      q8.setdefault(r["shape"], r)
  out = [f"{'shape':14s} {'fwd ms':>9s} {'TFLOP/s':>8s} {'fwdbwd ms':>10s} {'TFLOP/s':>8s} "
         f"{'cuDNN fwd':>10s} {'cuDNN fwdbwd':>13s} {'err':>8s}"
         + (f" {'8-bit fwd ms':>13s} {'x bf16':>7s} {'8-bit err':>9s}" if q8 else "")]
  for name in dict.fromkeys(r["shape"] for r in rows if "shape" in r):
    f, fb = by.get((name, False, "fwd"), {}), by.get((name, False, "fwdbwd"), {})
    cf, cfb = by.get((name, True, "fwd"), {}), by.get((name, True, "fwdbwd"), {})
    g = lambda r, key, fmt: format(r[key], fmt) if key in r else "-".rjust(int(fmt.split('.')[0]))
    err = max([f.get("rel_l2_err", 0.0), *fb.get("grad_rel_l2_err", {}).values()])
    line = (f"{name:14s} {g(f, 'ms', '9.2f')} {g(f, 'tflops', '8.0f')} "
            f"{g(fb, 'ms', '10.2f')} {g(fb, 'tflops', '8.0f')} {g(cf, 'ms', '10.2f')} "
            f"{g(cfb, 'ms', '13.2f')} {err:8.1e}")
    if q8:
      r8 = q8.get(name, {})
      line += (f" {g(r8, 'ms', '13.2f')} {g(r8, 'speedup_vs_bf16', '7.2f')} "
               f"{g(r8, 'rel_l2_err', '9.1e')}")
    out.append(line)
  return "\n".join(out)


def plot(rows, path: str) -> None:
  from matplotlib.figure import Figure

  names = list(dict.fromkeys(r["shape"] for r in rows if "shape" in r))
  # No pyplot: the caller's matplotlib backend stays as it is.
  fig = Figure(figsize=(1.6 * len(names) + 2, 3.2), layout="constrained")
  ax = fig.subplots()
  width = 0.2
  for i, (backend, mode) in enumerate([("jsta", "fwd"), ("jsta", "fwdbwd"),
                                       ("cudnn_dense", "fwd"), ("cudnn_dense", "fwdbwd")]):
    vals = []
    for n in names:
      r = [x for x in rows if x.get("shape") == n and x.get("mode") == mode and "tflops" in x
           and "precision" not in x
           and (x["backend"] == "cudnn_dense") == (backend == "cudnn_dense")]
      vals.append(r[0]["tflops"] if r else 0.0)
    ax.bar([j + (i - 1.5) * width for j in range(len(names))], vals, width,
           label=f"{'jsta STA' if backend == 'jsta' else 'cuDNN dense'} {mode}")
  ax.set_xticks(range(len(names)), names, fontsize=8)
  ax.set_ylabel("TFLOP/s (attended pairs)")
  ax.legend(fontsize=7)
  fig.savefig(path, dpi=120)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.shapes_bench",
                              description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--shapes", default=",".join(TABLE),
                 help=f"comma-separated names of benchmarks.shapes ({', '.join(shapes_lib.SHAPES)}"
                      f"; 'beyond': {','.join(BEYOND_TABLE)})")
  p.add_argument("--backend", default="auto", help="jsta backend")
  p.add_argument("--modes", default="fwd,fwdbwd", help="fwd and/or fwdbwd")
  p.add_argument("--no-cudnn", action="store_true", help="skip cuDNN dense")
  p.add_argument("--precisions", default="qk_int8,int8,fp8",
                 help="the op's 8-bit precisions to time as forward rows (comma-separated, "
                      "'' for none); skipped where the backend has no 8-bit forward")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--check-rows", type=int, default=256, help="query rows checked")
  p.add_argument("--out", default="out", help="output directory")
  args = p.parse_args(argv)
  try:
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    names = [m for n in names for m in (BEYOND_TABLE if n == "beyond" else (n,))]
    shapes = [shapes_lib.get(n) for n in names]
    jsta.ops.check_backend(args.backend)
  except (TypeError, ValueError) as e:
    p.error(str(e))
  modes = {m.strip() for m in args.modes.split(",")}
  if not modes <= {"fwd", "fwdbwd"} or not modes:
    p.error(f"--modes must name fwd and/or fwdbwd, got {args.modes!r}")
  if args.warmup < 0 or args.iters < 1 or args.check_rows < 1:
    p.error("--warmup must be >= 0, --iters and --check-rows >= 1")
  precisions = [x.strip() for x in args.precisions.split(",") if x.strip()]
  try:
    for x in precisions:
      jsta.ops.check_precision(x)
  except (TypeError, ValueError) as e:
    p.error(str(e))
  if "default" in precisions:
    p.error("--precisions names 8-bit precisions; the bf16 rows are the fwd mode")
  cudnn = not args.no_cudnn and jax.devices()[0].platform == "gpu"
  record = Record(f"{args.out}/shapes_bench.json",
                  run_meta(shapes=[s.name for s in shapes], backend=args.backend))
  failed = False
  for shape in shapes:
    print(shape.describe(), flush=True)
    try:
      bench_shape(shape, record, backend=args.backend, modes=modes, warmup=args.warmup,
                  iters=args.iters, check_rows=args.check_rows, cudnn=cudnn,
                  precisions=precisions)
    except Exception as e:  # noqa: BLE001 - keep the other shapes' rows
      traceback.print_exc()
      record.add(dict(shape=shape.name, error=repr(e)[:2000]))
      failed = True
  plot(record.rows, f"{args.out}/shapes_bench.png")
  print(table(record.rows))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
