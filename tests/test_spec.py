"""STASpec: geometry, windows, counts (sparsity, attended pairs, FLOPs) and every ValueError."""

from __future__ import annotations

import math

import numpy as np
import pytest

import jsta
from jsta.spec import STASpec, full_window

PAPER = dict(latent_shape=(30, 48, 80), tile_shape=(6, 8, 8))


def test_geometry_paper_shape():
  spec = STASpec(**PAPER, window=(3, 3, 3))
  assert spec.rank == 3
  assert spec.num_tiles == (5, 6, 10)
  assert spec.tile_size == 384
  assert spec.video_len == 115_200
  assert spec.padded_video_len == 115_200
  assert spec.seq_len == 115_200
  assert not spec.is_padded
  assert not spec.is_per_head


def test_geometry_padded_with_text():
  spec = STASpec((5, 7, 9), (2, 4, 4), (3, 1, 3), text_len=5, text_max_len=8)
  assert spec.num_tiles == (3, 2, 3)
  assert spec.padded_latent_shape == (6, 8, 12)
  assert spec.video_len == 5 * 7 * 9
  assert spec.padded_video_len == 6 * 8 * 12
  assert spec.seq_len == 6 * 8 * 12 + 8
  assert spec.is_padded


def test_normalizes_ints_and_is_hashable():
  a = STASpec([4, np.int64(8)], (2, 4), [3, 1], text_len=np.int32(2), text_max_len=4)
  b = STASpec((4, 8), (2, 4), (3, 1), text_len=2, text_max_len=4)
  assert a == b and hash(a) == hash(b)
  assert a.latent_shape == (4, 8) and type(a.latent_shape[1]) is int
  one_d = STASpec(16, 4, 3)
  assert one_d.latent_shape == (16,) and one_d.tile_shape == (4,) and one_d.window == (3,)


def test_per_head_windows():
  spec = STASpec((8, 8), (2, 2), ((3, 3), (1, 1), (3, 3)))
  assert spec.is_per_head
  assert spec.head_windows(3) == ((3, 3), (1, 1), (3, 3))
  assert spec.distinct_windows() == ((3, 3), (1, 1))
  single = STASpec((8, 8), (2, 2), (3, 3))
  assert single.head_windows(4) == ((3, 3),) * 4
  assert single.distinct_windows() == ((3, 3),)
  assert single.with_window(((1, 1), (3, 3))).head_windows(2) == ((1, 1), (3, 3))


@pytest.mark.parametrize("window, percent", [((3, 3, 3), 91.00), ((5, 5, 5), 58.33)])
def test_sparsity_paper_figures(window, percent):
  # The paper's 91.00% and 58.33% for (18,24,24) and (30,40,40) tokens on tiles (5, 6, 10).
  spec = STASpec(**PAPER, window=window)
  assert spec.sparsity() == pytest.approx(1 - math.prod(window) / 300, abs=1e-12)
  assert round(spec.sparsity() * 100, 2) == percent


def test_sparsity_clips_window_and_averages_heads():
  spec = STASpec(**PAPER, window=((3, 3, 3), (5, 5, 5), (11, 11, 11)))
  assert spec.effective_window((11, 11, 11)) == (5, 6, 10)
  assert spec.sparsity((11, 11, 11)) == 0.0
  assert spec.sparsity() == pytest.approx((0.91 + (1 - 125 / 300) + 0.0) / 3)


def test_attended_pairs_and_flops_paper_shape():
  spec = STASpec(**PAPER, window=(3, 3, 3))
  # Every query tile sees 27 key tiles of 384 tokens (the clamped window never shrinks).
  pairs = 300 * 27 * 384 * 384
  assert spec.attended_pairs(1) == pairs
  assert spec.attended_pairs(24) == 24 * pairs
  assert spec.flops(128, 24) == 4 * 24 * pairs * 128


def test_attended_pairs_with_text_and_padding_small():
  # Cross-checked against the token mask in test_mask.py; here the closed form for a dense window.
  spec = STASpec((3, 5), (2, 2), full_window((3, 5), (2, 2)), text_len=3, text_max_len=4)
  n_valid = 15 + 3
  assert spec.attended_pairs(2) == 2 * n_valid * n_valid


def test_full_window():
  assert full_window((30, 48, 80), (6, 8, 8)) == (5, 7, 11)
  assert full_window((3,), (4,)) == (1,)
  spec = STASpec((30, 48, 80), (6, 8, 8), full_window((30, 48, 80), (6, 8, 8)))
  assert spec.sparsity() == 0.0


