"""Token masks from jsta.mask against a brute-force construction written from docs/SEMANTICS.md.

The brute force enumerates the tile order with nested loops (tiles t-major, then tokens inside a
tile t-major), then applies the clamped-window rule token pair by token pair.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import jsta
from jsta.spec import STASpec


def brute_tile_order_coords(spec: STASpec, ragged: bool = True):
  """For each tile-order video position: (tile coords, latent coords or None, valid).

  ragged=True is the layout of docs/SEMANTICS.md: a partial edge tile holds its real tokens
  (t-major over its real extent), then padding up to a multiple of 64 tokens for tiles of a
  multiple of 64 tokens, up to the whole tile otherwise.
  ragged=False is the earlier layout (every tile whole, padding where coordinates fall
  outside the latent): the semantics must not depend on the layout.
  """
  out = []
  tile_size = int(np.prod(spec.tile_shape))
  align = 64 if tile_size % 64 == 0 else tile_size
  for tile in itertools.product(*[range(n) for n in spec.num_tiles]):   # t-major, then h, w
    if ragged:
      extent = [min(t, s - n * t) for n, t, s in zip(tile, spec.tile_shape, spec.latent_shape)]
    else:
      extent = list(spec.tile_shape)
    count = 0
    for inner in itertools.product(*[range(e) for e in extent]):        # t-major in the tile
      coord = tuple(n * t + i for n, t, i in zip(tile, spec.tile_shape, inner))
      valid = all(c < s for c, s in zip(coord, spec.latent_shape))
      out.append((tile, coord if valid else None, valid))
      count += 1
    while ragged and count % align:
      out.append((tile, None, False))
      count += 1
  return out


def brute_axis_attend(q: int, k: int, n: int, window: int) -> bool:
  if window >= n:
    return True
  half = window // 2
  center = min(max(q, half), n - 1 - half)
  return abs(k - center) <= half


def brute_token_mask(spec: STASpec, window, ragged: bool = True) -> np.ndarray:
  video = brute_tile_order_coords(spec, ragged)
  tokens = [("video", tile, valid) for tile, _, valid in video]
  tokens += [("text", None, i < spec.text_len) for i in range(spec.text_max_len)]
  s = len(tokens)
  m = np.zeros((s, s), dtype=bool)
  for i, (kind_q, tq, vq) in enumerate(tokens):
    if not vq:
      continue
    for j, (kind_k, tk, vk) in enumerate(tokens):
      if not vk:
        continue
      if kind_q == "video" and kind_k == "video":
        m[i, j] = all(brute_axis_attend(a, b, n, w)
                      for a, b, n, w in zip(tq, tk, spec.num_tiles, window))
      else:
        m[i, j] = True  # video<->valid text and text<->anything valid: dense
  return m


CASES = [
    # 3D, edge tiles on every axis (window 3 of 4/3/5 tiles).
    STASpec((4, 6, 10), (1, 2, 2), (3, 3, 3)),
    # 3D, mixed windows including one that covers its axis and a window of 1.
    STASpec((4, 4, 8), (2, 2, 2), (1, 3, 3)),
    # 2D with padded axes and padded text.
    STASpec((5, 7), (2, 3), (3, 1), text_len=3, text_max_len=5),
    # 2D, window larger than the volume.
    STASpec((4, 6), (2, 2), (7, 9), text_len=2, text_max_len=2),
    # 1D, padded.
    STASpec((11,), (3,), (3,), text_len=1, text_max_len=4),
    # 1D, window 5 on 6 tiles.
    STASpec((12,), (2,), (5,)),
    # 3D, padded on all axes, with text.
    STASpec((3, 5, 5), (2, 2, 4), (1, 3, 1), text_len=4, text_max_len=6),
]


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.latent_shape}-{s.tile_shape}-{s.window}")
def test_token_mask_matches_brute_force(spec):
  got = jsta.token_mask(spec)
  want = brute_token_mask(spec, spec.window)
  assert got.shape == (spec.seq_len, spec.seq_len) and got.dtype == np.bool_
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.latent_shape}-{s.tile_shape}")
def test_token_valid_matches_brute_force(spec):
  video = brute_tile_order_coords(spec)
  want = np.array([v for _, _, v in video] + [i < spec.text_len for i in range(spec.text_max_len)])
  np.testing.assert_array_equal(jsta.token_valid(spec), want)
  assert jsta.token_valid(spec).sum() == spec.video_len + spec.text_len


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.latent_shape}-{s.tile_shape}")
def test_attended_pairs_equals_mask_sum(spec):
  assert spec.attended_pairs(1) == int(brute_token_mask(spec, spec.window).sum())


def test_per_head_window_masks():
  spec = STASpec((4, 6), (1, 2), ((1, 1), (3, 3), (1, 3)), text_len=1, text_max_len=2)
  total = 0
  for w in spec.head_windows(3):
    m = jsta.token_mask(spec, w)
    np.testing.assert_array_equal(m, brute_token_mask(spec, w))
    total += int(m.sum())
  assert spec.attended_pairs(3) == total


def test_tile_mask_every_query_tile_sees_prod_window_tiles():
  # The clamped window never shrinks at an edge: each query tile sees prod(min(k, n)) key tiles.
  spec = STASpec((5, 6, 10), (1, 1, 1), (3, 3, 3))
  tm = jsta.tile_mask(spec, spec.window)
  assert tm.shape == (300, 300)
  np.testing.assert_array_equal(tm.sum(axis=1), np.full(300, 27))
  spec5 = spec.with_window((5, 5, 5))
  np.testing.assert_array_equal(jsta.tile_mask(spec5, spec5.window).sum(axis=1),
                                np.full(300, 125))


def test_edge_tile_window_is_shifted_inward():
  # 1D, 6 tiles, window 3: tile 0 sees tiles {0, 1, 2} (not {0, 1}); tile 5 sees {3, 4, 5}.
  spec = STASpec((6,), (1,), (3,))
  tm = jsta.tile_mask(spec, (3,))
  assert np.flatnonzero(tm[0]).tolist() == [0, 1, 2]
  assert np.flatnonzero(tm[1]).tolist() == [0, 1, 2]
  assert np.flatnonzero(tm[2]).tolist() == [1, 2, 3]
  assert np.flatnonzero(tm[5]).tolist() == [3, 4, 5]


def test_window_covering_volume_is_dense_on_valid_tokens():
  spec = STASpec((3, 5, 2), (2, 2, 1), (3, 5, 9), text_len=2, text_max_len=3)
  m = jsta.token_mask(spec)
  valid = jsta.token_valid(spec)
  np.testing.assert_array_equal(m, valid[:, None] & valid[None, :])


def test_padded_tokens_never_attend_or_are_attended():
  spec = STASpec((3, 3), (2, 2), (1, 1), text_len=1, text_max_len=3)
  m = jsta.token_mask(spec)
  invalid = ~jsta.token_valid(spec)
  assert invalid.sum() == (16 - 9) + 2
  assert not m[invalid].any() and not m[:, invalid].any()
  # Every valid query attends at least itself.
  assert m[~invalid][:, ~invalid].diagonal().all()


def test_axis_attend_small():
  np.testing.assert_array_equal(
      jsta.grid.axis_attend(4, 3),
      np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=bool))
  assert jsta.grid.axis_attend(3, 5).all()
  np.testing.assert_array_equal(jsta.grid.axis_attend(4, 1), np.eye(4, dtype=bool))


@pytest.mark.parametrize("spec", CASES, ids=lambda s: f"{s.latent_shape}-{s.tile_shape}")
def test_token_mask_rows_equals_token_mask_rows(spec):
  rng = np.random.default_rng(0)
  rows = rng.choice(spec.seq_len, size=min(9, spec.seq_len), replace=False)
  rows = np.concatenate([rows, [0, spec.seq_len - 1]])
  got = jsta.mask.token_mask_rows(spec, spec.window, rows)
  np.testing.assert_array_equal(got, jsta.token_mask(spec)[rows])


@pytest.mark.parametrize("rows", [[], [[0, 1]], [-1], [10_000]])
def test_token_mask_rows_bad_rows_raise(rows):
  spec = STASpec((4, 4), (2, 2), (1, 1))
  with pytest.raises(ValueError, match=r"rows must be a non-empty 1D list of positions in \[0, 16\)"):
    jsta.mask.token_mask_rows(spec, (1, 1), rows)


def _by_token(spec: STASpec, mask: np.ndarray, ragged: bool) -> dict:
  """{(query token, key token): attended} over valid tokens, each named by its latent
  coordinates or ("text", i): independent of where the layout puts it."""
  names = [c for _, c, _ in brute_tile_order_coords(spec, ragged)]
  names += [("text", i) if i < spec.text_len else None for i in range(spec.text_max_len)]
  valid = [i for i, n in enumerate(names) if n is not None]
  return {(names[i], names[j]): bool(mask[i, j]) for i in valid for j in valid}


def _random_specs(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  out = []
  while len(out) < n:
    rank = int(rng.integers(1, 4))
    tile = tuple(int(x) for x in rng.integers(1, 5, rank))
    latent = tuple(int(t * rng.integers(1, 4) + rng.integers(0, t)) for t in tile)
    window = tuple(int(2 * rng.integers(0, 3) + 1) for _ in range(rank))
    text_max = int(rng.integers(0, 4))
    out.append(STASpec(latent, tile, window, text_len=int(rng.integers(0, text_max + 1)),
                       text_max_len=text_max))
  # Tiles of 64-multiples with partial edges: the padding is then less than a tile.
  out += [STASpec((5, 10, 12), (2, 8, 8), (3, 1, 3), text_len=3, text_max_len=5),
          STASpec((12, 70), (4, 32), (1, 3)), STASpec((70,), (64,), (1,))]
  return out


@pytest.mark.parametrize("spec", CASES + _random_specs(25),
                         ids=lambda s: f"{s.latent_shape}-{s.tile_shape}-{s.window}")
def test_mask_is_the_same_as_with_whole_padded_tiles(spec):
  """The layout with partial edge tiles attends exactly the token pairs that the layout with
  whole (padded) tiles attended, token by token; and jsta's mask follows the new layout."""
  got = jsta.token_mask(spec)
  np.testing.assert_array_equal(got, brute_token_mask(spec, spec.window))
  assert _by_token(spec, got, True) == _by_token(
      spec, brute_token_mask(spec, spec.window, ragged=False), False)


