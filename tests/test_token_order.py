"""tile_order / untile_order: exact permutations on small cases, round trips, padding, errors."""

from __future__ import annotations

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta.spec import STASpec


def _row_major_ids(spec: STASpec, batch: int = 1, extra=()) -> jnp.ndarray:
  """[batch, video_len, *extra] float32 whose [b, i, ...] entry encodes (b, i) (and extra index)."""
  n = spec.video_len
  base = np.arange(n, dtype=np.float32)[None, :] + 1000.0 * np.arange(batch)[:, None]
  base = base.reshape((batch, n) + (1,) * len(extra))
  inner = np.arange(int(np.prod(extra)) if extra else 1, dtype=np.float32).reshape(extra or ())
  return jnp.asarray(base * 100.0 + inner if extra else base)


def test_exact_permutation_3d():
  spec = STASpec((2, 2, 4), (1, 2, 2), (1, 1, 1))
  x = jnp.arange(16, dtype=jnp.float32)[None]
  # Tiles (nt, nh, nw) in (2, 1, 2), each tile's 4 tokens (th, tw) row-major, written by hand
  # from the row-major index t*8 + h*4 + w.
  want = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
  np.testing.assert_array_equal(np.asarray(jsta.tile_order(x, spec))[0], want)


def test_exact_permutation_2d_padded():
  # latent (3, 3), tile (2, 2): the partial tiles hold their real tokens, then padding to the
  # whole tile (4 tokens); padding shows as -1.
  spec = STASpec((3, 3), (2, 2), (1, 1))
  x = jnp.arange(9, dtype=jnp.float32)[None]
  want = [0, 1, 3, 4, 2, 5, -1, -1, 6, 7, -1, -1, 8, -1, -1, -1]
  got = jsta.tile_order(x, spec, pad_value=-1.0)
  chex.assert_shape(got, (1, 16))
  np.testing.assert_array_equal(np.asarray(got)[0], want)
  # Padding positions are exactly the spec's invalid tokens.
  np.testing.assert_array_equal(np.asarray(got)[0] >= 0, jsta.token_valid(spec))


def test_exact_permutation_1d_padded():
  spec = STASpec((5,), (2,), (1,))
  got = jsta.tile_order(jnp.arange(1, 6, dtype=jnp.int32)[None], spec)
  np.testing.assert_array_equal(np.asarray(got)[0], [1, 2, 3, 4, 5, 0])
  assert got.dtype == jnp.int32


def _brute_tile_order(spec: STASpec) -> list[int | None]:
  """Row-major index (or None for padding) of each tile-order position, by nested loops: a
  tile's real tokens t-major over its real extent, then padding up to a multiple of 64 (tiles
  of a multiple of 64 tokens) or to the whole tile."""
  out = []
  size = int(np.prod(spec.tile_shape))
  align = 64 if size % 64 == 0 else size
  strides = [int(np.prod(spec.latent_shape[d + 1:])) for d in range(spec.rank)]
  for tile in itertools.product(*[range(n) for n in spec.num_tiles]):
    extent = [min(t, s - n * t) for n, t, s in zip(tile, spec.tile_shape, spec.latent_shape)]
    count = 0
    for inner in itertools.product(*[range(e) for e in extent]):
      c = [n * t + i for n, t, i in zip(tile, spec.tile_shape, inner)]
      out.append(sum(ci * st for ci, st in zip(c, strides)))
      count += 1
    out += [None] * (-(-count // align) * align - count)
  return out


SPECS = [
    STASpec((4, 6, 8), (2, 3, 4), (1, 1, 1)),
    STASpec((5, 7, 9), (2, 4, 4), (1, 1, 1)),     # padded on every axis
    STASpec((3, 10), (3, 4), (1, 1)),             # padded on w only
    STASpec((12,), (4,), (1,)),
    STASpec((13,), (4,), (1,)),
    STASpec((5, 10, 12), (2, 8, 8), (1, 1, 1)),   # 128-token tiles: partial ones padded to 64
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.latent_shape}-{s.tile_shape}")
def test_permutation_matches_brute_force(spec):
  got = np.asarray(jsta.tile_order(_row_major_ids(spec), spec, pad_value=-1.0))[0]
  want = [-1 if w is None else w for w in _brute_tile_order(spec)]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.latent_shape}-{s.tile_shape}")
@pytest.mark.parametrize("extra", [(), (3,), (2, 5)])
def test_round_trip(spec, extra):
  x = _row_major_ids(spec, batch=2, extra=extra)
  t = jsta.tile_order(x, spec)
  chex.assert_shape(t, (2, spec.padded_video_len) + extra)
  back = jsta.untile_order(t, spec)
  chex.assert_shape(back, x.shape)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(x))
  # Valid positions hold every input value once; padding holds pad_value (0).
  valid = jsta.token_valid(spec)[:spec.padded_video_len]
  np.testing.assert_array_equal(np.asarray(t)[:, ~valid], 0.0)
  np.testing.assert_array_equal(np.sort(np.asarray(t)[:, valid].reshape(2, -1)),
                                np.sort(np.asarray(x).reshape(2, -1)))


