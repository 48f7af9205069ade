"""Static block schedules for block-sparse STA kernels, computed once in numpy and cached.

The sequence (video positions in tile order, then the text slots, padded at the end to a
multiple of both block sizes) is cut into query blocks of ``block_q`` and key blocks of
``block_kv`` positions. Blocks may span tiles: the mask of a (query block, key block) pair is
described at the granularity of *mask units* of ``mask_unit`` positions (a divisor of both
block sizes and of every tile length, so a unit never spans two tiles and the STA mask is
constant on every pair of units). A visited pair carries a bit mask of its unit pairs that the
tile rule attends: bit ``r * (block_kv // mask_unit) + c`` for query unit r and key unit c. Where the
blocks divide every tile (the usual case: ``spec.block_align``), every visited pair is whole
and its bits are all set (``full_bits``). Besides, key validity (padding of partial edge tiles
and text slots) is token level: key blocks holding an invalid key are flagged in
``kv_needs_mask``.

Forward schedule, per head group g and query block i:
  ``kv_index[g, i, :kv_count[g, i]]`` are the key blocks to visit, ascending (so neighbouring
  tiles give contiguous runs of key blocks), ``kv_bits`` their unit masks; the tail of each row
  repeats the last valid entry so that a kernel may prefetch past the count.
Backward (transposed) schedule, per head group g and key block j:
  ``q_index[g, j, :q_count[g, j]]`` are the query blocks that visit key block j (``q_bits``).
Heads with equal windows share a group: ``head_to_group[h]``.
Fully padded query blocks get count 0 (their outputs are zeros); fully padded key blocks are
never visited.

Cost: the construction walks the key-tile box of each query tile (:mod:`jsta.mask`), never a
dense [tiles, tiles] mask, so without text it takes O(tiles x window) memory and time (the
115,200 1x1x1 tiles of a 30x48x80 latent with a 3x3x3 window: about a second and a few hundred
MiB). Text query blocks visit every key block, so with text slots the forward tables are
[groups, query blocks, key blocks]; schedules whose tables would exceed ``MAX_TABLE_ENTRIES``
entries are refused (ValueError).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from jsta import positions
from jsta import mask as mask_lib
from jsta.spec import STASpec, Window

# At most this many unit pairs per block pair (the bits of one int32).
MAX_UNIT_PAIRS = 16
# At most this many entries per index table (1 GiB of int32): text query blocks visit every key
# block, so with text slots the forward tables are [groups, query blocks, key blocks].
MAX_TABLE_ENTRIES = 2 ** 28


def schedule_seq_len(spec: STASpec, block_q: int, block_kv: int) -> int:
  """The schedule's sequence: ``spec.seq_len`` rounded up to a multiple of both blocks."""
  m = math.lcm(block_q, block_kv)
  return -(-spec.seq_len // m) * m


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSchedule:
  """Block-sparse schedule of an :class:`STASpec` for given block sizes and head count.

  Array shapes (G = number of distinct windows, nq/nkv = query/key blocks):
    head_to_group: int32[heads]
    kv_index, kv_bits: int32[G, nq, max_kv]; kv_count: int32[G, nq]
    q_index, q_bits: int32[G, nkv, max_q];   q_count: int32[G, nkv]
    kv_needs_mask: bool[nkv]; key_valid, query_valid: bool[seq]  (seq = nq * block_q)
  ``dynamic_text``: built for text lengths given at run time (see :func:`block_schedule`);
  schedules derived from this one (other block sizes) must pass it on.
  """

  spec: STASpec
  num_heads: int
  block_q: int
  block_kv: int
  mask_unit: int
  seq_len: int
  num_video_q_blocks: int
  num_video_kv_blocks: int
  head_to_group: np.ndarray
  group_windows: tuple[Window, ...]
  kv_index: np.ndarray
  kv_bits: np.ndarray
  kv_count: np.ndarray
  q_index: np.ndarray
  q_bits: np.ndarray
  q_count: np.ndarray
  kv_needs_mask: np.ndarray
  key_valid: np.ndarray
  query_valid: np.ndarray
  dynamic_text: bool = False

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
  def q_units(self) -> int:
    """Mask units per query block."""
    return self.block_q // self.mask_unit

  @property
  def kv_units(self) -> int:
    """Mask units per key block."""
    return self.block_kv // self.mask_unit

  @property
  def full_bits(self) -> int:
    """The unit mask of a wholly attended block pair."""
    return (1 << (self.q_units * self.kv_units)) - 1

  @property
  def has_partial_pairs(self) -> bool:
    """True when some visited block pair is attended only in part (blocks span tiles)."""
    live = np.arange(self.kv_index.shape[2])[None, None, :] < self.kv_count[..., None]
    return bool((live & (self.kv_bits != self.full_bits)).any())

  @property
  def has_masked_keys(self) -> bool:
    return bool(self.kv_needs_mask.any())

  @property
  def has_invalid_queries(self) -> bool:
    return not bool(self.query_valid.all())

  def maybe_padded(self) -> np.ndarray:
    """bool[seq]: the positions that may be padded (as queries and as keys): the invalid
    ones and, built for run-time text lengths (``dynamic_text``), every text slot."""
    maybe = ~np.asarray(self.query_valid, bool)
    if self.dynamic_text:
      start = self.spec.padded_video_len
      maybe[start:start + self.spec.text_max_len] = True
    return maybe

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


def _check_blocks(spec: STASpec, block_q: int, block_kv: int, mask_unit) -> int:
  """Validates the block sizes; returns the mask unit (default: the largest that fits)."""
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)):
      raise TypeError(f"{name} must be a positive int, got {b!r}")
    if b <= 0:
      raise ValueError(f"{name} must be a positive int, got {b!r}")
  align = spec.block_align
  if mask_unit is None:
    mask_unit = math.gcd(block_q, block_kv, align)
  if isinstance(mask_unit, bool) or not isinstance(mask_unit, (int, np.integer)):
    raise TypeError(f"mask_unit must be a positive int or None, got {mask_unit!r}")
  if mask_unit <= 0 or align % mask_unit:
    raise ValueError(
        f"mask_unit={mask_unit} must divide every tile length (their gcd is {align} for "
        f"tile_shape {spec.tile_shape} on latent_shape {spec.latent_shape})")
  for name, b in (("block_q", block_q), ("block_kv", block_kv)):
    if b % mask_unit:
      hint = (f"block sizes dividing {align} never span two tiles" if mask_unit == align else
              f"with mask_unit={mask_unit} the block sizes must be its multiples")
      raise ValueError(
          f"{name}={b} must divide the tile's token count or be a multiple of the mask unit: "
          f"tile_shape {spec.tile_shape} has {spec.tile_size} tokens and the tile lengths' gcd "
          f"is {align}; {hint}")
  ru, rk = block_q // mask_unit, block_kv // mask_unit
  if ru * rk > MAX_UNIT_PAIRS:
    bad = [f"{name}={b}" for name, b in (("block_q", block_q), ("block_kv", block_kv))
           if align % b]
    why = (f"{' and '.join(bad)} {'does' if len(bad) == 1 else 'do'} not divide {align}, the "
           f"gcd of the tile lengths (tile_shape {spec.tile_shape} has {spec.tile_size} "
           "tokens), so " if bad else "")
    fits = [d for d in range(min(align, 128), 0, -1) if align % d == 0][:3]
    # Both sizes may divide every tile (no block spans two tiles) and still be refused: the
    # unit must divide both, and the pair of blocks then holds too many units.
    what = ("span too many tiles:" if bad else
            f"are too far apart: both divide {align}, the gcd of the tile lengths, but")
    raise ValueError(
        f"block_q={block_q} and block_kv={block_kv} {what} {why}a block pair is "
        f"masked in units of {mask_unit} position{'s' * (mask_unit != 1)} (mask_unit = "
        f"gcd(block_q, block_kv, {align})) and would hold {ru} x {rk} = {ru * rk} unit "
        f"pairs, at most {MAX_UNIT_PAIRS} are allowed; use block sizes that divide {align} (e.g. "
        f"{', '.join(map(str, fits))}: blocks inside tiles) with (block_q / u) * (block_kv / u) "
        f"<= {MAX_UNIT_PAIRS} for u = gcd(block_q, block_kv) (equal sizes always fit), or "
        f"multiples of one divisor u of {align} with that bound")
  return int(mask_unit)


