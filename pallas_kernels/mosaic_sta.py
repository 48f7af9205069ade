"""Hopper (sm_90) block-sparse STA kernels in Pallas Mosaic GPU: the product's fast path.

Forward kernel, per CTA (one query block of ``block_q`` = 128 rows, one head, one batch entry):
two compute warpgroups own 64-row slices of the query block (both slices sit in the same STA
tile, so they share one key list), and a producer warpgroup streams the scheduled K/V blocks
with TMA, ``max_concurrent_steps`` stages deep. The key list ``kv_index[g, i, :kv_count[g, i]]``
and its length are read from GMEM (Pallas has no scalar prefetch on the GPU), so one compiled
kernel serves every window and the loop bound is dynamic (text rows are dense, video rows are
not). Online softmax in registers with exp2 and the softmax scale folded into one FMA.

Backward: ``delta = sum(o * do)`` outside, then two kernels: dQ (same streaming shape as the
forward: loop over the query block's key list) and dK/dV (per key block, loop over the
transposed list ``q_index[g, j, :q_count[g, j]]``; each scheduled 128-row query block is
streamed as two 64-row halves so the warpgroup's accumulators stay in registers).

Layouts: q, k, v, o, do: [batch, seq, heads, head_dim] (TMA reads the strided [rows, head_dim]
slices directly, no transpose); lse, delta: [batch, heads, seq] float32 (natural-log lse;
rows that attend nothing: o = 0, lse = +inf). seq is the schedule's padded ``seq_len``.

Shared memory holds bf16/fp16 (the wgmma path); float32 inputs are rejected by ``check``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsta.schedule import BlockSchedule, block_schedule
from jsta.spec import STASpec

_LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
_WG_ROWS = 64          # rows per compute warpgroup (wgmma M)
_SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
_SUPPORTED_HEAD_DIMS = (64, 128)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tuning knobs of the Mosaic GPU kernels.

  block_q: query rows per CTA = 64 * compute warpgroups (128: two compute warpgroups).
  block_kv: key rows per pipeline step (64 or 128).
  max_concurrent_steps: TMA pipeline depth (2..4); bounded by shared memory.
  use_schedule_barrier: ping-pong the two compute warpgroups (FA3 style) so one does softmax
    while the other's wgmma runs.
  bwd_max_concurrent_steps: pipeline depth of the backward kernels.
  interpret: run in GPU interpret mode on the CPU (tests only; slow).
  """

  block_q: int = 128
  block_kv: int = 128
  max_concurrent_steps: int = 2
  use_schedule_barrier: bool = True
  bwd_max_concurrent_steps: int = 2
  interpret: bool = False

  def __post_init__(self):
    if self.block_q not in (64, 128):
      raise ValueError(f"block_q must be 64 or 128 (64 rows per compute warpgroup), got {self.block_q}")
    if self.block_kv not in (64, 128):
      raise ValueError(f"block_kv must be 64 or 128, got {self.block_kv}")
    for name in ("max_concurrent_steps", "bwd_max_concurrent_steps"):
      v = getattr(self, name)
      if not 2 <= v <= 4:
        raise ValueError(f"{name} must be in 2..4, got {v}")

  @property
  def compute_wgs(self) -> int:
    return self.block_q // _WG_ROWS


def _compiler_params():
  return plgpu.CompilerParams(approx_math=True)


def _interpret(config: MosaicConfig):
  return plgpu.InterpretGPUParams() if config.interpret else None


def _smem_transforms(dtype):
  # 128-byte swizzle over 64-element rows: valid for both 2-byte dtypes (bf16, fp16).
  del dtype
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _schedule_operands(sched: BlockSchedule):
  """int32 GMEM operands: head->group, kv lists/counts, per-key-block mask flag, key bias."""
  bias = np.where(sched.key_valid, 0.0, -np.inf).astype(np.float32)
  return (jnp.asarray(sched.head_to_group, jnp.int32), jnp.asarray(sched.kv_index, jnp.int32),
          jnp.asarray(sched.kv_count, jnp.int32),
          jnp.asarray(sched.kv_needs_mask.astype(np.int32)), jnp.asarray(bias))


def _mma_accumulate(acc, a, b_smem, config: MosaicConfig, after_issue=None, a_smem=None):
  """acc + a @ b with wgmma, ``a`` in registers.

  On the GPU the accumulator is updated in place (``pl.run_state`` over ``ACC.init``) and ``a``
  stays in registers. GPU interpret mode has no rule for either, so there ``a`` goes through the
  SMEM scratch ``a_smem`` and the product into a fresh ``run_scoped`` accumulator that is added
  (same math).
  """
  if not config.interpret:
    def body(acc_ref):
      plgpu.wgmma(acc_ref, a, b_smem)
      if after_issue is not None:
        after_issue()
    return pl.run_state(body)(plgpu.ACC.init(acc))

  a_smem[...] = a
  plgpu.commit_smem()

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]
  return acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))


# ------------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------------
def _forward_call(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, *, scale: float,
                  config: MosaicConfig):
  """o [B,S,H,D] q.dtype, lse [B,H,S] float32 (natural log) over the schedule's key lists."""
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
    qi = lax.axis_index("q")
    hi = lax.axis_index("h")
    bi = lax.axis_index("b")
    wg = lax.axis_index("wg")
    grp = h2g_ref[hi]
    cnt = cnt_ref[grp, qi]

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

      def fetch(step, slot):
        kb = idx_ref[grp, qi, step]
        rows = pl.ds(kb * bk, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_bar.at[slot])

      for i in range(stages):
        pl.when(i < cnt)(functools.partial(fetch, i, i))

      @pl.loop(0, jnp.maximum(cnt - stages, 0))
      def _(step):
        slot = lax.rem(step, stages)
        kb = idx_ref[grp, qi, step + stages]
        rows = pl.ds(kb * bk, bk)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_bar.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_bar.at[slot])

      # Observe the last consumer arrivals too, so every barrier phase is waited for once
      # (the interpreter checks this; on the GPU it only keeps the producer until the end).
      @pl.loop(jnp.maximum(cnt - stages, 0), cnt)
      def _(step):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

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
  # Query blocks vary fastest, so neighbouring tiles of one head run together and share their
  # K/V blocks through L2.
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch, grid=(nq, heads, batch),
      grid_names=("q", "h", "b"), num_threads=wgs + 1, thread_name="wg",
      compiler_params=_compiler_params(), interpret=_interpret(config),
  )(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias)


@functools.partial(jax.jit, static_argnames=("scale", "config"))
def _forward_jit(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, *, scale, config):
  return _forward_call(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, scale=scale,
                       config=config)


def forward(q, k, v, sched: BlockSchedule, scale: float, config: MosaicConfig | None = None):
  """Returns (o [B, S, H, D] in q.dtype, lse [B, H, S] float32) on the schedule's seq.

  The schedule must have been built with ``block_q = config.block_q`` and
  ``block_kv = config.block_kv``.
  """
  config = config or MosaicConfig(block_q=sched.block_q, block_kv=sched.block_kv)
  if (sched.block_q, sched.block_kv) != (config.block_q, config.block_kv):
    raise ValueError(
        f"schedule blocks ({sched.block_q}, {sched.block_kv}) differ from the config's "
        f"({config.block_q}, {config.block_kv})")
  return _forward_jit(q, k, v, *_schedule_operands(sched), scale=float(scale), config=config)
