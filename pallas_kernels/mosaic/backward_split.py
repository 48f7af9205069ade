"""Hopper STA backward as two kernels (Mosaic GPU): dQ, then dK/dV.

``delta = sum(o * do)`` is computed outside. The dQ kernel has the forward's streaming shape
(per query block, loop over its key list); the dK/dV kernel runs per key block (64 rows per
compute warpgroup) over the transposed list ``q_index[g, j, :q_count[g, j]]``, each scheduled
query block streamed as 64-row pieces so the warpgroup's accumulators stay in registers. Both
recompute S and dP (7 matmuls per block pair, against the fused kernel's 5), but every output
is written once, so the gradients are bitwise deterministic.

Layouts as in :mod:`pallas_kernels.mosaic.common`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.common import (LOG2E, compiler_params, cta_position, dkdv_piece,
                                          interpret_params, key_bias_rows, launch_grid,
                                          mma_accumulate,
                                          piece_attends, smem_transforms, step_scores,
                                          store_kv_grads, stream_kv, stream_q_pieces)
from pallas_kernels.mosaic.config import WG_ROWS, MosaicConfig


def dq_call(q, k, v, do, lse, delta, ops, *, scale: float, config: MosaicConfig, masked: bool = True, partial: bool = False):
  """dq [B,S,H,D] in q.dtype: per query block, loop over its key list (as the forward; operands
  of ``schedule_operands``, ``masked`` and ``partial`` as there)."""
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  bq, bk = config.block_q, config.block_kv
  wgs = config.compute_wgs
  nq = seq // bq
  stages = config.bwd_max_concurrent_steps
  c2 = scale * LOG2E
  interpret = config.interpret
  kv_units = bk // WG_ROWS

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, h2g_ref, idx_ref, cnt_ref,
             info_ref, bias_ref, unit_ref, order_ref, dq_ref, q_smem2, do_smem2, lse_smem2, delta_smem2,
             k_smem, v_smem, bias_smem, in_bar, k_bar, v_bar, k_free, v_free, b_bar, *rest):
    qi, hi, bi, wg, grp, cnt = cta_position("q", h2g_ref, cnt_ref, order_ref)
    unit_smem, u_bar = rest[:2] if partial else (None, None)
    a_smem2 = rest[-1:] if interpret else ()

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      row0 = qi * bq + wg * WG_ROWS
      rows = pl.ds(row0, WG_ROWS)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, in_bar.at[wg * 4])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem, in_bar.at[wg * 4 + 1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem2.at[wg], in_bar.at[wg * 4 + 2])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem2.at[wg], in_bar.at[wg * 4 + 3])
      if partial:
        plgpu.copy_gmem_to_smem(unit_ref, unit_smem.at[wg], u_bar.at[wg])
        plgpu.barrier_wait(u_bar.at[wg])
      for t in range(4):
        plgpu.barrier_wait(in_bar.at[wg * 4 + t])
      lse2 = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * LOG2E
      dlt = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
      dq = plgpu.layout_cast(jnp.full((WG_ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def body(step, dq):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def compute_s(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
          return acc_ref[...]

        s = pl.run_scoped(compute_s, plgpu.ACC((WG_ROWS, bk), jnp.float32))
        s = step_scores(s, info_ref[grp, qi, step], wg, masked=masked, partial=partial,
                        kv_units=kv_units, bias_smem=bias_smem.at[slot], bias_bar=b_bar.at[slot],
                        unit_smem=unit_smem.at[wg] if partial else None)
        p = jnp.exp2(s * c2 - lax.broadcast_in_dim(lse2, s.shape, [0]))
        plgpu.barrier_wait(v_bar.at[slot])

        def compute_dp(acc_ref):
          plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].T)
          return acc_ref[...]

        dp = pl.run_scoped(compute_dp, plgpu.ACC((WG_ROWS, bk), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(dlt, dp.shape, [0]))
        dq = mma_accumulate(dq, ds.astype(dtype), k_smem.at[slot], config,
                             a_smem=a_smem2[0].at[wg] if a_smem2 else None)
        plgpu.barrier_arrive(k_free.at[slot])
        return dq

      dq = lax.fori_loop(0, cnt, body, dq)
      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      stream_kv(k_ref, v_ref, bias_ref if masked else None, k_smem, v_smem, bias_smem, k_bar,
                 v_bar, b_bar, k_free,
                 v_free, lambda step: idx_ref[grp, qi, step], cnt, stages, bk, bi, hi)

  tr = smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, WG_ROWS, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, WG_ROWS, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
      plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
      plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, bk), jnp.float32),
      plgpu.Barrier(num_barriers=wgs * 4),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
  ]
  if partial:
    scratch += [plgpu.SMEM((wgs, 2 ** kv_units, bk), jnp.float32),
                plgpu.Barrier(num_barriers=wgs)]
  if interpret:
    scratch.append(plgpu.SMEM((wgs, WG_ROWS, bk), dtype))
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch_types=scratch,
      **launch_grid(nq, heads, batch, "q"), num_threads=wgs + 1,
      thread_name="wg", compiler_params=compiler_params(), interpret=interpret_params(config),
  )(q, k, v, do, lse, delta, *ops)


def dkdv_call(q, k, v, do, lse, delta, ops, *,
              scale: float, block_kv: int, config: MosaicConfig,
              masked: bool = True, partial: bool = False):
  """dk, dv [B,S,H,D]: per key block (64 rows per compute warpgroup), loop over the 64-row
  query pieces of the transposed schedule (q, do, lse, delta). Operands of
  ``transposed_operands``: ``key_bias`` float32[seq] (0 or -inf per key) masks padded keys
  (``masked=False``: no key of the schedule is padded, compiled out); ``piece_codes`` say
  which warpgroups' keys each piece attends, applied where ``partial``."""
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  wgs = block_kv // WG_ROWS
  nkv = seq // block_kv
  stages = min(4, max(2, config.bwd_max_concurrent_steps * 2))
  c2 = scale * LOG2E
  R = WG_ROWS

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, h2g_ref, idx_ref, cnt_ref,
             bias_ref, code_ref, order_ref, dk_ref, dv_ref, k_smem2, v_smem2, q_smem, do_smem, lse_smem,
             delta_smem, bias_smem, kv_bar, q_bar, do_bar, lse_bar, delta_bar, free_bar,
             *a_smem2):
    ki, hi, bi, wg, grp, steps = cta_position("k", h2g_ref, cnt_ref, order_ref)

    def q_row(step):
      return idx_ref[grp, ki, step] * R

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      row0 = ki * block_kv + wg * R
      rows = pl.ds(row0, R)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem, kv_bar.at[wg * 3])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem, kv_bar.at[wg * 3 + 1])
      if masked:
        plgpu.copy_gmem_to_smem(key_bias_rows(bias_ref, bi, rows), bias_smem.at[wg],
                                kv_bar.at[wg * 3 + 2])
      for t in range(3 if masked else 2):
        plgpu.barrier_wait(kv_bar.at[wg * 3 + t])
      key_bias = (plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                  if masked else None)
      zeros = plgpu.layout_cast(jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def body(step, carry):
        dk, dv = carry
        slot = lax.rem(step, stages)
        a_smem = a_smem2[0].at[wg] if a_smem2 else None
        attends = piece_attends(code_ref[grp, ki, step], wg) if partial else None
        dv, dst = dkdv_piece(k_smem, v_smem, slot, dv, q_smem=q_smem, do_smem=do_smem,
                             lse_smem=lse_smem, delta_smem=delta_smem, q_bar=q_bar,
                             do_bar=do_bar, lse_bar=lse_bar, delta_bar=delta_bar, c2=c2,
                             dtype=dtype, config=config, a_smem=a_smem, key_bias=key_bias,
                             attends=attends)
        dk = mma_accumulate(dk, dst.astype(dtype), q_smem.at[slot], config, a_smem=a_smem)
        plgpu.barrier_arrive(free_bar.at[slot])
        return dk, dv

      # Padded keys get P^T = 0 from the bias, so their dK and dV rows come out exactly zero.
      dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
      store_kv_grads(dk * scale, dv, k_smem, v_smem, dk_ref.at[bi, rows, hi],
                      dv_ref.at[bi, rows, hi])

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      stream_q_pieces(q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem,
                       q_bar, do_bar, lse_bar, delta_bar, free_bar, q_row, steps, stages, bi, hi)

  tr = smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, R, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, R, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, R, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, R, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, R), jnp.float32),
      plgpu.SMEM((stages, R), jnp.float32),
      plgpu.SMEM((wgs, R), jnp.float32),
      plgpu.Barrier(num_barriers=wgs * 3),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  ]
  if config.interpret:
    scratch.append(plgpu.SMEM((wgs, R, R), dtype))
  out = jax.ShapeDtypeStruct(k.shape, dtype)
  return plgpu.kernel(
      kernel, out_type=(out, out), scratch_types=scratch,
      **launch_grid(nkv, heads, batch, "k"), num_threads=wgs + 1,
      thread_name="wg", compiler_params=compiler_params(), interpret=interpret_params(config),
  )(q, k, v, do, lse, delta, *ops)


