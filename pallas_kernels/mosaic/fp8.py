"""8-bit STA forward for inference: quantization, a float32 emulation of the quantized
algorithm, and the entry :func:`fp8_forward` that runs the Hopper kernel
(:mod:`pallas_kernels.mosaic.forward_fp8`).

The default recipe, :data:`KERNEL_RECIPE`, chosen by measured error (docs/PERFORMANCE.md, "FP8
forward: quantization choice"; e4m3 everywhere is :data:`ALL_E4M3`, faster and less exact):

- Q and K in int8 for Q K^T (s8 x s8 -> s32 wgmma): 7 bits of mantissa-equivalent where e4m3
  has 3. Q: one scale per (batch, head, row), absmax / 127. K: smoothed by its mean over the
  valid keys per (batch, kv head) first (as SageAttention does: it shifts every score of a
  query row by the same q . mean, which softmax ignores, and removes the common offset that
  would otherwise use up the quantization range); then one scale per (batch, kv head, key block
  of 128 rows). The lse is corrected by the shift. Before the scales, each channel's magnitude
  is balanced between Q and K (q_c t_c and k_c / t_c, t_c = sqrt(max|k_c| / max|q_c|) per
  (batch, kv head, channel), which leaves Q K^T unchanged): an outlier channel of K would
  otherwise set the step of every other channel.
- P V in bf16 (P in registers, V as given): e4m3 P and V cost about 2.6% relative error each
  on random data, more than the 3e-2 target allows.

With ``p_dtype="int8"`` (:data:`ALL_INT8`, the op's ``precision="int8"``): V in int8, one
scale per (batch, kv head, channel), transposed as for e4m3 below; each key step's P in int8
with one scale per row, round(127 exp2(x - the step's row max of x)) (x the log2-domain
scores), so the step's largest value is 127 and the scale is known without a pass over P; the
s32 product is folded into O (float32) with the row's factor exp2(step max - log2 127 -
(running max - 8)), which also weighs the step's row sums (taken from P before rounding). On
random inputs at the paper shape's window this recipe's error is about 2e-2
(``benchmarks.tools.pv_quantization_error``), e4m3 P V's about 3.8e-2.

With ``p_dtype="e4m3"``: V has one scale per (batch, kv head, channel) and is stored transposed,
V^T [B, Hkv, D, S], because 8-bit wgmma takes both operands K-major and the key axis is P V's
contraction axis; P is exp2 of the log2-domain scores minus (running max - 8), i.e. P * 256 in
[0, 256], cast to e4m3 (which holds up to 448; the shift keeps small probabilities above its
subnormals). The row sums l are taken from the float32 P before any cast.

:func:`quantize` is the quantization's reference (XLA's passes); where the kernels run on a GPU
the op quantizes Q and K with the Pallas passes of :mod:`pallas_kernels.mosaic.fp8_quantize`
instead (two reads of each; :func:`quantize_with`, :func:`default_quantizer`).

The Q and K scales are folded into the softmax's exp2 FMA (a per-row factor times one float32
per step); the V scales and 1/l are applied in the epilogue. Padded and invalid positions are
set to zero before any absmax, so garbage (NaN, inf) there cannot reach a scale.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.layout import Layout, with_layout_constraint
import numpy as np

from jsta.reference import reference_mask
from jsta.schedule import BlockSchedule
from pallas_kernels.mosaic import common, fp8_quantize
from pallas_kernels.mosaic.config import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, WG_ROWS
from pallas_kernels.mosaic.fp8_recipe import ALL_E4M3, ALL_INT8, KERNEL_RECIPE, QuantRecipe
from pallas_kernels.mosaic.forward_fp8 import (LOG2_127, P_SHIFT, fp8_forward_jit,
                                               fp8_kernel_operands, fp8_stages,
                                               in_register_key_order)

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


class FP8Operands(NamedTuple):
  """Quantized inputs of the FP8 forward (H heads, Hkv kv heads, S the schedule's seq)."""

  q8: jax.Array        # int8 or float8_e4m3fn [B, S, H, D] (the recipe's qk_dtype)
  q_scale: jax.Array   # float32 [B, H, S // q_block]
  k8: jax.Array        # int8 or float8_e4m3fn [B, S, Hkv, D] (smoothed)
  k_scale: jax.Array   # float32 [B, Hkv, S // k_block]
  vt8: jax.Array       # float8_e4m3fn or int8 [B, Hkv, D, S] (V transposed: keys contiguous)
  v_scale: jax.Array   # float32 [B, Hkv, D]
  k_mean: jax.Array    # float32 [B, Hkv, D]: the mean subtracted from K (zeros without smoothing)
  balance: jax.Array   # float32 [B, Hkv, D]: t; q8 ~ q t / q_scale, k8 ~ (k - k_mean) / (t k_scale)


def _block_scale(x, block: int, dtype: str):
  """x float32 [B, S, H, D] -> (scale float32 [B, H, S // block], x / scale rounded to
  ``dtype``) with scale = absmax / (448 for "e4m3", 127 for "int8") over each block of
  ``block`` rows (1 where the block is all zero)."""
  b, s, h, d = x.shape
  top = E4M3_MAX if dtype == "e4m3" else 127.0
  amax = jnp.max(jnp.abs(x.reshape(b, s // block, block, h, d)), axis=(2, 4))   # [B, nb, H]
  scale = jnp.where(amax > 0, amax / top, 1.0)
  xs = x / jnp.repeat(scale, block, axis=1)[..., None]
  xq = xs.astype(E4M3) if dtype == "e4m3" else jnp.clip(jnp.round(xs), -127, 127).astype(jnp.int8)
  return scale.transpose(0, 2, 1), xq


def _valid(mask, x):
  """Zeros where ``mask`` (bool [B or 1, S]) is False, by a select (drops NaN and inf too).

  The result keeps x's row-major layout: left free, XLA materialized it (a float32 copy of
  q, k and v each) in a layout with the sequence minor, for its reductions over the
  sequence (at Wan-14B 720p, compiled for an H200); constrained, the select fuses into each
  pass that reads it, as the plain convert does where no position is padded."""
  y = jnp.where(mask[:, :, None, None], x.astype(jnp.float32), 0.0)
  return with_layout_constraint(y, Layout(major_to_minor=tuple(range(y.ndim))))


@functools.partial(jax.jit, static_argnames=("recipe",))
def quantize(q, k, v, query_valid, key_valid, recipe: QuantRecipe = KERNEL_RECIPE
             ) -> FP8Operands:
  """Quantizes bf16/fp16 (or float32) inputs to the FP8 operands.

  Args:
    q: [B, S, H, D]; k, v: [B, S, Hkv, D] with Hkv dividing H; S a multiple of the blocks.
    query_valid, key_valid: bool [B or 1, S]: positions that are real queries / keys. Others
      are zeroed first (garbage there reaches no scale nor the K mean).
  Returns:
    :class:`FP8Operands` (rounding to nearest even; e4m3 within +-448, int8 within +-127).
  """
  qz, kz = _valid(query_valid, q), _valid(key_valid, k)
  if recipe.smooth_k:
    count = jnp.maximum(key_valid.sum(axis=1), 1).astype(jnp.float32)         # [B or 1]
    k_mean = kz.sum(axis=1) / count[:, None, None]                            # [B, Hkv, D]
    kz = jnp.where(key_valid[:, :, None, None], kz - k_mean[:, None], 0.0)
  else:
    k_mean = jnp.zeros((k.shape[0], k.shape[2], k.shape[3]), jnp.float32)
  if recipe.balance_channels:
    # q_c * k_c is unchanged by q_c * t_c, k_c / t_c: with t_c = sqrt(max|k_c| / max|q_c|)
    # both sides of a channel get the same absmax, so an outlier channel of K no longer sets
    # the scale of every other channel (SmoothQuant's migration, per (batch, kv head, channel)).
    b, s, h, d = qz.shape
    hkv = kz.shape[2]
    q_amax = jnp.max(jnp.abs(qz).reshape(b, s, hkv, h // hkv, d), axis=(1, 3))   # [B, Hkv, D]
    k_amax = jnp.max(jnp.abs(kz), axis=1)
    t = jnp.where((q_amax > 0) & (k_amax > 0), jnp.sqrt(k_amax / q_amax), 1.0)
    qz = qz * jnp.repeat(t, h // hkv, axis=1)[:, None]
    kz = kz / t[:, None]
  else:
    t = jnp.ones_like(k_mean)
  q_scale, qn = _block_scale(qz, recipe.q_block, recipe.qk_dtype)
  k_scale, kn = _block_scale(kz, recipe.k_block, recipe.qk_dtype)
  v_scale, vt8 = quantize_v(v, key_valid, recipe)
  return FP8Operands(qn, q_scale, kn, k_scale, vt8, v_scale, k_mean, t)


def quantize_v(v, key_valid, recipe: QuantRecipe):
  """v [B, S, Hkv, D] -> (v_scale float32 [B, Hkv, D], vt8 [B, Hkv, D, S]): V's scales per
  channel (or head) and V^T in int8 (``recipe.p_dtype == "int8"``, 127 levels, rounded to
  nearest even) or else e4m3, zero on invalid keys (bool [B or 1, S]). Only the 8-bit P V
  recipes read them (XLA drops them from the others' programs)."""
  vz = _valid(key_valid, v)
  amax = jnp.max(jnp.abs(vz), axis=1)                                         # [B, Hkv, D]
  if recipe.v_scale == "head":
    amax = jnp.broadcast_to(amax.max(axis=2, keepdims=True), amax.shape)
  int8 = recipe.p_dtype == "int8"
  v_scale = jnp.where(amax > 0, amax / (127.0 if int8 else E4M3_MAX), 1.0)
  vt = (vz / v_scale[:, None]).transpose(0, 2, 3, 1)                          # [B, Hkv, D, S]
  vt8 = jnp.clip(jnp.round(vt), -127, 127).astype(jnp.int8) if int8 else vt.astype(E4M3)
  return v_scale, vt8


def validity(sched: BlockSchedule, key_valid=None):
  """(query_valid, key_valid) bool [B or 1, S] of the schedule, with run-time key validity
  ``key_valid`` (bool [B, S], per-sample text lengths) applied to both: a text slot beyond a
  sample's length is neither a key nor a query worth a scale."""
  qv = jnp.asarray(sched.query_valid)[None]
  kv = jnp.asarray(sched.key_valid)[None]
  if key_valid is not None:
    key_valid = jnp.asarray(key_valid, bool)
    qv, kv = qv & key_valid, kv & key_valid
  return qv, kv


def _token_mask(sched: BlockSchedule) -> np.ndarray:
  """bool [H, S, S] on the schedule's seq (padding up to ``sched.seq_len`` masked). A schedule
  for run-time text lengths counts every text slot (the run-time key validity masks them)."""
  spec = sched.spec
  if sched.dynamic_text:
    spec = dataclasses.replace(spec, text_len=spec.text_max_len)
  m = reference_mask(spec, sched.num_heads)
  pad = sched.seq_len - m.shape[1]
  return np.pad(m, ((0, 0), (0, pad), (0, pad)))


def emulated_forward(q, k, v, sched: BlockSchedule, scale: float, key_valid=None,
                     recipe: QuantRecipe | None = KERNEL_RECIPE):
  """The FP8 forward's algorithm in float32 jnp, for the CPU (small shapes: builds the dense
  [H, S, S] token mask): the same quantization, the same key-block order (the schedule's
  lists, online softmax in the log2 domain), P rounded to e4m3 (or bf16) after the 2 ** 8
  shift (the kernel shifts in both precisions), or to int8 per row and step (the kernel's
  int8 P V: round(127 exp2(x - the step's row max)), weighed by exp2(step max - log2 127 -
  (running max - 8))), l from the float32 P, V scales and 1/l in the epilogue.
  ``recipe=None`` runs the same blockwise loop without any quantization (float32 attention).

  Args: as :func:`fp8_forward`. Returns (o float32 [B, S, H, D], lse float32 [B, H, S]).
  """
  b, s, h, d = q.shape
  hkv = k.shape[2]
  bq, bk = sched.block_q, sched.block_kv
  nq, nkv = s // bq, s // bk
  qv, kv = validity(sched, key_valid)
  if recipe is None:
    qf, kf, vf = _valid(qv, q), _valid(kv, k), _valid(kv, v)
    q_rows = jnp.full((b, h, s), 1.0)
    k_rows = jnp.full((b, hkv, s), 1.0)
    v_mult = jnp.ones((b, hkv, d))
    k_mean = jnp.zeros((b, hkv, d))
  else:
    ops = quantize(q, k, v, qv, kv, recipe)
    qf, kf = ops.q8.astype(jnp.float32), ops.k8.astype(jnp.float32)
    q_rows = jnp.repeat(ops.q_scale, recipe.q_block, axis=2)                 # [B, H, S]
    k_rows = jnp.repeat(ops.k_scale, recipe.k_block, axis=2)                 # [B, Hkv, S]
    k_mean = ops.k_mean
    if recipe.p_dtype in ("e4m3", "int8"):
      vf = ops.vt8.astype(jnp.float32).transpose(0, 3, 1, 2)                 # [B, S, Hkv, D]
      v_mult = ops.v_scale
    else:
      vf = _valid(kv, v).astype(jnp.bfloat16).astype(jnp.float32)
      v_mult = jnp.ones((b, hkv, d))
  rep = h // hkv
  kf, vf, k_rows, v_mult, k_mean = (jnp.repeat(x, rep, axis=2 if x.ndim == 4 else 1)
                                    for x in (kf, vf, k_rows, v_mult, k_mean))
  # Scores carry the dequantization factors per row and key, in the log2 domain.
  qb = qf.reshape(b, nq, bq, h, d).transpose(0, 3, 1, 2, 4)                   # [B, H, nq, bq, D]
  qsc = q_rows.reshape(b, h, nq, bq) * (scale * LOG2E)
  kb = kf.reshape(b, nkv, bk, h, d).transpose(0, 3, 1, 2, 4)                  # [B, H, nkv, bk, D]
  vb = vf.reshape(b, nkv, bk, h, d).transpose(0, 3, 1, 2, 4)
  ksc = k_rows.reshape(b, h, nkv, bk)
  tmask = jnp.asarray(_token_mask(sched)).reshape(h, nq, bq, nkv, bk)
  keyok = kv.reshape(kv.shape[0], nkv, bk)
  g = jnp.asarray(sched.head_to_group)
  idx = jnp.asarray(sched.kv_index)[g]                                         # [H, nq, max_kv]
  cnt = jnp.asarray(sched.kv_count)[g]                                         # [H, nq]
  hi = jnp.arange(h)[:, None]
  qi = jnp.arange(nq)[None, :]
  shift = 0.0 if recipe is None else P_SHIFT
  p_int8 = recipe is not None and recipe.p_dtype == "int8"

  def step(carry, j):
    m, l, acc = carry
    blk = idx[:, :, j]                                                         # [H, nq]
    live = (j < cnt)                                                           # [H, nq]
    kj = kb[:, hi, blk]                                                        # [B, H, nq, bk, D]
    vj = vb[:, hi, blk]
    sj = jnp.einsum("bhnqd,bhnkd->bhnqk", qb, kj, precision=jax.lax.Precision.HIGHEST)
    sj = sj * qsc[..., None] * ksc[:, hi, blk][:, :, :, None, :]
    ok = (tmask[hi, qi, :, blk, :][None] & keyok[:, blk][:, :, :, None, :]
          & live[None, :, :, None, None])
    sj = jnp.where(ok, sj, -jnp.inf)
    m_new = jnp.maximum(m, sj.max(-1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) - shift
    alpha = jnp.exp2(m - m_use - shift)
    alpha = jnp.where(m == -jnp.inf, 0.0, alpha)
    if p_int8:
      # P relative to the step's own row max (127 at it); a row with no key in this step
      # takes the running max instead (P = 0 there, a finite weight).
      m_step = sj.max(-1)
      m_p = jnp.where(m_step == -jnp.inf, m_use + shift, m_step) - LOG2_127
      p = jnp.exp2(sj - m_p[..., None])
      weight = jnp.exp2(m_p - m_use)
      l = l * alpha + p.sum(-1) * weight
      pv = jnp.einsum("bhnqk,bhnkd->bhnqd", jnp.round(p), vj,
                      precision=jax.lax.Precision.HIGHEST) * weight[..., None]
    else:
      p = jnp.exp2(sj - m_use[..., None])
      l = l * alpha + p.sum(-1)
      if recipe is not None:
        p = p.astype(E4M3 if recipe.p_dtype == "e4m3" else jnp.bfloat16).astype(jnp.float32)
      pv = jnp.einsum("bhnqk,bhnkd->bhnqd", p, vj, precision=jax.lax.Precision.HIGHEST)
    acc = acc * alpha[..., None] + pv
    return (m_new, l, acc), None

  init = (jnp.full((b, h, nq, bq), -jnp.inf), jnp.zeros((b, h, nq, bq)),
          jnp.zeros((b, h, nq, bq, d)))
  (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(idx.shape[2]))
  live = l != 0
  o = acc / jnp.where(live, l, 1.0)[..., None] * v_mult[:, :, None, None, :]
  o = jnp.where(live[..., None], o, 0.0).transpose(0, 2, 3, 1, 4).reshape(b, s, h, d)
  m_use = jnp.where(m == -jnp.inf, 0.0, m) - shift
  lse = ((m_use + jnp.log2(jnp.where(live, l, 1.0))) * LN2).reshape(b, h, s)
  lse = jnp.where(live.reshape(b, h, s), lse + lse_shift(q, k_mean, qv, scale), jnp.inf)
  return o, lse


def lse_shift(q, k_mean, query_valid, scale: float):
  """float32 [B, H, S]: what smoothing K by ``k_mean`` ([B, H or Hkv, D]) subtracted from each
  row's natural-log lse: scale * q . k_mean (zero on invalid query rows)."""
  h = q.shape[2]
  k_mean = jnp.repeat(k_mean, h // k_mean.shape[1], axis=1)
  return scale * jnp.einsum("bshd,bhd->bhs", _valid(query_valid, q), k_mean,
                            precision=jax.lax.Precision.HIGHEST)


def check_inputs(q, k, v, sched: BlockSchedule) -> None:
  """Raises ValueError (naming the argument) for input the FP8 forward does not take."""
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"q must be [batch, seq, heads, head_dim] and k, v the same shape "
                     f"[batch, seq, kv_heads, head_dim], got {q.shape}, {k.shape}, {v.shape}")
  b, s, h, d = q.shape
  if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"k and v must be [batch, seq, kv_heads, head_dim] with kv_heads dividing "
                     f"heads, matching q {q.shape}; got {k.shape}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    if jnp.dtype(x.dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
      raise ValueError(f"{name} must be bfloat16 or float16 for the FP8 forward (the output "
                       f"has the input dtype), got {jnp.dtype(x.dtype)}")
  if not q.dtype == k.dtype == v.dtype:
    raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if d not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} for the FP8 forward, "
                     f"got {d}")
  if s != sched.seq_len or h != sched.num_heads:
    raise ValueError(f"q has seq {s} and {h} heads; the schedule is for seq {sched.seq_len} and "
                     f"{sched.num_heads} heads")
  if sched.block_kv != 128 or sched.block_q not in (128, 192):
    raise ValueError(f"the FP8 forward needs a schedule of 128-key blocks (8-bit wgmma "
                     f"contracts 128 keys per 128-byte row) and 128-row query blocks (192: three "
                     f"compute warpgroups), got ({sched.block_q}, {sched.block_kv})")


def uses_gathered_steps(sched: BlockSchedule, config, recipe: QuantRecipe) -> bool:
  """Whether the 8-bit kernel runs ``sched`` as gathered work items: ``config.key_steps``
  asks for them ("auto": where they take fewer steps). bf16 P V reads V's 64-key units as
  rows; e4m3 P V reads each unit's V^T into a buffer of its own and runs a step's P V as two
  products of 64 keys, with P staged in shared memory (not with ``fp8_p_registers``)."""
  if kernel_precisions(recipe)[1] == "e4m3" and config.fp8_p_registers:
    return False
  return common.uses_gathered_steps(sched, config)


def kernel_recipe(sched: BlockSchedule, config, recipe: QuantRecipe) -> QuantRecipe:
  """``recipe`` as the kernel quantizes for ``sched``: with gathered work items one K scale
  per 64-key unit (a step's two units come from anywhere), else per 128 keys."""
  if config is not None and uses_gathered_steps(sched, config, recipe):
    return dataclasses.replace(recipe, k_block=WG_ROWS)
  return recipe


def kernel_precisions(recipe: QuantRecipe) -> tuple[str, str]:
  """(qk, pv) of :func:`~pallas_kernels.mosaic.forward_fp8.fp8_forward_call` for ``recipe``;
  ValueError for a recipe the kernel does not implement."""
  if recipe.q_block not in (1, WG_ROWS, 128) or recipe.k_block not in (WG_ROWS, 128):
    raise ValueError(f"the FP8 kernel takes Q scales per 1, 64 or 128 rows and K scales per "
                     f"128 keys (per 64 with gathered work items), got "
                     f"q_block={recipe.q_block}, k_block={recipe.k_block}")
  return recipe.qk_dtype, "bf16" if recipe.p_dtype == "bfloat16" else recipe.p_dtype


class KernelCall(NamedTuple):
  """What :func:`~pallas_kernels.mosaic.forward_fp8.fp8_forward_jit` is called with for one
  input (:func:`kernel_call`)."""

  args: tuple          # positional: q8, k8, the V operand, V's scales, Q rows, K steps, ops
  flags: dict          # static: masked, partial, pv, gather
  ops8: FP8Operands    # the quantized operands
  shift: jax.Array     # float32 [B, H, S]: lse_shift, to add to the kernel's lse


QUANTIZERS = ("pallas", "xla")


def default_quantizer(config=None) -> str:
  """"pallas" (:mod:`pallas_kernels.mosaic.fp8_quantize`: two reads of Q and of K) where the
  kernels run on a GPU; "xla" (:func:`quantize`, the reference) where they are interpreted or
  no GPU is present (a program only lowered for the GPU keeps the Pallas passes)."""
  cpu = jax.default_backend() == "cpu" and jax.sharding.get_abstract_mesh().abstract_device is None
  return "xla" if cpu or (config is not None and config.interpret) else "pallas"


def quantize_with(quantizer: str, q, k, v, query_valid, key_valid, recipe: QuantRecipe,
                  scale: float, interpret: bool = False,
                  quantize_config: fp8_quantize.QuantizeConfig | None = None
                  ) -> tuple[FP8Operands, jax.Array]:
  """(:class:`FP8Operands`, :func:`lse_shift` float32 [B, H, S]) by ``quantizer`` (one of
  :data:`QUANTIZERS`); arguments as :func:`quantize`, ``scale`` the softmax scale;
  ``interpret`` and ``quantize_config`` (None: the default launch) for "pallas"."""
  if quantizer == "pallas":
    qk = fp8_quantize.quantize_qk(q, k, query_valid, key_valid, recipe, float(scale),
                                  interpret=interpret,
                                  config=quantize_config or fp8_quantize.QuantizeConfig())
    v_scale, vt8 = quantize_v(v, key_valid, recipe)
    return FP8Operands(qk.q8, qk.q_scale, qk.k8, qk.k_scale, vt8, v_scale, qk.k_mean,
                       qk.balance), qk.shift
  if quantizer != "xla":
    raise ValueError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
  ops8 = quantize(q, k, v, query_valid, key_valid, recipe)
  # q is read for the shift only once the int8/e4m3 Q is written (a barrier of both): else XLA
  # fuses the shift's row reduction into the fusion that writes the 8-bit Q and K (both read
  # q), a reduction fusion with full-size side outputs (docs/PERFORMANCE.md, "FP8 forward").
  q_after, _ = lax.optimization_barrier((q, ops8.q8))
  return ops8, lse_shift(q_after, ops8.k_mean, query_valid, scale)


def kernel_call(q, k, v, sched: BlockSchedule, scale: float, recipe: QuantRecipe,
                key_valid=None, config=None) -> KernelCall:
  """The 8-bit kernel's inputs and static flags for ``recipe`` and ``config``, decided in
  one place for the op and the benches. With bf16 P V the kernel reads V as given (zeroed on
  invalid keys) and its scales must be ones; with e4m3 P V and ``config.fp8_p_registers`` it
  reads V^T's keys in :func:`~pallas_kernels.mosaic.forward_fp8.register_key_order`
  (:func:`~pallas_kernels.mosaic.forward_fp8.in_register_key_order`). Where the kernel runs
  gathered work items (:func:`uses_gathered_steps`) K is quantized per 64 keys
  (:func:`kernel_recipe`). ``config=None``: 128 x 128 blocks in the schedule's step order.
  Quantized by :func:`default_quantizer`'s choice."""
  _, pv = kernel_precisions(recipe)
  gather = config is not None and uses_gathered_steps(sched, config, recipe)
  recipe = kernel_recipe(sched, config, recipe)
  qv, kv = validity(sched, key_valid)
  ops8, shift = quantize_with(default_quantizer(config), q, k, v, qv, kv, recipe, scale)
  f_ops, (q_rows, k_steps), partial = fp8_kernel_operands(
      sched, ops8, scale, key_valid,
      masks_apart=config is not None and config.masked_steps_apart, gather=gather)
  if config is not None:
    f_ops = f_ops._replace(launch_order=jnp.asarray(
        common.forward_item_order(sched, config, gather)))
  if pv in ("e4m3", "int8"):
    v_in, v_scale = ops8.vt8, ops8.v_scale
    if pv == "e4m3" and config is not None and config.fp8_p_registers:
      v_in = in_register_key_order(v_in)
  else:
    # P is exactly 0 on invalid keys, but 0 * NaN is not: zero V there, where there are any.
    every_key = key_valid is None and bool(np.all(sched.key_valid))
    v_in = v if every_key else _valid(kv, v).astype(v.dtype)
    v_scale = jnp.ones_like(ops8.v_scale)
  flags = dict(masked=sched.has_masked_keys, partial=bool(partial), pv=pv, gather=gather)
  return KernelCall((ops8.q8, ops8.k8, v_in, v_scale, q_rows, k_steps, f_ops), flags, ops8,
                    shift)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fp8_attention(q, k, v, key_valid, sched, scale, config, recipe):
  call = kernel_call(q, k, v, sched, scale, recipe, key_valid, config)
  o, lse = fp8_forward_jit(*call.args, out_dtype=jnp.dtype(q.dtype), config=config,
                           **call.flags)
  lse = lse + call.shift
  if sched.has_invalid_queries:
    lse = jnp.where(jnp.asarray(sched.query_valid)[None, None, :], lse, jnp.inf)
  return o, lse


def _no_grad_fwd(q, k, v, key_valid, sched, scale, config, recipe):
  raise ValueError("the FP8 forward is for inference only: it has no gradient (differentiate "
                   "the bf16/fp16 forward instead)")


def _no_grad_bwd(*args):
  raise ValueError("the FP8 forward is for inference only: it has no gradient")


_fp8_attention.defvjp(_no_grad_fwd, _no_grad_bwd)


def default_config(head_dim: int, recipe: QuantRecipe = KERNEL_RECIPE, interpret: bool = False,
                   auto_barriers: bool = True, overlap_exp: bool = False,
                   p_registers: bool = False, masked_steps_apart: bool = True,
                   exp2_fma_columns: int = 0, schedule_barrier: bool = False,
                   gather: bool = True, biased_scores: bool = True, block_q: int = 128):
  """The FP8 kernel's :class:`~pallas_kernels.mosaic.config.MosaicConfig`: 128 x 128 blocks
  (``block_q=192``: 192-row query blocks, three compute warpgroups, where
  ``MosaicBackend.schedule_192_rows`` picks them; the schedule must have 192-row blocks too) and the deepest pipeline its shared memory allows
  (``auto_barriers``, ``overlap_exp``,
  ``p_registers`` (``fp8_p_registers``), ``masked_steps_apart``, ``exp2_fma_columns``,
  ``schedule_barrier`` (``use_schedule_barrier``), ``biased_scores``
  (``fp8_biased_scores``): see MosaicConfig; ``masked_steps_apart``
  on, as ``MosaicBackend`` runs it; the ping-pong off, as in the bf16 forward). ``gather``:
  gathered work items where they take fewer steps (``key_steps="auto"``,
  :func:`uses_gathered_steps`; False: ``key_steps="blocks"``)."""
  from pallas_kernels.mosaic.config import MosaicConfig
  if block_q not in (128, 192):
    raise ValueError(f"block_q must be 128 or 192 (three compute warpgroups) for the FP8 "
                     f"forward, got {block_q!r}")
  stages = fp8_stages(head_dim, kernel_precisions(recipe)[1], wgs=block_q // WG_ROWS)
  return MosaicConfig(block_q=block_q, max_concurrent_steps=stages,
                      key_steps="auto" if gather and block_q == 128 else "blocks",
                      auto_barriers=auto_barriers, overlap_exp=overlap_exp,
                      fp8_p_registers=p_registers, masked_steps_apart=masked_steps_apart,
                      exp2_fma_columns=exp2_fma_columns, fp8_biased_scores=biased_scores,
                      use_schedule_barrier=schedule_barrier, interpret=interpret)


def fp8_forward(q, k, v, sched: BlockSchedule, scale: float, config=None, key_valid=None,
                recipe: QuantRecipe = KERNEL_RECIPE):
  """FP8 STA forward on a Hopper GPU (inference only).

  Args:
    q: [batch, seq, heads, head_dim] bfloat16 or float16, text last, seq = ``sched.seq_len``.
    k, v: [batch, seq, kv_heads, head_dim], kv_heads dividing heads (query head h uses kv head
      h // (heads // kv_heads)).
    sched: the :class:`~jsta.schedule.BlockSchedule` (128-row blocks, 64-position mask unit,
      as the bf16 Hopper kernels use; or 192-row query blocks for three compute warpgroups).
    scale: softmax scale.
    config: a :class:`~pallas_kernels.mosaic.config.MosaicConfig` (the schedule's block_q,
      128-key blocks) or None (:func:`default_config` for the schedule's block_q).
    key_valid: bool [batch, seq] run-time key validity (per-sample text lengths) or None.
    recipe: the quantization (:class:`QuantRecipe`; the kernel implements Q scales per 64
      rows, K scales per 128 keys (per 64 with gathered work items, :func:`kernel_recipe`),
      e4m3 or int8 Q K^T, e4m3 or bf16 P V).
  Returns:
    (o [batch, seq, heads, head_dim] in q.dtype, lse [batch, heads, seq] float32 natural log;
    rows that attend nothing: o = 0, lse = +inf; invalid query rows: lse = +inf).
  Raises:
    ValueError for unsupported input, and when differentiated (no backward).
  """
  check_inputs(q, k, v, sched)
  kernel_precisions(recipe)
  config = config or default_config(q.shape[-1], recipe, block_q=sched.block_q)
  if (config.block_q, config.block_kv) != (sched.block_q, 128):
    raise ValueError(f"the FP8 forward needs config blocks (block_q, 128) with the schedule's "
                     f"block_q={sched.block_q}, got ({config.block_q}, {config.block_kv})")
  return _fp8_attention(q, k, v, key_valid, sched, float(scale), config, recipe)
