"""The 8-bit forward beside the bf16 Hopper forward and cuDNN dense, at the paper shape.

    python -m benchmarks.fp8_bench --out ./out            # on an H100/H200, under 3 minutes
    python -m benchmarks.fp8_bench --shape paper_text --out ./out

Rows: the bf16 forward (``pallas_kernels.mosaic.backend.forward``), the 8-bit forward from bf16
inputs (quantization included) for each recipe, the same kernel alone on inputs quantized
beforehand (``kernel only``), the quantization alone, and cuDNN dense. Each 8-bit and bf16 row
is checked against the float32 reference on sampled query rows in the same run (relative L2
and the worst row's). TFLOP/s counts attended pairs only (4 * pairs * head_dim over heads);
cuDNN's counts its dense pairs. Writes fp8_bench.json into --out.

``--options`` adds each recipe with kernel options (``fp8.default_config``'s arguments);
``--kernels-only --rounds 3`` times only the kernels (the bf16 forward, each recipe's kernel
alone, with and without the options) in three interleaved rounds, which is how options are
compared: one timing through the op moves by more than their differences.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from benchmarks import shapes as shapes_lib
from benchmarks.common import Record, random_inputs, row_errors, run_meta, sample_rows, timed
from jsta.reference import reference_attention_rows
from pallas_kernels.mosaic import backend as mosaic_backend
from pallas_kernels.mosaic import fp8
from pallas_kernels.mosaic.forward_fp8 import fp8_forward_jit
from pallas_kernels.mosaic.fp8_quantize import QuantizeConfig

RECIPES = {
    "int8 QK, bf16 PV (default)": fp8.KERNEL_RECIPE,
    "int8 QK, e4m3 PV": dataclasses.replace(fp8.KERNEL_RECIPE, p_dtype="e4m3"),
    "e4m3 QK, e4m3 PV": fp8.ALL_E4M3,
    "int8 QK, int8 PV": fp8.ALL_INT8,
}
# The recipes by the op's precision names (--option-recipes; "int8_e4m3" is the op's
# "qk_int8_pv_fp8").
RECIPE_NAMES = dict(zip(("qk_int8", "int8_e4m3", "fp8", "int8"), RECIPES))


def kernel_only(q, k, v, sched, scale, recipe, config=None):
  """(fn, args): the 8-bit kernel alone on inputs quantized here (what a caller holding 8-bit
  activations and their scales pays); its output o is the op's (its lse is not yet corrected
  for K's smoothing). ``config``: None for :func:`fp8.default_config`."""
  config = config or fp8.default_config(q.shape[-1], recipe)
  args, flags, *_ = fp8.kernel_call(q, k, v, sched, scale, recipe, config=config)
  fn = jax.jit(lambda *a: fp8_forward_jit(*a, out_dtype=jnp.dtype(q.dtype), config=config,
                                          **flags))
  return fn, args


# Kernel options of --options (fp8.default_config's arguments against their defaults),
# joined by '+'.
OPTIONS = {"noab": dict(auto_barriers=False), "ox": dict(overlap_exp=True),
           "wg3": dict(block_q=192),
           "preg": dict(p_registers=True), "apart": dict(masked_steps_apart=True),
           "together": dict(masked_steps_apart=False), "nosb": dict(schedule_barrier=False),
           "sb": dict(schedule_barrier=True), "gather": dict(gather=True),
           "blocks": dict(gather=False), "nobias": dict(biased_scores=False),
           **{f"fma{n}": dict(exp2_fma_columns=n) for n in (16, 32, 48, 64)}}


def _parse_tokens(text: str, known: dict, what: str) -> list[tuple[str, dict]]:
  """[(label, merged keyword arguments)] of a comma list of '+'-joined tokens of ``known``
  (ValueError naming ``what`` for any other token)."""
  out = []
  for token in filter(None, text.split(",")):
    kw = {}
    for part in token.split("+"):
      if part not in known:
        raise ValueError(f"unknown {what} {part!r} in {token!r} (known: {', '.join(known)})")
      kw.update(known[part])
    out.append((token, kw))
  return out


def parse_options(text: str) -> list[tuple[str, dict]]:
  """[(label, default_config keyword arguments)] of a comma list of '+'-joined OPTIONS tokens."""
  return _parse_tokens(text, OPTIONS, "option")


def quantization_mismatch(got, want) -> dict:
  """Fractions of 8-bit Q and K values that differ from ``want``'s (both
  :class:`~pallas_kernels.mosaic.fp8.FP8Operands`), and the largest relative difference of
  their scales: a quantization checked against XLA's (the reference) on the GPU."""
  def frac(a, b):
    return float(jnp.mean((a.astype(jnp.float32) != b.astype(jnp.float32)).astype(jnp.float32)))

  def rel(a, b):
    return float(jnp.max(jnp.abs(a - b) / jnp.maximum(jnp.abs(b), 1e-30)))
  return dict(q8_mismatch=frac(got.q8, want.q8), k8_mismatch=frac(got.k8, want.k8),
              scale_rel_diff=max(rel(got.q_scale, want.q_scale), rel(got.k_scale, want.k_scale)))