@functools.partial(jax.jit, static_argnames=("scale", "config", "block_kv_dkv",
                                             "masked", "partial", "partial_t"))
def split_backward_jit(q, k, v, o, lse, do, ops, ops_t, dlse=None, *,
                       scale, config, block_kv_dkv, masked=True, partial=False,
                       partial_t=False):
  """(dq, dk, dv) in q.dtype. Operands: the forward's (``schedule_operands``) for dQ, then the
  transposed ones (``transposed_operands``) for dK/dV, whose key blocks are
  ``block_kv_dkv`` rows; ``partial`` / ``partial_t``: the two schedules have partly attended
  block pairs. ``dlse`` (float32 [B, H, S] or None): the cotangent of the lse output."""
  f32 = jnp.float32
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
  if dlse is not None:
    # A cotangent g of the lse adds p * g to dS: the same as delta - g.
    delta = delta - dlse
  dq = dq_call(q, k, v, do, lse, delta, ops, scale=scale, config=config, masked=masked, partial=partial)
  if config.interpret:
    # GPU interpret mode keeps global state: the two kernels must not run at once, which
    # XLA's CPU runtime would do with independent ops. Make dK/dV wait for dQ.
    dq, q, k, v, do = lax.optimization_barrier((dq, q, k, v, do))
  dk, dv = dkdv_call(q, k, v, do, lse, delta, ops_t, scale=scale, block_kv=block_kv_dkv, config=config,
                     masked=masked, partial=partial_t)
  return dq, dk, dv
