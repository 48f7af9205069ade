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
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.common import (LOG2E, allocated, bind_scratch, compiler_params,
                                          cta_position, dkdv_piece, interpret_params,
                                          key_bias_rows, launch_grid, mma_accumulate,
                                          padded_steps, piece_attends, piece_stream_scratch,
                                          present, slot_barrier, smem_transforms, step_keys,
                                          step_scores, store_kv_grads, stream_kv,
                                          stream_q_pieces)
from pallas_kernels.mosaic.config import WG_ROWS, MosaicConfig


class DqScratch(NamedTuple):
  """Shared memory and barriers of the dQ kernel, allocated in this order (None: not
  allocated; bound by name in the kernel, :func:`~pallas_kernels.mosaic.common.bind_scratch`)."""

  q: object           # [wgs, 64, D]: each warpgroup's query rows (then its dQ staging)
  do: object          # [wgs, 64, D]
  lse: object         # [wgs, 64] float32
  delta: object       # [wgs, 64] float32
  k: object           # [stages, block_kv, D]
  v: object           # [stages, block_kv, D]
  bias: object        # [stages, block_kv] float32 key-bias rows
  in_bar: object      # [wgs * 4]: q, dO, lse, delta of each warpgroup landed
  k_bar: object       # [stages]
  v_bar: object       # [stages]
  k_free: object      # [stages], one arrival per compute warpgroup
  v_free: object      # [stages], likewise
  bias_bar: object    # [stages]
  unit: object = None       # [wgs, 2 ** (block_kv // 64), block_kv] float32 (partial pairs)
  unit_bar: object = None   # [wgs]
  a_interp: object = None   # [wgs, 64, block_kv]: dS staged (GPU interpret mode only)


class DkdvScratch(NamedTuple):
  """Shared memory and barriers of the split dK/dV kernel, allocated in this order."""

  k: object           # [wgs, 64, D]: each warpgroup's keys (then its dK staging)
  v: object           # [wgs, 64, D]: (then its dV staging)
  q: object           # [stages, 64, D]: query pieces
  do: object          # [stages, 64, D]
  lse: object         # [stages, 64] float32
  delta: object       # [stages, 64] float32
  bias: object        # [wgs, 64] float32: key bias of each warpgroup's keys
  kv_bar: object      # [wgs * 3]: K, V, key bias landed
  q_bar: object       # [stages]
  do_bar: object      # [stages]
  lse_bar: object     # [stages]
  delta_bar: object   # [stages]
  free_bar: object    # [stages], one arrival per compute warpgroup: the slot is free
  a_interp: object = None   # [wgs, 64, 64]: register operands staged (interpret mode only)


