"""Block schedules against the token mask: visited pairs, transposes, counts, key masks, errors."""

from __future__ import annotations

import dataclasses
import math
import time
import tracemalloc

import numpy as np
import pytest

import jsta
from jsta.schedule import block_schedule, schedule_seq_len
from jsta.spec import STASpec


def mask_blocks(spec: STASpec, window, sched) -> np.ndarray:
  """[nq, nkv] bool: blocks where the token mask (padded to the schedule's seq) has any True."""
  tm = jsta.token_mask(spec, window)
  s = sched.seq_len
  full = np.zeros((s, s), dtype=bool)
  full[:spec.seq_len, :spec.seq_len] = tm
  return full.reshape(s // sched.block_q, sched.block_q,
                      s // sched.block_kv, sched.block_kv).any(axis=(1, 3))


def as_pairs(bm: np.ndarray) -> set[tuple[int, int]]:
  return {(int(i), int(j)) for i, j in zip(*np.nonzero(bm))}


# (spec, heads, block_q, block_kv)
CASES = [
    # Blocks spanning tiles (unit masks), partial edge tiles of 64-multiple tiles.
    (STASpec((4, 8, 8), (2, 2, 4), (1, 3, 1), text_len=5, text_max_len=7), 2, 32, 64),
    (STASpec((5, 7, 9), (2, 2, 4), ((3, 1, 3), (1, 1, 1)), text_len=3, text_max_len=9), 2, 32,
     16),
    (STASpec((5, 10, 12), (2, 8, 8), (3, 1, 3), text_len=3, text_max_len=5), 1, 128, 128),
    (STASpec((9, 24), (3, 64), (3, 1)), 1, 128, 64),
    (STASpec((4, 6, 8), (2, 2, 2), (3, 3, 3)), 2, 8, 8),
    (STASpec((4, 6, 8), (2, 2, 2), (3, 3, 3)), 1, 4, 2),
    (STASpec((4, 6, 8), (2, 2, 4), (1, 3, 3), text_len=5, text_max_len=7), 2, 16, 4),
    (STASpec((5, 7, 6), (2, 2, 2), ((3, 3, 3), (1, 1, 1), (3, 3, 3)), text_len=3,
             text_max_len=4), 3, 8, 4),
    (STASpec((6, 10), (2, 4), ((3, 1), (5, 3)), text_len=2, text_max_len=9), 2, 4, 8),
    (STASpec((7, 9), (3, 3), (3, 5)), 4, 9, 3),
    (STASpec((40,), (4,), (5,)), 1, 4, 4),
    (STASpec((37,), (8,), ((3,), (7,)), text_len=2, text_max_len=2), 2, 2, 8),
]


def _id(case):
  spec, h, bq, bk = case
  return f"{spec.latent_shape}-{spec.tile_shape}-h{h}-{bq}x{bk}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_pairs_match_token_mask(case):
  spec, heads, bq, bk = case
  sched = block_schedule(spec, heads, bq, bk)
  assert sched.seq_len % bq == 0 and sched.seq_len % bk == 0
  assert sched.seq_len == schedule_seq_len(spec, bq, bk)
  assert 0 <= sched.seq_len - spec.seq_len < math.lcm(bq, bk)
  for h, w in enumerate(spec.head_windows(heads)):
    g = int(sched.head_to_group[h])
    assert sched.group_windows[g] == w
    want = as_pairs(mask_blocks(spec, w, sched))
    assert sched.pairs(g) == want
    assert sched.transposed_pairs(g) == want


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_index_tables_are_well_formed(case):
  spec, heads, bq, bk = case
  sched = block_schedule(spec, heads, bq, bk)
  g_, nq, _ = sched.kv_index.shape
  assert (g_, nq) == (sched.num_groups, sched.num_q_blocks)
  assert sched.q_index.shape[:2] == (sched.num_groups, sched.num_kv_blocks)
  for index, count in ((sched.kv_index, sched.kv_count), (sched.q_index, sched.q_count)):
    assert index.dtype == np.int32 and count.dtype == np.int32
    for g in range(sched.num_groups):
      for r in range(index.shape[1]):
        c = count[g, r]
        row = index[g, r]
        assert np.all(np.diff(row[:c]) > 0)            # ascending, no repeats
        if c:
          assert np.all(row[c:] == row[c - 1])         # tail repeats the last valid entry
  # Counts agree with the pair sets, and the per-head total.
  for g in range(sched.num_groups):
    assert int(sched.kv_count[g].sum()) == len(sched.pairs(g)) == int(sched.q_count[g].sum())
  assert sched.visited_blocks() == sum(
      int(sched.kv_count[sched.head_to_group[h]].sum()) for h in range(heads))


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_key_valid_and_kv_needs_mask(case):
  spec, heads, bq, bk = case
  sched = block_schedule(spec, heads, bq, bk)
  want_valid = np.zeros(sched.seq_len, dtype=bool)
  want_valid[:spec.seq_len] = jsta.token_valid(spec)
  np.testing.assert_array_equal(sched.key_valid, want_valid)
  np.testing.assert_array_equal(sched.query_valid, want_valid)
  np.testing.assert_array_equal(sched.kv_needs_mask,
                                ~want_valid.reshape(-1, bk).all(axis=1))
  assert sched.has_masked_keys == bool((~want_valid).any())
  assert sched.has_invalid_queries == bool((~want_valid).any())
  # Fully padded query blocks visit nothing; fully padded key blocks are never visited.
  q_any = want_valid.reshape(-1, bq).any(axis=1)
  k_any = want_valid.reshape(-1, bk).any(axis=1)
  assert np.all(sched.kv_count[:, ~q_any] == 0)
  assert np.all(sched.q_count[:, ~k_any] == 0)
  assert np.all(sched.kv_count[:, q_any] > 0)


@pytest.mark.parametrize("spec, bq, bk", [
    (STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3)), 128, 128),
    (STASpec((30, 48, 80), (6, 8, 8), (5, 5, 5)), 64, 128),
    (STASpec((4, 6, 8), (2, 2, 2), (3, 3, 3), text_len=3, text_max_len=8), 8, 4),
    (STASpec((6, 12), (2, 4), ((3, 1), (5, 3), (1, 1)), text_len=1, text_max_len=3), 4, 8),
])
def test_equal_counts_per_video_query_block_on_unpadded_specs(spec, bq, bk):
  assert not spec.is_padded
  heads = len(spec.window) if spec.is_per_head else 2
  sched = block_schedule(spec, heads, bq, bk)
  nqv, nkvv = sched.num_video_q_blocks, sched.num_video_kv_blocks
  assert nqv == spec.padded_video_len // bq and nkvv == spec.padded_video_len // bk
  text_kv_live = int(sched.key_valid.reshape(-1, bk)[nkvv:].any(axis=1).sum())
  for g, w in enumerate(sched.group_windows):
    # prod(min(k, n)) key tiles per query tile, each tile cut into tile_size / bk key blocks,
    # plus every key block holding a valid text token.
    want = math.prod(spec.effective_window(w)) * spec.tile_size // bk + text_kv_live
    np.testing.assert_array_equal(sched.kv_count[g, :nqv], want)
  # uniform_video_count is across groups too: true iff all groups keep as many tiles.
  kept = {math.prod(spec.effective_window(w)) for w in sched.group_windows}
  assert sched.uniform_video_count == (len(kept) == 1)
  assert sched.video_kv_count == max(kept) * spec.tile_size // bk + text_kv_live


