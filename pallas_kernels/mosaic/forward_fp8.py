"""Hopper STA forward with 8-bit tensor-core operands (inference), after
:mod:`pallas_kernels.mosaic.forward`: the same CTA (two compute warpgroups of 64 query rows,
one producer warpgroup streaming the scheduled key blocks with TMA), the same schedule
operands and masks (and work items), the same optional ping-pong and the same overlap of
P_{j-1} V_{j-1} with the softmax of step j. Quantization and the recipe:
:mod:`pallas_kernels.mosaic.fp8`.

Two static choices of precision:

- ``qk``: "e4m3" (Q K^T on float8_e4m3fn, float32 accumulator) or "int8" (s8 x s8 -> s32,
  converted to float32 before the softmax). Q [B, S, H, D] and K [B, S, Hkv, D] are 8-bit with
  rows of head_dim bytes: shared memory tiles (8, head_dim) under a head_dim-byte swizzle
  (8-bit wgmma contracts head_dim in one swizzle row, so both operands are K-major as they are).
- ``pv``: "e4m3" (P V on e4m3: V transposed in GMEM, V^T [B, Hkv, D, S], because 8-bit wgmma
  takes no transposed operand and the key axis is P V's contraction axis; P goes through a
  per-warpgroup [64, 128] e4m3 buffer in shared memory, since Mosaic GPU's register A operand
  of 8-bit wgmma must be in its 8-bit register layout, which the float32 scores' layout does
  not convert to; with ``MosaicConfig.fp8_p_registers`` P's registers are read as that layout
  instead, V^T's keys in :func:`register_key_order`), "int8" (s8 x s8 -> s32 into a step
  accumulator of its own: P staged in int8 as for e4m3, round(127 exp2(x - the step's row
  max)), V^T in int8; after the product's wait the s32 sums, converted exactly, are folded
  into O with each row's factor exp2(step max - log2 127 - (running max - 8)), which weighs
  the step's row sums too; two compute warpgroups) or "bf16" (P in registers and V
  [B, S, Hkv, D] in bf16, as the bf16 kernel).

Scales: each query row's Q scale (with the softmax scale and log2 e, ``q_rows``) times the
step's K block scale (``k_steps``) multiplies the scores in the exp2 FMA; P is exp2 of the
scores minus (running max - 8), i.e. P * 256, so e4m3 keeps the small probabilities; 1/l and
the V channel scales are applied in the epilogue.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsta.schedule import BlockSchedule
from pallas_kernels.mosaic.common import (LOG2E, compiler_params, cta_position,
                                          forward_key_loops, interpret_params,
                                          launch_grid, masked_steps_first, normalized_rows,
                                          may_see_empty_steps, padded_steps, present,
                                          gathered_operands, runtime_key_bias,
                                          schedule_operands, slot_barrier, smem_transforms,
                                          softmax_exp2,
                                          step_keys, step_scores, store_rows, stream_kv)
from pallas_kernels.mosaic.config import SMEM_BUDGET, THREE_WG_REGISTERS, WG_ROWS, MosaicConfig

E4M3 = jnp.float8_e4m3fn
# P is scaled by 2 ** P_SHIFT before its cast to e4m3 (exp2 of the scores minus (max - 8)), so
# small probabilities stay above e4m3's subnormals; the emulation in fp8.py does the same.
P_SHIFT = 8.0
# int8 P: exp2 of the scores minus (the step's row max - log2 127), at most 127.
LOG2_127 = math.log2(127.0)


# In the 8-bit register layout of a wgmma A operand a thread holds, in each row and 16-key
# group, keys {4t, .., 4t + 3} (t: its lane in the quad); in the float32 WGMMA layout of the
# scores it holds {2t, 2t + 1, 8 + 2t, 9 + 2t}. Read as the 8-bit layout, P's registers put
# key 16 g + REGISTER_KEY_ORDER[i] where the product takes key 16 g + i: with V's keys put in
# the same order (outside the kernel), P V is unchanged (MosaicConfig.fp8_p_registers).
REGISTER_KEY_ORDER = np.array([0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15])


def register_key_order(seq: int) -> np.ndarray:
  """int32[seq]: the key order of V (or V^T's last axis) for P V with P in registers:
  position i holds key ``register_key_order(seq)[i]`` (a permutation within 16-key groups)."""
  i = np.arange(seq)
  return (i // 16 * 16 + REGISTER_KEY_ORDER[i % 16]).astype(np.int32)


def in_register_key_order(x):
  """``x[..., register_key_order(n)]`` for keys on the last axis (n a multiple of 16), as a
  reshape and transpose (it fuses into a producer; a gather would not): key 16 g + 8 b + 2 a
  + c moves to 16 g + 4 a + 2 b + c."""
  *lead, n = x.shape
  return x.reshape(*lead, n // 16, 2, 4, 2).swapaxes(-3, -2).reshape(x.shape)


def p_as_8bit_operand(p):
  """P [64, N] float32 in the WGMMA layout -> e4m3 [64, N] in the 8-bit WGMMA layout (the A
  operand of an 8-bit wgmma in registers), built from the same registers: each 8-bit register
  of a 16-key group joins the e4m3 pairs of the group's two 8-key registers, so its keys are
  P's in :data:`REGISTER_KEY_ORDER` (V must follow it). No data moves between threads; Mosaic
  GPU has no layout-reinterpreting operation, hence inline Mosaic GPU code (not in GPU
  interpret mode)."""
  from jax._src.lib.mlir import ir
  from jax.experimental.mosaic import gpu as mgpu
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA,),
                     return_type=plgpu.ShapeDtypeStruct(p.shape, E4M3,
                                                        layout=plgpu.Layout.WGMMA_8BIT))
  def reinterpret(ctx, p):
    del ctx
    pairs = p.astype(ir.Float8E4M3FNType.get()).registers
    layout = mgpu.WGMMA_LAYOUT_8BIT
    shape = layout.registers_shape(p.shape)
    # Register axes: 1 counts column groups (8 keys in the float32 layout, 16 in the 8-bit
    # one), 4 the two row halves of a thread (checked against Mosaic GPU's layouts on the
    # CPU: tests/test_fp8.py).
    if pairs.shape[1] != 2 * shape[1] or pairs.shape[:1] + pairs.shape[2:] != (
        shape[:1] + shape[2:]):
      raise ValueError(f"unexpected register shapes {pairs.shape} -> {shape}")
    quads = np.empty(shape, dtype=object)
    for idx in np.ndindex(shape):
      lo = idx[:1] + (2 * idx[1],) + idx[2:]
      hi = idx[:1] + (2 * idx[1] + 1,) + idx[2:]
      quads[idx] = mgpu_utils.vector_concat([pairs[lo], pairs[hi]])
    return mgpu.FragmentedArray(_registers=quads, _layout=layout, _is_signed=None)

  return reinterpret(p)


def byte_transforms(row_bytes: int):
  """Tiling and swizzle of an 8-bit shared-memory operand whose rows (the contraction axis)
  hold ``row_bytes`` elements: one swizzle row of 64 or 128 bytes = 64 or 128 elements."""
  sw = min(row_bytes, 128)
  return (plgpu.TilingTransform((8, sw)), plgpu.SwizzleTransform(sw))


def fp8_stages(head_dim: int, pv: str, out_itemsize: int = 2, wgs: int = 2) -> int:
  """Deepest K/V pipeline (2..4) whose shared memory fits the budget: 8-bit Q and K, V in
  e4m3, int8 or bf16, the output staging, the staged P buffers (8-bit; bf16 too with three compute
  warpgroups, :func:`stages_bf16_p`), the per-row and per-channel scales, for ``wgs``
  compute warpgroups."""
  out = wgs * WG_ROWS * head_dim * out_itemsize
  fixed = wgs * WG_ROWS * head_dim + out + wgs * (WG_ROWS * 8 + head_dim * 4)
  eight_bit = pv in ("e4m3", "int8")
  if eight_bit:
    fixed += wgs * WG_ROWS * 128
  elif stages_bf16_p(wgs):
    fixed += wgs * WG_ROWS * 128 * 2 - (out if o_staged_in_p(wgs, head_dim) else 0)
  per_stage = 128 * head_dim * (1 + (1 if eight_bit else 2)) + 4 * 128
  for stages in (4, 3, 2):
    if fixed + stages * per_stage <= SMEM_BUDGET:
      return stages
  return 2


def stages_bf16_p(wgs: int) -> bool:
  """Whether bf16 P goes through shared memory on the GPU: with three compute warpgroups
  (160 registers a thread, :data:`~pallas_kernels.mosaic.config.THREE_WG_REGISTERS`) P's
  registers beside O's, S's and the next step's S do not fit (compiled for an H200: 80 / 128
  bytes of spill with P staged, 328 / 332 and every wgmma serialized with P in registers)."""
  return wgs == 3


def o_staged_in_p(wgs: int, head_dim: int, block_kv: int = 128) -> bool:
  """Whether o is staged in the buffer of the staged bf16 P (free after the last P V; three
  warpgroups' o buffers would not fit beside it and two stages of K and V): where P's
  [64, block_kv] and o's [64, head_dim] per warpgroup have one shape."""
  return stages_bf16_p(wgs) and head_dim == block_kv


def scale_operands(sched: BlockSchedule, q_scale, k_scale, scale: float, kv_index=None):
  """(q_rows float32 [B, H, S]: scale * log2(e) * each query row's Q scale; k_steps float32
  [B, H, nq, max_kv]: the K scale of each query block's step j, gathered from the schedule's
  key lists). ``q_scale`` [B, H, S // q_block] (any q_block), ``k_scale`` [B, Hkv, S // 128].
  The kernel's scores factor of row r at step j is ``q_rows[r] * k_steps[j]``: a per-row
  factor costs nothing more than a scalar one, as the row max commutes with it. ``kv_index``:
  the key lists in the kernel's step order (default: the schedule's)."""
  b, h, nb = q_scale.shape
  s, hkv = sched.seq_len, k_scale.shape[1]
  q_rows = (scale * LOG2E) * jnp.repeat(q_scale, s // nb, axis=2)
  g = jnp.asarray(sched.head_to_group)
  idx = jnp.asarray(sched.kv_index if kv_index is None else kv_index)[g]   # [H, nq, max_kv]
  ks = k_scale[:, jnp.arange(h) // (h // hkv)]                           # [B, H, nkv]
  k_steps = jax.vmap(lambda kb: jax.vmap(lambda kh, ih: kh[ih])(kb, idx))(ks)
  return q_rows, k_steps


def fp8_kernel_operands(sched: BlockSchedule, ops8, scale: float, key_valid=None,
                        masks_apart: bool = False, gather: bool = False):
  """(schedule operands, (q_rows, k_steps), partial) of :func:`fp8_forward_call` for the
  quantized inputs ``ops8`` (:class:`pallas_kernels.mosaic.fp8.FP8Operands`: its ``q_scale``
  and ``k_scale``); ``key_valid`` (bool [B, S] or None) replaces the schedule's key bias.
  ``masks_apart`` (``MosaicConfig.masked_steps_apart``, where some step needs a mask): each
  query block's masked steps first (:func:`~pallas_kernels.mosaic.common.masked_steps_first`),
  the K step scales in the same order. ``gather``: gathered work items
  (:func:`~pallas_kernels.mosaic.common.gathered_operands`: each warpgroup's 64 query rows
  from a table, two 64-key units a step); ``ops8.k_scale`` must then hold one scale per 64
  keys, and ``k_steps`` holds the two units' scales of each step. ``partial``: some step is
  attended only in part."""
  if gather:
    f_ops, partial = gathered_operands(sched)
  else:
    f_ops, partial = schedule_operands(sched), sched.has_partial_pairs
  if ops8.k_scale.shape[2] * (WG_ROWS if gather else 128) != sched.seq_len:
    raise ValueError(f"k_scale holds {ops8.k_scale.shape[2]} scales for {sched.seq_len} keys: "
                     f"the kernel reads one per {WG_ROWS if gather else 128} keys here")
  if masks_apart and (sched.has_masked_keys or partial):
    f_ops = masked_steps_first(sched, f_ops, gather=gather)
  if key_valid is not None:
    f_ops = f_ops._replace(key_bias=runtime_key_bias(key_valid))
  return f_ops, scale_operands(sched, ops8.q_scale, ops8.k_scale, scale,
                               kv_index=f_ops.kv_index), partial


def fp8_forward_call(q8, k8, v, v_scale, q_rows, k_steps, ops, *, out_dtype, config: MosaicConfig,
                     masked: bool = True, partial: bool = False, pv: str = "e4m3",
                     gather: bool = False):
  """o [B, S, H, D] ``out_dtype``, lse [B, H, S] float32 (natural log, of the scores as the
  kernel sees them: the caller adds back what K smoothing removed; +inf and o = 0 on rows that
  attend nothing).

  q8: [B, S, H, D] and k8: [B, S, Hkv, D], both float8_e4m3fn or both int8; v: V^T
  [B, Hkv, D, S] float8_e4m3fn (``pv="e4m3"``) or int8 (``pv="int8"``), or V [B, S, Hkv, D]
  bf16/fp16 (``pv="bf16"``);
  v_scale: float32 [B, Hkv, D] (applied to o; ones for bf16 V); q_rows [B, H, S] and k_steps
  [B, H, nq, max_kv] float32: the scores' factors (:func:`scale_operands`); ops: the
  :class:`~pallas_kernels.mosaic.common.ForwardOperands` of the schedule. ``masked`` and
  ``partial`` as in :func:`pallas_kernels.mosaic.forward.forward_call`. ``gather``: gathered
  work items (two 64-key units a step: rows of V, or column tiles of V^T); ``k_steps``
  then holds each step's two units' K scales ([B, H, items, 2 * max_steps]) and the scores'
  two column halves take their own factor."""
  batch, seq, heads, head_dim = q8.shape
  kv_heads = k8.shape[2]
  rep = heads // kv_heads
  qk_int = q8.dtype == jnp.int8
  # config.fp8_biased_scores: the int8 scores stay 1.5 * 2 ** 23 + s (no subtract per score);
  # the softmax takes the bias out of each row's maximum and folds it into its per-row
  # constant, so each score still costs one FMA before its exp2.
  bias = INT_SCORE_BIAS if qk_int and config.fp8_biased_scores else None

  def to_float(s):
    """A step's scores as float32 (int32 ones converted; biased with ``bias``)."""
    return int_to_float(s, biased=bias is not None) if qk_int else s
  bq, bk = config.block_q, config.block_kv
  wgs = config.compute_wgs
  stages = config.max_concurrent_steps
  use_sb = config.use_schedule_barrier and wgs == 2
  # setmaxnreg's (compute, producer) split: the config's with two compute warpgroups.
  registers = {1: (240, 40), 2: config.forward_registers, 3: THREE_WG_REGISTERS}[wgs]
  R = WG_ROWS
  interpret = config.interpret
  kv_units = bk // WG_ROWS
  pv_int = pv == "int8"
  if pv not in ("e4m3", "int8", "bf16"):
    raise ValueError(f"pv must be 'e4m3', 'int8' or 'bf16', got {pv!r}")
  if pv_int and wgs == 3:
    raise ValueError("int8 P V runs on two compute warpgroups (block_q 128): its step "
                     "accumulator beside O's does not fit three warpgroups' registers")
  p_dtype = {"e4m3": E4M3, "int8": jnp.int8}.get(pv, v.dtype)
  # e4m3 P straight from registers (V's keys in register_key_order); interpret mode stages P
  # with its columns in that order instead (the same product).
  p_regs = pv == "e4m3" and config.fp8_p_registers
  # Gathered e4m3 P V: V^T's two 64-key units in buffers of their own, and P staged in two
  # halves to match: two products of 64 keys a step (two wgmma groups).
  vt_halves = gather and pv in ("e4m3", "int8")
  if vt_halves and p_regs:
    raise ValueError("gathered work items with e4m3 P V stage P in shared memory: "
                     "config.fp8_p_registers must be False")
  # P carries 2 ** P_SHIFT (the emulation in fp8.py does the same in both precisions).
  shift_bits = P_SHIFT

  # config.masked_steps_apart where some step needs a mask (the operands then hold the count
  # of each query block's leading masked steps): two key loops, as the bf16 forward's.
  apart = ops.masked_steps is not None
  empty_steps = may_see_empty_steps(ops, partial)
  if apart and not (masked or partial):
    raise ValueError("ops.masked_steps is given, but no step needs a mask (masked and "
                     "partial are False)")

  def kernel(q_ref, k_ref, v_ref, vs_ref, qs_ref, ks_ref, h2g_ref, idx_ref, cnt_ref, info_ref,
             bias_ref, unit_ref, order_ref, *refs):
    pieces_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    nmask_ref, refs = (refs[0], refs[1:]) if apart else (None, refs)
    (o_ref, lse_ref, q_smem2, o_smem2, k_smem, v_smem, lse_smem2, bias_smem, vs_smem2,
     qs_smem2, p_smem2, k_bar, v_bar, q_bar, k_free, v_free, sched_bar, b_bar, vs_bar, qs_bar,
     *rest) = refs
    qi, hi, bi, wg, grp, cnt = cta_position("q", h2g_ref, cnt_ref, order_ref)
    hk = lax.div(hi, rep)
    unit_smem, u_bar = rest[:2] if partial else (None, None)

    def sched_wait():
      if use_sb:
        plgpu.barrier_wait(sched_bar.at[wg])

    def sched_arrive():
      if use_sb:
        plgpu.barrier_arrive(sched_bar.at[1 - wg])

    def scores(s, step, slot):
      return step_scores(to_float(s), info_ref[grp, qi, step], wg, masked=masked, partial=partial,
                         kv_units=kv_units, bias_smem=bias_smem.at[slot],
                         bias_bar=b_bar.at[slot],
                         unit_smem=unit_smem.at[wg] if partial else None)

    def shift(m):
      return jnp.where(m == -jnp.inf, 0.0, m) if empty_steps else m

    def unbiased(row_max):
      # max - bias is exact (both integers below 2 ** 24); -inf stays -inf.
      return row_max if bias is None else row_max - bias

    def offset(m, c):
      """Each row's offset of the exponent, x = s c - offset. Biased scores: (s + bias) c -
      (m - shift_bits + bias c); the FMA rounds once, so the error is the offset's rounding,
      about c (one unit of the int32 score) in the log2 domain."""
      return offset_of(shift(m) - shift_bits, c)

    def offset_of(ref, c):
      """The exponent's offset for P = 2 ** (s c - ref) (biased scores: ref + bias c)."""
      return ref if bias is None else ref + bias * c

    def v_operand(slot, half=None):
      # V^T [D, bk] seen as the [bk, D] operand whose contraction axis (keys) is contiguous.
      if half is not None:
        return v_smem.at[slot, half].T
      return v_smem.at[slot] if pv == "bf16" else v_smem.at[slot].T

    def p_cast(p):
      # int8 P (in [0, 127]): rounded to nearest by adding 1.5 * 2 ** 23 (the float's low
      # byte is then the integer; one add, where a conversion runs at exp2's rate).
      if pv_int:
        return lax.bitcast_convert_type(p + INT_SCORE_BIAS, jnp.int32).astype(jnp.int8)
      return p.astype(p_dtype)

    def stage_p(p):
      """8-bit P, bf16 P with three compute warpgroups (:func:`stages_bf16_p`) and any P in
      interpret mode go through this warpgroup's SMEM buffer."""
      if p_regs:                                    # interpret mode only
        p = in_register_key_order(p)
      if vt_halves:
        for half in range(2):
          p_smem2.at[wg, half][...] = p_cast(p[:, half * R:(half + 1) * R])
      else:
        p_smem2.at[wg][...] = p_cast(p)
      plgpu.commit_smem()

    # P in registers for P V: bf16 P, and e4m3 P with config.fp8_p_registers (on the GPU).
    regs = ((pv == "bf16" and not stages_bf16_p(wgs)) or p_regs) and not interpret

    def to_register_operand(p):
      return p_as_8bit_operand(p) if pv == "e4m3" else p.astype(p_dtype)

    def pv_issue(o_acc, p_reg, slot):
      """Issues O += P V (int8 P V: ``o_acc`` is the step's s32 accumulator). P is ``p_reg``
      (registers) or the staged SMEM buffer. In interpret mode O is a loop-carried value:
      returns P V for the caller to add."""
      def issue(acc):
        if vt_halves:
          for half in range(2):
            plgpu.wgmma(acc, p_smem2.at[wg, half], v_operand(slot, half))
        else:
          plgpu.wgmma(acc, p_reg if regs else p_smem2.at[wg], v_operand(slot))

      if not interpret:
        issue(o_acc)
        return None

      def product(acc):
        issue(acc)
        return acc[...]
      return pl.run_scoped(product, plgpu.ACC((R, head_dim), pv_acc_dtype))

    def keep_p(p):
      """P of this step for the next step's P V: staged in SMEM (None) or in registers."""
      if not regs:
        stage_p(p)
        return None
      return to_register_operand(p)

    s_dtype = jnp.int32 if qk_int else jnp.float32
    pv_acc_dtype = jnp.int32 if pv_int else jnp.float32

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(registers[0], action="increase")
      q_smem = q_smem2.at[wg]
      row0 = pieces_ref[grp, qi, wg] * R if gather else qi * bq + wg * R
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, R), hi], q_smem, q_bar.at[wg])
      plgpu.copy_gmem_to_smem(vs_ref.at[bi, hk], vs_smem2.at[wg], vs_bar.at[wg])
      plgpu.copy_gmem_to_smem(qs_ref.at[bi, hi, pl.ds(row0, R)], qs_smem2.at[wg], qs_bar.at[wg])
      if partial:
        plgpu.copy_gmem_to_smem(unit_ref, unit_smem.at[wg], u_bar.at[wg])
        plgpu.barrier_wait(u_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      plgpu.barrier_wait(vs_bar.at[wg])
      plgpu.barrier_wait(qs_bar.at[wg])
      q_rows = plgpu.load(qs_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

      def write_out(o, lse):
        store_rows(o, lse, (p_smem2 if o_in_p else o_smem2).at[wg], lse_smem2.at[wg],
                   o_ref.at[bi, pl.ds(row0, R), hi],
                   lse_ref.at[bi, hi, pl.ds(row0, R)])

      @pl.when(cnt == 0)
      def _empty():
        zeros = plgpu.layout_cast(jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        write_out(zeros, plgpu.layout_cast(jnp.full((R,), jnp.inf, jnp.float32),
                                           plgpu.Layout.WGMMA.reduce(1)))

      @pl.when(cnt > 0)
      def _main():
        if use_sb:
          pl.when(wg == 1)(lambda: plgpu.barrier_arrive(sched_bar.at[0]))

        def softmax(s, step, m_prev):
          # The factor is positive and constant along a row: max(s * c) = max(s) * c.
          # Gathered steps: each 64-key unit (a column half) has its own K scale.
          parts = (s[:, :R], s[:, R:]) if gather else (s,)
          units = (2 * step, 2 * step + 1) if gather else (step,)
          cs = [q_rows * ks_ref[bi, hi, qi, u] for u in units]
          m_new = functools.reduce(jnp.maximum,
                                   [unbiased(h.max(axis=1)) * c for h, c in zip(parts, cs)])
          m_step = m_new
          if m_prev is not None:
            m_new = jnp.maximum(m_prev, m_new)
          if pv_int:
            # int8 P relative to the step's own row max (127 there); a row with no key in this
            # step takes the running max instead (P = 0 there, a finite weight).
            m_run, m_p = m_new, m_step
            if masked or empty_steps:
              m_run = jnp.where(m_new == -jnp.inf, 0.0, m_new)
              m_p = jnp.where(m_step == -jnp.inf, m_run, m_step)
            ref = m_p - LOG2_127

          def row_offset(c):
            return offset_of(ref, c) if pv_int else offset(m_new, c)
          xs = [h * lax.broadcast_in_dim(c, h.shape, [0])
                - lax.broadcast_in_dim(row_offset(c), h.shape, [0])
                for h, c in zip(parts, cs)]
          x = jnp.concatenate(xs, axis=1) if gather else xs[0]
          p = softmax_exp2(x, config.exp2_fma_columns, interpret)
          # int8 P's weight: its scale 2 ** (ref - (running max - shift_bits)), for the row
          # sums and the fold of its P V into O.
          weight = jnp.exp2(ref - (m_run - shift_bits)) if pv_int else None
          return m_new, p, weight

        def online_softmax(s, step, m_i, l_i):
          """(running max, its correction alpha, P, row sums, int8 P's weight or None) after
          step ``step``'s scores."""
          m_new, p, weight = softmax(s, step, m_i)
          alpha = jnp.exp2(m_i - shift(m_new))
          return m_new, alpha, p, l_i * alpha + row_sums(p, weight), weight

        def row_sums(p, weight):
          """A step's row sums of P (int8 P: times its weight)."""
          return p.sum(axis=1) if weight is None else p.sum(axis=1) * weight

        def carried_p(p_reg, weight):
          """The loop's P: int8 P V carries its weight beside it."""
          return (p_reg, weight) if pv_int else p_reg

        def pv_term(acc, weight):
          """A step's int8 P V from its s32 sums (exact as floats below 2 ** 22: 127 * 127 *
          128 keys), times each row's ``weight``: (acc + 1.5 * 2 ** 23) w - 1.5 * 2 ** 23 w."""
          f = int_to_float(acc, biased=True)
          return (f * lax.broadcast_in_dim(weight, f.shape, [0])
                  - lax.broadcast_in_dim(weight * INT_SCORE_BIAS, f.shape, [0]))

        def lone_scores(step):
          """S = Q K^T of ``step``'s keys issued alone and waited for (step 0, or the first
          step after a drained loop)."""
          slot = lax.rem(step, stages)
          plgpu.barrier_wait(k_bar.at[slot])
          sched_wait()

          def qk(s_acc):
            plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].T)
            sched_arrive()
            return s_acc[...]

          s = pl.run_scoped(qk, plgpu.ACC((R, bk), s_dtype))
          plgpu.barrier_arrive(k_free.at[slot])
          return s

        def with_o(o_acc, o_val=None):
          def rescale(o_val, alpha):
            """O *= alpha per row: ``o_val`` in interpret mode, else the accumulator."""
            alpha_o = lax.broadcast_in_dim(alpha, (R, head_dim), [0])
            if interpret:
              return o_val * alpha_o
            o_acc[...] = o_acc[...] * alpha_o
            return o_val

          def with_pv_acc(work):
            """``work(acc)`` with the s32 accumulator of a step's int8 P V (on the GPU; None
            otherwise: other P V go into O, and interpret mode returns the product)."""
            if pv_int and not interpret:
              return pl.run_scoped(work, plgpu.ACC((R, head_dim), jnp.int32))
            return work(None)

          s = scores(lone_scores(0), 0, 0)
          m_i, p, weight = softmax(s, 0, None)
          l_i = row_sums(p, weight)
          p_carry = carried_p(keep_p(p), weight)

          def body(step, carry, masks=True):
            m_i, l_i, p_carry, o_val = carry
            p_reg, w_prev = p_carry if pv_int else (p_carry, None)
            slot = lax.rem(step, stages)
            pslot = lax.rem(step - 1, stages)
            plgpu.barrier_wait(k_bar.at[slot])
            plgpu.barrier_wait(v_bar.at[pslot])
            sched_wait()

            def work(pv_acc):
              def qk_and_pv(s_acc):
                plgpu.wgmma(s_acc, q_smem, k_smem.at[slot].T)
                prod = pv_issue(o_acc if pv_acc is None else pv_acc, p_reg, pslot)
                sched_arrive()
                # S is done once at most P V's groups (one, or two halves) are in flight.
                return plgpu.wgmma_accumulator_load(s_acc, wait_n=2 if vt_halves else 1), prod

              s, prod = pl.run_scoped(qk_and_pv, plgpu.ACC((R, bk), s_dtype))
              plgpu.barrier_arrive(k_free.at[slot])
              s = scores(s, step, slot) if masks else to_float(s)
              m_new, alpha, p, l_new, weight = online_softmax(s, step, m_i, l_i)
              p_next = p_reg
              if regs and pv == "bf16":
                p_next = to_register_operand(p)
              if config.overlap_exp:
                # Keeps ptxas from hoisting the wait below above the exponentials (as in the
                # bf16 forward; lse's staging buffer, rewritten at the end).
                lse_smem2.at[wg][...] = l_new
              plgpu.wgmma_wait(0)                                     # P_{j-1} V_{j-1} done
              plgpu.barrier_arrive(v_free.at[pslot])
              if not regs:
                stage_p(p)                                            # its buffer is free now
              elif pv == "e4m3":
                # After the wait: built before it, the e4m3 P's registers were the ones the P
                # V in flight reads (LLVM reuses the loop-carried P's), and ptxas serialized
                # every wgmma (C7513).
                p_next = to_register_operand(p)
              o_out = o_val
              if not pv_int:
                o_out = rescale(o_val + prod if interpret else o_val, alpha)
              elif interpret:
                o_out = rescale(o_val, alpha) + pv_term(prod, w_prev * alpha)
              else:
                # O = O alpha + P_{j-1} V_{j-1} w_{j-1} alpha (w_{j-1}: to the previous max).
                o_acc[...] = (o_acc[...] * lax.broadcast_in_dim(alpha, (R, head_dim), [0])
                              + pv_term(pv_acc[...], w_prev * alpha))
              return m_new, l_new, carried_p(p_next, weight), o_out

            return with_pv_acc(work)

          def drain(p_carry, o_val, last_step):
            """The P V of ``last_step`` (issued alone, waited for)."""
            p_reg, weight = p_carry if pv_int else (p_carry, None)
            last = lax.rem(last_step, stages)
            plgpu.barrier_wait(v_bar.at[last])
            sched_wait()

            def work(pv_acc):
              prod = pv_issue(o_acc if pv_acc is None else pv_acc, p_reg, last)
              sched_arrive()
              plgpu.wgmma_wait(0)
              plgpu.barrier_arrive(v_free.at[last])
              if not pv_int:
                return o_val + prod if interpret else o_val
              if interpret:
                return o_val + pv_term(prod, weight)
              o_acc[...] = o_acc[...] + pv_term(pv_acc[...], weight)
              return o_val

            return with_pv_acc(work)

          def restart(step, m_i, l_i, o_val):
            """Step ``step`` of the unmasked loop (masked_steps_apart), nothing in flight."""
            s = to_float(lone_scores(step))
            m_new, alpha, p, l_i, weight = online_softmax(s, step, m_i, l_i)
            o_val = rescale(o_val, alpha)
            return m_new, l_i, carried_p(keep_p(p), weight), o_val

          m_i, l_i, o_val = forward_key_loops(body, drain, restart, (m_i, l_i, p_carry, o_val),
                                              cnt, nmask_ref[grp, qi] if apart else None)
          return (o_val if interpret else o_acc[...]), m_i, l_i

        if interpret:
          o, m_i, l_i = with_o(None, plgpu.layout_cast(
              jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA))
        else:
          o, m_i, l_i = pl.run_scoped(with_o, plgpu.ACC((R, head_dim), jnp.float32))
        if use_sb:
          pl.when(wg == 0)(lambda: plgpu.barrier_wait(sched_bar.at[0]))
        o, lse = normalized_rows(o, m_i - shift_bits, l_i)
        vs = plgpu.load(vs_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(0))
        write_out(o * lax.broadcast_in_dim(vs, o.shape, [1]), lse)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(registers[1], action="decrease")
      # 8-bit P V reads V^T [B, Hkv, D, S]: a step's [D, block_kv] slice.
      v_block = (lambda rows: v_ref.at[bi, hk, :, rows]) if pv != "bf16" else None
      stream_kv(k_ref, v_ref, bias_ref if masked else None, k_smem, v_smem, bias_smem, k_bar,
                v_bar, b_bar, k_free, v_free, step_keys(idx_ref, grp, qi, gather), cnt, stages,
                bk, bi, hk, v_block=v_block, gather=gather,
                padded=padded_steps(info_ref, grp, qi))

  tr_qk = byte_transforms(head_dim)
  if pv != "bf16":
    # Gathered: each 64-key unit of V^T in a buffer of its own (one TMA copy needs contiguous
    # shared memory) under a 64-byte swizzle, and P, the products' other shared-memory
    # operand, in two halves with that swizzle (wgmma wants one swizzle for both).
    if vt_halves:
      v_buf = plgpu.SMEM((stages, 2, head_dim, R), p_dtype, transforms=byte_transforms(R))
      p_buf = plgpu.SMEM((wgs, 2, R, R), p_dtype, transforms=byte_transforms(R))
    else:
      v_buf = plgpu.SMEM((stages, head_dim, bk), p_dtype, transforms=byte_transforms(bk))
      p_buf = (plgpu.SMEM((1, 32), jnp.float32) if p_regs and not interpret else
               plgpu.SMEM((wgs, R, bk), p_dtype, transforms=byte_transforms(bk)))
  else:
    v_buf = plgpu.SMEM((stages, bk, head_dim), v.dtype, transforms=smem_transforms(v.dtype))
    p_buf = (plgpu.SMEM((wgs, R, bk), v.dtype, transforms=smem_transforms(v.dtype))
             if stages_bf16_p(wgs) and not interpret else
             plgpu.SMEM((wgs, R, bk) if interpret else (1, 32), v.dtype))
  o_in_p = (pv == "bf16" and o_staged_in_p(wgs, head_dim, bk) and not interpret
            and jnp.dtype(v.dtype) == jnp.dtype(out_dtype))
  scratch = [
      plgpu.SMEM((wgs, R, head_dim), q8.dtype, transforms=tr_qk),
      (plgpu.SMEM((1, 32), jnp.float32) if o_in_p else
       plgpu.SMEM((wgs, R, head_dim), out_dtype, transforms=smem_transforms(out_dtype))),
      plgpu.SMEM((stages, bk, head_dim), k8.dtype, transforms=tr_qk),
      v_buf,
      plgpu.SMEM((wgs, R), jnp.float32),
      plgpu.SMEM((stages, bk) if masked else (1, 32), jnp.float32),
      plgpu.SMEM((wgs, head_dim), jnp.float32),
      plgpu.SMEM((wgs, R), jnp.float32),
      p_buf,
      slot_barrier(stages, gather),
      slot_barrier(stages, gather),
      plgpu.Barrier(num_barriers=wgs),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_barriers=2),
      slot_barrier(stages, gather),
      plgpu.Barrier(num_barriers=wgs),
      plgpu.Barrier(num_barriers=wgs),
  ]
  if partial:
    scratch += [plgpu.SMEM((wgs, 2 ** kv_units, bk), jnp.float32),
                plgpu.Barrier(num_barriers=wgs)]
  out_type = (jax.ShapeDtypeStruct((batch, seq, heads, head_dim), out_dtype),
              jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      **launch_grid(seq // bq, heads, batch, "q"),
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=compiler_params(config), interpret=interpret_params(config),
  )(q8, k8, v, v_scale, q_rows, k_steps, *present(ops))


INT_SCORE_BIAS = 12582912.0                            # 1.5 * 2 ** 23


def int_to_float(s, biased: bool = False):
  """int32 scores -> float32 exactly, with an integer add and a float subtract (full-rate ALU
  work; a conversion instruction runs at the rate of exp2, the softmax's bottleneck): |s| <=
  127 * 127 * head_dim < 2 ** 22, so 1.5 * 2 ** 23 + s is exact in a float32's mantissa.
  ``biased``: that float, s + :data:`INT_SCORE_BIAS`, without the subtract."""
  magic = 0x4B400000                                   # the bits of 1.5 * 2 ** 23
  f = lax.bitcast_convert_type(s + magic, jnp.float32)
  return f if biased else f - INT_SCORE_BIAS


@functools.partial(jax.jit, static_argnames=("out_dtype", "config", "masked", "partial", "pv",
                                             "gather"))
def fp8_forward_jit(q8, k8, v, v_scale, q_rows, k_steps, ops, *, out_dtype, config,
                    masked=True, partial=False, pv="e4m3", gather=False):
  return fp8_forward_call(q8, k8, v, v_scale, q_rows, k_steps, ops, out_dtype=out_dtype,
                          config=config, masked=masked, partial=partial, pv=pv, gather=gather)