def dq_call(q, k, v, do, lse, delta, ops, *, scale: float, config: MosaicConfig,
            masked: bool = True, partial: bool = False, gather: bool = False):
  """dq [B,S,H,D] in q.dtype: per query block, loop over its key list (as the forward; operands
  of ``schedule_operands`` or ``gathered_operands``, ``masked``, ``partial`` and ``gather`` as
  there)."""
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
             info_ref, bias_ref, unit_ref, order_ref, *refs):
    # Gathered work items: each warpgroup's query piece comes from a table.
    pieces_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    dq_ref, *refs = refs
    sc = bind_scratch(scratch, refs)
    qi, hi, bi, wg, grp, cnt = cta_position("q", h2g_ref, cnt_ref, order_ref)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem, do_smem = sc.q.at[wg], sc.do.at[wg]
      row0 = pieces_ref[grp, qi, wg] * WG_ROWS if gather else qi * bq + wg * WG_ROWS
      rows = pl.ds(row0, WG_ROWS)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, sc.in_bar.at[wg * 4])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem, sc.in_bar.at[wg * 4 + 1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], sc.lse.at[wg], sc.in_bar.at[wg * 4 + 2])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], sc.delta.at[wg],
                              sc.in_bar.at[wg * 4 + 3])
      if partial:
        plgpu.copy_gmem_to_smem(unit_ref, sc.unit.at[wg], sc.unit_bar.at[wg])
        plgpu.barrier_wait(sc.unit_bar.at[wg])
      for t in range(4):
        plgpu.barrier_wait(sc.in_bar.at[wg * 4 + t])
      lse2 = plgpu.load(sc.lse.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * LOG2E
      dlt = plgpu.load(sc.delta.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
      dq = plgpu.layout_cast(jnp.full((WG_ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def body(step, dq):
        slot = lax.rem(step, stages)
        # Read before the products: the scalar's GMEM load completes under them.
        info = info_ref[grp, qi, step] if (masked or partial) else None
        plgpu.barrier_wait(sc.k_bar.at[slot])

        def probabilities(s):
          s = step_scores(s, info, wg, masked=masked, partial=partial,
                          kv_units=kv_units, bias_smem=sc.bias.at[slot],
                          bias_bar=sc.bias_bar.at[slot],
                          unit_smem=sc.unit.at[wg] if partial else None)
          return jnp.exp2(s * c2 - lax.broadcast_in_dim(lse2, s.shape, [0]))

        if config.overlap_exp:
          # S and dP = dO V^T issued back to back: the exponentials run under dP.
          plgpu.barrier_wait(sc.v_bar.at[slot])

          def products(s_acc, dp_acc):
            plgpu.wgmma(s_acc, q_smem, sc.k.at[slot].T)
            plgpu.wgmma(dp_acc, do_smem, sc.v.at[slot].T)
            p = probabilities(plgpu.wgmma_accumulator_load(s_acc, wait_n=1))
            return p, plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)

          p, dp = pl.run_scoped(products, plgpu.ACC((WG_ROWS, bk), jnp.float32),
                                plgpu.ACC((WG_ROWS, bk), jnp.float32))
        else:
          def compute_s(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, sc.k.at[slot].T)
            return acc_ref[...]

          p = probabilities(pl.run_scoped(compute_s, plgpu.ACC((WG_ROWS, bk), jnp.float32)))
          plgpu.barrier_wait(sc.v_bar.at[slot])

          def compute_dp(acc_ref):
            plgpu.wgmma(acc_ref, do_smem, sc.v.at[slot].T)
            return acc_ref[...]

          dp = pl.run_scoped(compute_dp, plgpu.ACC((WG_ROWS, bk), jnp.float32))
        plgpu.barrier_arrive(sc.v_free.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(dlt, dp.shape, [0]))
        dq = mma_accumulate(dq, ds.astype(dtype), sc.k.at[slot], config,
                             a_smem=sc.a_interp.at[wg] if interpret else None)
        plgpu.barrier_arrive(sc.k_free.at[slot])
        return dq

      dq = lax.fori_loop(0, cnt, body, dq)
      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[bi, rows, hi])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      stream_kv(k_ref, v_ref, bias_ref if masked else None, sc.k, sc.v, sc.bias, sc.k_bar,
                 sc.v_bar, sc.bias_bar, sc.k_free,
                 sc.v_free, step_keys(idx_ref, grp, qi, gather), cnt, stages, bk, bi, hi,
                 gather=gather, padded=padded_steps(info_ref, grp, qi))

  tr = smem_transforms(dtype)
  scratch = DqScratch(
      q=plgpu.SMEM((wgs, WG_ROWS, head_dim), dtype, transforms=tr),
      do=plgpu.SMEM((wgs, WG_ROWS, head_dim), dtype, transforms=tr),
      lse=plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
      delta=plgpu.SMEM((wgs, WG_ROWS), jnp.float32),
      k=plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      v=plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      bias=plgpu.SMEM((stages, bk), jnp.float32),
      in_bar=plgpu.Barrier(num_barriers=wgs * 4),
      k_bar=slot_barrier(stages, gather),
      v_bar=slot_barrier(stages, gather),
      k_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      v_free=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      bias_bar=slot_barrier(stages, gather),
      unit=plgpu.SMEM((wgs, 2 ** kv_units, bk), jnp.float32) if partial else None,
      unit_bar=plgpu.Barrier(num_barriers=wgs) if partial else None,
      a_interp=plgpu.SMEM((wgs, WG_ROWS, bk), dtype) if interpret else None,
  )
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch_types=allocated(scratch),
      **launch_grid(nq, heads, batch, "q"), num_threads=wgs + 1,
      thread_name="wg", compiler_params=compiler_params(config),
      interpret=interpret_params(config),
  )(q, k, v, do, lse, delta, *present(ops))


def dkdv_call(q, k, v, do, lse, delta, ops, *,
              scale: float, block_kv: int, config: MosaicConfig,
              masked: bool = True, partial: bool = False, gather: bool = False):
  """dk, dv [B,S,H,D] (``lse``: natural log, [B, H, S] float32):
  per key block (64 rows per compute warpgroup), loop over the 64-row
  query pieces of the transposed schedule (q, do, lse, delta). Operands of
  ``transposed_operands``: ``key_bias`` float32[seq] (0 or -inf per key) masks padded keys
  (``masked=False``: no key of the schedule is padded, compiled out); ``piece_codes`` say
  which warpgroups' keys each piece attends, applied where ``partial``. ``gather``: operands
  of ``gathered_transposed_operands`` (each warpgroup's key unit from a table)."""
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  wgs = block_kv // WG_ROWS
  nkv = seq // block_kv
  stages = min(4, max(2, config.bwd_max_concurrent_steps * 2))
  c2 = scale * LOG2E
  R = WG_ROWS

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, h2g_ref, idx_ref, cnt_ref,
             bias_ref, code_ref, order_ref, *refs):
    units_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    dk_ref, dv_ref, *refs = refs
    sc = bind_scratch(scratch, refs)
    ki, hi, bi, wg, grp, steps = cta_position("k", h2g_ref, cnt_ref, order_ref)

    def q_row(step):
      return idx_ref[grp, ki, step] * R

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      k_smem, v_smem = sc.k.at[wg], sc.v.at[wg]
      row0 = units_ref[grp, ki, wg] * R if gather else ki * block_kv + wg * R
      rows = pl.ds(row0, R)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem, sc.kv_bar.at[wg * 3])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem, sc.kv_bar.at[wg * 3 + 1])
      if masked:
        plgpu.copy_gmem_to_smem(key_bias_rows(bias_ref, bi, rows), sc.bias.at[wg],
                                sc.kv_bar.at[wg * 3 + 2])
      for t in range(3 if masked else 2):
        plgpu.barrier_wait(sc.kv_bar.at[wg * 3 + t])
      key_bias = (plgpu.load(sc.bias.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                  if masked else None)
      zeros = plgpu.layout_cast(jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def body(step, carry):
        dk, dv = carry
        slot = lax.rem(step, stages)
        a_smem = sc.a_interp.at[wg] if config.interpret else None
        attends = piece_attends(code_ref[grp, ki, step], wg) if partial else None
        dv, dst = dkdv_piece(k_smem, v_smem, slot, dv, q_smem=sc.q, do_smem=sc.do,
                             lse_smem=sc.lse, delta_smem=sc.delta, q_bar=sc.q_bar,
                             do_bar=sc.do_bar, lse_bar=sc.lse_bar, delta_bar=sc.delta_bar, c2=c2,
                             dtype=dtype, config=config, a_smem=a_smem, key_bias=key_bias,
                             attends=attends)
        dk = mma_accumulate(dk, dst.astype(dtype), sc.q.at[slot], config, a_smem=a_smem)
        plgpu.barrier_arrive(sc.free_bar.at[slot])
        return dk, dv

      # Padded keys get P^T = 0 from the bias, so their dK and dV rows come out exactly zero.
      dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
      store_kv_grads(dk * scale, dv, k_smem, v_smem, dk_ref.at[bi, rows, hi],
                      dv_ref.at[bi, rows, hi])

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      stream_q_pieces(q_ref, do_ref, lse_ref, delta_ref, sc.q, sc.do, sc.lse, sc.delta,
                       sc.q_bar, sc.do_bar, sc.lse_bar, sc.delta_bar, sc.free_bar, q_row, steps,
                       stages, bi, hi)

  tr = smem_transforms(dtype)
  scratch = DkdvScratch(
      k=plgpu.SMEM((wgs, R, head_dim), dtype, transforms=tr),
      v=plgpu.SMEM((wgs, R, head_dim), dtype, transforms=tr),
      lse=plgpu.SMEM((stages, R), jnp.float32),
      delta=plgpu.SMEM((stages, R), jnp.float32),
      bias=plgpu.SMEM((wgs, R), jnp.float32),
      kv_bar=plgpu.Barrier(num_barriers=wgs * 3),
      **piece_stream_scratch(dtype, head_dim, stages, wgs),
      a_interp=plgpu.SMEM((wgs, R, R), dtype) if config.interpret else None,
  )
  out = jax.ShapeDtypeStruct(k.shape, dtype)
  return plgpu.kernel(
      kernel, out_type=(out, out), scratch_types=allocated(scratch),
      **launch_grid(nkv, heads, batch, "k"), num_threads=wgs + 1,
      thread_name="wg", compiler_params=compiler_params(config),
      interpret=interpret_params(config),
  )(q, k, v, do, lse, delta, *present(ops))


@functools.partial(jax.jit, static_argnames=("scale", "config", "block_kv_dkv",
                                             "masked", "partial", "partial_t", "gather",
                                             "gather_t"))
def split_backward_jit(q, k, v, o, lse, do, ops, ops_t, dlse=None, *,
                       scale, config, block_kv_dkv, masked=True, partial=False,
                       partial_t=False, gather=False, gather_t=False):
  """(dq, dk, dv) in q.dtype. Operands: the forward's (``schedule_operands``) for dQ, then the
  transposed ones (``transposed_operands``) for dK/dV, whose key blocks are
  ``block_kv_dkv`` rows; ``partial`` / ``partial_t``: the two schedules have partly attended
  block pairs; ``gather`` / ``gather_t``: the dQ / dK/dV operands are gathered work items.
  ``dlse`` (float32 [B, H, S] or None): the cotangent of the lse output."""
  f32 = jnp.float32
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
  if dlse is not None:
    # A cotangent g of the lse adds p * g to dS: the same as delta - g.
    delta = delta - dlse
  dq = dq_call(q, k, v, do, lse, delta, ops, scale=scale, config=config, masked=masked,
               partial=partial, gather=gather)
  if config.interpret:
    # GPU interpret mode keeps global state: the two kernels must not run at once, which
    # XLA's CPU runtime would do with independent ops. Make dK/dV wait for dQ.
    dq, q, k, v, do = lax.optimization_barrier((dq, q, k, v, do))
  dk, dv = dkdv_call(q, k, v, do, lse, delta, ops_t, scale=scale,
                     block_kv=block_kv_dkv, config=config, masked=masked, partial=partial_t,
                     gather=gather_t)
  return dq, dk, dv
