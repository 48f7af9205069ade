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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsta.schedule import BlockSchedule, block_schedule
from jsta.spec import STASpec
from jsta.timing import median_ms

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
  forward_variant: "auto", "overlap", "general" or "unpadded". "overlap" is the kernel of
    :mod:`pallas_kernels.mosaic_sta_fwd_overlap` (FA3's intra-warpgroup overlap), "unpadded"
    that of :mod:`pallas_kernels.mosaic_sta_unpadded` (specs with no padded key only), "general"
    the one below. "auto" is "overlap": with ``blocks_fastest`` it is the fastest at every
    window measured on the H100 paper shape (pallas_kernels/logs/session3/call2_fwd.log):
    (3,3,3) 24.1 ms against 25.4 (unpadded); (5,5,5) 103.4 against 110.2; dense 248.7
    against 261.1 (cuDNN 258.4). In the old launch order the overlap kernel lost on long key
    lists (168 ms at (5,5,5)); that was L2 misses, not the kernel.
  backward_variant: "auto", "fused" or "split". "split" runs the dQ and dK/dV kernels below
    (7 matmuls per block pair); "fused" is the one-kernel backward of
    :mod:`pallas_kernels.mosaic_sta_backward` (dQ added from the dK/dV kernel with TMA
    reduce-adds: 5 matmuls). "auto" is "fused" where it applies (``fused_supported``: head_dim
    128 with 128-row key blocks, or 64-row key blocks), else "split". H100 paper shape,
    (3,3,3): fused 75.5 ms against split 78.3 (pallas_kernels/logs/session3/call3_bwd.log);
    in the old launch order (``blocks_fastest=False``) the fused one lost, 129 against 84 ms.
    The fused one's dQ is not bitwise deterministic (float32 reduce-adds land in any order);
    "split" is.
  blocks_fastest: launch order of the CTAs. Pallas Mosaic GPU maps the *last* grid axis to
    CUDA's x, which the hardware dispatches first; True puts the query (key) block axis last,
    so the CTAs running together are neighbouring blocks of one head and share their K/V (q,
    dO, dQ rows) through L2. False is the order of the first two sessions, (block, head,
    batch): heads vary fastest and a wave of 132 CTAs spans all 24 heads.
  interpret: run in GPU interpret mode on the CPU (tests only; slow).
  """

  block_q: int = 128
  block_kv: int = 128
  max_concurrent_steps: int = 2
  use_schedule_barrier: bool = True
  bwd_max_concurrent_steps: int = 2
  forward_variant: str = "auto"
  backward_variant: str = "auto"
  blocks_fastest: bool = True
  interpret: bool = False

  def __post_init__(self):
    if self.block_q not in (64, 128):
      raise ValueError(f"block_q must be 64 or 128 (64 rows per compute warpgroup), got {self.block_q}")
    if self.block_kv not in (64, 128):
      raise ValueError(f"block_kv must be 64 or 128, got {self.block_kv}")
    if self.forward_variant not in ("auto", "general", "unpadded", "overlap"):
      raise ValueError(f"forward_variant must be 'auto', 'general', 'unpadded' or 'overlap', "
                       f"got {self.forward_variant!r}")
    if self.backward_variant not in ("auto", "fused", "split"):
      raise ValueError(f"backward_variant must be 'auto', 'fused' or 'split', got "
                       f"{self.backward_variant!r}")
    for name in ("max_concurrent_steps", "bwd_max_concurrent_steps"):
      v = getattr(self, name)
      if not 2 <= v <= 4:
        raise ValueError(f"{name} must be in 2..4, got {v}")

  @property
  def compute_wgs(self) -> int:
    return self.block_q // _WG_ROWS


def _compiler_params():
  # No SMEM reserved for cross-warp reductions: the kernels' row max/sum over the WGMMA layout
  # stay within a warp, and the 2 KiB default is what keeps a third K/V stage from fitting.
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0)


def _grid(blocks: int, heads: int, batch: int, config: MosaicConfig, block_axis: str):
  """``grid`` and ``grid_names`` for ``plgpu.kernel`` over (block, head, batch), in the launch
  order ``config.blocks_fastest`` asks for (the kernels read their indices by name)."""
  if config.blocks_fastest:
    return dict(grid=(batch, heads, blocks), grid_names=("b", "h", block_axis))
  return dict(grid=(blocks, heads, batch), grid_names=(block_axis, "h", "b"))


def _cta_position(block_axis: str, h2g_ref, cnt_ref):
  """Inside a kernel launched with :func:`_grid`: (block, head, batch, warpgroup, head group,
  the block's scheduled count ``cnt_ref[group, block]``) of the running thread."""
  blk = lax.axis_index(block_axis)
  hi = lax.axis_index("h")
  bi = lax.axis_index("b")
  wg = lax.axis_index("wg")
  grp = h2g_ref[hi]
  return blk, hi, bi, wg, grp, cnt_ref[grp, blk]


def _interpret(config: MosaicConfig):
  return plgpu.InterpretGPUParams() if config.interpret else None


def _smem_transforms(dtype):
  # 128-byte swizzle over 64-element rows: valid for both 2-byte dtypes (bf16, fp16).
  del dtype
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _schedule_operands(sched: BlockSchedule):
  """GMEM operands: head->group int32[H], kv lists int32[G, nq, max_kv] and counts
  int32[G, nq], per-step mask flags int32[G, nq, max_kv] (does step j's key block hold padding:
  one independent scalar load per step), key bias float32[seq] (0 or -inf)."""
  step_mask = sched.kv_needs_mask[sched.kv_index].astype(np.int32)
  return (jnp.asarray(sched.head_to_group, jnp.int32), jnp.asarray(sched.kv_index, jnp.int32),
          jnp.asarray(sched.kv_count, jnp.int32), jnp.asarray(step_mask),
          jnp.asarray(_key_bias(sched)))


def _key_bias(sched: BlockSchedule) -> np.ndarray:
  """float32[seq]: 0 on valid keys, -inf on padded ones (added to scores before the exponent)."""
  return np.where(sched.key_valid, 0.0, -np.inf).astype(np.float32)


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
                  config: MosaicConfig, masked: bool = True):
  """o [B,S,H,D] q.dtype, lse [B,H,S] float32 (natural log) over the schedule's key lists.

  ``masked=False`` (no key block holds padding: unpadded latent, no text padding) compiles the
  key-mask path out (no bias copies, barriers or flag loads)."""
  head_dim = q.shape[-1]
  dtype = q.dtype
  bq, bk = config.block_q, config.block_kv
  wgs = config.compute_wgs
  stages = config.max_concurrent_steps
  c2 = scale * _LOG2E                       # scores in the log2 domain, scale folded in
  use_sb = config.use_schedule_barrier and wgs == 2

  def kernel(q_ref, k_ref, v_ref, h2g_ref, idx_ref, cnt_ref, msk_ref, bias_ref, o_ref, lse_ref,
             qo_smem2, k_smem, v_smem, lse_smem2, bias_smem, k_bar, v_bar, q_bar, k_free, v_free,
             sched_bar, b_bar, *p_smem2):
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

        # Key-validity mask only on the (few) key blocks that hold padding.
        if masked:
          s = _masked_scores(s, msk_ref[grp, qi, step], bias_smem.at[slot], b_bar.at[slot])

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

      o, lse = _normalized_rows(acc, m_i, l_i)
      _store_rows(o, lse, qo_smem, lse_smem, o_ref.at[bi, pl.ds(row0, _WG_ROWS), hi],
                  lse_ref.at[bi, hi, pl.ds(row0, _WG_ROWS)])

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      _stream_kv(k_ref, v_ref, bias_ref if masked else None, k_smem, v_smem, bias_smem, k_bar,
                 v_bar, b_bar, k_free,
                 v_free, lambda step: idx_ref[grp, qi, step], cnt, stages, bk, bi, hi)

  scratch = _forward_scratch(dtype, head_dim, config, bias_rows=True,
                             sched_barrier=plgpu.Barrier(num_arrivals=wgs))
  return _launch_forward(kernel, scratch, config, q, k, v, h2g, kv_index, kv_count, kv_mask,
                         key_bias)


def _forward_scratch(dtype, head_dim: int, config: MosaicConfig, *, bias_rows: bool,
                     sched_barrier):
  """Shared memory and barriers of the general and overlap forwards, in their kernels'
  argument order: q/o staging [wgs, 64, D], K and V stages [stages, block_kv, D], lse staging
  [wgs, 64], key-bias rows [stages, block_kv] (``bias_rows=False``: a token buffer, when
  nothing is masked), K/V/Q barriers, K/V release barriers, ``sched_barrier`` (the kernel's
  ping-pong), bias barriers, and in interpret mode the P staging buffer [wgs, 64, block_kv]."""
  wgs, bk, stages = config.compute_wgs, config.block_kv, config.max_concurrent_steps
  tr = _smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, _WG_ROWS, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      plgpu.SMEM((stages, bk, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, _WG_ROWS), jnp.float32),
      # A token buffer when unused: shared memory decides the pipeline depth.
      plgpu.SMEM((stages, bk) if bias_rows else (1, 32), jnp.float32),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=wgs),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
      sched_barrier,
      plgpu.Barrier(num_barriers=stages),
  ]
  if config.interpret:
    scratch.append(plgpu.SMEM((wgs, _WG_ROWS, bk), dtype))
  return scratch


