"""An independent float64 brute-force STA, written from docs/SEMANTICS.md in numpy.

It shares no code with jsta: it builds the sequence layout, the clamped-window rule and the
text rules itself, then computes attention and the gradients of sum(o * w) with the textbook
formulas, one head at a time, over the query rows asked for.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def layout(latent, tile, text_len: int, text_max_len: int, text_position: str = "last"):
  """Per sequence position: (tile coordinates or None for text, valid). Tiles t-major; a
  tile's real tokens t-major over its real extent, then padding up to a multiple of 64
  (tiles of a multiple of 64 tokens) or to the whole tile; the text slots after the video
  (or, ``text_position="first"``, before it)."""
  size = math.prod(tile)
  align = 64 if size % 64 == 0 else size
  out = []
  for t in itertools.product(*[range(-(-s // x)) for s, x in zip(latent, tile)]):
    extent = [min(x, s - i * x) for i, x, s in zip(t, tile, latent)]
    n = math.prod(extent)
    out += [(t, True)] * n + [(t, False)] * (-(-n // align) * align - n)
  text = [(None, i < text_len) for i in range(text_max_len)]
  return text + out if text_position == "first" else out + text


def _attends(qt, kt, num_tiles, window, causal_axes=()) -> bool:
  for axis, (q, k, n, w) in enumerate(zip(qt, kt, num_tiles, window)):
    if axis in causal_axes:
      if not q - (w - 1) <= k <= q:
        return False
      continue
    if w >= n:
      continue
    half = w // 2
    center = min(max(q, half), n - 1 - half)
    if abs(k - center) > half:
      return False
  return True


def mask(latent, tile, window, text_len: int, text_max_len: int, text_position: str = "last",
         causal_axes=()) -> np.ndarray:
  """bool[seq, seq]: query position i attends key position j."""
  pos = layout(latent, tile, text_len, text_max_len, text_position)
  num_tiles = [-(-s // x) for s, x in zip(latent, tile)]
  s = len(pos)
  m = np.zeros((s, s), dtype=bool)
  for i, (ti, vi) in enumerate(pos):
    if not vi:
      continue
    for j, (tj, vj) in enumerate(pos):
      if vj:
        m[i, j] = (ti is None or tj is None
                   or _attends(ti, tj, num_tiles, window, tuple(causal_axes)))
  return m


def attention_and_grads(q, k, v, w, masks, scale: float, rows=None):
  """o and the gradients of sum(o[rows] * w[rows]) with respect to q, k, v, in float64.

  q, k, v, w: [batch, seq, heads, dim] (any float dtype; computed in float64); masks: one
  bool[seq, seq] per head. ``rows`` (default: all) are the query rows whose outputs enter the
  sum, and o is returned for them only. Returns (o [batch, rows, heads, dim], dq, dk, dv
  [batch, seq, heads, dim]).
  """
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  b, s, h, d = q.shape
  rows = np.arange(s) if rows is None else np.asarray(rows)
  o = np.zeros((b, rows.size, h, d))
  dq, dk, dv = (np.zeros_like(q) for _ in range(3))
  for hi in range(h):
    m = masks[hi][rows]                                         # [r, s]
    live = m.any(axis=1)
    for bi in range(b):
      qi, ki, vi = q[bi, rows, hi], k[bi, :, hi], v[bi, :, hi]
      logits = np.where(m, qi @ ki.T * scale, -np.inf)
      top = np.where(live, logits.max(axis=1), 0.0)
      p = np.where(m, np.exp(logits - top[:, None]), 0.0)
      p /= np.where(live, p.sum(axis=1), 1.0)[:, None]
      o[bi, :, hi] = p @ vi
      do = w[bi, rows, hi]
      dp = do @ vi.T
      ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
      dq[bi, rows, hi] += ds @ ki * scale
      dk[bi, :, hi] += ds.T @ qi * scale
      dv[bi, :, hi] += p.T @ do
  return o, dq, dk, dv


def general_attention(q, k, v, w, w_lse, masks, scale: float):
  """Attention with grouped key/value heads and per-sample masks, in float64, and the
  gradients of ``sum(o * w) + sum(lse * w_lse)`` (lse taken as 0 on rows that attend nothing).

  q, w: [batch, seq, heads, dim]; k, v: [batch, seq, kv_heads, dim] (query head h uses key
  head h // (heads // kv_heads)); w_lse: [batch, heads, seq]; masks[b][h]: bool[seq, seq].
  Returns (o, lse [batch, heads, seq] with +inf on rows that attend nothing, dq, dk, dv).
  """
  q, k, v, w, w_lse = (np.asarray(x, np.float64) for x in (q, k, v, w, w_lse))
  b, s, h, d = q.shape
  group = h // k.shape[2]
  o = np.zeros_like(q)
  lse = np.full((b, h, s), np.inf)
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  for bi in range(b):
    for hi in range(h):
      kh = hi // group
      m = masks[bi][hi]
      live = m.any(axis=1)
      qi, ki, vi = q[bi, :, hi], k[bi, :, kh], v[bi, :, kh]
      logits = np.where(m, qi @ ki.T * scale, -np.inf)
      top = np.where(live, logits.max(axis=1), 0.0)
      e = np.where(m, np.exp(logits - top[:, None]), 0.0)
      total = e.sum(axis=1)
      p = e / np.where(live, total, 1.0)[:, None]
      o[bi, :, hi] = p @ vi
      lse[bi, hi] = np.where(live, top + np.log(np.where(live, total, 1.0)), np.inf)
      do = w[bi, :, hi]
      dp = do @ vi.T
      ds = p * (dp - (dp * p).sum(axis=1, keepdims=True)) + p * w_lse[bi, hi][:, None]
      dq[bi, :, hi] += ds @ ki * scale
      dk[bi, :, kh] += ds.T @ qi * scale
      dv[bi, :, kh] += p.T @ do
  return o, lse, dq, dk, dv
