"""Forward kernel for specs with no padded key (no padded latent axis, no text padding).

This is the first measured version of the pallas_mosaic forward (commit 2681e10), kept verbatim
because on the H100 it is faster than the general forward in ``mosaic_sta`` on large windows
(paper shape, bf16, same session 2026-11-23, direct kernel calls, medians of 5):
  window (5,5,5): 116.4-117.6 ms (this) vs 162.6-165.3 ms (general forward, masked=False);
  dense window (5,7,11): 291.1 ms vs 392.1-403.5 ms;  window (3,3,3): 26.6 ms vs 25.4-26.1 ms.
The general forward differs only in how the key mask is staged (SMEM bias per step, mask path
compiled out when unpadded) and in its producer; a variant of it that re-adds the per-step
schedule read in the consumers recovered only part of the gap (147 ms), so the cause is a
timing effect of the ping-ponged consumers that still needs a device bisect. The second
session measured the general forward at 134.5 ms median but 118.4 ms fastest call on (5,5,5):
its calls spread far more than this kernel's, like the overlap forward's on long key lists
(see MOSAIC_NOTES.md). Third session: with the block axis launched first
(``MosaicConfig.blocks_fastest``) this kernel takes 110.2 ms at (5,5,5) against 103.4 ms for
the overlap forward, which "auto" now always picks; this one stays selectable
(``forward_variant="unpadded"``) and among ``autotune``'s candidates.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsta.schedule import BlockSchedule
from pallas_kernels.mosaic_sta import (MosaicConfig, _LN2, _LOG2E, _WG_ROWS, _compiler_params,
                                       _cta_position, _grid, _interpret, _mma_accumulate,
                                       _smem_transforms, _stream_kv)


def unpadded_operands(sched: BlockSchedule):
  """GMEM operands: head->group int32[H], kv lists int32[G, nq, max_kv], counts int32[G, nq],
  per-key-block mask flags int32[nkv], key bias float32[seq] (0 / -inf)."""
  bias = np.where(sched.key_valid, 0.0, -np.inf).astype(np.float32)
  return (jnp.asarray(sched.head_to_group, jnp.int32), jnp.asarray(sched.kv_index, jnp.int32),
          jnp.asarray(sched.kv_count, jnp.int32),
          jnp.asarray(sched.kv_needs_mask.astype(np.int32)), jnp.asarray(bias))


def forward_unpadded_call(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, *, scale: float,
                  config: MosaicConfig):
  """o [B,S,H,D] q.dtype, lse [B,H,S] float32 (natural log) over the schedule's key lists.

  Operands as :func:`unpadded_operands`. The key-bias branch only runs on flagged key blocks,
  so on an unpadded spec (all flags 0) it never runs; it is kept as measured (see module doc)."""
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  bq, bk = config.block_q, config.block_kv
  wgs = config.compute_wgs
  nq = seq // bq
  stages = config.max_concurrent_steps
  c2 = scale * _LOG2E                       # scores in the log2 domain, scale folded in
  use_sb = config.use_schedule_barrier and wgs == 2

  def kernel(q_ref, k_ref, v_ref, h2g_ref, idx_ref, cnt_ref, msk_ref, bias_ref, o_ref, lse_ref,
             qo_smem2, k_smem, v_smem, lse_smem2, k_bar, v_bar, q_bar, k_free, v_free, sched_bar,
             *p_smem2):
    qi, hi, bi, wg, grp, cnt = _cta_position("q", h2g_ref, cnt_ref)

    def schedule_barrier():
      if use_sb:
        plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(sched_bar)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      qo_smem = qo_smem2.at[wg]
      lse_smem = lse_smem2.at[wg]
      row0 = qi * bq + wg * _WG_ROWS
      plgpu.copy_gmem_to_smem(q_ref.at[bi, pl.ds(row0, _WG_ROWS), hi], qo_smem, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])

      m_i = plgpu.layout_cast(jnp.full((_WG_ROWS,), -jnp.inf, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      l_i = plgpu.layout_cast(jnp.full((_WG_ROWS,), 0.0, jnp.float32),
                              plgpu.Layout.WGMMA.reduce(1))
      acc = plgpu.layout_cast(jnp.full((_WG_ROWS, head_dim), 0.0, jnp.float32),
                              plgpu.Layout.WGMMA)

      @pl.when(cnt > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])

      if use_sb:
        pl.when(wg == 1)(schedule_barrier)

      def body(step, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(step, stages)

        def compute_qk(acc_ref):
          plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].T)
          schedule_barrier()
          return acc_ref[...]

        s = pl.run_scoped(compute_qk, plgpu.ACC((_WG_ROWS, bk), jnp.float32))
        plgpu.barrier_arrive(k_free.at[slot])

        kb = idx_ref[grp, qi, step]

        def add_bias(s):
          bias = plgpu.load(bias_ref.at[pl.ds(kb * bk, bk)], layout=plgpu.Layout.WGMMA.reduce(0),
                             optimized=False)
          return s + lax.broadcast_in_dim(bias, s.shape, [1])

        # Key-validity mask only on the (few) key blocks that hold padding.
        s = lax.cond(msk_ref[kb] != 0, add_bias, lambda s: s, s)

        m_new = jnp.maximum(m_i, s.max(axis=1) * c2)
        alpha = jnp.exp2(m_i - m_new)
        p = jnp.exp2(s * c2 - lax.broadcast_in_dim(m_new, s.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        l_i = l_i * alpha
        p16 = p.astype(dtype)
        l_i = l_i + p.sum(axis=1)
        acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
        if use_sb:
          plgpu.barrier_arrive(sched_bar)
        plgpu.barrier_wait(v_bar.at[slot])
        if use_sb:
          plgpu.barrier_wait(sched_bar)

        def wait_next_k():
          # Overlaps the wait for the next K block with this step's PV wgmma.
          nxt = step + 1

          @pl.when(nxt < cnt)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(nxt, stages)])

        acc = _mma_accumulate(acc, p16, v_smem.at[slot], config, after_issue=wait_next_k,
                              a_smem=p_smem2[0].at[wg] if p_smem2 else None)
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, cnt, body, (acc, m_i, l_i))
      if use_sb:
        pl.when(wg == 0)(schedule_barrier)

      live = l_i > 0.0
      inv = jnp.where(live, 1.0 / jnp.where(live, l_i, 1.0), 0.0)
      acc = acc * lax.broadcast_in_dim(inv, acc.shape, [0])
      qo_smem[...] = acc.astype(dtype)
      lse = (m_i + jnp.log2(jnp.where(live, l_i, 1.0))) * _LN2
      lse_smem[...] = jnp.where(live, lse, jnp.inf)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[bi, pl.ds(row0, _WG_ROWS), hi])
      plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[bi, hi, pl.ds(row0, _WG_ROWS)])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      _stream_kv(k_ref, v_ref, None, k_smem, v_smem, None, k_bar, v_bar, None, k_free, v_free,
                 lambda step: idx_ref[grp, qi, step], cnt, stages, bk, bi, hi)

  tr = _smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, _WG_ROWS, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, _WG_ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=wgs),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs),
  ]
  if config.interpret:
    scratch.append(plgpu.SMEM((wgs, _WG_ROWS, bk), dtype))
  out_type = (jax.ShapeDtypeStruct(q.shape, dtype),
              jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, **_grid(nq, heads, batch, config, "q"),
      num_threads=wgs + 1, thread_name="wg",
      compiler_params=_compiler_params(), interpret=_interpret(config),
  )(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias)


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def forward_unpadded_jit(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, *, scale, config):
  return forward_unpadded_call(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, scale=scale,
                               config=config)