def _launch_forward(kernel, scratch, config: MosaicConfig, q, *operands):
  """Runs a forward ``kernel`` over the grid (query block, head, batch) with one producer
  warpgroup after the compute ones: (o [B,S,H,D] in q.dtype, lse [B,H,S] float32)."""
  batch, seq, heads, _ = q.shape
  out_type = (jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((batch, heads, seq), jnp.float32))
  return plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch,
      **_grid(seq // config.block_q, heads, batch, config, "q"),
      num_threads=config.compute_wgs + 1, thread_name="wg",
      compiler_params=_compiler_params(), interpret=_interpret(config),
  )(q, *operands)


@functools.partial(jax.jit, static_argnames=("scale", "config", "masked"))
def _forward_jit(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, *, scale, config,
                 masked=True):
  return _forward_call(q, k, v, h2g, kv_index, kv_count, kv_mask, key_bias, scale=scale,
                       config=config, masked=masked)


def forward_route(sched: BlockSchedule, config: MosaicConfig) -> str:
  """The forward kernel that ``config.forward_variant`` selects for ``sched``: "overlap",
  "unpadded" or "general"."""
  if config.forward_variant == "unpadded" and sched.has_masked_keys:
    raise ValueError("forward_variant='unpadded' needs a spec with no padded key (no padded "
                     "latent axis, text_len == text_max_len); use 'auto' or 'general'")
  return "overlap" if config.forward_variant == "auto" else config.forward_variant


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
  route = forward_route(sched, config)
  if route == "overlap":
    from pallas_kernels.mosaic_sta_fwd_overlap import forward_overlap_jit  # imports this module
    return forward_overlap_jit(q, k, v, *_schedule_operands(sched), scale=float(scale),
                               config=config, masked=sched.has_masked_keys)
  if route == "unpadded":
    from pallas_kernels import mosaic_sta_unpadded as unpadded  # here: it imports this module
    return unpadded.forward_unpadded_jit(q, k, v, *unpadded.unpadded_operands(sched),
                                         scale=float(scale), config=config)
  return _forward_jit(q, k, v, *_schedule_operands(sched), scale=float(scale), config=config,
                      masked=True)


