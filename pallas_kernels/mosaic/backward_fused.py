"""Fused Hopper backward for STA (Mosaic GPU): dK, dV and dQ in one kernel.

The split backward (:mod:`pallas_kernels.mosaic.backward_split`) runs a dQ kernel and a dK/dV
kernel, and both recompute S = Q K^T and dP = dO V^T: 7 matmuls per block pair. This kernel
does FA3's 5: per key block (64 keys per compute warpgroup), loop over the transposed
schedule's query blocks in 64-row pieces, and per piece

  S^T = K Q^T,  P^T = exp2(S^T c - lse),  dV += P^T dO,  dP^T = V dO^T,
  dS^T = P^T (dP^T - delta),  dK += dS^T Q,  dQ_partial = dS K,

where dQ_partial ([64 query rows, head_dim], float32) is added into a float32 dQ accumulator
in GMEM with a TMA reduce-add (``copy_smem_to_gmem(..., reduction_op="add")``): every key
block that sees a query block adds its share. dS^T of both warpgroups goes through shared
memory (double-buffered), so each warpgroup computes one column half of dQ_partial over all
128 keys of the CTA's key block (a 64x64x128 wgmma).

Layouts as the split kernels: q, k, v, do: [batch, seq, heads, head_dim]; lse, delta:
[batch, heads, seq] float32. The dQ accumulator is float32 [batch, seq, heads * wgs,
head_dim // wgs] (each warpgroup's column half is one "head" of it, so its TMA box is a plain
[64, head_dim // wgs] slice); the caller zero-fills it and applies the softmax scale.

GPU interpret mode has no TMA reduce-add; there the add is a GMEM read-add-write through SMEM,
which is exact because interpret mode runs the grid's CTAs one after another.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic import dq_fragments
from pallas_kernels.mosaic.common import (FIRST_NAMED_BARRIER, LOG2E, allocated, bind_scratch,
                                          compiler_params, cta_position, interpret_params,
                                          key_bias_rows, launch_grid, mma_accumulate,
                                          named_barrier,
                                          piece_attends, piece_lse2, piece_probabilities,
                                          piece_stream_scratch, present, smem_transforms,
                                          store_kv_grads, stream_q_pieces)
from pallas_kernels.mosaic.config import WG_ROWS, MosaicConfig


def fused_supported(head_dim: int, block_kv: int) -> bool:
  """Each compute warpgroup owns ``head_dim // (block_kv // 64)`` dQ columns: a whole number of
  64-wide swizzle tiles is needed (head_dim 128 with 128-row key blocks, or 64-row key blocks)."""
  wgs = block_kv // WG_ROWS
  return head_dim % wgs == 0 and (head_dim // wgs) % 64 == 0


# The dQ staging: rows of 32 float32 elements under a 128-byte swizzle (a 32-byte swizzle
# measured level: docs/PERFORMANCE_ARCHIVE.md).
_F32_SMEM_TRANSFORMS = (plgpu.TilingTransform((8, 32)), plgpu.SwizzleTransform(128))


class FusedScratch(NamedTuple):
  """Shared memory and barriers of the fused backward, allocated in this order (None: not
  allocated; the kernel binds them by name, :func:`~pallas_kernels.mosaic.common.bind_scratch`)."""

  k: object           # [block_kv, D]: the key block (then dK's output staging)
  v: object           # [block_kv, D]: the value block (then dV's)
  q: object           # [stages, 64, D]: query pieces
  do: object          # [stages, 64, D]: their dO
  ds: object          # [2, block_kv, 64]: dS^T of both warpgroups, double-buffered
  dq: object          # [wgs, 64, D // wgs] float32: each warpgroup's dQ columns to reduce-add
                      # (fragments: [wgs, D // (4 * wgs), 256] in dq_fragments' order)
  vec: object         # [2 * stages + wgs, 64] float32: lse, delta per slot; key bias per wg
  kv_bar: object      # [wgs * 3]: K, V, key bias of each warpgroup landed
  q_bar: object       # [stages]
  do_bar: object      # [stages]
  lse_bar: object     # [stages]
  delta_bar: object   # [stages]
  free_bar: object    # [stages], one arrival per compute warpgroup: the slot is free
  ds_bar: object      # both warpgroups' dS^T are in shared memory
  done_bar: object    # both warpgroups are past their last read of the other's keys
  a_interp: object = None     # [wgs, 64, 64]: register operands staged (interpret mode only)
  dq_interp: object = None    # like dq, float32: reduce-add emulation (interpret)
  interp_bar: object = None   # [wgs] (interpret)


def fused_backward_call(q, k, v, do, lse, delta, ops, dq_acc, *, scale: float, block_kv: int,
                        config: MosaicConfig, masked: bool = True, partial: bool = False,
                        kv_acc=None, gather: bool = False, video_rows: int = 0):
  """(dk, dv) [B,S,H,D] in q.dtype; adds the unscaled dQ into the mutable ref ``dq_acc``
  (float32 [B, S, H * wgs, D // wgs], zero-filled by the caller, see :func:`dq_acc_shape`;
  with ``config.bwd_dq_fragments``, [B, S // 64, H * wgs, D // (4 * wgs), 256] in
  :mod:`~pallas_kernels.mosaic.dq_fragments`' order). ``lse``: natural log.

  Grouped-query attention: k and v [B, S, Hkv, D] with Hkv dividing H (query head h reads head
  h // (H // Hkv)); then ``kv_acc`` = (dk_acc, dv_acc), mutable float32 refs of
  :func:`dq_acc_shape` ``(k.shape)``, zero-filled, into which every query head of a group adds
  its share (dK already scaled), and the call returns ().

  ``piece_index[g, j, :piece_count[g, j]]``: the 64-row query pieces that key block j (of
  ``block_kv`` rows) serves in head group g (``transposed_operands``). ``key_bias[seq]``
  (float32, 0 or -inf per key) masks padded keys before the exponent; ``masked=False`` (no key
  of the schedule is padded) compiles that out. ``piece_codes`` say which warpgroups' keys each
  piece attends, applied where ``partial``. Every key block walks its query list from the
  start: the CTAs running together are neighbouring key blocks whose lists overlap, so at any
  time they add into a narrow band of dQ rows that stays in L2. ``gather=True``: gathered
  work items (:func:`~pallas_kernels.mosaic.common.gathered_transposed_operands`), each
  warpgroup's 64 keys from the ``key_units`` table.

  ``config.bwd_text_dq_copies`` = C > 1 with ``video_rows`` = V > 0 (the text-last sequence's
  rows before the text slots): ``dq_acc`` has ``(C - 1) * (S - V)`` rows more
  (:func:`dq_acc_shape` with ``text_copies``), and key block j adds the dQ of rows r >= V
  into row r + (j % C) * (S - V): the copies of the rows past the video, for the caller to sum
  (:func:`fold_text_copies`).
  """
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  R = WG_ROWS
  wgs = block_kv // R
  rep = heads // k.shape[2]
  if (rep > 1) != (kv_acc is not None):
    raise ValueError("kv_acc must be given exactly when k and v have fewer heads than q")
  if not fused_supported(head_dim, block_kv):
    raise ValueError(f"fused backward needs head_dim // (block_kv // 64) to be a multiple of 64, "
                     f"got head_dim={head_dim}, block_kv={block_kv}")
  dc = head_dim // wgs                      # dQ columns per compute warpgroup
  nkv = seq // block_kv
  copies = config.bwd_text_dq_copies if video_rows else 1
  if copies > 1 and not 0 < video_rows < seq:
    raise ValueError(f"video_rows must be in 1..{seq - 1} (the rows before the text slots), "
                     f"got {video_rows}")
  if dq_acc.shape[1] != seq + (copies - 1) * (seq - video_rows) and not config.bwd_dq_fragments:
    raise ValueError(f"dq_acc must have {seq + (copies - 1) * (seq - video_rows)} rows "
                     f"(dq_acc_shape with text_copies), got shape {dq_acc.shape}")
  stages = config.bwd_max_concurrent_steps
  c2 = scale * LOG2E
  interpret = config.interpret
  # config.bwd_dq_writer: the producer warpgroup issues the dQ reduce-adds. Per compute
  # warpgroup w, named barriers DQ_FULL + w (its dQ part is staged) and DQ_EMPTY + w (the
  # writer has read it), each of the warpgroup's and the producer's 256 threads.
  dq_writer = config.bwd_dq_writer and not interpret
  # config.bwd_dq_fragments: the float32 parts staged and added in the fragments' order.
  frags = config.bwd_dq_fragments
  DQ_FULL, DQ_EMPTY = FIRST_NAMED_BARRIER, FIRST_NAMED_BARRIER + wgs
  pair = 2 * 128
  # 240/24 with two compute warpgroups: with 232/40 the compute loop reloads spilled wgmma
  # descriptors from local memory at every step (docs/PERFORMANCE.md).
  compute_regs, producer_regs = (240, 24) if wgs == 2 else (240, 40)

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, h2g_ref, idx_ref, cnt_ref,
             bias_ref, code_ref, order_ref, *refs):
    # Gathered work items: each warpgroup's key unit comes from a table.
    units_ref, refs = (refs[0], refs[1:]) if gather else (None, refs)
    dq_ref, dk_ref, dv_ref, *refs = refs
    sc = bind_scratch(scratch, refs)
    # One buffer for the per-row float32 vectors (each SMEM allocation is 1 KiB aligned):
    # lse and delta per pipeline slot, key bias per warpgroup.
    lse_smem = sc.vec.at[pl.ds(0, stages)]
    delta_smem = sc.vec.at[pl.ds(stages, stages)]
    bias_smem = sc.vec.at[pl.ds(2 * stages, wgs)]
    ki, hi, bi, wg, grp, steps = cta_position("k", h2g_ref, cnt_ref, order_ref)

    def q_row(step):
      return idx_ref[grp, ki, step] * R

    def dq_row(row):
      """The accumulator row a piece at query ``row`` adds its dQ into: past the video, in
      this key block's copy of the text rows (config.bwd_text_dq_copies)."""
      if copies == 1:
        return row
      text = seq - video_rows
      return row + jnp.where(row >= video_rows, lax.rem(ki, copies) * text, 0)

    def my_barrier(base: int, **kw):
      """The dQ writer's named barrier ``base`` + this compute warpgroup's index."""
      named_barrier(base, pair, plus_warpgroup=True, **kw)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(compute_regs, action="increase")
      my = pl.ds(wg * R, R)                       # this warpgroup's 64 keys of the block
      k_mine, v_mine = sc.k.at[my], sc.v.at[my]
      rows = pl.ds(units_ref[grp, ki, wg] * R if gather else ki * block_kv + wg * R, R)
      hk = lax.div(hi, rep) if rep > 1 else hi
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hk], k_mine, sc.kv_bar.at[wg * 3])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hk], v_mine, sc.kv_bar.at[wg * 3 + 1])
      if masked:
        plgpu.copy_gmem_to_smem(key_bias_rows(bias_ref, bi, rows), bias_smem.at[wg],
                                sc.kv_bar.at[wg * 3 + 2])
      for t in range(3 if masked else 2):
        plgpu.barrier_wait(sc.kv_bar.at[wg * 3 + t])
      if wgs > 1:
        # The dQ product reads all keys of the block: wait for the other half too.
        plgpu.barrier_arrive(sc.done_bar)
        plgpu.barrier_wait(sc.done_bar)
      k_cols = sc.k.at[:, pl.ds(wg * dc, dc)] if wgs > 1 else sc.k
      key_bias = (plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                  if masked else None)
      # Schedule indices are never negative: min(index, 0) is zero at run time, unknown to the
      # compiler (config.bwd_step_descriptors).
      opaque_zero = jnp.minimum(idx_ref[grp, ki, 0], 0) if config.bwd_step_descriptors else None

      def key_operands(step):
        """(K, V of this warpgroup's keys, the dQ product's key columns) as SMEM refs. With
        ``bwd_step_descriptors`` their offsets hold ``step & opaque_zero`` (zero), so their
        wgmma descriptors are computed in the step, not hoisted before the loop."""
        if opaque_zero is None:
          return k_mine, v_mine, k_cols
        z = lax.bitwise_and(step, opaque_zero) * R
        mine = pl.ds(pl.multiple_of(wg * R + z, R), R)
        cols = sc.k.at[:, pl.ds(pl.multiple_of(wg * dc + z, 64), dc)] if wgs > 1 else sc.k
        return sc.k.at[mine], sc.v.at[mine], cols

      def piece_inputs(step):
        """(slot, dS buffer, this piece's ``attends`` flag or None) of pipeline ``step``."""
        attends = piece_attends(code_ref[grp, ki, step], wg) if partial else None
        return lax.rem(step, stages), lax.rem(step, 2), attends

      def share_ds(ds16, dslot):
        """dS^T to shared memory for the dQ product, which reads both warpgroups' halves."""
        sc.ds.at[dslot, my][...] = ds16
        plgpu.commit_smem()
        if wgs > 1:
          plgpu.barrier_arrive(sc.ds_bar)
          plgpu.barrier_wait(sc.ds_bar)

      def add_dq(dq, step, row=None):
        """Reduce-adds this piece's dQ columns [64, dc] into the GMEM accumulator (at query
        ``row``, read from the schedule where None). The previous reduce-add must have finished
        reading the buffer (a second buffer with one reduce-add left in flight measured
        slower: docs/PERFORMANCE_ARCHIVE.md)."""
        dq_buf = sc.dq.at[wg]
        # (A function: with row None the schedule's row is read only where it is used.)
        target = lambda: dq_part(dq_ref, bi, dq_row(q_row(step) if row is None else row),
                                 hi * wgs + wg)
        if dq_writer:
          # The writer has read the previous piece's part; this one is handed over without
          # waiting for it to be taken.
          my_barrier(DQ_EMPTY, wait=True)
          stage(dq_buf, dq)
          my_barrier(DQ_FULL, wait=False, fence_smem=True)
          # A TMA store in the loop that never runs (schedule indices are never negative):
          # without any, ptxas spills 136 bytes here and serializes every wgmma of the
          # kernel (C7512; the default kernel with its TMA issue deleted does the same).
          never = idx_ref[grp, ki, 0] < 0
          dst = target()
          pl.when(never)(lambda: plgpu.copy_smem_to_gmem(dq_buf, dst, reduction_op="add"))
          return
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        stage(dq_buf, dq)
        plgpu.commit_smem()
        dst_ref = target()
        if interpret:
          _interpret_reduce_add(dq_buf, dst_ref, sc.dq_interp.at[wg], sc.interp_bar.at[wg])
        else:
          plgpu.copy_smem_to_gmem(dq_buf, dst_ref, reduction_op="add")

      def scores_and_ds(slot, attends, k_wg, v_wg):
        """P^T and dS^T [64 keys, 64 queries] float32 of one piece. S^T = K Q^T and
        dP^T = V dO^T are issued back to back; the exponent runs while dP^T is computed."""
        def products(s_acc, dp_acc):
          plgpu.barrier_wait(sc.q_bar.at[slot])
          plgpu.wgmma(s_acc, k_wg, sc.q.at[slot].T)
          plgpu.barrier_wait(sc.do_bar.at[slot])
          plgpu.wgmma(dp_acc, v_wg, sc.do.at[slot].T)
          # config.bwd_early_loads: the lse's shared-memory load completes under S^T.
          lse2 = (piece_lse2(slot, lse_smem=lse_smem, lse_bar=sc.lse_bar)
                  if config.bwd_early_loads else None)
          s = plgpu.wgmma_accumulator_load(s_acc, wait_n=1)
          pt = piece_probabilities(s, slot, lse_smem=lse_smem, lse_bar=sc.lse_bar, c2=c2,
                                   key_bias=key_bias, attends=attends, lse2=lse2)
          plgpu.barrier_wait(sc.delta_bar.at[slot])
          dlt = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
          dpt = plgpu.wgmma_accumulator_load(dp_acc, wait_n=0)
          return pt, pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))

        acc = lambda: plgpu.ACC((R, R), jnp.float32)
        return pl.run_scoped(products, acc(), acc())

      def loop_in_place(dk_acc, dv_acc):
        """GPU: dK and dV stay in wgmma accumulators for the whole loop; each piece issues
        dV += P^T dO, then dQ = dS K and dK += dS^T Q, and stores dQ while dK runs."""

        @pl.loop(0, steps)
        def _(step):
          slot, dslot, attends = piece_inputs(step)
          k_wg, v_wg, k_cols_wg = key_operands(step)
          # config.bwd_early_loads: the dQ target's row read from GMEM before the products,
          # so the load completes under them.
          row = q_row(step) if config.bwd_early_loads and not dq_writer else None
          pt, dst = scores_and_ds(slot, attends, k_wg, v_wg)
          pt16, ds16 = pt.astype(dtype), dst.astype(dtype)
          plgpu.wgmma(dv_acc, pt16, sc.do.at[slot])
          share_ds(ds16, dslot)

          def dq_product(dq_acc):
            # (dQ's accumulator is allocated after the wait: its zero fill then folds into
            # the first wgmma.)
            plgpu.wgmma(dq_acc, sc.ds.at[dslot].T, k_cols_wg)
            plgpu.wgmma(dk_acc, ds16, sc.q.at[slot])
            return plgpu.wgmma_accumulator_load(dq_acc, wait_n=1)   # dV and dQ done

          dq = pl.run_scoped(dq_product, plgpu.ACC((R, dc), jnp.float32))
          add_dq(dq, step, row)
          plgpu.wgmma_wait(0)                                       # dK done: slot free
          plgpu.barrier_arrive(sc.free_bar.at[slot])

        return dk_acc[...], dv_acc[...]

      def loop_interpreted():
        """GPU interpret mode (no register A operand, no stores into an accumulator): the
        same products and waits, dK and dV carried as values, products added."""
        a_smem = sc.a_interp.at[wg]

        def body(step, carry):
          dk, dv = carry
          slot, dslot, attends = piece_inputs(step)
          k_wg, v_wg, k_cols_wg = key_operands(step)
          pt, dst = scores_and_ds(slot, attends, k_wg, v_wg)
          pt16, ds16 = pt.astype(dtype), dst.astype(dtype)
          dv = mma_accumulate(dv, pt16, sc.do.at[slot], config, a_smem=a_smem)
          share_ds(ds16, dslot)

          def dq_product(dq_acc):
            plgpu.wgmma(dq_acc, sc.ds.at[dslot].T, k_cols_wg)
            return dq_acc[...]

          add_dq(pl.run_scoped(dq_product, plgpu.ACC((R, dc), jnp.float32)), step)
          dk = mma_accumulate(dk, ds16, sc.q.at[slot], config, a_smem=a_smem)
          plgpu.barrier_arrive(sc.free_bar.at[slot])
          return dk, dv
        zeros = plgpu.layout_cast(jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)
        return lax.fori_loop(0, steps, body, (zeros, zeros))

      if interpret:
        dk, dv = loop_interpreted()
      else:
        dk, dv = pl.run_scoped(loop_in_place, plgpu.ACC((R, head_dim), jnp.float32),
                               plgpu.ACC((R, head_dim), jnp.float32))
      plgpu.wait_smem_to_gmem(0)
      dk = dk * scale
      if rep > 1:
        # The group's query heads add into float32 accumulators, in column chunks of dc
        # through this warpgroup's dQ staging buffer (free after the loop, once the writer
        # has read the last piece's part).
        if dq_writer:
          my_barrier(DQ_EMPTY, wait=True)
        for acc_ref, grad in ((dk_ref, dk), (dv_ref, dv)):
          for c in range(wgs):
            buf = sc.dq.at[wg]
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)
            stage(buf, grad[:, c * dc:(c + 1) * dc])
            plgpu.commit_smem()
            dst = dq_part(acc_ref, bi, rows.start, hk * wgs + c)
            if interpret:
              _interpret_reduce_add(buf, dst, sc.dq_interp.at[wg], sc.interp_bar.at[wg])
            else:
              plgpu.copy_smem_to_gmem(buf, dst, reduction_op="add")
        plgpu.wait_smem_to_gmem(0)
        return
      if wgs > 1:
        # sc.k / sc.v become the output staging: the other warpgroup's last dQ product
        # must be done reading this warpgroup's keys.
        plgpu.barrier_arrive(sc.done_bar)
        plgpu.barrier_wait(sc.done_bar)
      store_kv_grads(dk, dv, k_mine, v_mine, dk_ref.at[bi, rows, hi], dv_ref.at[bi, rows, hi])

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(producer_regs, action="decrease")
      write_dq = None
      if dq_writer:
        def hand_back():
          for w in range(wgs):
            named_barrier(DQ_EMPTY + w, pair, wait=False)

        # The staging buffers start free. Every phase a compute warpgroup waits for is
        # handed back once: before each piece's store and, with grouped k/v, before the
        # epilogue's reuse of the buffer (so no arrival is left over where a key block has
        # no piece).
        if rep > 1:
          hand_back()
        else:
          pl.when(steps > 0)(hand_back)

        def write_dq(step):
          """Reduce-adds the dQ parts of ``step`` (staged before the step's slot was freed)
          and hands the buffers back once read (after the last step only where the compute
          warpgroups reuse them: grouped k/v)."""
          row = dq_row(q_row(step))
          for w in range(wgs):
            named_barrier(DQ_FULL + w, pair, wait=True)
            plgpu.copy_smem_to_gmem(sc.dq.at[w], dq_part(dq_ref, bi, row, hi * wgs + w),
                                    reduction_op="add")
          plgpu.wait_smem_to_gmem(0, wait_read_only=True)
          if rep > 1:
            hand_back()
          else:
            pl.when(step + 1 < steps)(hand_back)

      stream_q_pieces(q_ref, do_ref, lse_ref, delta_ref, sc.q, sc.do, lse_smem, delta_smem,
                       sc.q_bar, sc.do_bar, sc.lse_bar, sc.delta_bar, sc.free_bar, q_row, steps,
                       stages, bi, hi, on_freed=write_dq)
      if dq_writer:
        plgpu.wait_smem_to_gmem(0)

  def dq_part(acc_ref, b, row, col_head):
    """The float32 accumulator's part for the 64 rows from ``row`` and one warpgroup's
    columns (``col_head``: head * wgs + warpgroup)."""
    if frags:
      return acc_ref.at[b, lax.div(row, R), col_head]
    return acc_ref.at[b, pl.ds(row, R), col_head]

  def stage(buf, x):
    """x [64, dc] float32 (WGMMA layout) into a staging buffer of ``sc.dq``. (GPU interpret
    mode runs no inline Mosaic GPU code: there the fragments' order is the value's
    rearrangement, dq_fragments.fragments_of_part.)"""
    if frags and interpret:
      buf[...] = dq_fragments.fragments_of_part(x)
    elif frags:
      dq_fragments.store_fragments(x, buf)
    else:
      buf[...] = x

  tr = smem_transforms(dtype)
  scratch = FusedScratch(
      k=plgpu.SMEM((block_kv, head_dim), dtype, transforms=tr),
      v=plgpu.SMEM((block_kv, head_dim), dtype, transforms=tr),
      ds=plgpu.SMEM((2, block_kv, R), dtype, transforms=tr),
      dq=(plgpu.SMEM((wgs, *dq_fragments.part_shape(dc)), jnp.float32) if frags else
          plgpu.SMEM((wgs, R, dc), jnp.float32, transforms=_F32_SMEM_TRANSFORMS)),
      vec=plgpu.SMEM((2 * stages + wgs, R), jnp.float32),
      kv_bar=plgpu.Barrier(num_barriers=wgs * 3),
      **piece_stream_scratch(dtype, head_dim, stages, wgs),
      ds_bar=plgpu.Barrier(num_arrivals=wgs),
      done_bar=plgpu.Barrier(num_arrivals=wgs),
      a_interp=plgpu.SMEM((wgs, R, R), dtype) if interpret else None,
      dq_interp=(plgpu.SMEM((wgs, *dq_fragments.part_shape(dc)) if frags else (wgs, R, dc),
                            jnp.float32) if interpret else None),
      interp_bar=plgpu.Barrier(num_barriers=wgs) if interpret else None,
  )
  out = jax.ShapeDtypeStruct(k.shape, dtype)
  return plgpu.kernel(
      kernel, out_type=(out, out) if rep == 1 else (), scratch_types=allocated(scratch),
      **launch_grid(nkv, heads, batch, "k"), num_threads=wgs + 1,
      thread_name="wg",
      compiler_params=compiler_params(config, auto_barriers=config.fused_bwd_auto_barriers),
      interpret=interpret_params(config),
  )(q, k, v, do, lse, delta, *present(ops), dq_acc, *(kv_acc or ()))


