"""Property tests: random specs and inputs against the independent float64 brute force.

Hypothesis draws the spec (rank 1-3, latents divisible by the tile or not, odd windows up to
beyond the tile count, per-head windows, text 0..max), the heads, head_dim, dtype and block
sizes, and inputs with NaN in every padded position; the op's output and the gradients of
sum(o * w) must match :mod:`reference64` on valid positions and be exact zeros on padded ones.
Examples are derandomized (the same ones every run) and bounded in number, so the time in CI
is fixed. The GPU test draws medium shapes for the GPU backends and checks a random subset of
query rows.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, seed, settings
from hypothesis import strategies as st

import jsta
import reference64
from helpers import np_f32

COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


@st.composite
def specs(draw, tiles=None, max_per_axis=3, max_text=6, heads=(1, 3)):
  """(spec, heads): a random layout; ``tiles`` restricts the tile shapes."""
  if tiles is None:
    rank = draw(st.integers(1, 3))
    tile = tuple(draw(st.integers(1, 4)) for _ in range(rank))
  else:
    tile = draw(st.sampled_from(tiles))
    rank = len(tile)
  latent = tuple(t * draw(st.integers(1, max_per_axis)) + draw(st.integers(0, t - 1))
                 for t in tile)
  n = [-(-s // t) for s, t in zip(latent, tile)]
  window = lambda: tuple(2 * draw(st.integers(0, x)) + 1 for x in n)   # odd, up to beyond n
  h = draw(st.integers(*heads))
  win = tuple(window() for _ in range(h)) if draw(st.booleans()) else window()
  text_max = draw(st.integers(0, max_text))
  spec = jsta.STASpec(latent, tile, win, text_len=draw(st.integers(0, text_max)),
                      text_max_len=text_max)
  return spec, h


def _blocks(draw, spec, choices):
  """A (block_q, block_kv) the schedule takes: None (the backend's), or sizes from choices."""
  if draw(st.booleans()):
    return None, None
  for _ in range(10):
    bq, bk = draw(st.sampled_from(choices)), draw(st.sampled_from(choices))
    unit = math.gcd(bq, bk, spec.block_align)
    if (bq // unit) * (bk // unit) <= 16:
      return bq, bk
  return None, None


def _nan_padded(spec, x):
  valid = jnp.asarray(jsta.token_valid(spec))[None, :, None, None]
  return jnp.where(valid, x, jnp.nan).astype(x.dtype)


def _check(spec, heads, head_dim, dtype, backend, block_q, block_kv, seed, rows=None):
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (1, spec.seq_len, heads, head_dim)
  q, k, v, w = (jax.random.normal(kk, shape, jnp.float32) for kk in keys)
  q = q * 2.0                                   # logits of a few units: a peaked softmax
  q, k, v = (_nan_padded(spec, x.astype(dtype)) for x in (q, k, v))
  scale = head_dim ** -0.5
  keep = np.zeros(spec.seq_len, bool)
  keep[np.arange(spec.seq_len) if rows is None else rows] = True
  w = w * jnp.asarray(keep)[None, :, None, None]

  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, spec, backend=backend, block_q=block_q,
                                    block_kv=block_kv)
    return jnp.sum(o.astype(jnp.float32) * w), o

  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  valid = np.asarray(jsta.token_valid(spec))
  clean = [np.where(valid[None, :, None, None], np_f32(x), 0.0) for x in (q, k, v)]
  masks = [reference64.mask(spec.latent_shape, spec.tile_shape, hw, spec.text_len,
                            spec.text_max_len) for hw in spec.head_windows(heads)]
  sel = np.flatnonzero(keep)
  ro, *rgrads = reference64.attention_and_grads(*clean, np_f32(w), masks, scale, rows=sel)
  tol = TOL[dtype]
  got_o = np_f32(o)
  assert np.isfinite(got_o).all() and np.isfinite([np_f32(g) for g in grads]).all()
  assert (got_o[:, ~valid] == 0).all()
  _close(got_o[:, sel][:, valid[sel]], ro[:, valid[sel]], tol, "o")
  for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
    g = np_f32(g)
    assert (g[:, ~valid] == 0).all(), f"{name} at padded positions"
    _close(g[:, valid], rg[:, valid], tol, name)


def _close(got, want, tol, name):
  # Relative to the reference, with a floor: a gradient that is zero in exact arithmetic (a
  # row with a single key has dq = 0) leaves only rounding, which no relative test bounds.
  err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-2 * np.sqrt(want.size))
  assert err < tol, f"{name}: relative L2 error {err:.3g} >= {tol} against float64"


@settings(max_examples=10, **COMMON)
@given(st.data())
def test_xla_matches_float64_brute_force(data):
  spec, heads = data.draw(specs())
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.float32, jnp.bfloat16]))
  head_dim = data.draw(st.sampled_from([4, 8]))
  a = spec.block_align
  bq, bk = _blocks(data.draw, spec, sorted({a, 2 * a, max(a // 2, 1), 1}))
  _check(spec, heads, head_dim, dtype, "xla", bq, bk, seed=data.draw(st.integers(0, 99)))


TRITON_TILES = [(16,), (4, 4), (2, 8), (2, 2, 4), (1, 4, 4), (2, 4, 4)]


@settings(max_examples=6, **COMMON)
@given(st.data())
def test_triton_matches_float64_brute_force(data):
  spec, heads = data.draw(specs(tiles=TRITON_TILES, max_per_axis=2, max_text=20,
                                heads=(1, 2)))
  dtype = data.draw(st.sampled_from([jnp.float32, jnp.float16]))
  a = spec.block_align
  blocks = [b for b in (16, 32) if a % b == 0] or [16]
  bq, bk = data.draw(st.sampled_from(blocks)), data.draw(st.sampled_from(blocks))
  _check(spec, heads, 16, dtype, "pallas_triton", bq, bk, seed=data.draw(st.integers(0, 99)))


GPU_TILES = [(3, 8, 8), (6, 8, 8), (2, 8, 8), (1, 8, 8), (8, 8), (4, 32)]


@pytest.mark.gpu
@pytest.mark.parametrize("shard", range(4))
@pytest.mark.parametrize("backend", ["pallas_mosaic", "pallas_triton"])
def test_gpu_backends_match_float64_brute_force(backend, shard):
  """Medium shapes (tiles of a multiple of 64 tokens, a few thousand positions), bf16/fp16,
  head_dim 64/128; a random subset of 96 query rows enters the loss. One random example per
  shard, each shard its own seed and its own test (each example compiles its kernels for
  most of a minute: as separate tests the GPU suite's workers run them side by side); the
  smallest layout, which Hypothesis tries first, is left to the smaller tests."""
  if backend == "pallas_mosaic" and "9." not in str(
      getattr(jax.devices()[0], "compute_capability", "")):
    pytest.skip("needs a compute capability 9.x GPU")

  @seed(shard)
  @settings(max_examples=1, **{**COMMON, "derandomize": False})
  @given(data=st.data())
  def check(data):
    spec, heads = data.draw(specs(tiles=GPU_TILES, max_per_axis=3, max_text=70, heads=(1, 2)))
    assume(spec.seq_len > 256)
    dtype = data.draw(st.sampled_from([jnp.bfloat16, jnp.float16]))
    head_dim = data.draw(st.sampled_from([64, 128]))
    valid = np.flatnonzero(jsta.token_valid(spec))
    rows = np.sort(np.random.default_rng(data.draw(st.integers(0, 99))).choice(
        valid, size=min(96, valid.size), replace=False))
    _check(spec, heads, head_dim, dtype, backend, None, None, seed=1, rows=rows)

  check()