# ------------------------------------------------------------------------------------------------
# Backward
# ------------------------------------------------------------------------------------------------
def _dq_call(q, k, v, do, lse, delta, h2g, kv_index, kv_count, kv_mask, key_bias, *,
             scale: float, config: MosaicConfig, masked: bool = True):
  """dq [B,S,H,D] in q.dtype: per query block, loop over its key list (as the forward)."""
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  bq, bk = config.block_q, config.block_kv
  wgs = config.compute_wgs
  nq = seq // bq
  stages = config.bwd_max_concurrent_steps
  c2 = scale * _LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, h2g_ref, idx_ref, cnt_ref, msk_ref,
             bias_ref, dq_ref, q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem,
             bias_smem, in_bar, k_bar, v_bar, k_free, v_free, b_bar, *a_smem2):
    qi, hi, bi, wg, grp, cnt = _cta_position("q", h2g_ref, cnt_ref)

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      row0 = qi * bq + wg * _WG_ROWS
      rows = pl.ds(row0, _WG_ROWS)
      plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem, in_bar.at[wg * 4])
      plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem, in_bar.at[wg * 4 + 1])
      plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem2.at[wg], in_bar.at[wg * 4 + 2])
      plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem2.at[wg], in_bar.at[wg * 4 + 3])
      for t in range(4):
        plgpu.barrier_wait(in_bar.at[wg * 4 + t])
      lse2 = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)) * _LOG2E
      dlt = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
      dq = plgpu.layout_cast(jnp.full((_WG_ROWS, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def body(step, dq):
        slot = lax.rem(step, stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def compute_s(acc_ref):
          plgpu.wgmma(acc_ref, q_smem, k_smem.at[slot].T)
          return acc_ref[...]

        s = pl.run_scoped(compute_s, plgpu.ACC((_WG_ROWS, bk), jnp.float32))
        if masked:
          s = _masked_scores(s, msk_ref[grp, qi, step], bias_smem.at[slot], b_bar.at[slot])
        p = jnp.exp2(s * c2 - lax.broadcast_in_dim(lse2, s.shape, [0]))
        plgpu.barrier_wait(v_bar.at[slot])

        def compute_dp(acc_ref):
          plgpu.wgmma(acc_ref, do_smem, v_smem.at[slot].T)
          return acc_ref[...]

        dp = pl.run_scoped(compute_dp, plgpu.ACC((_WG_ROWS, bk), jnp.float32))
        plgpu.barrier_arrive(v_free.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(dlt, dp.shape, [0]))
        dq = _mma_accumulate(dq, ds.astype(dtype), k_smem.at[slot], config,
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
      _stream_kv(k_ref, v_ref, bias_ref if masked else None, k_smem, v_smem, bias_smem, k_bar,
                 v_bar, b_bar, k_free,
                 v_free, lambda step: idx_ref[grp, qi, step], cnt, stages, bk, bi, hi)

  tr = _smem_transforms(dtype)
  scratch = [
      plgpu.SMEM((wgs, _WG_ROWS, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, _WG_ROWS, head_dim), dtype, transforms=tr),
      plgpu.SMEM((wgs, _WG_ROWS), jnp.float32),
      plgpu.SMEM((wgs, _WG_ROWS), jnp.float32),
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
  if config.interpret:
    scratch.append(plgpu.SMEM((wgs, _WG_ROWS, bk), dtype))
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(q.shape, dtype), scratch_types=scratch,
      **_grid(nq, heads, batch, config, "q"), num_threads=wgs + 1,
      thread_name="wg", compiler_params=_compiler_params(), interpret=_interpret(config),
  )(q, k, v, do, lse, delta, h2g, kv_index, kv_count, kv_mask, key_bias)


def _stream_kv(k_ref, v_ref, bias_ref, k_smem, v_smem, bias_smem, k_bar, v_bar, b_bar, k_free,
               v_free, index, cnt, stages, bk, bi, hi):
  """Producer warpgroup: TMA the scheduled K/V blocks ``index(step)`` (and their key-bias rows,
  512 bytes, for the mask), ``stages`` deep. A slot's K is refilled once both compute
  warpgroups released it after QK^T; V and the bias once they finished the step."""

  # The key-block index is read from GMEM once per step, before the waits, so the scalar
  # load's latency overlaps them (re-reading it after the v_free wait delays every V copy).
  def fetch_k(rows, slot):
    plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem.at[slot], k_bar.at[slot])

  def fetch_v(rows, slot):
    plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem.at[slot], v_bar.at[slot])
    if bias_ref is not None:
      plgpu.copy_gmem_to_smem(bias_ref.at[rows], bias_smem.at[slot], b_bar.at[slot])

  for i in range(stages):
    @pl.when(i < cnt)
    def _():
      rows = pl.ds(index(i) * bk, bk)
      fetch_k(rows, i)
      fetch_v(rows, i)

  @pl.loop(0, jnp.maximum(cnt - stages, 0))
  def _(step):
    slot = lax.rem(step, stages)
    rows = pl.ds(index(step + stages) * bk, bk)
    plgpu.barrier_wait(k_free.at[slot])
    fetch_k(rows, slot)
    plgpu.barrier_wait(v_free.at[slot])
    fetch_v(rows, slot)

  # Observe the last consumer arrivals too, so every barrier phase is waited for once
  # (the interpreter checks this; on the GPU it only keeps the producer until the end).
  @pl.loop(jnp.maximum(cnt - stages, 0), cnt)
  def _(step):
    slot = lax.rem(step, stages)
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.barrier_wait(v_free.at[slot])


def _dkdv_piece(k_wg, v_wg, slot, dv, *, q_smem, do_smem, lse_smem, delta_smem, q_bar, do_bar,
                lse_bar, delta_bar, c2, dtype, config, a_smem, key_bias=None):
  """One 64-row query piece (pipeline ``slot``) against a warpgroup's 64 keys ``k_wg``, ``v_wg``
  (SMEM [64, head_dim]), waiting for each input as it is needed. Returns
  (dv + P^T dO, dS^T float32 [64, 64]) with P^T = exp2((S^T + bias) c2 - lse), S^T = K Q^T,
  and dS^T = P^T (V dO^T - delta). Shared by the split dK/dV and the fused backward kernels.

  ``key_bias`` ([64] float32 in the WGMMA row layout, 0 or -inf per key; None when no key of
  the kernel's schedule is padded) masks padded keys before the exponent, as the forward does.
  Without it a padded key's score is not bounded by the query's lse: exp2 overflows (fp16
  holds at most 65504), and the inf reaches dK, dV and dQ."""
  R = _WG_ROWS
  plgpu.barrier_wait(q_bar.at[slot])

  def compute_st(acc_ref):
    plgpu.wgmma(acc_ref, k_wg, q_smem.at[slot].T)
    return acc_ref[...]

  st = pl.run_scoped(compute_st, plgpu.ACC((R, R), jnp.float32))
  if key_bias is not None:
    st = st + lax.broadcast_in_dim(key_bias, st.shape, [0])
  plgpu.barrier_wait(lse_bar.at[slot])
  lse2 = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0)) * _LOG2E
  pt = jnp.exp2(st * c2 - lax.broadcast_in_dim(lse2, st.shape, [1]))
  plgpu.barrier_wait(do_bar.at[slot])
  dv = _mma_accumulate(dv, pt.astype(dtype), do_smem.at[slot], config, a_smem=a_smem)

  def compute_dpt(acc_ref):
    plgpu.wgmma(acc_ref, v_wg, do_smem.at[slot].T)
    return acc_ref[...]

  dpt = pl.run_scoped(compute_dpt, plgpu.ACC((R, R), jnp.float32))
  plgpu.barrier_wait(delta_bar.at[slot])
  dlt = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  return dv, pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))