# Launches of the Pallas quantization (--quantize-configs), '+'-joined tokens.
QUANTIZE_TOKENS = {"default": {}, "blocks": dict(heads_minor=False),
                   **{f"w{n}": dict(num_warps=n) for n in (2, 4, 8, 16)}}


def parse_quantize_configs(text: str) -> list[tuple[str, QuantizeConfig]]:
  """[(label, QuantizeConfig)] of a comma list of '+'-joined QUANTIZE_TOKENS ("default": the
  default launch)."""
  return [(label, QuantizeConfig(**kw))
          for label, kw in _parse_tokens(text, QUANTIZE_TOKENS, "quantize config")]


def run(shape, check_rows: int, warmup: int, iters: int, record: Record, cudnn: bool = True,
        options=(), option_recipes=tuple(RECIPES), kernels_only: bool = False,
        rounds: int = 1, quantize_configs=(("default", QuantizeConfig()),)):
  """The rows of one shape, each case timed ``rounds`` times in interleaved rounds (checked
  in the first round only). ``kernels_only``: the bf16 forward and each recipe's kernel alone
  (with every option of ``options`` for ``option_recipes``), no rows through the op and no
  quantization row: what compares kernel options, whose differences one timing through the
  op does not resolve."""
  spec = shape.spec()
  heads, d = shape.heads, shape.head_dim
  sched = jsta.block_schedule(spec, heads, 128, 128, mask_unit=64)
  q, k, v, _ = random_inputs(shape, seq_len=sched.seq_len)
  scale = d ** -0.5
  rows = sample_rows(spec, check_rows)
  s = spec.seq_len
  ref = reference_attention_rows(*(x[:, :s].astype(jnp.float32) for x in (q, k, v)), spec, rows,
                                 scale=scale)
  flops = spec.flops(d, heads) * shape.batch
  cases = []       # (variant, build, check, flops): build() -> (fn, args)

  def case(name, build, check=True, fl=flops):
    cases.append((name, build, check, fl))

  def schedule_of(config):
    """The schedule of ``config``'s query block (wg3: 192 rows), on the inputs' sequence."""
    if config.block_q == sched.block_q:
      return sched
    other = jsta.block_schedule(spec, heads, config.block_q, 128, mask_unit=64)
    if other.seq_len != sched.seq_len:
      raise ValueError(f"block_q={config.block_q} pads this shape to {other.seq_len} "
                       f"positions, not {sched.seq_len}: not comparable here")
    return other

  def op_build(recipe, config):
    sched_c = schedule_of(config)
    return jax.jit(lambda q, k, v: fp8.fp8_forward(q, k, v, sched_c, scale, config=config,
                                                   recipe=recipe)), (q, k, v)

  def kernel_build(recipe, config):
    return kernel_only(q, k, v, schedule_of(config), scale, recipe, config)

  cfg = mosaic_backend.MosaicBackend().config(128, 128, d)
  case("bf16 pallas_mosaic", lambda: (jax.jit(
      lambda q, k, v: mosaic_backend.forward(q, k, v, sched, scale, cfg)), (q, k, v)))
  for name, recipe in RECIPES.items():
    with_options = options if name in option_recipes else ()
    if not kernels_only:
      case(name, functools.partial(op_build, recipe, fp8.default_config(d, recipe)))
      for label, kw in with_options:
        case(f"{name}, {label}",
             functools.partial(op_build, recipe, fp8.default_config(d, recipe, **kw)))
    case(f"{name}, kernel only", functools.partial(kernel_only, q, k, v, sched, scale, recipe))
    if kernels_only:
      for label, kw in with_options:
        case(f"{name}, {label}, kernel only", functools.partial(
            kernel_build, recipe, fp8.default_config(d, recipe, **kw)))
  if not kernels_only:
    qv, kv = fp8.validity(sched)
    recipe = fp8.KERNEL_RECIPE
    xla_ops = []          # the XLA quantization's output, the others' reference

    def quantization(quantizer, config=None):
      # What the default recipe's op computes: V is read as given (its 8-bit V^T is dropped).
      def fn(q, k, v):
        ops, shift = fp8.quantize_with(quantizer, q, k, v, qv, kv, recipe, scale,
                                       quantize_config=config)
        return ops._replace(vt8=None, v_scale=None), shift
      return jax.jit(fn), (q, k, v)

    def same_as_xla(out):
      if not xla_ops:
        xla_ops.append(out[0])
        return {}
      return quantization_mismatch(out[0], xla_ops[0])

    case("quantization only (default recipe, xla)", functools.partial(quantization, "xla"),
         check=same_as_xla, fl=0.0)
    for label, config in quantize_configs:
      case(f"quantization only (default recipe, pallas {label})",
           functools.partial(quantization, "pallas", config), check=same_as_xla, fl=0.0)
  if cudnn:
    dense = 4 * s * s * d * heads * shape.batch
    case("cudnn dense", lambda: (jax.jit(lambda q, k, v: (jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn"),)), tuple(x[:, :s] for x in (q, k, v))), check=False,
         fl=dense)

  built = {}
  for rnd in range(rounds):
    for name, build, check, fl in cases:
      row = dict(variant=name, seq=sched.seq_len, sparsity=spec.sparsity())
      if rounds > 1:
        row["round"] = rnd
      try:
        if name not in built:
          built[name] = build()
        fn, args = built[name]
        if rnd == 0:
          out = fn(*args)
          if callable(check):
            row.update(check(out))
          elif check:
            row.update(row_errors(out[0], ref, rows))
        row.update(timed(fn, *args, flops=fl, warmup=warmup, iters=iters))
      except Exception as e:  # one failing variant must not lose the others
        row["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
        traceback.print_exc()
      record.add(row)
  # Each row's speed against the bf16 forward of its own round.
  base = {r.get("round", 0): r["ms"] for r in record.rows
          if r["variant"] == "bf16 pallas_mosaic" and "ms" in r}
  for r in record.rows:
    if "ms" in r and r.get("round", 0) in base:
      r["speedup_vs_bf16"] = base[r.get("round", 0)] / r["ms"]
  record.save()
  return record.rows


def table(rows) -> str:
  lines = [f"{'variant':52} {'ms':>8} {'TFLOP/s':>8} {'vs bf16':>8} {'rel L2':>8} {'worst row':>9}"]
  for r in rows:
    name = r["variant"] + (f" [round {r['round']}]" if "round" in r else "")
    if "ms" not in r:
      lines.append(f"{name:52} ERROR {r.get('error', '')[:70]}")
      continue
    lines.append(f"{name:52} {r['ms']:8.2f} {r['tflops']:8.1f} "
                 f"{r.get('speedup_vs_bf16', float('nan')):8.2f} "
                 f"{r.get('rel_l2_err', float('nan')):8.2e} "
                 f"{r.get('worst_row_err', float('nan')):9.2e}"
                 + (f"  differs from xla: q8 {r['q8_mismatch']:.1e}, k8 {r['k8_mismatch']:.1e}, "
                    f"scales {r['scale_rel_diff']:.1e}" if "q8_mismatch" in r else ""))
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  p.add_argument("--check-rows", type=int, default=256)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--no-cudnn", action="store_true")
  p.add_argument("--options", default="",
                 help="also each recipe with these kernel options, comma-separated, each "
                      "'+'-joined: noab (MosaicConfig.auto_barriers=False), ox "
                      "(overlap_exp), preg (fp8_p_registers), apart / together (masked_steps_apart on, "
                      "the default, or off), sb / nosb (the ping-pong of the compute warpgroups "
                      "on, or off: the default), fma16..fma64 (exp2_fma_columns), gather / "
                      "blocks (gathered work items where they save steps, recipes with bf16 P "
                      "V: the default; or 128-key blocks), nobias (fp8_biased_scores=False: int8 "
                      "recipes), wg3 (192-row query blocks, three compute warpgroups: "
                      "shapes whose schedules pad to the same length), e.g. "
                      "noab,noab+ox,sb,blocks,fma32,wg3")
  p.add_argument("--option-recipes", default=",".join(RECIPE_NAMES),
                 help="the recipes that get the --options rows, comma-separated among "
                      + ", ".join(RECIPE_NAMES))
  p.add_argument("--kernels-only", action="store_true",
                 help="only the bf16 forward and each recipe's kernel alone (with the "
                      "--options), no rows through the op: kernel options compared")
  p.add_argument("--quantize-configs", default="default",
                 help="launches of the Pallas quantization timed in its own rows, a comma "
                      "list of '+'-joined tokens: default, blocks (the grid's blocks first), "
                      "w2, w4, w8, w16 (warps per program)")
  p.add_argument("--rounds", type=int, default=1,
                 help="interleaved rounds of every row (each checked in the first)")
  p.add_argument("--out", default="out")
  a = p.parse_args(argv)
  if a.rounds < 1:
    p.error(f"--rounds must be >= 1, got {a.rounds}")
  options = parse_options(a.options)            # a bad token fails before any GPU work
  quantize_configs = parse_quantize_configs(a.quantize_configs)
  unknown = [n for n in a.option_recipes.split(",") if n not in RECIPE_NAMES]
  if unknown:
    p.error(f"unknown --option-recipes {unknown} (known: {', '.join(RECIPE_NAMES)})")
  option_recipes = tuple(RECIPE_NAMES[n] for n in a.option_recipes.split(","))
  shape = shapes_lib.get(a.shape)
  meta = run_meta(shape, flops_note="4*attended_pairs*head_dim summed over heads; cudnn: dense")
  record = Record(os.path.join(a.out, "fp8_bench.json"), meta)
  rows = run(shape, a.check_rows, a.warmup, a.iters, record, cudnn=not a.no_cudnn,
             options=options, option_recipes=option_recipes, kernels_only=a.kernels_only,
             rounds=a.rounds, quantize_configs=quantize_configs)
  print(f"\n{meta['gpu']}  JAX {meta['jax']}  {meta['date']}  {shape.describe()}")
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
