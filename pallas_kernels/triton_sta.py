"""Portable block-sparse STA kernels: Pallas ``pallas_call`` with a grid and BlockSpecs.

Lowered through Triton on NVIDIA GPUs; run with ``interpret=True`` on the CPU (chosen
automatically when JAX's default backend is the CPU). The kernels consume the static
schedules of :func:`jsta.block_schedule` as ordinary int32 operands: every program reads its
head group, its key-block count and the key-block indices as scalars and loops over them with
a dynamic ``fori_loop`` bound, so only scheduled (query block, key block) pairs are computed.

Kernels (layouts: q, k, v, o, do: [batch, seq, heads, head_dim]; lse, delta: [batch, heads, seq]),
each over (batch, heads, blocks), launched blocks first (``KernelConfig.blocks_fastest``):
  forward   per query block:  o, lse (natural-log, float32).
  dq        per query block:  dq over its key blocks.
  dk/dv     per key block:    dk, dv over the query blocks of the transposed schedule
            (q_index / q_count).
``delta = rowsum(dO * O)`` is computed with jnp between the forward and the backward kernels.

Conventions (see docs/ARCHITECTURE.md): query rows that attend nothing (count 0) and invalid
(padded) query rows get o = 0 and lse = +inf, so exp(s - lse) = 0 in the backward pass and
they contribute no gradient anywhere. Key validity is applied only on key blocks flagged in
``kv_needs_mask``: each query row's key blocks are reordered (unmasked first), and the kernels
run an unmasked loop then a masked loop, so the common path never pays for the mask.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jsta.schedule import BlockSchedule, block_schedule
from jsta.spec import STASpec

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite (not -inf) so that a fully masked row could never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_CANDIDATES = (128, 64, 32, 16)
MIN_DIM, MAX_DIM = 16, 256


def _is_pow2(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0 and (
      x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Triton launch knobs. ``None`` picks a heuristic default (see the ``resolved_*`` methods).

  Attributes:
    fwd_num_warps: warps per forward program (default 4 for head_dim <= 64, else 8).
    fwd_num_stages: software-pipelining stages of the forward key loop.
    bwd_num_warps: warps per dq and dk/dv program (default 4 for blocks <= 64x64, else 8).
    bwd_num_stages: pipelining stages of the backward loops.
    bwd_block_q, bwd_block_kv: block sizes of the backward schedule (default
      ``min(64, forward block)``). Smaller than the forward's because the backward keeps
      more [block_q, block_kv] float32 tiles live (s, p, dp, ds), which at 128x128 would
      likely spill registers (not measured yet: tune on the GPU).
    blocks_fastest: launch order. True: grid (block, head, batch), so the blocks of one head
      are dispatched together and share their key blocks through L2 (Pallas' Triton lowering
      makes grid axis 0 CUDA's x, which the GPU dispatches first). False: grid (batch, head,
      block), heads first.
  """

  fwd_num_warps: int | None = None
  fwd_num_stages: int = 2
  bwd_num_warps: int | None = None
  bwd_num_stages: int = 2
  bwd_block_q: int | None = None
  bwd_block_kv: int | None = None
  blocks_fastest: bool = True

  def resolved_fwd_warps(self, head_dim: int) -> int:
    if self.fwd_num_warps is not None:
      return self.fwd_num_warps
    return 4 if head_dim <= 64 else 8

  def resolved_bwd_warps(self, block_q: int, block_kv: int) -> int:
    if self.bwd_num_warps is not None:
      return self.bwd_num_warps
    return 4 if block_q * block_kv <= 64 * 64 else 8

  def resolved_bwd_blocks(self, block_q: int, block_kv: int) -> tuple[int, int]:
    bq = min(64, block_q) if self.bwd_block_q is None else self.bwd_block_q
    bk = min(64, block_kv) if self.bwd_block_kv is None else self.bwd_block_kv
    return bq, bk


def _use_interpret(interpret: bool | None) -> bool:
  return jax.default_backend() == "cpu" if interpret is None else interpret


def _compiler_params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rotated(pid, shift: int, n: int):
  """Program id -> block index, rotated so that the (dense, long) text blocks run first.

  Text query blocks visit every key block and text key blocks are visited by every query
  block; launching them last would leave a long tail on a few SMs.
  """
  if shift == 0:
    return pid
  return lax.rem(pid + shift, n)


