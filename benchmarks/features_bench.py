"""The cost of the op's features at a benchmark shape, each beside the plain call in one run.

Rows (forward and fwd+bwd, median ms, each checked against the float32 reference on sampled
query rows):
  static        text_len fixed in the spec (the baseline)
  text_lengths  the same lengths given at run time (``text_lengths``, traced under jit)
  text_first    the text slots before the video (``text_position="first"``)
  gqa           ``--kv-heads`` key/value heads for the shape's query heads
  causal_time   a causal time axis (window ``--causal-window`` tiles back, the others kept)
  row_major     ``jsta.sliding_tile_attention_row_major`` (reorders inside)
The targets these rows answer: run-time text lengths cost <= 3% over a static text length, and
GQA is not slower than MHA (the same kernel time; k and v are repeated to the query heads).

  python -m benchmarks.features_bench --out DIR            # the paper shape with 256 text slots
  python -m benchmarks.features_bench --shape quick --backend xla --iters 1   # CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from benchmarks import common
from benchmarks import shapes as shapes_lib


def _variants(spec: jsta.STASpec, args):
  """(name, spec, kwargs of the op, kv_heads, row_major)."""
  base = dict(implementation=args.backend)
  lengths = np.full(args.batch, spec.text_len, np.int32)
  causal = dataclasses.replace(spec, causal_axes=(0,),
                               window=(args.causal_window,) + tuple(spec.window[1:]))
  heads = args.heads
  out = [("static", spec, base, heads, False),
         ("text_lengths", spec, base | dict(text_lengths=lengths), heads, False),
         ("text_first", dataclasses.replace(spec, text_position="first"), base, heads, False),
         ("gqa", spec, base, args.kv_heads, False),
         ("causal_time", causal, base, heads, False),
         ("row_major", spec, base, heads, True)]
  return [v for v in out if args.only is None or v[0] in args.only]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  p.add_argument("--text-len", type=int, default=200, help="valid text slots")
  p.add_argument("--text-max-len", type=int, default=256, help="text slots")
  p.add_argument("--kv-heads", type=int, default=8, help="key/value heads of the gqa row")
  p.add_argument("--causal-window", type=int, default=3, help="tiles back on the time axis")
  p.add_argument("--backend", default="auto")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--rows", type=int, default=256, help="query rows checked per variant")
  p.add_argument("--only", nargs="*", default=None, help="variant names to run")
  p.add_argument("--out", default="out")
  args = p.parse_args(argv)
  shape = dataclasses.replace(shapes_lib.get(args.shape), text_len=args.text_len,
                              text_max_len=args.text_max_len, batch=args.batch)
  if not 0 <= args.text_len <= args.text_max_len:
    p.error(f"--text-len must be in [0, --text-max-len={args.text_max_len}]")
  if shape.heads % args.kv_heads:
    p.error(f"--kv-heads must divide the shape's {shape.heads} heads, got {args.kv_heads}")
  args.heads = shape.heads
  spec = shape.spec()
  print(shape.describe(), flush=True)
  rec = common.Record(os.path.join(args.out, f"features_{shape.name}.json"),
                      common.run_meta(shape, backend=args.backend))
  dtype = jnp.dtype(shape.dtype)
  for name, sp, kwargs, kv_heads, row_major in _variants(spec, args):
    keys = jax.random.split(jax.random.key(0), 4)
    s = sp.video_len + sp.text_max_len if row_major else sp.seq_len
    q, do = (jax.random.normal(kk, (args.batch, s, shape.heads, shape.head_dim),
                               jnp.float32).astype(dtype) for kk in keys[:2])
    k, v = (jax.random.normal(kk, (args.batch, s, kv_heads, shape.head_dim),
                              jnp.float32).astype(dtype) for kk in keys[2:])
    op = jsta.sliding_tile_attention_row_major if row_major else jsta.sliding_tile_attention
    lengths = kwargs.get("text_lengths")
    kw = {key: val for key, val in kwargs.items() if key != "text_lengths"}
    fwd = jax.jit(lambda q, k, v, t: op(q, k, v, sp, text_lengths=t, **kw))

    def step(q, k, v, t, do):
      o, vjp = jax.vjp(lambda q, k, v: op(q, k, v, sp, text_lengths=t, **kw), q, k, v)
      return vjp(do)

    bwd = jax.jit(step)
    t = None if lengths is None else jnp.asarray(lengths)
    flops = sp.flops(shape.head_dim, shape.heads) * args.batch
    row = dict(variant=name, kv_heads=kv_heads)
    try:
      o = fwd(q, k, v, t)
      if not row_major:
        # The float32 reference on sampled rows (GQA: k and v repeated to the query heads).
        rep = lambda x: jnp.repeat(x, shape.heads // kv_heads, axis=2)
        qq, kk, vv = q, rep(k), rep(v)
        if sp.text_position == "first":
          pos = jsta.mask.text_last_position(sp)
          back = np.argsort(pos)
          qq, kk, vv, o = (x[:, back] for x in (qq, kk, vv, o))
        rows = common.sample_rows(sp.text_last(), args.rows)
        row["rel_l2_fwd"] = common.forward_error(o, qq, kk, vv, sp.text_last(), rows,
                                                 shape.head_dim ** -0.5)
      f = common.timed(fwd, q, k, v, t, flops=flops, iters=args.iters)
      b = common.timed(bwd, q, k, v, t, do, flops=3.5 * flops, iters=args.iters)
      row |= dict(fwd_ms=f["ms"], fwd_tflops=f["tflops"], fwd_ms_all=f["ms_all"],
                  fwd_bwd_ms=b["ms"], fwd_bwd_tflops=b["tflops"], fwd_bwd_ms_all=b["ms_all"])
    except Exception as e:  # one variant's failure must not hide the others' figures
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
    rec.add(row)
  base = next((r for r in rec.rows if r["variant"] == "static" and "fwd_ms" in r), None)
  print(f"{'variant':14s} {'fwd ms':>9s} {'vs static':>9s} {'fwd+bwd ms':>11s} {'vs static':>9s}"
        f" {'rel_l2':>8s}")
  for r in rec.rows:
    if "fwd_ms" not in r:
      print(f"{r['variant']:14s} {r.get('error', '')}")
      continue
    rel = lambda key: f"{r[key] / base[key] - 1:+8.1%}" if base else "      -"
    print(f"{r['variant']:14s} {r['fwd_ms']:9.2f} {rel('fwd_ms'):>9s} {r['fwd_bwd_ms']:11.2f} "
          f"{rel('fwd_bwd_ms'):>9s} {r.get('rel_l2_fwd', float('nan')):8.1e}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
