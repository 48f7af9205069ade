"""Pieces shared by the portable kernels: launch grid, schedule operands, the masked-key and
two-loop helpers, sequence fitting and operand checks.

Conventions (docs/ARCHITECTURE.md): query rows that attend nothing (count 0) and invalid
(padded) query rows get o = 0 and lse = +inf, so exp(s - lse) = 0 in the backward pass and
they contribute no gradient anywhere. Key validity is applied only on key blocks flagged in
``kv_needs_mask``: each query row's key blocks are reordered (unmasked first), and the kernels
run an unmasked loop then a masked loop, so the common path never pays for the mask.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jsta.schedule import BlockSchedule

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# Finite (not -inf) so that a fully masked row could never produce inf - inf = NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def use_interpret(interpret: bool | None) -> bool:
  return jax.default_backend() == "cpu" if interpret is None else interpret


def compiler_params(num_warps: int, num_stages: int):
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def rotated(pid, shift: int, n: int):
  """Program id -> block index, rotated so that the (dense, long) text blocks run first.

  Text query blocks visit every key block and text key blocks are visited by every query
  block; launching them last would leave a long tail on a few SMs.
  """
  if shift == 0:
    return pid
  return lax.rem(pid + shift, n)


def launch(b: int, h: int, n: int):
  """(grid, spec): the grid (block, head, batch) and ``spec(block_shape, index_map)`` making a
  BlockSpec whose ``index_map`` takes (batch, head, block). Pallas' Triton lowering makes grid
  axis 0 CUDA's x, which the GPU dispatches first: the blocks of one head run together and
  share their key blocks through L2. Kernels read their block index as ``program_id(0)``."""
  return (n, h, b), lambda shape, f: pl.BlockSpec(shape, lambda i, hi, bi: f(bi, hi, i))


@functools.lru_cache(maxsize=64)
def partitioned_rows(sched: BlockSchedule) -> tuple[np.ndarray, np.ndarray]:
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


def schedule_operands(sched: BlockSchedule, transposed: bool):
  """int32 device arrays of the schedule (bools as int32: Triton has no i1 memory loads)."""
  i32 = lambda a: jnp.asarray(np.asarray(a, dtype=np.int32))
  if transposed:
    idx, cnt, plain = sched.q_index, sched.q_count, sched.q_count
  else:
    idx, plain = partitioned_rows(sched)
    cnt = sched.kv_count
  return dict(h2g=i32(sched.head_to_group), idx=i32(idx), cnt=i32(cnt), plain=i32(plain),
              kvalid=i32(sched.key_valid), qvalid=i32(sched.query_valid))


def whole(x):
  """BlockSpec of a whole (small) array, the same for every program."""
  nd = x.ndim
  return pl.BlockSpec(x.shape, lambda *_: (0,) * nd)


def key_validity(ops: dict, key_valid, seq: int, spec):
  """(kvalid operand, its BlockSpec): the schedule's int32[seq] for every program, or with a
  run-time ``key_valid`` (bool [batch, >= seq or fewer], cropped or padded to ``seq``) the
  row of the program's batch entry, so the kernels see an int32[seq] either way. ``spec`` is
  the second value of :func:`launch`."""
  if key_valid is None:
    return ops["kvalid"], whole(ops["kvalid"])
  kv = fit_seq(jnp.asarray(key_valid).astype(jnp.int32), seq, axis=1, fill=0)
  return kv, spec((None, seq), lambda bi, hi, i: (bi, 0))


def qk(q, k, qk_scale: float):
  """[bq, D] x [bk, D] -> [bq, bk] float32 logits in the base-2 domain."""
  s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return s * qk_scale


def mask_keys(s, kvalid_ref, start, block_kv: int):
  """Masks the invalid keys of one key block: s [bq, bk]."""
  valid = kvalid_ref[pl.ds(start, block_kv)]
  return jnp.where(valid[None, :] != 0, s, MASK_VALUE)


def two_loops(body, plain, count, carry):
  """Runs body(j, carry, masked) over [0, plain) unmasked, then [plain, count) masked."""
  carry = lax.fori_loop(0, plain, functools.partial(body, masked=False), carry)
  return lax.fori_loop(plain, count, functools.partial(body, masked=True), carry)


def fit_seq(x, n: int, axis: int = 1, fill=0.0):
  """Crops or pads (with ``fill``) axis ``axis`` of x to length n."""
  cur = x.shape[axis]
  if cur == n:
    return x
  if cur > n:
    return lax.slice_in_dim(x, 0, n, axis=axis)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, n - cur)
  return jnp.pad(x, pad, constant_values=fill)


def check_operands(q, k, v, sched: BlockSchedule) -> None:
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