def _launch(b: int, h: int, n: int, config: KernelConfig):
  """(grid, block_axis, spec): the grid over (batch, head, block) in ``config``'s launch order,
  the grid axis of the block index, and ``spec(block_shape, index_map)`` making a BlockSpec
  whose ``index_map`` takes (batch, head, block) whatever the order."""
  if config.blocks_fastest:
    return (n, h, b), 0, lambda shape, f: pl.BlockSpec(shape, lambda i, hi, bi: f(bi, hi, i))
  return (b, h, n), 2, pl.BlockSpec


@functools.lru_cache(maxsize=64)
def _partitioned_rows(sched: BlockSchedule) -> tuple[np.ndarray, np.ndarray]:
  """Forward rows reordered so unmasked key blocks come first: (kv_index, plain_count).

  ``kv_index[g, i, :plain_count[g, i]]`` need no key mask, the rest up to ``kv_count[g, i]``
  do. The kernels run two loops with the mask decided statically, instead of a branch per
  block, so the loop bodies have no control flow for Triton's software pipeliner to work
  around and the unmasked loop does no mask work at all. Softmax does not care about the
  order; the stable partition keeps each part ascending for locality. (BlockSchedule hashes by
  identity and block_schedule is cached, so this cache hits per schedule.)
  """
  idx, cnt, needs = sched.kv_index, sched.kv_count, sched.kv_needs_mask
  out = idx.copy()
  plain = np.zeros_like(cnt)
  for g in range(idx.shape[0]):
    for i in range(idx.shape[1]):
      row = idx[g, i, :cnt[g, i]]
      order = np.argsort(needs[row], kind="stable")
      out[g, i, :row.size] = row[order]
      plain[g, i] = int((~needs[row]).sum())
  return out, plain


def _schedule_operands(sched: BlockSchedule, transposed: bool):
  """int32 device arrays of the schedule (bools as int32: Triton has no i1 memory loads)."""
  i32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.int32))
  if transposed:
    idx, cnt, plain = sched.q_index, sched.q_count, sched.q_count
  else:
    idx, plain = _partitioned_rows(sched)
    cnt = sched.kv_count
  return dict(h2g=i32(sched.head_to_group), idx=i32(idx), cnt=i32(cnt), plain=i32(plain),
              kvalid=i32(sched.key_valid), qvalid=i32(sched.query_valid))


def _whole(x):
  """BlockSpec of a whole (small) array, the same for every program."""
  nd = x.ndim
  return pl.BlockSpec(x.shape, lambda *_: (0,) * nd)


def _qk(q, k, qk_scale: float):
  """[bq, D] x [bk, D] -> [bq, bk] float32 logits in the base-2 domain."""
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return s * qk_scale


def _mask_keys(s, kvalid_ref, start, block_kv: int):
  """Masks the invalid keys of one key block: s [bq, bk]."""
  valid = kvalid_ref[pl.ds(start, block_kv)]
  return jnp.where(valid[None, :] != 0, s, MASK_VALUE)


def _two_loops(body, plain, count, carry):
  """Runs body(j, carry, masked) over [0, plain) unmasked, then [plain, count) masked."""
  carry = lax.fori_loop(0, plain, functools.partial(body, masked=False), carry)
  return lax.fori_loop(plain, count, functools.partial(body, masked=True), carry)


# ---- forward ------------------------------------------------------------------------------------
def _fwd_kernel(h2g_ref, idx_ref, cnt_ref, plain_ref, kvalid_ref, qvalid_ref, q_ref, k_ref, v_ref,
                o_ref, lse_ref, *, block_q: int, block_kv: int, qk_scale: float, shift: int,
                nq: int, block_axis: int):
  h = pl.program_id(1)
  qi = _rotated(pl.program_id(block_axis), shift, nq)
  g = h2g_ref[h]
  count, plain = cnt_ref[g, qi], plain_ref[g, qi]
  q = q_ref[...]                                            # [bq, D]
  d = q.shape[-1]

  def body(j, carry, masked: bool):
    acc, m_prev, l_prev = carry
    kb = idx_ref[g, qi, j]
    start = pl.multiple_of(kb * block_kv, block_kv)
    k = k_ref[pl.ds(start, block_kv), :]                    # [bk, D]
    s = _qk(q, k, qk_scale)                                 # [bq, bk] f32, log2 domain
    if masked:
      s = _mask_keys(s, kvalid_ref, start, block_kv)
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
  acc, m, l = _two_loops(body, plain, count, (acc, m, l))

  qvalid = qvalid_ref[pl.ds(pl.multiple_of(qi * block_q, block_q), block_q)] != 0
  # l == 0: the row attends nothing. A NaN l (NaN in an attended key or value) stays live, so
  # the NaN reaches the output as in dense attention.
  live = (l != 0) & qvalid
  l_safe = jnp.where(live, l, 1.0)
  o = jnp.where(live[:, None], acc / l_safe[:, None], 0.0)
  o_ref[...] = o.astype(o_ref.dtype)
  # Natural-log lse from the base-2 running max: ln(sum e^x) = m2 * ln 2 + ln(l).
  lse_ref[...] = jnp.where(live, m * LN2 + jnp.log(l_safe), jnp.inf)


