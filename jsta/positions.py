"""Sequence positions of a spec: where each video token sits in tile order (numpy, cached).

Tiles are ordered t-major (then h, then w) and each tile's tokens are contiguous, t-major
inside the tile. A tile cut by the edge of the latent (an axis that is not a multiple of its
tile) holds only its real tokens, in the same order over its real extent, followed by padding
up to a multiple of ``tile_align(spec)`` tokens (64 for tiles of a multiple of 64 tokens): a
partial edge tile costs about its real tokens, not a whole tile. Whole tiles have no padding.
See docs/SEMANTICS.md. The per-tile counts come from :mod:`jsta.grid`; this module adds the
token-level index that :mod:`jsta.token_order` gathers with and the masks and schedules read.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np

from jsta import grid
from jsta.spec import STASpec


def tile_align(spec: STASpec) -> int:
  """The padding granularity of partial edge tiles (:func:`jsta.grid.tile_align`)."""
  return grid.tile_align(spec.tile_size)


def _readonly(a: np.ndarray) -> np.ndarray:
  a.setflags(write=False)
  return a


def tile_lengths(spec: STASpec) -> np.ndarray:
  """int64[num tiles]: positions each tile occupies (its real tokens rounded up to
  ``tile_align``), in tile order."""
  return grid.tile_lengths(spec.latent_shape, spec.tile_shape)


def tile_offsets(spec: STASpec) -> np.ndarray:
  """int64[num tiles + 1]: the first position of each tile, then the video length."""
  return grid.tile_offsets(spec.latent_shape, spec.tile_shape)


@functools.lru_cache(maxsize=128)
def source_index(spec: STASpec) -> np.ndarray:
  """int64[padded_video_len]: the row-major (t, h, w) index of the token at each position,
  -1 at padding positions."""
  ext = grid.tile_extents(spec.latent_shape, spec.tile_shape)
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
