"""Token- and tile-level STA masks, computed in numpy from the spec.

Everything here is in tile order: the video positions in tile order and the text slots, the
text after the video (``text_position="last"``) or before it (``"first"``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import numpy as np

from jsta import layout

if TYPE_CHECKING:  # annotations only: jsta.spec imports this module
  from jsta.spec import STASpec, Window


def axis_attend(n: int, k: int, causal: bool = False) -> np.ndarray:
  """[n, n] bool: query tile coordinate q attends key tile coordinate kk along one axis: a
  window of k tiles centered on q and clamped into [0, n), or with ``causal`` the k tiles
  ending at q (``q - (k - 1) <= kk <= q``, fewer near the start)."""
  q = np.arange(n)[:, None]
  kk = np.arange(n)[None, :]
  if causal:
    return (kk <= q) & (kk >= q - (k - 1))
  if k >= n:
    return np.ones((n, n), dtype=bool)
  half = k // 2
  center = np.clip(q, half, n - 1 - half)
  return np.abs(kk - center) <= half


@functools.lru_cache(maxsize=64)
def tile_mask(spec: STASpec, window: Window) -> np.ndarray:
  """[num_tiles_total, num_tiles_total] bool over tiles in tile order (t-major, then h, then w)."""
  m = np.ones((1, 1), dtype=bool)
  for d, (n, k) in enumerate(zip(spec.num_tiles, window)):
    m = np.kron(m, axis_attend(n, k, d in spec.causal_axes))
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=64)
def video_token_valid(spec: STASpec) -> np.ndarray:
  """[padded_video_len] bool: True where the tile-order position holds a real token (False on
  the padding that rounds a partial edge tile up, see :mod:`jsta.layout`)."""
  out = layout.source_index(spec) >= 0
  out.setflags(write=False)
  return out


@functools.lru_cache(maxsize=64)
def text_last_position(spec: STASpec) -> np.ndarray:
  """int64[seq_len]: for each sequence position, its position in the text-last layout
  (``spec.text_last()``): the identity when the text is last."""
  nv, t = spec.padded_video_len, spec.text_max_len
  if spec.text_position == "first":
    out = np.concatenate([nv + np.arange(t), np.arange(nv)])
  else:
    out = np.arange(nv + t)
  out.setflags(write=False)
  return out


def _check_spec(spec) -> None:
  # jsta.spec imports this module, so the spec is known by what these functions use of it.
  if not callable(getattr(spec, "check_window", None)):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")


def token_valid(spec: STASpec) -> np.ndarray:
  """[seq_len] bool: valid video tokens and text slots (the first text_len of the text slots
  are valid, the rest are padding), in the spec's order."""
  _check_spec(spec)
  return _token_valid(spec)


@functools.lru_cache(maxsize=64)
def _token_valid(spec: STASpec) -> np.ndarray:
  text = np.arange(spec.text_max_len) < spec.text_len
  video = video_token_valid(spec)
  out = np.concatenate([text, video] if spec.text_position == "first" else [video, text])
  out.setflags(write=False)
  return out


def token_mask(spec: STASpec, window: Window | None = None) -> np.ndarray:
  """[seq_len, seq_len] bool token mask (query, key) for one window. Small shapes only.

  Rows of invalid queries (padding) are all False.
  """
  _check_spec(spec)
  if window is None:
    if spec.is_per_head:
      raise ValueError("token_mask: spec has per-head windows; pass window=")
    window = spec.window
  window = spec.check_window(window)
  if spec.text_position == "first":
    pos = text_last_position(spec)
    return token_mask(spec.text_last(), window)[np.ix_(pos, pos)]
  nv = spec.padded_video_len
  valid = token_valid(spec)
  tm = tile_mask(spec, tuple(window))
  lengths = layout.tile_lengths(spec)
  vv = np.repeat(np.repeat(tm, lengths, axis=0), lengths, axis=1)
  m = np.ones((spec.seq_len, spec.seq_len), dtype=bool)
  m[:nv, :nv] = vv
  return m & valid[:, None] & valid[None, :]


def attended_pairs(spec: STASpec, window: Window) -> int:
  """Attended valid (query, key) token pairs for one head, computed at tile granularity."""
  _check_spec(spec)
  window = spec.check_window(window)
  tm = tile_mask(spec, tuple(window))
  per_tile = np.bincount(layout.position_tile(spec), weights=video_token_valid(spec),
                         minlength=tm.shape[0]).astype(np.int64)
  video = int(per_tile @ tm.astype(np.int64) @ per_tile)
  nvalid_video = int(per_tile.sum())
  t = spec.text_len
  # video->text, text->video, text->text.
  return video + 2 * nvalid_video * t + t * t


def token_mask_rows(spec: STASpec, window: Window, rows) -> np.ndarray:
  """[len(rows), seq_len] bool: the rows ``rows`` (query positions) of :func:`token_mask`.

  Built from the tile mask row by row, so it also works where the full mask would not fit.
  """
  _check_spec(spec)
  window = spec.check_window(window)
  rows = np.asarray(rows, dtype=np.int64)
  if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= spec.seq_len:
    raise ValueError(f"rows must be a non-empty 1D list of positions in [0, {spec.seq_len}), "
                     f"got {rows!r}")
  if spec.text_position == "first":
    pos = text_last_position(spec)
    return token_mask_rows(spec.text_last(), window, pos[rows])[:, pos]
  nv = spec.padded_video_len
  valid = token_valid(spec)
  tm = tile_mask(spec, tuple(window))
  video_row = rows < nv
  m = np.ones((rows.size, spec.seq_len), dtype=bool)
  tiles = layout.position_tile(spec)[np.minimum(rows, nv - 1)]
  m[:, :nv] = np.where(video_row[:, None],
                       np.repeat(tm[tiles], layout.tile_lengths(spec), axis=1), True)
  return m & valid[rows][:, None] & valid[None, :]