def sta_forward(q, k, v, sched: BlockSchedule, scale: float, *,
                config: KernelConfig = KernelConfig(), interpret: bool | None = None):
  """Block-sparse STA forward.

  Args:
    q, k, v: [batch, seq, heads, head_dim], seq = sched.seq_len, heads = sched.num_heads.
    sched: the forward schedule (its block sizes are the kernel's).
    scale: softmax scale.
  Returns:
    o [batch, seq, heads, head_dim] in q.dtype, lse [batch, heads, seq] float32 (natural log;
    +inf on rows that attend nothing and on invalid query rows, whose o is 0).
  """
  b, s, h, d = q.shape
  _check_operands(q, k, v, sched)
  bq, bk = sched.block_q, sched.block_kv
  nq = sched.num_q_blocks
  ops = _schedule_operands(sched, transposed=False)
  shift = sched.num_video_q_blocks if nq > sched.num_video_q_blocks else 0
  qi = lambda i: _rotated(i, shift, nq)
  grid, block_axis, spec = _launch(b, h, nq, config)
  kernel = functools.partial(_fwd_kernel, block_q=bq, block_kv=bk, qk_scale=scale * LOG2E,
                             shift=shift, nq=nq, block_axis=block_axis)
  sched_args = [ops[n] for n in ("h2g", "idx", "cnt", "plain", "kvalid", "qvalid")]
  q_blk = spec((None, bq, None, d), lambda bi, hi, i: (bi, qi(i), hi, 0))
  seq_all = spec((None, s, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  o, lse = pl.pallas_call(
      kernel,
      grid=grid,
      in_specs=[*(_whole(x) for x in sched_args), q_blk, seq_all, seq_all],
      out_specs=[q_blk, spec((None, None, bq), lambda bi, hi, i: (bi, hi, qi(i)))],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
      compiler_params=_compiler_params(config.resolved_fwd_warps(d), config.fwd_num_stages),
      interpret=_use_interpret(interpret),
      name="sta_fwd",
  )(*sched_args, q, k, v)
  return o, lse


# ---- backward: dq -------------------------------------------------------------------------------
def _dq_kernel(h2g_ref, idx_ref, cnt_ref, plain_ref, kvalid_ref, q_ref, do_ref, lse_ref,
               delta_ref, k_ref, v_ref, dq_ref, *, block_q: int, block_kv: int, scale: float,
               shift: int, nq: int, block_axis: int):
  h = pl.program_id(1)
  qi = _rotated(pl.program_id(block_axis), shift, nq)
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
    s = _qk(q, k, qk_scale)
    if masked:
      s = _mask_keys(s, kvalid_ref, start, block_kv)
    p = jnp.exp2(s - lse2[:, None])                         # [bq, bk]
    dp = lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    ds = p * (dp - delta[:, None])
    return dq + lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                preferred_element_type=jnp.float32)

  dq = _two_loops(body, plain, count, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


# ---- backward: dk, dv ---------------------------------------------------------------------------
def _dkdv_kernel(h2g_ref, idx_ref, cnt_ref, kvalid_ref, k_ref, v_ref, q_ref, do_ref, lse_ref,
                 delta_ref, dk_ref, dv_ref, *, block_q: int, block_kv: int, scale: float,
                 shift: int, nkv: int, block_axis: int):
  h = pl.program_id(1)
  kj = _rotated(pl.program_id(block_axis), shift, nkv)
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
    p = jnp.exp2(_qk(q, k, qk_scale) - lse2[:, None])      # [bq, bk]
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
                 config: KernelConfig = KernelConfig(), interpret: bool | None = None):
  """Block-sparse STA backward from the saved lse.

  Args:
    q, k, v, o, do: [batch, seq, heads, head_dim] (seq = sched.seq_len); lse: [batch, heads, seq]
      float32 from :func:`sta_forward` with the same schedule.
    sched: the forward schedule; the backward runs its own schedule of the same spec with
      ``config.resolved_bwd_blocks`` (whose seq_len may differ in text padding only).
  Returns:
    (dq, dk, dv) in the dtypes of q, k, v.
  """
  b, s, h, d = q.shape
  _check_operands(q, k, v, sched)
  bq, bk = config.resolved_bwd_blocks(sched.block_q, sched.block_kv)
  bs = block_schedule(sched.spec, sched.num_heads, bq, bk)
  sb = bs.seq_len
  f32 = jnp.float32
  # The backward schedule may cut or add text padding at the end; padding rows have lse=+inf
  # (no probability mass) and invalid keys, so their gradients are zero either way.
  q_, k_, v_, o_, do_ = (_fit_seq(x, sb) for x in (q, k, v, o, do))
  lse_ = _fit_seq(lse, sb, axis=2, fill=jnp.inf)
  # delta_i = sum_d dO_id * O_id = sum_j P_ij dP_ij: the softmax-gradient row correction.
  delta = jnp.einsum("bshd,bshd->bhs", o_.astype(f32), do_.astype(f32))
  nq, nkv = bs.num_q_blocks, bs.num_kv_blocks
  warps = config.resolved_bwd_warps(bq, bk)
  params = _compiler_params(warps, config.bwd_num_stages)
  interpret = _use_interpret(interpret)

  fwd_ops = _schedule_operands(bs, transposed=False)
  q_shift = bs.num_video_q_blocks if nq > bs.num_video_q_blocks else 0
  qi = lambda i: _rotated(i, q_shift, nq)
  dq_args = [fwd_ops[n] for n in ("h2g", "idx", "cnt", "plain", "kvalid")]
  grid, block_axis, spec = _launch(b, h, nq, config)
  q_blk = spec((None, bq, None, d), lambda bi, hi, i: (bi, qi(i), hi, 0))
  row_blk = spec((None, None, bq), lambda bi, hi, i: (bi, hi, qi(i)))
  seq_all = spec((None, sb, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, block_q=bq, block_kv=bk, scale=scale, shift=q_shift, nq=nq,
                        block_axis=block_axis),
      grid=grid,
      in_specs=[*(_whole(x) for x in dq_args), q_blk, q_blk, row_blk, row_blk, seq_all, seq_all],
      out_specs=q_blk,
      out_shape=jax.ShapeDtypeStruct(q_.shape, q.dtype),
      compiler_params=params,
      interpret=interpret,
      name="sta_bwd_dq",
  )(*dq_args, q_, do_, lse_, delta, k_, v_)

  t_ops = _schedule_operands(bs, transposed=True)
  k_shift = bs.num_video_kv_blocks if nkv > bs.num_video_kv_blocks else 0
  kj = lambda i: _rotated(i, k_shift, nkv)
  dkv_args = [t_ops[n] for n in ("h2g", "idx", "cnt", "kvalid")]
  grid, block_axis, spec = _launch(b, h, nkv, config)
  k_blk = spec((None, bk, None, d), lambda bi, hi, i: (bi, kj(i), hi, 0))
  seq_all = spec((None, sb, None, d), lambda bi, hi, i: (bi, 0, hi, 0))
  rows_all = spec((None, None, sb), lambda bi, hi, i: (bi, hi, 0))
  dk, dv = pl.pallas_call(
      functools.partial(_dkdv_kernel, block_q=bq, block_kv=bk, scale=scale, shift=k_shift,
                        nkv=nkv, block_axis=block_axis),
      grid=grid,
      in_specs=[*(_whole(x) for x in dkv_args), k_blk, k_blk, seq_all, seq_all, rows_all,
                rows_all],
      out_specs=[k_blk, k_blk],
      out_shape=[jax.ShapeDtypeStruct(k_.shape, k.dtype), jax.ShapeDtypeStruct(v_.shape, v.dtype)],
      compiler_params=params,
      interpret=interpret,
      name="sta_bwd_dkdv",
  )(*dkv_args, k_, v_, q_, do_, lse_, delta)

  if sb != s:
    dq, dk, dv = (_fit_seq(x, s) for x in (dq, dk, dv))
  return dq, dk, dv


def _fit_seq(x, n: int, axis: int = 1, fill=0.0):
  """Crops or pads (with ``fill``) axis ``axis`` of x to length n."""
  cur = x.shape[axis]
  if cur == n:
    return x
  if cur > n:
    return lax.slice_in_dim(x, 0, n, axis=axis)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - cur)
  return jnp.pad(x, pad, constant_values=fill)


