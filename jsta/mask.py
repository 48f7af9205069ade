"""Token- and tile-level STA masks, computed in numpy from the spec.

Everything here is in tile order: the video positions in tile order and the text slots, the
text after the video (``text_position="last"``) or before it (``"first"``).

The tile rule is a product of intervals: along each axis a query tile attends the key tiles of
one interval (:func:`jsta.grid.axis_bounds`), so the key tiles of a query tile form a box of the
tile grid. Everything a schedule or a count needs is built from these boxes in O(tiles x window)
memory and time (:func:`box_sums`, :func:`key_tile_runs`); only :func:`tile_mask` and
:func:`token_mask`, dense masks for small shapes, cost O(tiles^2) or O(seq^2), and they refuse
shapes whose mask would exceed ``MAX_DENSE_ENTRIES`` entries.
"""

from __future__ import annotations

import functools

import numpy as np

from jsta import checks, grid, positions
from jsta.spec import STASpec, Window

# The dense masks (tile_mask, token_mask) refuse shapes beyond this many entries (1 GiB of bool):
# the 115,200 1x1x1 tiles of a 30x48x80 latent would need 12.4 GiB.
MAX_DENSE_ENTRIES = 2 ** 30


def tile_bounds(spec: STASpec, window: Window) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) int64[num_tiles_total, rank]: the box of key tile coordinates (inclusive) that
  each query tile (tile order) attends (:func:`jsta.grid.tile_bounds`)."""
  return grid.tile_bounds(spec.num_tiles, window, spec.causal_axes)


def box_sums(spec: STASpec, window: Window, values: np.ndarray) -> np.ndarray:
  """[num_tiles_total]: for each query tile, the sum of ``values`` (one per tile, tile order)
  over the key tiles it attends (:func:`jsta.grid.box_sums`): O(tiles)."""
  return grid.box_sums(spec.num_tiles, window, spec.causal_axes, values)


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


def tile_mask(spec: STASpec, window: Window | None = None) -> np.ndarray:
  """[num_tiles_total, num_tiles_total] bool over tiles in tile order (t-major, then h, then w)
  for one window (default: the spec's, which must then be one for every head).

  Dense: small shapes only (ValueError beyond ``MAX_DENSE_ENTRIES`` entries).
  """
  _check_spec(spec)
  if window is None:
    if spec.is_per_head:
      raise ValueError("tile_mask: spec has per-head windows; pass window=")
    window = spec.window
  return _tile_mask(spec, spec.check_window(window))


@functools.lru_cache(maxsize=64)
def _tile_mask(spec: STASpec, window: Window) -> np.ndarray:
  _check_dense("tile_mask", int(np.prod(spec.num_tiles)), "tiles")
  m = np.ones((1, 1), dtype=bool)
  for d, (n, k) in enumerate(zip(spec.num_tiles, window)):
    m = np.kron(m, grid.axis_attend(n, k, d in spec.causal_axes))
  m.setflags(write=False)
  return m


@functools.lru_cache(maxsize=64)
def video_token_valid(spec: STASpec) -> np.ndarray:
  """[padded_video_len] bool: True where the tile-order position holds a real token (False on
  the padding that rounds a partial edge tile up, see :mod:`jsta.positions`)."""
  out = positions.source_index(spec) >= 0
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
  if not isinstance(spec, STASpec):
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
  """Attended valid (query, key) token pairs for one head with ``window``, computed at tile
  granularity in O(tiles) (:meth:`jsta.STASpec.attended_pairs`)."""
  _check_spec(spec)
  return spec.with_window(spec.check_window(window)).attended_pairs()


def token_mask_rows(spec: STASpec, window: Window, rows) -> np.ndarray:
  """[len(rows), seq_len] bool: the rows ``rows`` (query positions) of :func:`token_mask`.

  Built from the key-tile box of each row's tile: O(len(rows) x seq_len), so it also works
  where the full mask would not fit.
  """
  _check_spec(spec)
  window = spec.check_window(window)
  rows = checks.check_positions("rows", rows, spec.seq_len)
  if spec.text_position == "first":
    pos = text_last_position(spec)
    return token_mask_rows(spec.text_last(), window, pos[rows])[:, pos]
  nv = spec.padded_video_len
  valid = token_valid(spec)
  video_row = rows < nv
  m = np.ones((rows.size, spec.seq_len), dtype=bool)
  if nv:
    tiles = positions.position_tile(spec)[np.minimum(rows, nv - 1)]
    lo, hi = tile_bounds(spec, window)
    key_coords = np.stack(np.unravel_index(np.arange(lo.shape[0]), spec.num_tiles), axis=1)
    # Attended key tiles of each row: inside the box of its query tile on every axis.
    attend = np.ones((rows.size, lo.shape[0]), dtype=bool)
    for d in range(spec.rank):
      attend &= ((key_coords[None, :, d] >= lo[tiles, d][:, None])
                 & (key_coords[None, :, d] <= hi[tiles, d][:, None]))
    m[:, :nv] = np.where(video_row[:, None],
                         np.repeat(attend, positions.tile_lengths(spec), axis=1), True)
  return m & valid[rows][:, None] & valid[None, :]