def _stream_q_pieces(q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem,
                     q_bar, do_bar, lse_bar, delta_bar, free_bar, q_row, steps, stages, bi, hi):
  """Producer warpgroup of the dK/dV kernels: TMA the 64-row query pieces starting at
  ``q_row(step)`` (q, lse, dO, delta), ``stages`` deep; a slot is refilled once both compute
  warpgroups released it (``free_bar``)."""
  R = _WG_ROWS

  def fetch(step, slot):
    rows = pl.ds(q_row(step), R)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[slot], q_bar.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[slot], lse_bar.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem.at[slot], do_bar.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[slot], delta_bar.at[slot])

  for i in range(stages):
    pl.when(i < steps)(functools.partial(fetch, i, i))

  @pl.loop(0, jnp.maximum(steps - stages, 0))
  def _(step):
    slot = lax.rem(step, stages)
    plgpu.barrier_wait(free_bar.at[slot])
    fetch(step + stages, slot)

  # Observe the last releases too: every barrier phase is waited for once.
  @pl.loop(jnp.maximum(steps - stages, 0), steps)
  def _(step):
    plgpu.barrier_wait(free_bar.at[lax.rem(step, stages)])


def _normalized_rows(acc, m_i, l_i):
  """Forward epilogue of one warpgroup's rows: (o = acc / l, natural-log lse), with o = 0 and
  lse = +inf on rows that attended nothing (l = 0). m_i is the running max in the log2
  domain. acc: [64, D] float32; m_i, l_i: [64]. A NaN l (a NaN in an attended key or value)
  counts as live, so the NaN reaches the output as in dense attention."""
  live = l_i != 0.0
  inv = jnp.where(live, 1.0 / jnp.where(live, l_i, 1.0), 0.0)
  lse = (m_i + jnp.log2(jnp.where(live, l_i, 1.0))) * _LN2
  return acc * lax.broadcast_in_dim(inv, acc.shape, [0]), jnp.where(live, lse, jnp.inf)