def test_paper_shape_schedule_counts():
  spec = STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  sched = block_schedule(spec, 24, 128, 128)
  assert sched.num_groups == 1 and sched.num_q_blocks == 900
  assert sched.video_kv_count == 27 * 3
  assert sched.visited_blocks() == 24 * 900 * 81
  assert not sched.has_masked_keys and not sched.has_invalid_queries
  # Visited block area equals the attended token pairs (tile-granular mask, no partial blocks).
  assert sched.visited_blocks() * 128 * 128 == spec.attended_pairs(24)


def test_padded_spec_can_be_non_uniform():
  # Token 4 of latent (5,) lives in a half-padded tile: its query block sees one valid key block.
  sched = block_schedule(STASpec((5,), (2,), (1,)), 1, 1, 1)
  assert sched.kv_count[0].tolist() == [2, 2, 2, 2, 1, 0]
  assert not sched.uniform_video_count


def test_head_to_group_shares_equal_windows():
  w = ((3, 3), (1, 1), (3, 3), (5, 1), (1, 1))
  spec = STASpec((8, 8), (2, 2), w)
  sched = block_schedule(spec, 5, 4, 4)
  assert sched.head_to_group.tolist() == [0, 1, 0, 2, 1]
  assert sched.group_windows == ((3, 3), (1, 1), (5, 1))
  assert sched.num_groups == 3
  single = block_schedule(spec.with_window((3, 3)), 4, 4, 4)
  assert single.head_to_group.tolist() == [0, 0, 0, 0] and single.num_groups == 1


