"""The tile grid in plain values: how tiles cut a latent, and which key tiles a query tile attends.

The lowest layer of the spec -> schedule path: everything here takes shapes, windows and axes as
tuples of ints, never a spec, so that :mod:`jsta.spec` computes its geometry and counts from it
and the modules that take a spec (:mod:`jsta.positions`, :mod:`jsta.mask`, :mod:`jsta.schedule`)
sit above both. Tiles are numbered in tile order (t-major, then h, then w; docs/SEMANTICS.md).

  tile_align, tile_extents, tile_lengths, tile_offsets   tokens and positions of each tile
  axis_bounds, axis_attend                               the tile rule along one axis
  tile_bounds, box_sums                                  the rule as a box of key tiles per tile
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

# Partial edge tiles of tiles of a multiple of this many tokens are padded to a multiple of
# it: the row granularity of the Hopper kernels' compute warpgroups.
ALIGN = 64

Shape = tuple[int, ...]


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def num_tiles(latent_shape: Shape, tile_shape: Shape) -> Shape:
  """Tiles per axis: ceil(latent / tile) (a partial edge tile counts as one)."""
  return tuple(-(-s // t) for s, t in zip(latent_shape, tile_shape))


def tile_align(tile_size: int) -> int:
  """The padding granularity of partial edge tiles of ``tile_size`` tokens: 64 where that is a
  multiple of 64, else the tile size itself (partial tiles padded to whole tiles)."""
  return ALIGN if tile_size % ALIGN == 0 else tile_size


@functools.lru_cache(maxsize=128)
def tile_extents(latent_shape: Shape, tile_shape: Shape) -> np.ndarray:
  """int64[num tiles, rank]: the real extent of each tile (tile order), <= tile_shape."""
  per_axis = [np.minimum(t, s - np.arange(n) * t)
              for n, t, s in zip(num_tiles(latent_shape, tile_shape), tile_shape, latent_shape)]
  grids = np.meshgrid(*per_axis, indexing="ij")
  return _readonly(np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64))


@functools.lru_cache(maxsize=128)
def tile_lengths(latent_shape: Shape, tile_shape: Shape) -> np.ndarray:
  """int64[num tiles]: positions each tile occupies in the sequence, its real tokens rounded up
  to :func:`tile_align` (whole tiles: the tile size)."""
  real = tile_extents(latent_shape, tile_shape).prod(axis=1)
  a = tile_align(math.prod(tile_shape))
  return _readonly(-(-real // a) * a)


@functools.lru_cache(maxsize=128)
def tile_offsets(latent_shape: Shape, tile_shape: Shape) -> np.ndarray:
  """int64[num tiles + 1]: the first position of each tile, then the padded video length."""
  lengths = tile_lengths(latent_shape, tile_shape)
  return _readonly(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))


def axis_bounds(n: int, k: int, causal: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) int64[n]: query tile coordinate q attends the key tile coordinates
  ``lo[q] <= kk <= hi[q]`` along an axis of ``n`` tiles with a window of ``k`` tiles (see
  :func:`axis_attend`)."""
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


def tile_bounds(tiles: Shape, window: Shape,
                causal_axes: Shape = ()) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) int64[prod(tiles), rank]: the box of key tile coordinates (inclusive) that each
  query tile (tile order) of a grid of ``tiles`` tiles per axis attends."""
  per_axis = [axis_bounds(n, k, d in causal_axes) for d, (n, k) in enumerate(zip(tiles, window))]
  coords = np.unravel_index(np.arange(math.prod(tiles)), tiles)
  lo = np.stack([b[0][c] for b, c in zip(per_axis, coords)], axis=1)
  hi = np.stack([b[1][c] for b, c in zip(per_axis, coords)], axis=1)
  return lo, hi


def box_sums(tiles: Shape, window: Shape, causal_axes: Shape, values: np.ndarray) -> np.ndarray:
  """[prod(tiles)]: for each query tile, the sum of ``values`` (one per tile, tile order) over
  the key tiles it attends. Summed-area table: O(tiles) memory and time."""
  rank = len(tiles)
  grid = np.asarray(values).reshape(tiles)
  table = np.zeros(tuple(n + 1 for n in tiles), grid.dtype)
  inner = grid
  for d in range(rank):
    inner = np.cumsum(inner, axis=d)
  table[(slice(1, None),) * rank] = inner
  lo, hi = tile_bounds(tiles, window, causal_axes)
  out = np.zeros(lo.shape[0], grid.dtype)
  for corner in itertools.product((0, 1), repeat=rank):
    # Inclusion-exclusion over the box's corners: hi + 1 where the bit is set, lo elsewhere.
    idx = tuple(np.where(c, hi[:, d] + 1, lo[:, d]) for d, c in enumerate(corner))
    sign = -1 if (rank - sum(corner)) % 2 else 1
    out += sign * table[idx]
  return out
