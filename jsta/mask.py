"""Token- and tile-level STA masks, computed in numpy from the spec.

Everything here is in tile order: the video positions in tile order and the text slots, the
text after the video (``text_position="last"``) or before it (``"first"``).

The tile rule is a product of intervals: along each axis a query tile attends the key tiles of
one interval (:func:`axis_bounds`), so the key tiles of a query tile form a box of the tile grid.
Everything a schedule or a count needs is built from these boxes in O(tiles x window) memory and
time (:func:`box_sums`, :func:`key_tile_runs`); only :func:`tile_mask` and :func:`token_mask`,
dense masks for small shapes, cost O(tiles^2) or O(seq^2), and they refuse shapes whose mask
would exceed ``MAX_DENSE_ENTRIES`` entries.
"""

from __future__ import annotations

import functools
import itertools
from typing import TYPE_CHECKING

import numpy as np

from jsta import layout

if TYPE_CHECKING:  # annotations only: jsta.spec imports this module
  from jsta.spec import STASpec, Window

# The dense masks (tile_mask, token_mask) refuse shapes beyond this many entries (1 GiB of bool):
# the 115,200 1x1x1 tiles of a 30x48x80 latent would need 12.4 GiB.
MAX_DENSE_ENTRIES = 2 ** 30


def axis_bounds(n: int, k: int, causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) int64[n]: query tile coordinate q attends the key tile coordinates
  ``lo[q] <= kk <= hi[q]`` along one axis (see :func:`axis_attend`)."""
  q = np.arange(n, dtype=np.int64)
  if causal:
    return np.maximum(q - (k - 1), 0), q
  if k >= n:
    return np.zeros(n, np.int64), np.full(n, n - 1, np.int64)
  half = k // 2
  center = np.clip(q, half, n - 1 - half)
  return center - half, center + half


def axis_attend(n: int, k: int, causal: bool = False) -> np.ndarray:
  """[n, n] bool: query tile coordinate q attends key tile coordinate kk along one axis: a
  window of k tiles centered on q and clamped into [0, n), or with ``causal`` the k tiles
  ending at q (``q - (k - 1) <= kk <= q``, fewer near the start)."""
  lo, hi = axis_bounds(n, k, causal)
  kk = np.arange(n)[None, :]
  return (kk >= lo[:, None]) & (kk <= hi[:, None])


def tile_bounds(spec: STASpec, window: Window) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) int64[num_tiles_total, rank]: the box of key tile coordinates (inclusive) that
  each query tile (tile order) attends."""
  per_axis = [axis_bounds(n, k, d in spec.causal_axes)
              for d, (n, k) in enumerate(zip(spec.num_tiles, window))]
  coords = np.unravel_index(np.arange(int(np.prod(spec.num_tiles))), spec.num_tiles)
  lo = np.stack([b[0][c] for b, c in zip(per_axis, coords)], axis=1)
  hi = np.stack([b[1][c] for b, c in zip(per_axis, coords)], axis=1)
  return lo, hi


def box_sums(spec: STASpec, window: Window, values: np.ndarray) -> np.ndarray:
  """[num_tiles_total]: for each query tile, the sum of ``values`` (one per tile, tile order)
  over the key tiles it attends. Summed-area table: O(tiles) memory and time."""
  grid = np.asarray(values).reshape(spec.num_tiles)
  table = np.zeros(tuple(n + 1 for n in spec.num_tiles), grid.dtype)
  inner = grid
  for d in range(spec.rank):
    inner = np.cumsum(inner, axis=d)
  table[(slice(1, None),) * spec.rank] = inner
  lo, hi = tile_bounds(spec, window)
  out = np.zeros(lo.shape[0], grid.dtype)
  for corner in itertools.product((0, 1), repeat=spec.rank):
    # Inclusion-exclusion over the box's corners: hi + 1 where the bit is set, lo elsewhere.
    idx = tuple(np.where(c, hi[:, d] + 1, lo[:, d]) for d, c in enumerate(corner))
    sign = -1 if (spec.rank - sum(corner)) % 2 else 1
    out += sign * table[idx]
  return out