def dq_acc_shape(q_shape, block_kv: int, fragments: bool = False,
                 text_copies: tuple[int, int] = (1, 0)) -> tuple[int, ...]:
  """float32 dQ accumulator shape: [B, S, H * wgs, D // wgs] (one column half per compute
  warpgroup of a ``block_kv``-row key block: its reduce-add target is a plain slice), or with
  ``fragments`` [B, S // 64, H * wgs, D // (4 * wgs), 256] (:func:`dq_fragments.acc_shape`).
  ``text_copies`` = (C, V): C copies of the rows from V on (``bwd_text_dq_copies``), the
  extra ones after row S."""
  if fragments:
    return dq_fragments.acc_shape(q_shape, block_kv)
  batch, seq, heads, head_dim = q_shape
  wgs = block_kv // WG_ROWS
  copies, video_rows = text_copies
  extra = (copies - 1) * (seq - video_rows) if copies > 1 else 0
  return batch, seq + extra, heads * wgs, head_dim // wgs


def fold_text_copies(acc: jax.Array, seq: int, video_rows: int) -> jax.Array:
  """acc [B, S + (C - 1) * (S - V), ...] (:func:`dq_acc_shape` with ``text_copies``) ->
  [B, S, ...]: rows V.. S plus their C - 1 copies after row S."""
  if acc.shape[1] == seq:
    return acc
  text = seq - video_rows
  copies = acc[:, seq:].reshape(acc.shape[0], -1, text, *acc.shape[2:]).sum(axis=1)
  return jnp.concatenate([acc[:, :video_rows], acc[:, video_rows:seq] + copies], axis=1)