def _store_rows(o, lse, o_smem, lse_smem, o_gmem, lse_gmem):
  """Writes a warpgroup's o [64, D] (cast to o_smem's dtype) and lse [64] to GMEM through
  their SMEM staging buffers, and waits for the copies."""
  o_smem[...] = o.astype(o_smem.dtype)
  lse_smem[...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem)
  plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
  plgpu.wait_smem_to_gmem(0)


def _store_kv_grads(dk, dv, k_smem, v_smem, dk_gmem, dv_gmem):
  """Writes dk, dv [rows, D] (cast to the staging buffers' dtype) to GMEM through the SMEM that
  held the block's K and V, and waits for the copies."""
  k_smem[...] = dk.astype(k_smem.dtype)
  v_smem[...] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_gmem)
  plgpu.copy_smem_to_gmem(v_smem, dv_gmem)
  plgpu.wait_smem_to_gmem(0)


def _masked_scores(s, needs_mask, bias_smem, bias_bar):
  """Adds the key bias (0 / -inf per key) of this step's key block when it holds padding.

  The bias row always arrives (its barrier phase must be consumed), but it is only read from
  SMEM on flagged blocks, so unpadded blocks pay one barrier wait and no arithmetic."""
  plgpu.barrier_wait(bias_bar)

  def add(s):
    bias = plgpu.load(bias_smem, layout=plgpu.Layout.WGMMA.reduce(0))
    return s + lax.broadcast_in_dim(bias, s.shape, [1])

  return lax.cond(needs_mask != 0, add, lambda s: s, s)