# Unit pairs enumerated per piece of the query side: bounds the temporaries of the construction.
_PAIRS_PER_PIECE = 1 << 21


def _runs(starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """For runs of ``counts[r]`` consecutive ints from ``starts[r]``: (run int64[N], value
  int64[N]) of every element, runs in order (N = counts.sum())."""
  run = np.repeat(np.arange(counts.size), counts)
  value = np.arange(run.size, dtype=np.int64) + np.repeat(starts - (np.cumsum(counts) - counts),
                                                          counts)
  return run, value


class _UnitRule:
  """The tile rule of one window at the granularity of mask units (``unit`` positions, a
  divisor of every tile length): which key units each query unit attends. Video query units
  attend the key units of their tile's key-tile box and every non-video unit; non-video query
  units (text slots, the schedule's trailing padding) attend every unit. Works on pieces of
  query units, in O(tiles x window) memory and time besides the pairs themselves."""

  def __init__(self, spec: STASpec, window: Window, unit: int, seq_len: int):
    self.spec, self.window = spec, window
    self.n = seq_len // unit                                           # units
    self.nv = spec.padded_video_len // unit                            # video units
    self.unit_tile = positions.position_tile(spec)[::unit][:self.nv]      # tile of each video unit
    self.tile_units = positions.tile_offsets(spec) // unit                # [tiles + 1]
    # Attended units per query unit, for cutting the query side into pieces.
    box = mask_lib.box_sums(spec, window, np.diff(self.tile_units)) if self.nv else np.zeros(0)
    self.per_query = np.concatenate([box[self.unit_tile] + (self.n - self.nv),
                                     np.full(self.n - self.nv, self.n)]).astype(np.int64)

  def pairs(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(query unit, key unit) int64 arrays of the attended pairs of query units [start, stop),
    ascending by query unit, then by key unit."""
    nv, n = self.nv, self.n
    q_starts, q_counts, q_of = [], [], []
    vstop = min(stop, nv)
    if start < vstop:
      qu = np.arange(start, vstop)
      row, first, last = mask_lib.key_tile_runs(self.spec, self.window, self.unit_tile[qu])
      # Each run of key tiles is a run of key units; then the non-video key units.
      s = np.concatenate([self.tile_units[first], np.full(qu.size, nv)])
      e = np.concatenate([self.tile_units[last + 1], np.full(qu.size, n)])
      owner = np.concatenate([row, np.arange(qu.size)])
      order = np.argsort(owner, kind="stable")                         # runs ascend per query
      q_starts.append(s[order])
      q_counts.append((e - s)[order])
      q_of.append(qu[owner[order]])
    if stop > nv:
      qu = np.arange(max(start, nv), stop)
      q_starts.append(np.zeros(qu.size, np.int64))
      q_counts.append(np.full(qu.size, n, np.int64))
      q_of.append(qu)
    run, key = _runs(np.concatenate(q_starts), np.concatenate(q_counts))
    return np.concatenate(q_of)[run], key


def _group_bits(spec: STASpec, window: Window, unit: int, seq_len: int, valid: np.ndarray,
                ru: int, rk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The visited block pairs of one window: (query block, key block, unit mask) int arrays,
  ascending by query block, then key block. A pair is visited if some (query unit, key unit)
  pair in it is attended by the tile rule and both units hold a valid position; its unit mask
  (bit ``r * rk + c``) follows the tile rule alone (key validity is masked token by token,
  padded queries are dropped), so it is full wherever the blocks lie inside tiles."""
  rule = _UnitRule(spec, window, unit, seq_len)
  any_valid = valid.reshape(-1, unit).any(axis=1)
  nkv = seq_len // (unit * rk)
  # Pieces of whole query blocks (a block pair never spans two pieces) of about
  # _PAIRS_PER_PIECE unit pairs each.
  per_block = rule.per_query.reshape(-1, ru).sum(axis=1)
  cuts = np.searchsorted(np.cumsum(per_block), np.arange(1, per_block.sum() // _PAIRS_PER_PIECE
                                                         + 1) * _PAIRS_PER_PIECE)
  bounds = np.unique(np.concatenate([[0], cuts, [per_block.size]]))
  out_i, out_j, out_b = [], [], []
  for b0, b1 in zip(bounds[:-1], bounds[1:]):
    qu, ku = rule.pairs(int(b0) * ru, int(b1) * ru)
    live = any_valid[qu] & any_valid[ku]
    key = (qu // ru) * nkv + ku // rk
    bit = np.left_shift(1, (qu % ru) * rk + ku % rk)
    if ru > 1 or rk > 1:
      # Several unit pairs per block pair: OR their bits and their liveness.
      order = np.argsort(key, kind="stable")
      key, bit, live = key[order], bit[order], live[order]
      first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]]))
      key = key[first]
      bit = np.bitwise_or.reduceat(bit, first)
      live = np.logical_or.reduceat(live, first)
    out_i.append(key[live] // nkv)
    out_j.append(key[live] % nkv)
    out_b.append(bit[live])
  return (np.concatenate(out_i), np.concatenate(out_j),
          np.concatenate(out_b).astype(np.int32))


def _check_table_size(spec: STASpec, groups: int, seq_len: int, block_q: int, block_kv: int,
                      valid: np.ndarray) -> None:
  """Raises ValueError before building tables of more than ``MAX_TABLE_ENTRIES`` entries: a
  query block holding a valid text slot visits every key block holding a valid position, so
  the forward tables are at least [groups, query blocks, such key blocks]."""
  text = valid[spec.padded_video_len:]
  if not text.any():
    return
  nq = seq_len // block_q
  live_kv = int(valid.reshape(-1, block_kv).any(axis=1).sum())
  if groups * nq * live_kv > MAX_TABLE_ENTRIES:
    raise ValueError(
        f"block_q={block_q} and block_kv={block_kv} are too small for this sequence of "
        f"{spec.seq_len} positions with text: text query blocks visit all {live_kv} key "
        f"blocks, so the schedule's tables would have {groups} x {nq} x {live_kv} = "
        f"{groups * nq * live_kv:,} entries (at most {MAX_TABLE_ENTRIES:,}); use larger blocks "
        f"or larger tiles (tile_shape {spec.tile_shape})")


def _pack(groups, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per group, (row, col, bits) of the non-zero entries, ascending by row then col ->
  (index, bits int32[G, rows, width], count int32[G, rows]): the columns of each row, ascending,
  padded by repeating the last entry (rows without entries: zeros)."""
  counts = np.stack([np.bincount(r, minlength=rows) for r, _, _ in groups]).astype(np.int32)
  width = max(int(counts.max()), 1)
  index = np.zeros((len(groups), rows, width), np.int32)
  packed = np.zeros((len(groups), rows, width), np.int32)
  col = np.minimum(np.arange(width)[None, :], np.maximum(counts[:, :, None] - 1, 0))
  for g, (r, c, b) in enumerate(groups):
    pos = np.arange(r.size) - (np.cumsum(counts[g]) - counts[g])[r]
    index[g, r, pos] = c
    packed[g, r, pos] = b
  return (np.take_along_axis(index, col, axis=2), np.take_along_axis(packed, col, axis=2),
          counts)


def _transpose(group) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(row, col, bits) ascending by row then col -> the same entries ascending by col then row,
  as (col, row, bits)."""
  r, c, b = group
  order = np.lexsort((r, c))
  return c[order], r[order], b[order]


def block_schedule(spec: STASpec, num_heads: int, block_q: int, block_kv: int,
                   mask_unit: int | None = None, dynamic_text: bool = False) -> BlockSchedule:
  """The cached :class:`BlockSchedule` of ``spec`` for ``num_heads`` heads and the block sizes.

  Schedules are of the text-last layout (``spec.text_last()``, kept as ``sched.spec``): with
  ``text_position="first"`` the op moves the text slots behind the video and back.
  ``mask_unit`` (default: gcd(block_q, block_kv, spec.block_align)) is the granularity of the
  block pairs' masks; kernels that mask at a fixed granularity ask for it (the Hopper kernels:
  64, one compute warpgroup's rows). ``dynamic_text=True`` is the schedule for text lengths
  given at run time: every text slot counts as valid in ``key_valid`` and ``query_valid`` (the
  op masks the slots beyond each sample's length), and every key block holding a text slot is
  flagged in ``kv_needs_mask``. Raises ValueError if the blocks do not fit the tiles (see
  :func:`_check_blocks`) or a per-head window list does not have ``num_heads`` entries.
  """
  # The types are checked before the cache is asked: 2.0 == 2 (and True == 1) would hit the
  # entry of an int, so an answer must not depend on what was cached before.
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  if isinstance(num_heads, (bool, np.bool_)) or not isinstance(num_heads, (int, np.integer)):
    raise TypeError(f"num_heads must be an int, got {num_heads!r}")
  for name, b in (("block_q", block_q), ("block_kv", block_kv), ("mask_unit", mask_unit)):
    if name == "mask_unit" and b is None:
      continue
    if isinstance(b, (bool, np.bool_)) or not isinstance(b, (int, np.integer)):
      raise TypeError(f"{name} must be a positive int{' or None' * (name == 'mask_unit')}, "
                      f"got {b!r}")
  if not isinstance(dynamic_text, (bool, np.bool_)):
    raise TypeError(f"dynamic_text must be a bool, got {dynamic_text!r}")
  return _block_schedule(spec, int(num_heads), int(block_q), int(block_kv),
                         None if mask_unit is None else int(mask_unit), bool(dynamic_text))


@functools.lru_cache(maxsize=128)
def _block_schedule(spec: STASpec, num_heads: int, block_q: int, block_kv: int,
                    mask_unit: int | None, dynamic_text: bool) -> BlockSchedule:
  spec = spec.text_last()
  if dynamic_text:
    spec = dataclasses.replace(spec, text_len=spec.text_max_len)
  unit = _check_blocks(spec, block_q, block_kv, mask_unit)
  head_windows = spec.head_windows(num_heads)
  group_windows = tuple(dict.fromkeys(head_windows))
  head_to_group = np.array([group_windows.index(w) for w in head_windows], dtype=np.int32)

  seq_len = schedule_seq_len(spec, block_q, block_kv)
  valid = np.zeros(seq_len, dtype=bool)
  tv = mask_lib.token_valid(spec)
  valid[:tv.size] = tv
  ru, rk = block_q // unit, block_kv // unit
  _check_table_size(spec, len(group_windows), seq_len, block_q, block_kv, valid)
  groups = [_group_bits(spec, w, unit, seq_len, valid, ru, rk) for w in group_windows]
  kv_index, kv_bits, kv_count = _pack(groups, seq_len // block_q)
  # Seen from the key side, with the same bit order (query unit r, key unit c).
  q_index, q_bits, q_count = _pack([_transpose(g) for g in groups], seq_len // block_kv)
  kv_needs_mask = ~valid.reshape(seq_len // block_kv, block_kv).all(axis=1)
  if dynamic_text and spec.text_max_len:
    text = np.zeros(seq_len, dtype=bool)
    text[spec.padded_video_len:spec.seq_len] = True
    kv_needs_mask |= text.reshape(seq_len // block_kv, block_kv).any(axis=1)

  arrays = dict(head_to_group=head_to_group, kv_index=kv_index, kv_bits=kv_bits,
                kv_count=kv_count, q_index=q_index, q_bits=q_bits, q_count=q_count,
                kv_needs_mask=kv_needs_mask, key_valid=valid, query_valid=valid.copy())
  for a in arrays.values():
    a.setflags(write=False)
  return BlockSchedule(
      spec=spec, num_heads=num_heads, block_q=block_q, block_kv=block_kv, mask_unit=unit,
      seq_len=seq_len, num_video_q_blocks=spec.padded_video_len // block_q,
      num_video_kv_blocks=spec.padded_video_len // block_kv,
      group_windows=group_windows, dynamic_text=bool(dynamic_text and spec.text_max_len),
      **arrays)
