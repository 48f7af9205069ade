"""Portable STA backward: two Pallas ``pallas_call`` kernels (Triton on NVIDIA GPUs,
interpret mode on the CPU).

  dq      per query block:  dq over its key blocks (the forward's schedule).
  dk/dv   per key block:    dk, dv over the query blocks of the transposed schedule
          (q_index / q_count).

``delta = rowsum(dO * O)`` is computed with jnp before the kernels. The backward runs its own
schedule (``KernelConfig.resolved_bwd_blocks``), whose text padding may differ from the
forward's. Layouts as :mod:`pallas_kernels.triton.forward`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jsta.schedule import BlockSchedule, block_schedule
from pallas_kernels.triton.common import (LOG2E, check_operands, compiler_params, fit_seq,
                                          key_validity, launch, mask_keys, qk, rotated, schedule_operands,
                                          two_loops, use_interpret, whole)
from pallas_kernels.triton.config import KernelConfig


def _dq_kernel(h2g_ref, idx_ref, cnt_ref, plain_ref, kvalid_ref, q_ref, do_ref, lse_ref,
               delta_ref, k_ref, v_ref, dq_ref, *, block_q: int, block_kv: int, scale: float,
               shift: int, nq: int):
  h = pl.program_id(1)
  qi = rotated(pl.program_id(0), shift, nq)
  g = h2g_ref[h]
  count, plain = cnt_ref[g, qi], plain_ref[g, qi]
  q = q_ref[...]                                            # [bq, D]
  do = do_ref[...]                                          # [bq, D]
  lse2 = lse_ref[...] * LOG2E                               # [bq] base-2 (+inf stays +inf)
  delta = delta_ref[...]                                    # [bq]
  qk_scale = scale * LOG2E

  def body(j, dq, masked: bool):
    kb = idx_ref[g, qi, j]
    start = pl.multiple_of(kb * block_kv, block_kv)
    k = k_ref[pl.ds(start, block_kv), :]
    v = v_ref[pl.ds(start, block_kv), :]
    s = qk(q, k, qk_scale)
    if masked:
      s = mask_keys(s, kvalid_ref, start, block_kv)
    p = jnp.exp2(s - lse2[:, None])                         # [bq, bk]
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)

  dq = two_loops(body, plain, count, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkdv_kernel(h2g_ref, idx_ref, cnt_ref, kvalid_ref, k_ref, v_ref, q_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, block_q: int, block_kv: int, scale: float,
                 shift: int, nkv: int):
  h = pl.program_id(1)
  kj = rotated(pl.program_id(0), shift, nkv)
  g = h2g_ref[h]
  count = cnt_ref[g, kj]
  k = k_ref[...]                                            # [bk, D]
  v = v_ref[...]
  qk_scale = scale * LOG2E

  def body(j, carry):
    dk, dv = carry
    qb = idx_ref[g, kj, j]
    start = pl.multiple_of(qb * block_q, block_q)
    q = q_ref[pl.ds(start, block_q), :]                     # [bq, D]
    do = do_ref[pl.ds(start, block_q), :]
    lse2 = lse_ref[pl.ds(start, block_q)] * LOG2E
    delta = delta_ref[pl.ds(start, block_q)]
    # Invalid keys need no mask here: their p only reaches their own dk/dv rows (zeroed below).
    p = jnp.exp2(qk(q, k, qk_scale) - lse2[:, None])      # [bq, bk]
    dv = dv + lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    dk = dk + lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
    return dk, dv

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, count, body, (zeros, zeros))
  kvalid = kvalid_ref[pl.ds(pl.multiple_of(kj * block_kv, block_kv), block_kv)] != 0
  dk_ref[...] = jnp.where(kvalid[:, None], dk * scale, 0.0).astype(dk_ref.dtype)
  dv_ref[...] = jnp.where(kvalid[:, None], dv, 0.0).astype(dv_ref.dtype)


def sta_backward(q, k, v, o, lse, do, sched: BlockSchedule, scale: float, *,
                 config: KernelConfig = KernelConfig(), interpret: bool | None = None,
                 key_valid=None, dlse=None):
  """Block-sparse STA backward from the saved lse.

  Args:
    q, k, v, o, do: [batch, seq, heads, head_dim] (seq = sched.seq_len); lse: [batch, heads, seq]
      float32 from :func:`sta_forward` with the same schedule.
    sched: the forward schedule; the backward runs its own schedule of the same spec with
      ``config.resolved_bwd_blocks`` (whose seq_len may differ in text padding only).
    key_valid: as in :func:`pallas_kernels.triton.forward.sta_forward`.
    dlse: None or float32 [batch, heads, seq]: the cotangent of the lse output.
  Returns:
    (dq, dk, dv) in the dtypes of q, k, v.
  """
  b, s, h, d = q.shape
  check_operands(q, k, v, sched)
  bq, bk = config.resolved_bwd_blocks(sched.block_q, sched.block_kv)
  bs = block_schedule(sched.spec, sched.num_heads, bq, bk, dynamic_text=sched.dynamic_text)
  sb = bs.seq_len
  f32 = jnp.float32
  # The backward schedule may cut or add text padding at the end; padding rows have lse=+inf
  # (no probability mass) and invalid keys, so their gradients are zero either way.
  q_, k_, v_, o_, do_ = (fit_seq(x, sb) for x in (q, k, v, o, do))
  lse_ = fit_seq(lse, sb, axis=2, fill=jnp.inf)
  # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-gradient row correction.
  delta = jnp.einsum("bshd,bshd->bhs", o_.astype(f32), do_.astype(f32))
  if dlse is not None:
    # A cotangent g of the lse adds p * g to dS: the same as delta - g.
    delta = delta - fit_seq(dlse, sb, axis=2)
  nq, nkv = bs.num_q_blocks, bs.num_kv_blocks
  warps = config.resolved_bwd_warps(bq, bk)
  params = compiler_params(warps, config.bwd_num_stages)
  interpret = use_interpret(interpret)

  fwd_ops = schedule_operands(bs, transposed=False)
  q_shift = bs.num_video_q_blocks if nq > bs.num_video_q_blocks else 0
  qi = lambda i: rotated(i, q_shift, nq)
  grid, spec = launch(b, h, nq)
  kvalid, kvalid_spec = key_validity(fwd_ops, key_valid, sb, spec)
  dq_args = [fwd_ops["h2g"], fwd_ops["idx"], fwd_ops["cnt"], fwd_ops["plain"], kvalid]
  dq_specs = [*(whole(x) for x in dq_args[:4]), kvalid_spec]
  q_blk = spec((None, bq, None, d), lambda bi, hi, i: (bi, qi(i), hi, 0))
  row_blk = spec((None, None, bq), lambda bi, hi, i: (bi, hi, qi(i)))
  seq_all = spec((None, sb, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_kv=bk, scale=scale, shift=q_shift, nq=nq),
      grid=grid,
      in_specs=[*dq_specs, q_blk, q_blk, row_blk, row_blk, seq_all, seq_all],
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q_.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="sta_bwd_dq",
  )(*dq_args, q_, do_, lse_, delta, k_, v_)

  t_ops = schedule_operands(bs, transposed=True)
  k_shift = bs.num_video_kv_blocks if nkv > bs.num_video_kv_blocks else 0
  kj = lambda i: rotated(i, k_shift, nkv)
  grid, spec = launch(b, h, nkv)
  kvalid, kvalid_spec = key_validity(t_ops, key_valid, sb, spec)
  dkv_args = [t_ops["h2g"], t_ops["idx"], t_ops["cnt"], kvalid]
  dkv_specs = [*(whole(x) for x in dkv_args[:3]), kvalid_spec]
  k_blk = spec((None, bk, None, d), lambda bi, hi, i: (bi, kj(i), hi, 0))
  seq_all = spec((None, sb, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  rows_all = spec((None, None, sb), lambda bi, hi, i: (bi, hi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=bq, block_kv=bk, scale=scale, shift=k_shift,
                        nkv=nkv),
      grid=grid,
      in_specs=[*dkv_specs, k_blk, k_blk, seq_all, seq_all, rows_all, rows_all],
      out_specs=[k_blk, k_blk],
      out_shape=[jax.ShapeDtypeStruct(k_.shape, k.dtype), jax.ShapeDtypeStruct(v_.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="sta_bwd_dkdv",
  )(*dkv_args, k_, v_, q_, do_, lse_, delta)

  if sb != s:
    dq, dk, dv = (fit_seq(x, s) for x in (dq, dk, dv))
  return dq, dk, dv