def _dkdv_call(q, k, v, do, lse, delta, h2g, q_index, q_count, key_bias, *,
               scale: float, block_q: int, block_kv: int, config: MosaicConfig,
               masked: bool = True):
  """dk, dv [B,S,H,D]: per key block (64 rows per compute warpgroup), loop over the query
  blocks of the transposed schedule, each streamed as 64-row pieces (q, do, lse, delta).
  ``key_bias`` float32[seq] (0 or -inf per key) masks padded keys; ``masked=False`` (no key of
  the schedule is padded) compiles it out."""
  batch, seq, heads, head_dim = q.shape
  dtype = q.dtype
  wgs = block_kv // _WG_ROWS
  nkv = seq // block_kv
  pieces = block_q // _WG_ROWS            # 64-row pieces per scheduled query block
  stages = min(4, max(2, config.bwd_max_concurrent_steps * 2))
  c2 = scale * _LOG2E
  R = _WG_ROWS

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, h2g_ref, idx_ref, cnt_ref,
             bias_ref, dk_ref, dv_ref, k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem,
             bias_smem, kv_bar, q_bar, do_bar, lse_bar, delta_bar, free_bar, *a_smem2):
    ki, hi, bi, wg, grp, count = _cta_position("k", h2g_ref, cnt_ref)
    steps = count * pieces

    def q_row(step):
      return idx_ref[grp, ki, step // pieces] * block_q + lax.rem(step, pieces) * R

    @pl.when(wg < wgs)
    def _compute():
      plgpu.set_max_registers(232 if wgs == 2 else 240, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      row0 = ki * block_kv + wg * R
      rows = pl.ds(row0, R)
      plgpu.copy_gmem_to_smem(k_ref.at[bi, rows, hi], k_smem, kv_bar.at[wg * 3])
      plgpu.copy_gmem_to_smem(v_ref.at[bi, rows, hi], v_smem, kv_bar.at[wg * 3 + 1])
      if masked:
        plgpu.copy_gmem_to_smem(bias_ref.at[rows], bias_smem.at[wg], kv_bar.at[wg * 3 + 2])
      for t in range(3 if masked else 2):
        plgpu.barrier_wait(kv_bar.at[wg * 3 + t])
      key_bias = (plgpu.load(bias_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
                  if masked else None)
      zeros = plgpu.layout_cast(jnp.full((R, head_dim), 0.0, jnp.float32), plgpu.Layout.WGMMA)

      def body(step, carry):
        dk, dv = carry
        slot = lax.rem(step, stages)
        a_smem = a_smem2[0].at[wg] if a_smem2 else None
        dv, dst = _dkdv_piece(k_smem, v_smem, slot, dv, q_smem=q_smem, do_smem=do_smem,
                              lse_smem=lse_smem, delta_smem=delta_smem, q_bar=q_bar,
                              do_bar=do_bar, lse_bar=lse_bar, delta_bar=delta_bar, c2=c2,
                              dtype=dtype, config=config, a_smem=a_smem, key_bias=key_bias)
        dk = _mma_accumulate(dk, dst.astype(dtype), q_smem.at[slot], config, a_smem=a_smem)
        plgpu.barrier_arrive(free_bar.at[slot])
        return dk, dv

      # Padded keys get P^T = 0 from the bias, so their dK and dV rows come out exactly zero.
      dk, dv = lax.fori_loop(0, steps, body, (zeros, zeros))
      _store_kv_grads(dk * scale, dv, k_smem, v_smem, dk_ref.at[bi, rows, hi],
                      dv_ref.at[bi, rows, hi])

    @pl.when(wg == wgs)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      _stream_q_pieces(q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem,
                       q_bar, do_bar, lse_bar, delta_bar, free_bar, q_row, steps, stages, bi, hi)

  tr = _smem_transforms(dtype)
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
      **_grid(nkv, heads, batch, config, "k"), num_threads=wgs + 1,
      thread_name="wg", compiler_params=_compiler_params(), interpret=_interpret(config),
  )(q, k, v, do, lse, delta, h2g, q_index, q_count, key_bias)


@functools.partial(jax.jit,
                   static_argnames=("scale", "config", "block_q", "block_kv_dkv", "masked"))
def _backward_jit(q, k, v, o, lse, do, h2g, kv_index, kv_count, kv_mask, key_bias,
                  h2g_t, q_index, q_count, key_bias_t, *, scale, config, block_q,
                  block_kv_dkv, masked=True):
  f32 = jnp.float32
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))
  dq = _dq_call(q, k, v, do, lse, delta, h2g, kv_index, kv_count, kv_mask, key_bias,
                scale=scale, config=config, masked=masked)
  dk, dv = _dkdv_call(q, k, v, do, lse, delta, h2g_t, q_index, q_count, key_bias_t,
                      scale=scale, block_q=block_q, block_kv=block_kv_dkv, config=config,
                      masked=masked)
  return dq, dk, dv


def _use_fused_backward(head_dim: int, block_kv_dkv: int, config: MosaicConfig) -> bool:
  from pallas_kernels.mosaic_sta_backward import fused_supported
  if config.backward_variant == "fused" and not fused_supported(head_dim, block_kv_dkv):
    raise ValueError(f"backward_variant='fused' needs head_dim // (block_kv // 64) to be a "
                     f"multiple of 64 (head_dim={head_dim}, dK/dV key block {block_kv_dkv}); "
                     "use 'auto' or 'split'")
  if config.backward_variant == "auto":
    return fused_supported(head_dim, block_kv_dkv)
  return config.backward_variant == "fused"


