"""Static block schedules for block-sparse STA kernels, computed once in numpy and cached.

The sequence (tile-order video tokens, then text slots padded up to a block multiple) is cut
into query blocks of ``block_q`` and key blocks of ``block_kv`` tokens. Tiles are cut into whole
blocks, so the STA mask is constant on every (query block, key block) pair: a pair is either
attended or skipped. The only token-level masking left is key validity (padded latent tokens,
padded text slots); key blocks holding any invalid key are flagged in ``kv_needs_mask``.

Forward schedule, per head group g and query block i:
  ``kv_index[g, i, :kv_count[g, i]]`` are the key blocks to visit, ascending (so neighbouring
  tiles give contiguous runs of key blocks); the tail of each row repeats the last valid entry
  so that a kernel may prefetch past the count without going out of bounds.
Backward (transposed) schedule, per head group g and key block j:
  ``q_index[g, j, :q_count[g, j]]`` are the query blocks that visit key block j.
Heads with equal windows share a group: ``head_to_group[h]``.
Fully padded query blocks get count 0 (their outputs are zeros); fully padded key blocks are
never visited. Every video query block of an unpadded spec has the same count.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jsta import mask as mask_lib
from jsta.spec import STASpec, Window


def padded_text_len(spec: STASpec, block_q: int, block_kv: int) -> int:
  """Text slots rounded up so the whole sequence is a multiple of both block sizes."""
  if spec.text_max_len == 0:
    return 0
  m = math.lcm(block_q, block_kv)
  return -(-spec.text_max_len // m) * m


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSchedule:
  """Block-sparse schedule of an :class:`STASpec` for given block sizes and head count.

  Array shapes (G = number of distinct windows, nq/nkv = query/key blocks):
    head_to_group: int32[heads]
    kv_index: int32[G, nq, max_kv]; kv_count: int32[G, nq]
    q_index: int32[G, nkv, max_q];  q_count: int32[G, nkv]
    kv_needs_mask: bool[nkv]; key_valid, query_valid: bool[seq]  (seq = nq * block_q)
  """

  spec: STASpec
  num_heads: int
  block_q: int
  block_kv: int
  seq_len: int
  num_video_q_blocks: int
  num_video_kv_blocks: int
  head_to_group: np.ndarray
  group_windows: tuple[Window, ...]
  kv_index: np.ndarray
  kv_count: np.ndarray
  q_index: np.ndarray
  q_count: np.ndarray
  kv_needs_mask: np.ndarray
  key_valid: np.ndarray
  query_valid: np.ndarray

  @property
  def num_groups(self) -> int:
    return len(self.group_windows)

  @property
  def num_q_blocks(self) -> int:
    return self.seq_len // self.block_q

  @property
  def num_kv_blocks(self) -> int:
    return self.seq_len // self.block_kv

  @property
  def has_masked_keys(self) -> bool:
    return bool(self.kv_needs_mask.any())

  @property
  def has_invalid_queries(self) -> bool:
    return not bool(self.query_valid.all())

  @property
  def video_kv_count(self) -> int:
    """Key blocks per video query block (max over groups and blocks)."""
    nqv = self.num_video_q_blocks
    return int(self.kv_count[:, :nqv].max()) if nqv else 0

  @property
  def uniform_video_count(self) -> bool:
    """True when every non-empty video query block of every group visits the same number."""
    c = self.kv_count[:, :self.num_video_q_blocks]
    c = c[c > 0]
    return c.size == 0 or bool((c == c.max()).all())

  def pairs(self, group: int) -> set[tuple[int, int]]:
    """The set of (query block, key block) pairs the forward schedule visits for one group."""
    out = set()
    for i in range(self.num_q_blocks):
      for j in self.kv_index[group, i, :self.kv_count[group, i]]:
        out.add((i, int(j)))
    return out

  def transposed_pairs(self, group: int) -> set[tuple[int, int]]:
    out = set()
    for j in range(self.num_kv_blocks):
      for i in self.q_index[group, j, :self.q_count[group, j]]:
        out.add((int(i), j))
    return out

  def visited_blocks(self) -> int:
    """Visited (query block, key block) pairs summed over heads."""
    per_group = self.kv_count.sum(axis=1)
    return int(per_group[self.head_to_group].sum())


def _check_blocks(spec: STASpec, block_q: int, block_kv: int) -> None:
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
      raise TypeError(f"{name} must be a positive int, got {b!r}")
    if b <= 0:
      raise ValueError(f"{name} must be a positive int, got {b!r}")
    if spec.tile_size % b:
      raise ValueError(
          f"{name}={b} must divide the tile's token count: tile_shape {spec.tile_shape} has "
          f"{spec.tile_size} tokens; pick a block size that divides it or another tile shape")


def _group_tables(spec: STASpec, window: Window, block_q: int, block_kv: int, seq_len: int,
                  key_valid: np.ndarray, query_valid: np.ndarray):
  """Per-group key-block lists for every query block, and the transposed lists."""
  nq, nkv = seq_len // block_q, seq_len // block_kv
  rq, rk = spec.tile_size // block_q, spec.tile_size // block_kv
  nqv, nkvv = spec.padded_video_len // block_q, spec.padded_video_len // block_kv
  kv_block_any = key_valid.reshape(nkv, block_kv).any(axis=1)
  q_block_any = query_valid.reshape(nq, block_q).any(axis=1)

  tm = mask_lib.tile_mask(spec, window)
  # Block-level mask [nq, nkv]: tiles expanded into whole blocks; text rows/columns dense.
  bm = np.ones((nq, nkv), dtype=bool)
  bm[:nqv, :nkvv] = np.repeat(np.repeat(tm, rq, axis=0), rk, axis=1)
  bm &= q_block_any[:, None] & kv_block_any[None, :]
  return bm


def _pack_rows(bm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """[G, rows, cols] bool -> (index int32[G, rows, width], count int32[G, rows]), ascending."""
  g, rows, cols = bm.shape
  count = bm.sum(axis=2).astype(np.int32)
  width = max(int(count.max()), 1)
  index = np.zeros((g, rows, width), dtype=np.int32)
  for gi in range(g):
    for r in range(rows):
      idx = np.flatnonzero(bm[gi, r])
      if idx.size:
        index[gi, r, :idx.size] = idx
        index[gi, r, idx.size:] = idx[-1]
  return index, count


@functools.lru_cache(maxsize=128)
def block_schedule(spec: STASpec, num_heads: int, block_q: int, block_kv: int) -> BlockSchedule:
  """The cached :class:`BlockSchedule` of ``spec`` for ``num_heads`` heads and the block sizes.

  Raises ValueError if a block size does not divide the tile's token count or if a per-head
  window list does not have ``num_heads`` entries.
  """
  _check_blocks(spec, block_q, block_kv)
  head_windows = spec.head_windows(num_heads)
  group_windows = tuple(dict.fromkeys(head_windows))
  head_to_group = np.array([group_windows.index(w) for w in head_windows], dtype=np.int32)

  seq_len = spec.padded_video_len + padded_text_len(spec, block_q, block_kv)
  valid = np.zeros(seq_len, dtype=bool)
  tv = mask_lib.token_valid(spec)
  valid[:tv.size] = tv
  nkv = seq_len // block_kv

  bms = np.stack([
      _group_tables(spec, w, block_q, block_kv, seq_len, valid, valid) for w in group_windows])
  kv_index, kv_count = _pack_rows(bms)
  q_index, q_count = _pack_rows(np.swapaxes(bms, 1, 2))
  kv_needs_mask = ~valid.reshape(nkv, block_kv).all(axis=1)

  arrays = dict(head_to_group=head_to_group, kv_index=kv_index, kv_count=kv_count,
                q_index=q_index, q_count=q_count, kv_needs_mask=kv_needs_mask,
                key_valid=valid, query_valid=valid.copy())
  for a in arrays.values():
    a.setflags(write=False)
  return BlockSchedule(
      spec=spec, num_heads=num_heads, block_q=block_q, block_kv=block_kv, seq_len=seq_len,
      num_video_q_blocks=spec.padded_video_len // block_q,
      num_video_kv_blocks=spec.padded_video_len // block_kv,
      group_windows=group_windows, **arrays)