# ---- checks and the backend object --------------------------------------------------------------
def _check_operands(q, k, v, sched: BlockSchedule) -> None:
  for name, x in (("k", k), ("v", v)):
    if x.shape != q.shape:
      raise ValueError(f"{name} must have q's shape {q.shape}, got {x.shape}")
  if q.shape[1] != sched.seq_len:
    raise ValueError(f"q has seq {q.shape[1]} but the schedule's seq_len is {sched.seq_len}")
  if q.shape[2] != sched.num_heads:
    raise ValueError(f"q has {q.shape[2]} heads but the schedule is for {sched.num_heads}")
  if math.prod(q.shape) >= 2**31:
    # Pallas-Triton computes element offsets in int32: larger arrays would wrap silently.
    raise ValueError(
        f"q of shape {q.shape} has {math.prod(q.shape)} elements; the pallas_triton kernels "
        "index with int32 and need < 2**31: split the batch (or use another backend)")


def check_config(spec: STASpec, head_dim: int, dtype, block_q: int, block_kv: int,
                 config: KernelConfig = KernelConfig()) -> None:
  """Raises ValueError (naming the argument) for input the Triton kernels do not support."""
  if not _is_pow2(head_dim) or not MIN_DIM <= head_dim <= MAX_DIM:
    raise ValueError(
        f"head_dim must be a power of two in [{MIN_DIM}, {MAX_DIM}] for the pallas_triton "
        f"backend (Triton tensors are power-of-two shaped, dots need >= 16), got {head_dim}")
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype)}")
  blocks = (("block_q", block_q), ("block_kv", block_kv))
  if config.bwd_block_q is not None:
    blocks += (("bwd_block_q", config.bwd_block_q),)
  if config.bwd_block_kv is not None:
    blocks += (("bwd_block_kv", config.bwd_block_kv),)
  for name, blk in blocks:
    if not _is_pow2(blk) or not MIN_DIM <= blk <= MAX_DIM:
      raise ValueError(
          f"{name} must be a power of two in [{MIN_DIM}, {MAX_DIM}] for the pallas_triton "
          f"backend, got {blk!r}")
    if spec.tile_size % blk:
      raise ValueError(
          f"{name}={blk} must divide the tile's token count ({spec.tile_size} for tile_shape "
          f"{spec.tile_shape})")