def key_tile_runs(spec: STASpec, window: Window, query_tiles: np.ndarray):
  """The key tiles of each query tile in ``query_tiles``, as runs of consecutive tiles.

  Along the last axis a box's key tiles are consecutive in tile order, so each query tile's
  box is ``prod(box sizes of the other axes)`` runs. Returns (row int64[R], first, last
  int64[R]): run r holds the key tiles ``first[r]..last[r]`` (inclusive) of query
  ``query_tiles[row[r]]``; rows ascending and, within a row, runs ascending.
  """
  lo, hi = tile_bounds(spec, window)
  lo, hi = lo[query_tiles], hi[query_tiles]
  size = hi - lo + 1                                                  # [m, rank]
  outer = size[:, :-1].prod(axis=1)                                   # runs per query
  row = np.repeat(np.arange(query_tiles.size), outer)
  local = np.arange(row.size) - np.repeat(np.cumsum(outer) - outer, outer)
  coords = []
  for d in range(spec.rank - 2, -1, -1):                             # last outer axis fastest
    coords.append(lo[row, d] + local % size[row, d])
    local = local // size[row, d]
  coords = coords[::-1]
  nt = spec.num_tiles
  first = np.ravel_multi_index(tuple(coords) + (lo[row, -1],), nt) if coords else lo[row, -1]
  last = first + (hi[row, -1] - lo[row, -1])
  return row, np.asarray(first, np.int64), np.asarray(last, np.int64)


def _check_dense(name: str, n: int, what: str) -> None:
  if n * n > MAX_DENSE_ENTRIES:
    raise ValueError(
        f"{name}: the dense [{n}, {n}] mask over {what} would have {n * n:,} entries (at most "
        f"{MAX_DENSE_ENTRIES:,}); it is meant for small shapes. Use jsta.block_schedule (the "
        f"block-sparse schedule) or jsta.mask.token_mask_rows (some rows of the mask) instead")


@functools.lru_cache(maxsize=64)
def tile_mask(spec: STASpec, window: Window) -> np.ndarray:
  """[num_tiles_total, num_tiles_total] bool over tiles in tile order (t-major, then h, then w).

  Dense: small shapes only (ValueError beyond ``MAX_DENSE_ENTRIES`` entries).
  """
  _check_dense("tile_mask", int(np.prod(spec.num_tiles)), "tiles")
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
  """[seq_len, seq_len] bool token mask (query, key) for one window. Small shapes only
  (ValueError beyond ``MAX_DENSE_ENTRIES`` entries; :func:`token_mask_rows` gives some rows).

  Rows of invalid queries (padding) are all False.
  """
  _check_spec(spec)
  if window is None:
    if spec.is_per_head:
      raise ValueError("token_mask: spec has per-head windows; pass window=")
    window = spec.window
  window = spec.check_window(window)
  _check_dense("token_mask", spec.seq_len, "tokens")
  return token_mask_rows(spec, window, np.arange(spec.seq_len))


def attended_pairs(spec: STASpec, window: Window) -> int:
  """Attended valid (query, key) token pairs for one head, computed at tile granularity in
  O(tiles) (a box sum of the valid tokens per tile)."""
  _check_spec(spec)
  window = spec.check_window(window)
  per_tile = np.bincount(layout.position_tile(spec), weights=video_token_valid(spec),
                         minlength=int(np.prod(spec.num_tiles))).astype(np.int64)
  video = int(per_tile @ box_sums(spec, window, per_tile))
  nvalid_video = int(per_tile.sum())
  t = spec.text_len
  # video->text, text->video, text->text.
  return video + 2 * nvalid_video * t + t * t


def token_mask_rows(spec: STASpec, window: Window, rows) -> np.ndarray:
  """[len(rows), seq_len] bool: the rows ``rows`` (query positions) of :func:`token_mask`.

  Built from the key-tile box of each row's tile: O(len(rows) x seq_len), so it also works
  where the full mask would not fit.
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
  video_row = rows < nv
  m = np.ones((rows.size, spec.seq_len), dtype=bool)
  if nv:
    tiles = layout.position_tile(spec)[np.minimum(rows, nv - 1)]
    lo, hi = tile_bounds(spec, window)
    key_coords = np.stack(np.unravel_index(np.arange(lo.shape[0]), spec.num_tiles), axis=1)
    # Attended key tiles of each row: inside the box of its query tile on every axis.
    attend = np.ones((rows.size, lo.shape[0]), dtype=bool)
    for d in range(spec.rank):
      attend &= ((key_coords[None, :, d] >= lo[tiles, d][:, None])
                 & (key_coords[None, :, d] <= hi[tiles, d][:, None]))
    m[:, :nv] = np.where(video_row[:, None],
                         np.repeat(attend, layout.tile_lengths(spec), axis=1), True)
  return m & valid[rows][:, None] & valid[None, :]
