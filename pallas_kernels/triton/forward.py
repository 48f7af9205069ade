"""Portable STA forward: a Pallas ``pallas_call`` with a grid and BlockSpecs.

Lowered through Triton on NVIDIA GPUs; runs with ``interpret=True`` on the CPU (chosen
automatically when JAX's default backend is the CPU). The kernel consumes the static schedule
of :func:`jsta.block_schedule` as ordinary int32 operands: every program reads its head group,
its key-block count and the key-block indices as scalars and loops over them with a dynamic
``fori_loop`` bound, so only scheduled (query block, key block) pairs are computed.

Layouts: q, k, v, o: [batch, seq, heads, head_dim]; lse: [batch, heads, seq] (natural log,
float32). Grid (block, head, batch), see :func:`pallas_kernels.triton.common.launch`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jsta.schedule import BlockSchedule
from pallas_kernels.triton.common import (LN2, LOG2E, check_operands, compiler_params,
                                          key_validity, launch, mask_keys, qk, rotated,
                                          schedule_operands, two_loops, use_interpret, whole)
from pallas_kernels.triton.config import KernelConfig


def _fwd_kernel(h2g_ref, idx_ref, cnt_ref, plain_ref, kvalid_ref, qvalid_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *o_low_ref, block_q: int, block_kv: int, qk_scale: float,
                shift: int, nq: int):
  h = pl.program_id(1)
  qi = rotated(pl.program_id(0), shift, nq)
  g = h2g_ref[h]
  count, plain = cnt_ref[g, qi], plain_ref[g, qi]
  q = q_ref[...]                                            # [bq, D]
  d = q.shape[-1]

  def body(j, carry, masked: bool):
    acc, m_prev, l_prev = carry
    kb = idx_ref[g, qi, j]
    start = pl.multiple_of(kb * block_kv, block_kv)
    k = k_ref[pl.ds(start, block_kv), :]                    # [bk, D]
    s = qk(q, k, qk_scale)                                 # [bq, bk] f32, log2 domain
    if masked:
      s = mask_keys(s, kvalid_ref, start, block_kv)
    m_next = jnp.maximum(m_prev, s.max(axis=-1))
    alpha = jnp.exp2(m_prev - m_next)                       # 0 on the first block (m_prev=-inf)
    p = jnp.exp2(s - m_next[:, None])
    l_next = alpha * l_prev + p.sum(axis=-1)
    v = v_ref[pl.ds(start, block_kv), :]
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return acc * alpha[:, None] + pv, m_next, l_next

  acc = jnp.zeros((block_q, d), jnp.float32)
  m = jnp.full((block_q,), -jnp.inf, jnp.float32)
  l = jnp.zeros((block_q,), jnp.float32)
  acc, m, l = two_loops(body, plain, count, (acc, m, l))

  qvalid = qvalid_ref[pl.ds(pl.multiple_of(qi * block_q, block_q), block_q)] != 0
  # l == 0: the row attends nothing. A NaN l (NaN in an attended key or value) stays live, so
  # the NaN reaches the output as in dense attention.
  live = (l != 0) & qvalid
  l_safe = jnp.where(live, l, 1.0)
  o = jnp.where(live[:, None], acc / l_safe[:, None], 0.0)
  o_ref[...] = o.astype(o_ref.dtype)
  if o_low_ref:
    o_low_ref[0][...] = (o - o.astype(o_ref.dtype).astype(jnp.float32)).astype(o_ref.dtype)
  # Natural-log lse from the base-2 running max: ln(sum e^x) = m2 * ln 2 + ln(l).
  lse_ref[...] = jnp.where(live, m * LN2 + jnp.log(l_safe), jnp.inf)


def sta_forward(q, k, v, sched: BlockSchedule, scale: float, *,
                config: KernelConfig = KernelConfig(), interpret: bool | None = None,
                key_valid=None, with_o_low: bool = False):
  """Block-sparse STA forward.

  Args:
    q, k, v: [batch, seq, heads, head_dim], seq = sched.seq_len, heads = sched.num_heads.
    sched: the forward schedule (its block sizes are the kernel's).
    scale: softmax scale.
    key_valid: None (the schedule's key validity) or bool [batch, seq]: run-time key
      validity (per-sample text lengths), applied on the blocks flagged in kv_needs_mask.
    with_o_low: also return o_low (o's rounding error, see :class:`jsta.ops.Backend`).
  Returns:
    o [batch, seq, heads, head_dim] in q.dtype, lse [batch, heads, seq] float32 (natural log;
    +inf on rows that attend nothing and on invalid query rows, whose o is 0), and with
    ``with_o_low`` o_low [batch, seq, heads, head_dim] in q.dtype.
  """
  b, s, h, d = q.shape
  check_operands(q, k, v, sched)
  bq, bk = sched.block_q, sched.block_kv
  nq = sched.num_q_blocks
  ops = schedule_operands(sched, transposed=False)
  shift = sched.num_video_q_blocks if nq > sched.num_video_q_blocks else 0
  qi = lambda i: rotated(i, shift, nq)
  grid, spec = launch(b, h, nq)
  kernel = functools.partial(_fwd_kernel, block_q=bq, block_kv=bk, qk_scale=scale * LOG2E,
                             shift=shift, nq=nq)
  kvalid, kvalid_spec = key_validity(ops, key_valid, s, spec)
  sched_args = [ops["h2g"], ops["idx"], ops["cnt"], ops["plain"], kvalid, ops["qvalid"]]
  sched_specs = [whole(x) for x in sched_args]
  sched_specs[4] = kvalid_spec
  q_blk = spec((None, bq, None, d), lambda bi, hi, i: (bi, qi(i), hi, 0))
  seq_all = spec((None, s, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  o_shape = jax.ShapeDtypeStruct(q.shape, q.dtype)
  outs = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[*sched_specs, q_blk, seq_all, seq_all],
      out_specs=[q_blk, spec((None, None, bq), lambda bi, hi, i: (bi, hi, qi(i)))]
      + [q_blk] * with_o_low,
      out_shape=[o_shape, jax.ShapeDtypeStruct((b, h, s), jnp.float32)] + [o_shape] * with_o_low,
      compiler_params=compiler_params(config.resolved_fwd_warps(d), config.fwd_num_stages),
      interpret=use_interpret(interpret),
      name="sta_fwd",
  )(*sched_args, q, k, v)
  return tuple(outs)
