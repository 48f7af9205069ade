"""Dense masked float32 reference for STA (small shapes only: it builds the [seq, seq] mask)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsta import checks, inputs
from jsta import mask as mask_lib
from jsta.spec import STASpec


def reference_mask(spec: STASpec, num_heads: int) -> np.ndarray:
  """[heads, seq_len, seq_len] bool token mask, one per head."""
  windows = spec.head_windows(num_heads)
  cache = {w: mask_lib.token_mask(spec, w) for w in dict.fromkeys(windows)}
  return np.stack([cache[w] for w in windows])


def reference_attention(q, k, v, spec: STASpec, *, scale: float | None = None,
                        text_lengths=None) -> jnp.ndarray:
  """Dense masked attention in float32.

  Args:
    q: [batch, seq_len, heads, head_dim] with seq_len == spec.seq_len.
    k, v: [batch, seq_len, kv_heads, head_dim], kv_heads dividing heads (query head h uses
      key/value head h // (heads // kv_heads)).
    text_lengths: None (``spec.text_len``) or int [batch]: the valid text slots per sample, as
      in :func:`jsta.sliding_tile_attention`.
  Returns:
    [batch, seq_len, heads, head_dim] float32; rows of padded queries are zeros.
  """
  # The op's checks: a wrong input is an error here too, not a broadcast or a clamp.
  q, k, v = inputs.checked_qkv(q, k, v, spec)
  scale = checks.check_scale(scale)
  b, s, h, d = q.shape
  if k.shape[2] != h:
    k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
  if text_lengths is None:
    m = jnp.asarray(reference_mask(spec, h))
  else:
    text_lengths = inputs.check_text_lengths(text_lengths, b, spec)
    full = dataclasses.replace(spec, text_len=spec.text_max_len)
    slot = np.arange(spec.seq_len) - spec.text_offset
    is_text = (slot >= 0) & (slot < spec.text_max_len)
    valid = ~jnp.asarray(is_text) | (jnp.asarray(slot)[None] < jnp.asarray(text_lengths)[:, None])
    m = (jnp.asarray(reference_mask(full, h))[None] & valid[:, None, :, None]
         & valid[:, None, None, :])                                   # [b, h, s, s]
  return _masked_attention(q, k, v, m, d ** -0.5 if scale is None else scale)


def reference_attention_rows(q, k, v, spec: STASpec, rows, *,
                             scale: float | None = None) -> jnp.ndarray:
  """Dense masked float32 attention for the query positions ``rows`` only.

  For checking large shapes (the paper's 115K tokens) where the full mask would not fit.

  Args:
    q, k, v: [batch, seq_len, heads, head_dim] with seq_len == spec.seq_len.
    rows: 1D int positions of the queries to compute.
  Returns:
    [batch, len(rows), heads, head_dim] float32, equal to ``reference_attention(...)[:, rows]``.
  """
  q, k, v = inputs.checked_qkv(q, k, v, spec)
  scale = checks.check_scale(scale)
  b, s, h, d = q.shape
  rows = checks.check_positions("rows", rows, spec.seq_len)
  if k.shape[2] != h:
    k, v = (jnp.repeat(x, h // k.shape[2], axis=2) for x in (k, v))
  windows = spec.head_windows(h)
  cache = {w: mask_lib.token_mask_rows(spec, w, rows) for w in dict.fromkeys(windows)}
  # One shared window: one mask broadcast over heads (24 copies at 115K keys would be GBs).
  m = jnp.asarray(np.stack([cache[w] for w in windows]) if len(cache) > 1
                  else cache[windows[0]][None])
  return _masked_attention(q[:, rows], k, v, m, d ** -0.5 if scale is None else scale)


def _masked_attention(q, k, v, m, scale: float) -> jnp.ndarray:
  """q: [b, R, h, d], k/v: [b, S, h, d], m: [h, R, S] or [b, h, R, S] bool -> [b, R, h, d]
  float32.

  Fully masked rows give zeros.
  """
  qf, kf, vf = (x.astype(jnp.float32) for x in (q, k, v))
  m = m if m.ndim == 4 else m[None]
  logits = jnp.einsum("bqhd,bkhd->bhqk", qf, kf, precision=jax.lax.Precision.HIGHEST) * scale
  logits = jnp.where(m, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.where(m, jnp.exp(logits - row_max), 0.0)
  denom = p.sum(-1, keepdims=True)
  p = p / jnp.where(denom == 0, 1.0, denom)
  return jnp.einsum("bhqk,bkhd->bqhd", p, vf, precision=jax.lax.Precision.HIGHEST)