def acc_rows(acc: jax.Array, shape, fragments: bool = False) -> jax.Array:
  """[B, S, H, D] float32 rows of an accumulator of :func:`dq_acc_shape` ``(shape, ...)``."""
  return dq_fragments.from_fragments(acc, shape) if fragments else acc.reshape(shape)


def _interpret_reduce_add(src_smem, dst_gmem, tmp_smem, bar):
  """dst += src through SMEM (interpret mode only: no TMA reduce-add there; CTAs run one at a
  time, so the read-add-write is not racing another CTA)."""
  plgpu.copy_gmem_to_smem(dst_gmem, tmp_smem, bar)
  plgpu.barrier_wait(bar)
  tmp_smem[...] = tmp_smem[...] + src_smem[...]
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(tmp_smem, dst_gmem)
  plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("scale", "config", "block_kv",
                                             "masked", "partial", "gather", "video_rows"))
def fused_backward_jit(q, k, v, o, lse, do, ops, dlse=None, *, scale, config, block_kv, masked=True,
                       partial=False, gather=False, video_rows: int = 0):
  """(dq, dk, dv) in q.dtype. ``delta = sum(o * do)``, the dQ accumulator's zero fill and its
  final scale and cast are XLA ops around the kernel (memory-bound, about 2 ms together at the
  paper shape: docs/PERFORMANCE.md). Operands as ``transposed_operands`` (or, ``gather``,
  ``gathered_transposed_operands``); ``dlse`` (float32 [B, H, S] or None): the cotangent of
  the lse output. ``video_rows``: where the text slots start, for
  ``config.bwd_text_dq_copies`` (0: no copies)."""
  f32 = jnp.float32
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
  if dlse is not None:
    # A cotangent g of the lse adds p * g to dS: the same as delta - g.
    delta = delta - dlse
  # A mutable ref: the kernel adds into it in place (TMA reduce-add needs the zeros first).
  frags = config.bwd_dq_fragments
  copies = (config.bwd_text_dq_copies, video_rows) if video_rows else (1, 0)
  dq_acc = jax.new_ref(jnp.zeros(dq_acc_shape(q.shape, block_kv, frags, copies), f32))
  if k.shape[2] == q.shape[2]:
    dk, dv = fused_backward_call(q, k, v, do, lse, delta, ops, dq_acc, scale=scale,
                                 block_kv=block_kv, config=config, masked=masked,
                                 partial=partial, gather=gather, video_rows=video_rows)
  else:
    # Grouped k/v: the group's dK/dV sums in float32, rounded once.
    kv_acc = tuple(jax.new_ref(jnp.zeros(dq_acc_shape(k.shape, block_kv, frags), f32))
                   for _ in range(2))
    fused_backward_call(q, k, v, do, lse, delta, ops, dq_acc, scale=scale, block_kv=block_kv,
                        config=config, masked=masked, partial=partial, kv_acc=kv_acc,
                        gather=gather, video_rows=video_rows)
    dk, dv = (acc_rows(a[...], k.shape, frags).astype(k.dtype) for a in kv_acc)
  acc = fold_text_copies(dq_acc[...], q.shape[1], video_rows) if video_rows else dq_acc[...]
  dq = (acc_rows(acc, q.shape, frags) * scale).astype(q.dtype)
  return dq, dk, dv
