"""The 8-bit forward's quantization of Q and K as Pallas kernels: two reads of each instead
of XLA's three to four (and a fourth of Q for the lse correction).

:func:`pallas_kernels.mosaic.fp8.quantize` (jnp, the reference) needs statistics over the whole
sequence before any block can be quantized: K's mean over the valid keys, and the channel
maxima of Q and of the smoothed K for the balance. XLA computes them in separate passes and
re-reads Q and K for the per-row and per-block scales before the converting pass
(docs/PERFORMANCE.md, "FP8 forward: the quantization's layout"). Here:

1. :func:`_stats_kernel` reads each 128-row block of K once for its channel sums, maxima and
   minima, and each block of Q once for its channel absmax. The absmax of the smoothed K
   needs no second pass: ``max_s |k - mean| = max(max_s k - mean, mean - min_s k)`` per
   channel, exactly (float32 subtraction is monotone). XLA reduces the per-block partials.
2. :func:`_quantize_kernel` reads each block of Q (K) once more, applies the balance (and K's
   mean), takes the block's or each row's absmax, and writes the 8-bit block with its scales;
   Q's pass also writes each row's lse correction ``scale * q . k_mean`` (:func:`fp8.lse_shift`).

Lowered through Triton on the GPU (a ``pallas_call`` with a grid: these are memory-bound
passes, no wgmma), ``interpret=True`` on the CPU. V (read unquantized by the default recipe)
stays with XLA: its channel absmax and transposing convert to V^T are what the e4m3 P V recipes
need. Same arithmetic as the reference up to the order of K's sum and multiplications by
reciprocals (x * (1 / s) for x / s): an 8-bit value can differ by one step where such a
last-bit change decides a rounding tie (a few values per million at the paper shape).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

ROWS = 128               # rows of a statistics block
TOP = {"int8": 127.0, "e4m3": 448.0}        # the largest magnitude of each 8-bit type
DTYPE = {"int8": jnp.int8, "e4m3": jnp.float8_e4m3fn}


class QuantizedQK(NamedTuple):
  """Q and K quantized (the :class:`~pallas_kernels.mosaic.fp8.FP8Operands` fields of the same
  names) and the lse correction."""

  q8: jax.Array        # int8 or float8_e4m3fn [B, S, H, D]
  q_scale: jax.Array   # float32 [B, H, S // q_block]
  k8: jax.Array        # int8 or float8_e4m3fn [B, S, Hkv, D] (smoothed)
  k_scale: jax.Array   # float32 [B, Hkv, S // k_block]
  k_mean: jax.Array    # float32 [B, Hkv, D]
  balance: jax.Array   # float32 [B, Hkv, D]
  shift: jax.Array     # float32 [B, H, S]: softmax_scale * q . k_mean (0 on invalid rows)


@dataclasses.dataclass(frozen=True)
class QuantizeConfig:
  """How the passes are launched.

  num_warps: warps per program (one program per [128 or 64, D] block of one head).
  heads_minor: the grid's first (fastest-launched) axis is the head, so programs launched
    together read all heads of the same rows (whole [H, D] rows of q, contiguous in memory);
    False: the block, so they read one head's consecutive blocks (D of every H * D elements).
  """

  num_warps: int = 8
  heads_minor: bool = True

  def __post_init__(self):
    if self.num_warps not in (1, 2, 4, 8, 16):
      raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")


def _launch(x, valid, rows: int, config: QuantizeConfig):
  """(grid, spec, x_spec, valid_spec) of a pass over x [B, S, H, D] in blocks of ``rows``
  rows of one head: the grid over (block, head, batch), heads or blocks first
  (``config.heads_minor``); ``spec(block_shape, index_map)`` a BlockSpec whose index map takes
  (batch, head, block); the specs of x's [rows, D] block and of its rows of ``valid``
  ([B or 1, S])."""
  b, s, h, d = x.shape
  n = s // rows
  if config.heads_minor:
    grid, spec = (h, n, b), lambda shape, f: pl.BlockSpec(shape, lambda hi, i, bi: f(bi, hi, i))
  else:
    grid, spec = (n, h, b), lambda shape, f: pl.BlockSpec(shape, lambda i, hi, bi: f(bi, hi, i))
  x_spec = spec((None, rows, None, d), lambda bi, hi, i: (bi, i, hi, 0))
  per_sample = valid.shape[0] == b
  valid_spec = spec((None, rows), lambda bi, hi, i: (bi if per_sample else 0, i))
  return grid, spec, x_spec, valid_spec


_RNE = 12582912.0        # 1.5 * 2 ** 23: (x + c) - c rounds |x| < 2 ** 22 to nearest even


def round_half_even(x):
  """float32 x rounded to the nearest integer, ties to even, as jnp.round (which Pallas'
  Triton lowering lacks) in exact steps: x - floor(x) is exact, so is the tie test. The
  compiled kernels round by (x + c) - c with c = 1.5 * 2 ** 23 instead (two instructions, the
  same result for |x| < 2 ** 22), which XLA's CPU compiler folds to x in interpret mode."""
  low = jnp.floor(x)
  frac = x - low
  odd = jnp.floor(low * 0.5) * 2.0 != low
  return jnp.where((frac > 0.5) | ((frac == 0.5) & odd), low + 1.0, low)