def test_partial_edge_tiles_cost_about_their_real_tokens():
  spec = STASpec((33, 34, 60), (3, 8, 8), (5, 3, 3))     # HunyuanVideo 544p latent
  assert spec.video_len == 67_320
  assert spec.padded_video_len == 70_400                   # whole tiles would take 84,480
  assert spec.tile_align == 64 and spec.block_align == 64
  assert sorted(set(spec.tile_lengths)) == [64, 128, 192]
  paper = STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  assert paper.padded_video_len == 115_200 and paper.block_align == 384


@pytest.mark.parametrize("spec", CASES + _random_specs(10, seed=3) + [
    STASpec((6, 9, 10), (1, 2, 2), (4, 5, 3), causal_axes=(0,)),
    STASpec((7, 8), (2, 1), (2, 9), causal_axes=(0, 1))],
    ids=lambda s: f"{s.latent_shape}-{s.tile_shape}-{s.window}-{s.causal_axes}")
def test_key_tile_boxes_match_the_dense_tile_mask(spec):
  """The sparse forms of the tile rule (runs of key tiles, box sums) say what tile_mask says."""
  tm = jsta.tile_mask(spec, spec.window)
  n = tm.shape[0]
  row, first, last = jsta.mask.key_tile_runs(spec, spec.window, np.arange(n))
  runs = np.zeros_like(tm)
  for r, f, l in zip(row, first, last):
    assert not runs[r, f:l + 1].any()                   # runs do not overlap
    runs[r, f:l + 1] = True
  np.testing.assert_array_equal(runs, tm)
  values = np.random.default_rng(0).integers(0, 100, n)
  np.testing.assert_array_equal(jsta.mask.box_sums(spec, spec.window, values),
                                tm.astype(np.int64) @ values)