# ---- error paths (TypeError: wrong type; ValueError: wrong value) -----------------------------------------------------------------------
@pytest.mark.parametrize("exc, kwargs, match", [
    (TypeError, dict(latent_shape=None, tile_shape=(1,), window=(1,)), "latent_shape must be a tuple of ints"),
    (TypeError, dict(latent_shape=(4.0,), tile_shape=(1,), window=(1,)), "latent_shape must be a tuple of ints"),
    (TypeError, dict(latent_shape=(True, 4), tile_shape=(1, 1), window=(1, 1)),
     "latent_shape must be a tuple of ints"),
    (TypeError, dict(latent_shape=(4,), tile_shape=("a",), window=(1,)), "tile_shape must be a tuple of ints"),
    (ValueError, dict(latent_shape=(), tile_shape=(), window=()), "latent_shape must have rank 1, 2 or 3"),
    (ValueError, dict(latent_shape=(2, 2, 2, 2), tile_shape=(1, 1, 1, 1), window=(1, 1, 1, 1)),
     "latent_shape must have rank 1, 2 or 3"),
    (ValueError, dict(latent_shape=(4, 0), tile_shape=(1, 1), window=(1, 1)),
     "latent_shape sizes must be positive"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2,), window=(1, 1)), r"tile_shape \(2,\) has rank 1"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, -2), window=(1, 1)),
     "tile_shape sizes must be positive"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=(3,)), r"window \(3,\) has rank 1"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=()), r"window \(\) has rank 0"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=(3, 2)), "window sizes must be odd"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=(3, 0)),
     "window sizes must be positive"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=(3, -1)),
     "window sizes must be positive"),
    (TypeError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=None),
     "window must be a tuple of odd ints .* got None"),
    (TypeError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=3.0),
     "window must be a tuple of odd ints .* got 3.0"),
    (TypeError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=(3, (3, 3))),
     "window must be a tuple of ints"),
    (TypeError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=((3, 3), (3.0, 3))),
     r"window\[1\] must be a tuple of ints"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=((3, 3), (3, 4))),
     r"window\[1\] \(3, 4\): window sizes must be odd"),
    (ValueError, dict(latent_shape=(4, 4), tile_shape=(2, 2), window=((3, 3), (3,))),
     r"window\[1\] \(3,\) has rank 1"),
    (ValueError, dict(latent_shape=(4,), tile_shape=(2,), window=(1,), text_len=-1, text_max_len=2),
     "text_len must be a non-negative int"),
    (TypeError, dict(latent_shape=(4,), tile_shape=(2,), window=(1,), text_len=1.0, text_max_len=2),
     "text_len must be a non-negative int"),
    (TypeError, dict(latent_shape=(4,), tile_shape=(2,), window=(1,), text_len=True, text_max_len=2),
     "text_len must be a non-negative int"),
    (ValueError, dict(latent_shape=(4,), tile_shape=(2,), window=(1,), text_max_len=-3),
     "text_max_len must be a non-negative int"),
    (ValueError, dict(latent_shape=(4,), tile_shape=(2,), window=(1,), text_len=3, text_max_len=2),
     r"text_len \(3\) must be <= text_max_len \(2\)"),
])
def test_invalid_spec_raises(exc, kwargs, match):
  with pytest.raises(exc, match=match):
    STASpec(**kwargs)


def test_head_windows_count_mismatch_raises():
  spec = STASpec((8,), (2,), ((3,), (1,)))
  with pytest.raises(ValueError, match="gives 2 per-head windows but there are 3 heads"):
    spec.head_windows(3)
  with pytest.raises(ValueError, match="gives 2 per-head windows but there are 1 heads"):
    spec.attended_pairs(1)


def test_token_mask_needs_window_for_per_head_spec():
  spec = STASpec((8,), (2,), ((3,), (1,)))
  with pytest.raises(ValueError, match="per-head windows; pass window="):
    jsta.token_mask(spec)
  assert jsta.token_mask(spec, (1,)).shape == (8, 8)


def test_suggest_tile_fits_the_window_with_little_padding():
  s = jsta.suggest_tile((21, 45, 80), (15, 24, 24))          # Wan 720p latent
  assert s.window_tokens == (15, 24, 24) and math.prod(s.tile_shape) % 64 == 0
  assert s.padding < 0.01 and s.spec((21, 45, 80)).window == s.window
  image = jsta.suggest_tile((128, 128), (56, 56))
  assert (image.tile_shape, image.window, image.padding) == ((8, 8), (7, 7), 0.0)
  # A latent no tile of 64 tokens fits, and bad arguments.
  with pytest.raises(ValueError, match="no tile of a multiple of 64"):
    jsta.suggest_tile((3, 3), (3, 3))
  with pytest.raises(ValueError, match="must have the rank"):
    jsta.suggest_tile((8, 8), (3,))
  with pytest.raises(TypeError, match=r"window_tokens\[0\] must be an int"):
    jsta.suggest_tile((8, 8), (3.0, 3))