def test_schedule_is_cached_and_read_only():
  spec = STASpec((4, 4), (2, 2), (1, 1))
  a = block_schedule(spec, 2, 4, 2)
  assert block_schedule(STASpec((4, 4), (2, 2), (1, 1)), 2, 4, 2) is a
  with pytest.raises(ValueError):
    a.kv_index[0, 0, 0] = 5


def test_schedule_seq_len():
  spec = STASpec((4,), (4,), (1,), text_len=3, text_max_len=5)      # seq_len 9
  assert schedule_seq_len(spec, 4, 2) == 12
  assert schedule_seq_len(spec, 4, 4) == 12
  assert schedule_seq_len(spec, 1, 1) == 9
  assert schedule_seq_len(STASpec((4,), (4,), (1,)), 4, 4) == 4


@pytest.mark.parametrize("exc, bq, bk, match", [
    (ValueError, 0, 4, "block_q must be a positive int, got 0"),
    (ValueError, 4, -4, "block_kv must be a positive int, got -4"),
    (TypeError, True, 4, "block_q must be a positive int, got True"),
    (TypeError, 4, 2.0, "block_kv must be a positive int, got 2.0"),
    (ValueError, 3, 8, "block_q=3 and block_kv=8 span too many tiles"),
])
def test_bad_blocks_raise(exc, bq, bk, match):
  spec = STASpec((4, 8), (2, 4), (1, 1))
  with pytest.raises(exc, match=match):
    block_schedule(spec, 1, bq, bk)


def test_zero_heads_raise():
  with pytest.raises(ValueError, match=r"num_heads \(heads\) must be >= 1, got 0"):
    block_schedule(STASpec((4, 8), (2, 4), (1, 1)), 0, 4, 4)


