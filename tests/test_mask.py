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


def brute_tile_order_coords(spec: STASpec):
  """For each tile-order video position: (tile coords, latent coords, valid)."""
  out = []
  tile_ranges = [range(n) for n in spec.num_tiles]
  inner_ranges = [range(t) for t in spec.tile_shape]
  for tile in itertools.product(*tile_ranges):          # tiles t-major, then h, then w
    for inner in itertools.product(*inner_ranges):      # tokens inside a tile, t-major
      coord = tuple(n * t + i for n, t, i in zip(tile, spec.tile_shape, inner))
      valid = all(c < s for c, s in zip(coord, spec.latent_shape))
      out.append((tile, coord, valid))
  return out


def brute_axis_attend(q: int, k: int, n: int, window: int) -> bool:
  if window >= n:
    return True
  half = window // 2
  center = min(max(q, half), n - 1 - half)
  return abs(k - center) <= half


def brute_token_mask(spec: STASpec, window) -> np.ndarray:
  video = brute_tile_order_coords(spec)
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
      jsta.mask.axis_attend(4, 3),
      np.array([[1, 1, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 1, 1, 1]], dtype=bool))
  assert jsta.mask.axis_attend(3, 5).all()
  np.testing.assert_array_equal(jsta.mask.axis_attend(4, 1), np.eye(4, dtype=bool))


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