def test_untile_then_tile_on_valid_positions_and_jit():
  spec = STASpec((5, 7, 9), (2, 4, 4), (1, 1, 1))
  y = jax.random.normal(jax.random.key(0), (2, spec.padded_video_len, 4))
  valid = jsta.token_valid(spec)
  y = y * jnp.asarray(valid, y.dtype)[None, :, None]   # tile_order pads with 0
  f = jax.jit(lambda a: jsta.tile_order(jsta.untile_order(a, spec), spec))
  np.testing.assert_array_equal(np.asarray(f(y)), np.asarray(y))


def test_tile_order_is_differentiable():
  spec = STASpec((3, 5), (2, 2), (1, 1))
  x = jax.random.normal(jax.random.key(1), (1, 15, 2))
  g = jax.grad(lambda a: jnp.sum(jsta.tile_order(a, spec) ** 2))(x)
  np.testing.assert_allclose(np.asarray(g), 2 * np.asarray(x), rtol=1e-6)


def test_split_video_text():
  spec = STASpec((4, 4), (2, 2), (1, 1), text_len=2, text_max_len=3)
  x = jnp.arange(2 * spec.seq_len).reshape(2, spec.seq_len)
  video, text = jsta.split_video_text(x, spec)
  chex.assert_shape(video, (2, 16))
  chex.assert_shape(text, (2, 3))
  np.testing.assert_array_equal(np.asarray(text[0]), [16, 17, 18])


@pytest.mark.parametrize("fn, shape, match", [
    ("tile_order", (15,), r"x must be \[batch, tokens, \.\.\.\], got shape \(15,\)"),
    ("tile_order", (1, 24), "x has 24 tokens on axis 1 but the spec's video_len .* is 15"),
    ("untile_order", (24,), r"x must be \[batch, tokens, \.\.\.\]"),
    ("untile_order", (1, 15), "x has 15 tokens on axis 1 but the spec's padded_video_len is 24"),
])
def test_bad_token_count_raises(fn, shape, match):
  spec = STASpec((3, 5), (2, 2), (1, 1))   # 15 tokens, padded to (4, 6) = 24
  with pytest.raises(ValueError, match=match):
    getattr(jsta, fn)(jnp.zeros(shape), spec)


@pytest.mark.parametrize("fn", ["tile_order", "untile_order", "split_video_text"])
@pytest.mark.parametrize("container", [list, tuple])
def test_non_arrays_raise_type_error(fn, container):
  spec = STASpec((3, 5), (2, 2), (1, 1))
  with pytest.raises(TypeError, match=f"x must be a jax or numpy array, got {container.__name__}"):
    getattr(jsta, fn)(container([[0.0] * 24]), spec)
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec"):
    getattr(jsta, fn)(jnp.zeros((1, 24)), (3, 5))


def test_split_video_text_checks_the_length():
  spec = STASpec((4, 4), (2, 2), (1, 1), text_len=2, text_max_len=3)   # seq_len 19
  with pytest.raises(ValueError, match="x has 18 tokens on axis 1 but the spec's seq_len"):
    jsta.split_video_text(jnp.zeros((2, 18)), spec)