def test_per_head_length_mismatch_raises():
  spec = STASpec((4, 8), (2, 4), ((1, 1), (3, 1)))
  with pytest.raises(ValueError, match="gives 2 per-head windows but there are 3 heads"):
    block_schedule(spec, 3, 8, 8)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_unit_bits_match_token_mask(case):
  """Each visited pair's unit mask says which of its (query unit, key unit) pairs the tile rule
  attends (text rows and columns: all), the transposed schedule carries the same bits, and
  blocks inside tiles have whole pairs only."""
  spec, heads, bq, bk = case
  sched = block_schedule(spec, heads, bq, bk)
  u, s = sched.mask_unit, sched.seq_len
  assert spec.block_align % u == 0 and bq % u == 0 and bk % u == 0
  nv = spec.padded_video_len
  tile = np.full(s, -1)
  tile[:nv] = jsta.positions.position_tile(spec)
  unit_tile = tile[::u]
  for g, w in enumerate(sched.group_windows):
    tm = jsta.tile_mask(spec, w)
    video = unit_tile >= 0
    rule = np.ones((s // u, s // u), dtype=bool)
    rule[np.ix_(video, video)] = tm[np.ix_(unit_tile[video], unit_tile[video])]
    by_pair = {}
    for i in range(sched.num_q_blocks):
      for step in range(sched.kv_count[g, i]):
        j, bits = int(sched.kv_index[g, i, step]), int(sched.kv_bits[g, i, step])
        for r in range(sched.q_units):
          for c in range(sched.kv_units):
            assert bool(bits >> (r * sched.kv_units + c) & 1) == rule[
                i * sched.q_units + r, j * sched.kv_units + c]
        by_pair[(i, j)] = bits
    for j in range(sched.num_kv_blocks):
      for step in range(sched.q_count[g, j]):
        i = int(sched.q_index[g, j, step])
        assert by_pair[(i, j)] == int(sched.q_bits[g, j, step])
  if not any(spec.block_align % b for b in (bq, bk)):
    assert not sched.has_partial_pairs and sched.mask_unit == math.gcd(bq, bk)


def test_blocks_spanning_tiles_need_a_whole_unit():
  spec = STASpec((5, 10, 12), (2, 8, 8), (3, 1, 3))      # tile lengths 128 and 64
  assert block_schedule(spec, 1, 128, 128).mask_unit == 64
  assert block_schedule(spec, 1, 128, 128, mask_unit=32).mask_unit == 32
  with pytest.raises(ValueError, match="mask_unit=48 must divide every tile length"):
    block_schedule(spec, 1, 128, 128, mask_unit=48)
  with pytest.raises(ValueError, match="span too many tiles"):
    block_schedule(spec, 1, 512, 512)
  # Blocks inside tiles whose gcd is too small: the message says so, not "spanning tiles".
  inside = STASpec((2, 9), (2, 9), (3, 1))                 # one tile length, 18
  with pytest.raises(ValueError, match="block_q=2 and block_kv=9 are too far apart: both "
                                       "divide 18.* 2 x 9 = 18 unit pairs"):
    block_schedule(inside, 1, 2, 9)
  assert block_schedule(inside, 1, 9, 9).mask_unit == 9
  with pytest.raises(TypeError, match="mask_unit must be a positive int"):
    block_schedule(spec, 1, 128, 128, mask_unit=64.0)


# ---- the sparse construction against the dense one ------------------------------------------

def dense_block_schedule(spec: STASpec, heads: int, bq: int, bk: int, mask_unit=None,
                         dynamic_text: bool = False) -> dict:
  """The schedule's tables built the plain way, from the dense [units, units] mask (tile mask
  indexed by each unit's tile): O(seq^2), small specs only."""
  spec = spec.text_last()
  if dynamic_text:
    spec = dataclasses.replace(spec, text_len=spec.text_max_len)
  unit = mask_unit or math.gcd(bq, bk, spec.block_align)
  s = schedule_seq_len(spec, bq, bk)
  valid = np.zeros(s, bool)
  valid[:spec.seq_len] = jsta.token_valid(spec)
  n, nv = s // unit, spec.padded_video_len // unit
  ru, rk = bq // unit, bk // unit
  unit_tile = jsta.positions.position_tile(spec)[::unit][:nv]
  any_valid = valid.reshape(n, unit).any(axis=1)
  windows = tuple(dict.fromkeys(spec.head_windows(heads)))
  weights = (1 << np.arange(ru * rk, dtype=np.int64)).reshape(ru, rk)

  def block_bits(m):
    u = m.reshape(s // bq, ru, s // bk, rk).astype(np.int64)
    return np.einsum("irjc,rc->ij", u, weights)

  bits = []
  for w in windows:
    rule = np.ones((n, n), bool)
    rule[:nv, :nv] = jsta.tile_mask(spec, w)[np.ix_(unit_tile, unit_tile)]
    live = rule & any_valid[:, None] & any_valid[None, :]
    bits.append(np.where(block_bits(live) != 0, block_bits(rule), 0))
  bits = np.stack(bits)

  def pack(b):
    g, rows, _ = b.shape
    count = (b != 0).sum(axis=2)
    width = max(int(count.max()), 1)
    index, packed = np.zeros((g, rows, width), int), np.zeros((g, rows, width), int)
    for gi in range(g):
      for r in range(rows):
        idx = np.flatnonzero(b[gi, r])
        if idx.size:
          full = np.concatenate([idx, np.full(width - idx.size, idx[-1])])
          index[gi, r], packed[gi, r] = full, b[gi, r, full]
    return index, packed, count

  out = dict(zip(("kv_index", "kv_bits", "kv_count"), pack(bits)))
  out.update(zip(("q_index", "q_bits", "q_count"), pack(np.swapaxes(bits, 1, 2))))
  needs = ~valid.reshape(-1, bk).all(axis=1)
  if dynamic_text and spec.text_max_len:
    text = np.zeros(s, bool)
    text[spec.padded_video_len:spec.seq_len] = True
    needs |= text.reshape(-1, bk).any(axis=1)
  out.update(kv_needs_mask=needs, key_valid=valid, query_valid=valid)
  return out


def _random_schedule_cases(n: int, seed: int):
  """(spec, heads, block_q, block_kv, mask_unit, dynamic_text): random ranks, tiles (small ones,
  and 64-token ones with partial edge tiles padded to 64), windows (causal axes, per-head), text
  in either position, blocks inside tiles or spanning them."""
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    rank = int(rng.integers(1, 4))
    if rng.random() < 0.3:
      tile = [int(rng.choice([1, 2, 4])) for _ in range(rank - 1)]
      tile = tuple(tile + [64 // math.prod(tile)])
      latent = tuple(int(rng.integers(1, 2 * t + 2)) for t in tile)
      units = [8, 16, 32, 64]
    else:
      tile = tuple(int(x) for x in rng.integers(1, 5, rank))
      latent = tuple(int(t * rng.integers(1, 4) + rng.integers(0, t)) for t in tile)
      units = [1, 2, 3, 4]
    causal = tuple(d for d in range(rank) if rng.random() < 0.2)

    def window():
      return tuple(int(rng.integers(1, 5)) if d in causal else int(rng.choice([1, 3, 5, 7]))
                   for d in range(rank))

    heads = int(rng.integers(1, 4))
    win = tuple(window() for _ in range(heads)) if rng.random() < 0.4 else window()
    text_max = int(rng.integers(0, 70 if units[0] == 8 else 7))
    spec = STASpec(latent, tile, win, int(rng.integers(0, text_max + 1)), text_max,
                   str(rng.choice(["last", "first"])), causal)
    unit = int(rng.choice([u for u in units if spec.block_align % u == 0]))
    bq, bk = (unit * int(rng.choice([1, 2, 4])) for _ in range(2))
    if (bq // unit) * (bk // unit) > 16:
      continue
    out.append((spec, heads, bq, bk, unit if rng.random() < 0.5 else None,
                bool(rng.random() < 0.3)))
  return out


SPARSE_CASES = ([(spec, h, bq, bk, None, dyn) for spec, h, bq, bk in CASES for dyn in (False, True)]
                + _random_schedule_cases(120, seed=1))


def test_sparse_construction_equals_dense_construction():
  """Every table, bit for bit, equals the dense construction's on 144 specs."""
  for spec, heads, bq, bk, unit, dyn in SPARSE_CASES:
    sched = block_schedule(spec, heads, bq, bk, unit, dyn)
    want = dense_block_schedule(spec, heads, bq, bk, unit, dyn)
    for name, w in want.items():
      got = getattr(sched, name)
      assert got.shape == w.shape and (got == w).all(), (spec, heads, bq, bk, unit, dyn, name)


def test_paper_latent_one_token_tiles_in_bounded_memory_and_time():
  """30x48x80 in 115,200 1x1x1 tiles: the dense tile mask would take 12.4 GiB; the schedule
  takes O(tiles x window)."""
  spec = STASpec((30, 48, 80), (1, 1, 1), (3, 3, 3))
  tracemalloc.start()
  t0 = time.perf_counter()
  try:
    # Uncached, so the memory traced is this call's.
    sched = jsta.schedule._block_schedule.__wrapped__(spec, 2, 1, 1, None, False)
    pairs = spec.attended_pairs(2)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 2 ** 30, f"peak {peak / 2 ** 20:.0f} MiB"
  assert seconds < 20, f"{seconds:.1f} s"
  assert sched.kv_index.shape == (1, 115_200, 27)
  np.testing.assert_array_equal(sched.kv_count, 27)
  assert pairs == 2 * 115_200 * 27 == sched.visited_blocks()
  # The query tile in the middle of the volume attends its 3x3x3 neighbours.
  t, h, w = 15, 24, 40
  row = sched.kv_index[0, (t * 48 + h) * 80 + w]
  want = sorted(((t + a) * 48 + h + b) * 80 + w + c
                for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1))
  assert row.tolist() == want
  # The dense masks refuse this shape with a clear message instead of running out of memory.
  with pytest.raises(ValueError, match=r"tile_mask: the dense \[115200, 115200\] mask"):
    jsta.tile_mask(spec, spec.window)
  with pytest.raises(ValueError, match=r"token_mask: the dense \[115200, 115200\] mask"):
    jsta.token_mask(spec)


def test_text_tables_too_large_raise():
  # Text query blocks visit every key block: with one-token blocks that is 115,208^2 entries.
  spec = STASpec((30, 48, 80), (1, 1, 1), (3, 3, 3), text_len=7, text_max_len=8)
  with pytest.raises(ValueError, match=r"block_q=1 and block_kv=1 are too small .* text query "
                                       r"blocks visit all 115207 key blocks"):
    block_schedule(spec, 1, 1, 1)
