"""The sequence layout of a spec: where each video token sits in tile order (numpy, cached).

Tiles are ordered t-major (then h, then w) and each tile's tokens are contiguous, t-major
inside the tile. A tile cut by the edge of the latent (an axis that is not a multiple of its
tile) holds only its real tokens, in the same order over its real extent, followed by padding
up to a multiple of ``tile_align(spec)`` tokens (64 for tiles of a multiple of 64 tokens): a
partial edge tile costs about its real tokens, not a whole tile. Whole tiles have no padding.
See docs/SEMANTICS.md.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # annotations only: jsta.spec imports this module
  from jsta.spec import STASpec

# Partial edge tiles of tiles of a multiple of this many tokens are padded to a multiple of
# it: the row granularity of the Hopper kernels' compute warpgroups.
ALIGN = 64


def tile_align(spec: STASpec) -> int:
  """The padding granularity of partial edge tiles: 64 where the tile's token count is a
  multiple of 64, else the tile's token count (partial tiles padded to whole tiles)."""
  return ALIGN if spec.tile_size % ALIGN == 0 else spec.tile_size


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def _tile_extents(spec: STASpec) -> np.ndarray:
  """int64[num tiles, rank]: the real extent of each tile (tile order), <= tile_shape."""
  per_axis = []
  for n, t, s in zip(spec.num_tiles, spec.tile_shape, spec.latent_shape):
    per_axis.append(np.minimum(t, s - np.arange(n) * t))
  grids = np.meshgrid(*per_axis, indexing="ij")
  return np.stack([g.reshape(-1) for g in grids], axis=1).astype(np.int64)


@functools.lru_cache(maxsize=128)
def tile_lengths(spec: STASpec) -> np.ndarray:
  """int64[num tiles]: positions each tile occupies (its real tokens rounded up to
  ``tile_align``), in tile order."""
  real = _tile_extents(spec).prod(axis=1)
  a = tile_align(spec)
  return _readonly(-(-real // a) * a)


@functools.lru_cache(maxsize=128)
def tile_offsets(spec: STASpec) -> np.ndarray:
  """int64[num tiles + 1]: the first position of each tile, then the video length."""
  return _readonly(np.concatenate([[0], np.cumsum(tile_lengths(spec))]).astype(np.int64))


@functools.lru_cache(maxsize=128)
def source_index(spec: STASpec) -> np.ndarray:
  """int64[padded_video_len]: the row-major (t, h, w) index of the token at each position,
  -1 at padding positions."""
  ext = _tile_extents(spec)
  offs = tile_offsets(spec)
  out = np.full(int(offs[-1]), -1, np.int64)
  strides = np.array([math.prod(spec.latent_shape[d + 1:]) for d in range(spec.rank)])
  ranges = [range(n) for n in spec.num_tiles]
  # Tiles of one shape share their in-tile offsets: group by extent.
  origin = np.array(list(itertools.product(*ranges)), np.int64).reshape(-1, spec.rank)
  origin = origin * np.array(spec.tile_shape)
  for e in {tuple(x) for x in ext}:
    sel = np.flatnonzero((ext == np.array(e)).all(axis=1))
    local = np.stack(np.meshgrid(*[np.arange(x) for x in e], indexing="ij"), -1).reshape(-1,
                                                                                       spec.rank)
    rows = (origin[sel][:, None, :] + local[None]) @ strides          # [tiles, tokens]
    pos = offs[sel][:, None] + np.arange(local.shape[0])[None]
    out[pos] = rows
  return _readonly(out)


@functools.lru_cache(maxsize=128)
def position_tile(spec: STASpec) -> np.ndarray:
  """int64[padded_video_len]: the tile (in tile order) of each video position."""
  return _readonly(np.repeat(np.arange(tile_lengths(spec).size), tile_lengths(spec)))


@functools.lru_cache(maxsize=128)
def target_index(spec: STASpec) -> np.ndarray:
  """int64[video_len]: the position of each row-major token (the inverse of source_index)."""
  src = source_index(spec)
  out = np.empty(spec.video_len, np.int64)
  valid = np.flatnonzero(src >= 0)
  out[src[valid]] = valid
  return _readonly(out)