def default_blocks(spec: STASpec, head_dim: int, dtype) -> tuple[int, int]:
  """(block_q, block_kv): 128 queries and 64 keys per step where the tile allows.

  128x64 is Triton flash attention's usual H100/A100 forward tile for head_dim 128; with
  head_dim <= 64 a 128-key step fits the registers too, with head_dim 256 only 64x64 does.
  """
  ts = spec.tile_size
  fits = [b for b in BLOCK_CANDIDATES if ts % b == 0]
  if not fits:
    raise ValueError(
        f"tile_shape {spec.tile_shape} has {ts} tokens, which none of the pallas_triton block "
        f"sizes {BLOCK_CANDIDATES} divides; pick a tile whose token count is a multiple of 16")
  q_cap = 128 if head_dim <= 128 else 64
  kv_cap = 128 if head_dim <= 64 else 64
  return next(b for b in fits if b <= q_cap), next(b for b in fits if b <= kv_cap)


@dataclasses.dataclass(frozen=True)
class TritonBackend:
  """The "pallas_triton" backend of :mod:`jsta.ops` (any NVIDIA GPU; interpret mode on CPU)."""

  name: str = "pallas_triton"
  config: KernelConfig = KernelConfig()
  interpret: bool | None = None   # None: interpret iff JAX's default backend is the CPU

  def default_blocks(self, spec, head_dim, dtype):
    return default_blocks(spec, head_dim, dtype)

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    check_config(spec, head_dim, dtype, block_q, block_kv, self.config)

  def forward(self, q, k, v, sched, scale):
    return sta_forward(q, k, v, sched, scale, config=self.config, interpret=self.interpret)

  def backward(self, q, k, v, o, lse, do, sched, scale):
    return sta_backward(q, k, v, o, lse, do, sched, scale, config=self.config,
                        interpret=self.interpret)


BACKEND = TritonBackend()
