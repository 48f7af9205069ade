"""Block-sparse STA in plain XLA, driven by the static schedule.

Video query blocks gather their scheduled key blocks (memory grows with the kept blocks, not
with seq^2); text query blocks are dense rows and attend all keys directly. The forward saves
the log-sum-exp; the backward recomputes probabilities from it (no dense recomputation) and
scatter-adds key/value gradients into their blocks.

All layouts: q, k, v, o: [batch, seq, heads, head_dim]; lse: [batch, heads, seq] float32,
where seq is the schedule's padded ``seq_len``.
"""

from __future__ import annotations

import einops
import jax
import jax.numpy as jnp
import numpy as np

from jsta.schedule import BlockSchedule


def _dot(spec: str, a, b):
  precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def _video_tables(sched: BlockSchedule):
  """Per-head tables for the video query blocks: idx [H, nqv, C], entry mask [H, nqv, C, bk]."""
  nqv = sched.num_video_q_blocks
  c = max(sched.video_kv_count, 1)
  idx = sched.kv_index[sched.head_to_group][:, :nqv, :c]
  cnt = sched.kv_count[sched.head_to_group][:, :nqv]
  live = np.arange(c)[None, None, :] < cnt[:, :, None]
  key_valid = sched.key_valid.reshape(sched.num_kv_blocks, sched.block_kv)
  entry = live[..., None] & key_valid[idx]
  return jnp.asarray(idx), jnp.asarray(entry)


def _blocks(x, block):
  return einops.rearrange(x, "b (n x) h d -> b h n x d", x=block)


def _unblocks(x):
  return einops.rearrange(x, "b h n x d -> b (n x) h d")


def _gather(kb, idx):
  """kb: [B, H, nkv, bk, D], idx: [H, nq, C] -> [B, H, nq, C, bk, D]."""
  h = jnp.arange(kb.shape[1])[:, None, None]
  return kb[:, h, idx]


def _safe_lse(m, l):
  # Rows that attend nothing get lse=+inf so that exp(s - lse) is 0 in the backward pass.
  return jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), jnp.inf)


def forward(q, k, v, sched: BlockSchedule, scale: float):
  """Returns (o [B, S, H, D] in q.dtype, lse [B, H, S] float32)."""
  bq, bk = sched.block_q, sched.block_kv
  nqv = sched.num_video_q_blocks
  sv = nqv * bq
  idx, entry = _video_tables(sched)
  kb, vb = _blocks(k, bk), _blocks(v, bk)

  # Video rows: gathered key blocks.
  qv = _blocks(q[:, :sv], bq)                                    # [B,H,nqv,bq,D]
  kg, vg = _gather(kb, idx), _gather(vb, idx)                    # [B,H,nqv,C,bk,D]
  s = _dot("bhixd,bhicyd->bhixcy", qv, kg) * scale
  msk = entry[None, :, :, None]                                  # [1,H,nqv,1,C,bk]
  s = jnp.where(msk, s, -jnp.inf)
  m = s.max(axis=(-2, -1), keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(msk, jnp.exp(s - m), 0.0)
  l = p.sum(axis=(-2, -1), keepdims=True)
  o_v = _dot("bhixcy,bhicyd->bhixd", p, vg)
  o_v = o_v / jnp.where(l > 0, l, 1.0)[..., 0]
  lse_v = _safe_lse(m, l)[..., 0, 0]                             # [B,H,nqv,bq]
  o_v = _unblocks(o_v)
  lse_v = einops.rearrange(lse_v, "b h n x -> b h (n x)")

  if sv == q.shape[1]:
    return o_v.astype(q.dtype), lse_v

  # Text rows: dense over all (valid) keys.
  o_t, lse_t = _dense_rows(q[:, sv:], k, v, jnp.asarray(sched.key_valid), scale,
                           jnp.asarray(sched.query_valid[sv:]))
  o = jnp.concatenate([o_v, o_t], axis=1).astype(q.dtype)
  return o, jnp.concatenate([lse_v, lse_t], axis=2)


def _dense_rows(q, k, v, key_valid, scale, query_valid):
  s = _dot("bqhd,bkhd->bhqk", q, k) * scale
  msk = key_valid[None, None, None, :] & query_valid[None, None, :, None]
  s = jnp.where(msk, s, -jnp.inf)
  m = s.max(axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(msk, jnp.exp(s - m), 0.0)
  l = p.sum(axis=-1, keepdims=True)
  o = _dot("bhqk,bkhd->bqhd", p, v)
  o = o / einops.rearrange(jnp.where(l > 0, l, 1.0), "b h q 1 -> b q h 1")
  return o, _safe_lse(m, l)[..., 0]


def backward(q, k, v, o, lse, do, sched: BlockSchedule, scale: float):
  """Gradients (dq, dk, dv) in the input dtypes, from the saved lse."""
  bq, bk = sched.block_q, sched.block_kv
  nqv = sched.num_video_q_blocks
  sv = nqv * bq
  idx, entry = _video_tables(sched)
  f32 = jnp.float32
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), do.astype(f32))   # [B,H,S]
  kb, vb = _blocks(k, bk), _blocks(v, bk)
  kg, vg = _gather(kb, idx), _gather(vb, idx)

  qv, dov = _blocks(q[:, :sv], bq), _blocks(do[:, :sv], bq)
  lse_v = einops.rearrange(lse[:, :, :sv], "b h (n x) -> b h n x 1 1", x=bq)
  delta_v = einops.rearrange(delta[:, :, :sv], "b h (n x) -> b h n x 1 1", x=bq)
  msk = entry[None, :, :, None]
  s = _dot("bhixd,bhicyd->bhixcy", qv, kg) * scale
  p = jnp.where(msk, jnp.exp(s - lse_v), 0.0)
  dp = _dot("bhixd,bhicyd->bhixcy", dov, vg)
  ds = p * (dp - delta_v)
  dq_v = _unblocks(_dot("bhixcy,bhicyd->bhixd", ds, kg.astype(f32)) * scale)
  dk_c = _dot("bhixcy,bhixd->bhicyd", ds, qv.astype(f32)) * scale    # [B,H,nqv,C,bk,D]
  dv_c = _dot("bhixcy,bhixd->bhicyd", p, dov.astype(f32))
  h = jnp.arange(k.shape[2])[:, None, None]
  zeros = jnp.zeros(kb.shape, f32)
  dkb = zeros.at[:, h, idx].add(dk_c)
  dvb = zeros.at[:, h, idx].add(dv_c)
  dk, dv = _unblocks(dkb), _unblocks(dvb)
  dq = dq_v

  if sv < q.shape[1]:
    qt, dot_ = q[:, sv:], do[:, sv:]
    key_valid = jnp.asarray(sched.key_valid)
    query_valid = jnp.asarray(sched.query_valid[sv:])
    msk_t = key_valid[None, None, None, :] & query_valid[None, None, :, None]
    s = _dot("bqhd,bkhd->bhqk", qt, k) * scale
    p = jnp.where(msk_t, jnp.exp(s - lse[:, :, sv:, None]), 0.0)
    dp = _dot("bqhd,bkhd->bhqk", dot_, v)
    ds = p * (dp - delta[:, :, sv:, None])
    dq = jnp.concatenate([dq, _dot("bhqk,bkhd->bqhd", ds, k.astype(f32)) * scale], axis=1)
    dk = dk + _dot("bhqk,bqhd->bkhd", ds, qt.astype(f32)) * scale
    dv = dv + _dot("bhqk,bqhd->bkhd", p, dot_.astype(f32))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)