def _params(interpret: bool, config: QuantizeConfig):
  return {} if interpret else dict(compiler_params=plgpu.CompilerParams(
      num_warps=config.num_warps, num_stages=1))


def _stats_kernel(x_ref, valid_ref, max_ref, min_ref, *sum_ref):
  """One [ROWS, D] block: the valid rows' channel max and min (max -inf and min +inf where no
  row is valid) and, with ``sum_ref``, their sum. Invalid rows are selected away (garbage
  there reaches nothing)."""
  valid = (valid_ref[...] != 0)[:, None]
  x = x_ref[...].astype(jnp.float32)
  if sum_ref:
    sum_ref[0][...] = jnp.sum(jnp.where(valid, x, 0.0), axis=0)
  max_ref[...] = jnp.max(jnp.where(valid, x, -jnp.inf), axis=0)
  min_ref[...] = jnp.min(jnp.where(valid, x, jnp.inf), axis=0)


def _block_stats(x, valid, interpret: bool, config: QuantizeConfig, with_sum: bool):
  """x [B, S, H, D], valid int32 [B or 1, S] -> (max, min[, sum]) float32
  [B, S // ROWS, H, D] (the sum only ``with_sum``: Q's pass needs none)."""
  b, s, h, d = x.shape
  grid, spec, x_spec, valid_spec = _launch(x, valid, ROWS, config)
  out = jax.ShapeDtypeStruct((b, s // ROWS, h, d), jnp.float32)
  n = 3 if with_sum else 2
  return pl.pallas_call(
      _stats_kernel, grid=grid, in_specs=[x_spec, valid_spec],
      out_specs=[spec((None, None, None, d), lambda bi, hi, i: (bi, i, hi, 0))] * n,
      out_shape=[out] * n, interpret=interpret, name="fp8_quantize_stats",
      **_params(interpret, config))(x, valid)


def _quantize_kernel(x_ref, valid_ref, mean_ref, mult_ref, x8_ref, rows_ref, *shift_ref,
                     per_row: bool, divide: bool, subtract: bool, top: float, to_int8: bool,
                     softmax_scale: float, exact_rounding: bool):
  """One [rows, D] block: x -> ((x - mean) * or / mult) on valid rows, 0 elsewhere; its
  absmax per row (``per_row``) or over the block; x / scale rounded to 8 bits; each row's
  scale; and with ``shift_ref`` each row's ``softmax_scale * x . mean`` (Q's lse correction:
  mean is K's there, and Q itself is not shifted)."""
  valid = (valid_ref[...] != 0)[:, None]
  x = jnp.where(valid, x_ref[...].astype(jnp.float32), 0.0)
  mean = mean_ref[...][None, :]
  if shift_ref:
    shift_ref[0][...] = jnp.sum(x * mean, axis=1) * softmax_scale
  if subtract:
    x = jnp.where(valid, x - mean, 0.0)
  # Reciprocals per channel and per row, then multiplies: a division per element made the
  # pass issue-bound (about 32 instructions an element at 24% warp occupancy, half the
  # bandwidth). x * (1 / s) can differ from x / s in the last bit: an 8-bit value moves by one
  # step only where that bit decides a rounding tie.
  mult = mult_ref[...][None, :]
  x = x * (1.0 / mult) if divide else x * mult
  amax = jnp.max(jnp.abs(x), axis=1)                                        # [rows]
  if not per_row:
    amax = jnp.broadcast_to(jnp.max(amax), amax.shape)
  scale = jnp.where(amax > 0, amax / top, 1.0)
  xs = x * (1.0 / scale)[:, None]
  if to_int8:
    xs = jnp.clip(round_half_even(xs) if exact_rounding else (xs + _RNE) - _RNE, -127.0, 127.0)
  x8_ref[...] = xs.astype(x8_ref.dtype)
  rows_ref[...] = scale


def _quantize(x, valid, mean, mult, *, block: int, dtype: str, divide: bool, subtract: bool,
              softmax_scale: float | None, interpret: bool, config: QuantizeConfig):
  """x [B, S, H, D] -> (x8 [B, S, H, D], row scales float32 [B, H, S][, shift [B, H, S]]);
  mean, mult float32 [B, H, D]; ``block`` 1 (a scale per row) or the rows per scale."""
  b, s, h, d = x.shape
  rows = ROWS if block == 1 else block
  grid, spec, x_spec, valid_spec = _launch(x, valid, rows, config)
  per_head = spec((None, None, d), lambda bi, hi, i: (bi, hi, 0))
  row_spec = spec((None, None, rows), lambda bi, hi, i: (bi, hi, i))
  out_shape = [jax.ShapeDtypeStruct(x.shape, DTYPE[dtype]),
               jax.ShapeDtypeStruct((b, h, s), jnp.float32)]
  out_specs = [x_spec, row_spec]
  if softmax_scale is not None:
    out_shape.append(jax.ShapeDtypeStruct((b, h, s), jnp.float32))
    out_specs.append(row_spec)
  kernel = functools.partial(
      _quantize_kernel, per_row=block == 1, divide=divide, subtract=subtract,
      top=TOP[dtype], to_int8=dtype == "int8", exact_rounding=interpret,
      softmax_scale=0.0 if softmax_scale is None else float(softmax_scale))
  return pl.pallas_call(
      kernel, grid=grid,
      in_specs=[x_spec, valid_spec, per_head, per_head],
      out_specs=out_specs, out_shape=out_shape, interpret=interpret,
      name="fp8_quantize", **_params(interpret, config))(x, valid, mean, mult)


def check_shapes(q, k, recipe) -> None:
  """ValueError unless the sequence is a multiple of the statistics block and the recipe's
  scale blocks (1, 64 or 128 rows), as the 8-bit forward's schedules guarantee."""
  s = q.shape[1]
  for name, block in (("q_block", recipe.q_block), ("k_block", recipe.k_block)):
    if block not in (1, 64, 128):
      raise ValueError(f"recipe.{name} must be 1, 64 or 128 for the quantization kernels, "
                       f"got {block}")
  if s % ROWS:
    raise ValueError(f"the quantization kernels need seq a multiple of {ROWS}, got {s}")
  if k.shape[1] != s:
    raise ValueError(f"q and k must share seq, got {q.shape} and {k.shape}")


@functools.partial(jax.jit, static_argnames=("recipe", "softmax_scale", "interpret", "config"))
def quantize_qk(q, k, query_valid, key_valid, recipe, softmax_scale: float,
                interpret: bool = False, config: QuantizeConfig = QuantizeConfig()
                ) -> QuantizedQK:
  """Q and K of :func:`pallas_kernels.mosaic.fp8.quantize` in two passes each, and the lse
  correction of K's smoothing (:func:`~pallas_kernels.mosaic.fp8.lse_shift`) on the way.

  Args:
    q: [B, S, H, D]; k: [B, S, Hkv, D] (bf16, fp16 or float32), S a multiple of 128.
    query_valid, key_valid: bool [B or 1, S].
    recipe: a :class:`~pallas_kernels.mosaic.fp8.QuantRecipe` (q_block, k_block in 1, 64, 128).
    softmax_scale: the attention's scale (for the lse correction).
    interpret: run the kernels in Pallas' interpreter (the CPU).
    config: the launch (:class:`QuantizeConfig`).
  Returns:
    :class:`QuantizedQK`.
  """
  check_shapes(q, k, recipe)
  b, s, h, d = q.shape
  hkv = k.shape[2]
  rep = h // hkv
  qv = query_valid.astype(jnp.int32)
  kv = key_valid.astype(jnp.int32)
  k_max, k_min, *k_sum = _block_stats(k, kv, interpret, config, with_sum=recipe.smooth_k)
  k_max, k_min = k_max.max(1), k_min.min(1)                           # [B, Hkv, D]
  if recipe.smooth_k:
    count = jnp.maximum(key_valid.sum(axis=1), 1).astype(jnp.float32)
    k_mean = k_sum[0].sum(1) / count[:, None, None]
  else:
    k_mean = jnp.zeros((b, hkv, d), jnp.float32)
  if recipe.balance_channels:
    q_max, q_min = _block_stats(q, qv, interpret, config, with_sum=False)
    q_amax = jnp.maximum(q_max.max(1), -q_min.min(1)).reshape(b, hkv, rep, d).max(2)
    q_amax = jnp.maximum(q_amax, 0.0)   # no valid row: -inf -> 0, as the reference's zeros
    # max |k - mean| over the valid keys from the maxima and minima (0 without valid keys).
    k_amax = jnp.maximum(jnp.maximum(k_max - k_mean, k_mean - k_min), 0.0)
    t = jnp.where((q_amax > 0) & (k_amax > 0), jnp.sqrt(k_amax / q_amax), 1.0)
  else:
    t = jnp.ones_like(k_mean)
  q8, q_rows, shift = _quantize(
      q, qv, jnp.repeat(k_mean, rep, axis=1), jnp.repeat(t, rep, axis=1), block=recipe.q_block,
      dtype=recipe.qk_dtype, divide=False, subtract=False, softmax_scale=softmax_scale,
      interpret=interpret, config=config)
  k8, k_rows = _quantize(k, kv, k_mean, t, block=recipe.k_block, dtype=recipe.qk_dtype,
                         divide=True, subtract=recipe.smooth_k, softmax_scale=None,
                         interpret=interpret, config=config)
  return QuantizedQK(q8, q_rows[:, :, ::recipe.q_block], k8, k_rows[:, :, ::recipe.k_block],
                     k_mean, t, shift)