def transposed_operands(sched: BlockSchedule):
  """(block_kv of the dK/dV kernels, their operands): key blocks of 128 rows where the tile
  allows (two compute warpgroups), with the transposed schedule of the same query blocks:
  head->group int32[H], q lists int32[G, nkv, max_q], counts int32[G, nkv], key bias
  float32[seq] (0 or -inf per key)."""
  bkd = 128 if sched.spec.tile_size % 128 == 0 else 64
  sched_t = block_schedule(sched.spec, sched.num_heads, sched.block_q, bkd)
  if sched_t.seq_len != sched.seq_len:
    bkd, sched_t = sched.block_kv, sched
  return bkd, (jnp.asarray(sched_t.head_to_group, jnp.int32),
               jnp.asarray(sched_t.q_index, jnp.int32), jnp.asarray(sched_t.q_count, jnp.int32),
               jnp.asarray(_key_bias(sched_t)))


def backward(q, k, v, o, lse, do, sched: BlockSchedule, scale: float,
             config: MosaicConfig | None = None):
  """(dq, dk, dv) in the input dtypes from the saved natural-log ``lse`` (+inf on rows that
  attend nothing or are invalid). dK/dV use key blocks of 128 rows where the tile allows
  (two compute warpgroups), with the transposed schedule of the same query blocks."""
  config = config or MosaicConfig(block_q=sched.block_q, block_kv=sched.block_kv)
  bkd, t_ops = transposed_operands(sched)
  do = do.astype(q.dtype)
  if _use_fused_backward(q.shape[-1], bkd, config):
    from pallas_kernels import mosaic_sta_backward as fused  # here: it imports this module
    return fused.fused_backward_jit(q, k, v, o, lse, do, *t_ops, scale=float(scale),
                                    config=config, block_q=sched.block_q, block_kv=bkd,
                                    masked=sched.has_masked_keys)
  return _backward_jit(q, k, v, o, lse, do, *_schedule_operands(sched), *t_ops,
                       scale=float(scale), config=config, block_q=sched.block_q,
                       block_kv_dkv=bkd, masked=sched.has_masked_keys)


# ------------------------------------------------------------------------------------------------
# Backend
# ------------------------------------------------------------------------------------------------
_SMEM_BUDGET = 200 * 1024    # of the H100's 227 KiB: leave room for barriers and the lse buffers


def default_stages(block_q: int, block_kv: int, head_dim: int, itemsize: int = 2) -> int:
  """Deepest K/V pipeline (2..4) whose shared memory fits the budget."""
  q_bytes = block_q * head_dim * itemsize
  for stages in (4, 3, 2):
    if q_bytes + stages * 2 * block_kv * head_dim * itemsize <= _SMEM_BUDGET:
      return stages
  return 2


def _check_dtype(dtype) -> None:
  if jnp.dtype(dtype) not in map(jnp.dtype, _SUPPORTED_DTYPES):
    raise ValueError(
        f"dtype must be bfloat16 or float16 for the pallas_mosaic backend (its wgmma path keeps "
        f"bf16/fp16 in shared memory; float32 is not supported), got {jnp.dtype(dtype)}; use "
        "backend='pallas_triton' or 'xla' for float32")


def check(spec: STASpec, head_dim: int, dtype, block_q: int, block_kv: int) -> None:
  _check_dtype(dtype)
  if head_dim not in _SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {_SUPPORTED_HEAD_DIMS} for pallas_mosaic, got {head_dim}")
  if block_q not in (64, 128):
    raise ValueError(f"block_q must be 64 or 128 for pallas_mosaic, got {block_q}")
  if block_kv not in (64, 128):
    raise ValueError(f"block_kv must be 64 or 128 for pallas_mosaic, got {block_kv}")
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if spec.tile_size % b:
      raise ValueError(
          f"{name}={b} must divide the tile's token count ({spec.tile_size} for tile_shape "
          f"{spec.tile_shape}); pallas_mosaic needs tiles of a multiple of 64 tokens")


def default_blocks(spec: STASpec, head_dim: int, dtype) -> tuple[int, int]:
  b = 128 if spec.tile_size % 128 == 0 else 64
  return b, b


@dataclasses.dataclass(frozen=True)
class MosaicBackend:
  """The ``pallas_mosaic`` backend (Hopper, compute capability 9.x).

  ``configs`` maps (block_q, block_kv, head_dim) to a tuned :class:`MosaicConfig`
  (see :func:`autotune`); otherwise the pipeline depth comes from :func:`default_stages`.
  ``backward_impl``: "mosaic" (the dQ and dK/dV kernels here) or "triton" (the portable
  pallas_triton backward).
  """

  name: str = "pallas_mosaic"
  interpret: bool = False
  backward_impl: str = "mosaic"
  configs: tuple = ()

  def config(self, block_q: int, block_kv: int, head_dim: int) -> MosaicConfig:
    for key, cfg in self.configs:
      if key == (block_q, block_kv, head_dim):
        return cfg
    return MosaicConfig(block_q=block_q, block_kv=block_kv,
                        max_concurrent_steps=default_stages(block_q, block_kv, head_dim),
                        interpret=self.interpret)

  def default_blocks(self, spec, head_dim, dtype):
    return default_blocks(spec, head_dim, dtype)

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    check(spec, head_dim, dtype, block_q, block_kv)

  def forward(self, q, k, v, sched, scale):
    _check_dtype(q.dtype)
    cfg = self.config(sched.block_q, sched.block_kv, q.shape[-1])
    o, lse = forward(q, k, v, sched, scale, cfg)
    if sched.has_invalid_queries:
      # Convention shared with the other backends: invalid (padded) query rows get lse = +inf.
      lse = jnp.where(jnp.asarray(sched.query_valid)[None, None, :], lse, jnp.inf)
    return o, lse

  def backward(self, q, k, v, o, lse, do, sched, scale):
    if self.backward_impl == "triton":
      from pallas_kernels import triton_sta  # lazy: another backend's module
      return triton_sta.sta_backward(q, k, v, o, lse, do, sched, scale)
    cfg = self.config(sched.block_q, sched.block_kv, q.shape[-1])
    return backward(q, k, v, o, lse, do, sched, scale, cfg)


BACKEND = MosaicBackend()


# ------------------------------------------------------------------------------------------------
# Autotuning
# ------------------------------------------------------------------------------------------------
def _default_candidates(spec: STASpec, head_dim: int):
  """Every forward kernel ("unpadded" only where no key is padded) at each pipeline depth, with
  the ping-pong; the general kernel also without it. "auto" takes the overlap kernel (see
  ``MosaicConfig.forward_variant``); another shape or GPU may differ, so it is worth timing. Configs whose shared memory does
  not fit are skipped by :func:`autotune`."""
  unpadded = not block_schedule(spec, 1, 128, 128 if spec.tile_size % 128 == 0 else 64
                                ).has_masked_keys
  variants = ("overlap", "general") + (("unpadded",) if unpadded else ())
  out = []
  for bk in (128, 64):
    if spec.tile_size % bk:
      continue
    for variant in variants:
      for stages in (2, 3, 4):
        for sb in ((True, False) if variant == "general" else (True,)):
          out.append(MosaicConfig(block_q=128, block_kv=bk, max_concurrent_steps=stages,
                                  use_schedule_barrier=sb, forward_variant=variant))
  return out


def time_forward(spec: STASpec, num_heads: int, head_dim: int, dtype, config: MosaicConfig, *,
                 batch: int = 1, iters: int = 5, warmup: int = 2, seed: int = 0) -> float:
  """Median forward time in milliseconds (random normal inputs, after warm-up)."""
  sched = block_schedule(spec, num_heads, config.block_q, config.block_kv)
  ks = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, sched.seq_len, num_heads, head_dim)
  q, k, v = (jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks)
  # Through forward(), so the timed kernel is the one the config's forward_variant selects.
  fn = lambda q, k, v: forward(q, k, v, sched, head_dim ** -0.5, config)
  return float(median_ms(fn, q, k, v, warmup=warmup, iters=iters))


def autotune(spec: STASpec, num_heads: int, head_dim: int, dtype, batch: int = 1,
             candidates: Sequence[MosaicConfig] | None = None, iters: int = 5,
             verbose: bool = False) -> MosaicConfig:
  """Times the forward of each candidate config and returns the fastest.

  Configs that do not fit in shared memory ("exceeds available shared memory" at kernel build
  time) are skipped. Raises ValueError if no candidate runs.
  """
  check(spec, head_dim, dtype, 128 if spec.tile_size % 128 == 0 else 64, 64)
  candidates = list(candidates) if candidates is not None else _default_candidates(spec, head_dim)
  best, best_ms = None, float("inf")
  for cfg in candidates:
    try:
      ms = time_forward(spec, num_heads, head_dim, dtype, cfg, batch=batch, iters=iters)
    except Exception as e:  # noqa: BLE001 - only the shared-memory overflow is expected
      if "exceeds available shared memory" in str(e) or "shared memory" in str(e).lower():
        if verbose:
          print(f"autotune: {cfg} does not fit in shared memory")
        continue
      raise
    if verbose:
      print(f"autotune: {cfg}: {ms:.3f} ms")
    if ms < best_ms:
      best, best_ms = cfg, ms
  if best is None:
    raise ValueError("autotune: no candidate config fits in shared memory")
  return best
