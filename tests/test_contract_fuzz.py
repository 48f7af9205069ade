"""Randomized check of the op against docs/SEMANTICS.md: the float64 brute force of
reference64.py (layout, clamped or causal tile window, text slots first or last, run-time text
lengths, per-head windows, GQA) compared with the op's output, lse and gradients on random
specs with garbage (NaN, inf, 1e4) in every padded position.

Each case compiles a forward and a backward (about 2 s on a CPU), so the default run keeps few
cases; ``JSTA_FUZZ_CASES=300`` (and ``JSTA_FUZZ_SEED``) runs a longer fuzz.
"""

from __future__ import annotations

import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
import reference64
from helpers import MOSAIC_INTERPRET, backend_id, interpreted

NUM_CASES = int(os.environ.get("JSTA_FUZZ_CASES", "4"))
# The Hopper kernels' own random cases (tiles of a multiple of 64 tokens): GPU interpret mode
# on the CPU (5-30 s a case), compiled on a GPU.
NUM_MOSAIC_CASES = int(os.environ.get("JSTA_FUZZ_MOSAIC_CASES", "2"))
NUM_MOSAIC_GPU_CASES = int(os.environ.get("JSTA_FUZZ_MOSAIC_GPU_CASES", "6"))
SEED = int(os.environ.get("JSTA_FUZZ_SEED", "0"))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Relative L2 (o, gradients) and max abs lse error against the float64 brute force.
TOL = {"float32": (2e-5, 1e-4, 1e-4), "bfloat16": (6e-3, 1.5e-2, 1e-3),
       "float16": (1.5e-3, 3e-3, 1e-3)}


# ---- random cases ---------------------------------------------------------------------------
def _random_windows_and_text(rng: random.Random, latent, tile, *, text_max, batch):
  """(spec, heads, kv_heads, batch, lengths) for a random latent and tile: causal axes, a tile
  window (or one per head), GQA, text slots (``text_max``: the choices of text_max_len) first
  or last with a static length, the batch (``batch``: its choices) and run-time lengths."""
  rank = len(latent)
  n = [-(-s // t) for s, t in zip(latent, tile)]
  causal = tuple(d for d in range(rank) if rng.random() < 0.15)

  def window():
    return tuple(rng.randint(1, n[d] + 2) if d in causal else
                 rng.choice([1, 3, 5, 2 * n[d] - 1, 2 * n[d] + 1]) for d in range(rank))
  heads = rng.choice([1, 2, 3, 4])
  kv_heads = rng.choice([x for x in range(1, heads + 1) if heads % x == 0])
  win = tuple(window() for _ in range(heads)) if rng.random() < 0.3 else window()
  text_max = rng.choice(text_max)
  spec = jsta.STASpec(tuple(latent), tuple(tile), win,
                      text_len=rng.choice([0, text_max, rng.randint(0, text_max)]),
                      text_max_len=text_max, text_position=rng.choice(["last", "first"]),
                      causal_axes=causal)
  batch = rng.choice(batch)
  lengths = None
  if text_max and rng.random() < 0.5:
    lengths = [rng.choice([0, text_max, rng.randint(0, text_max)]) for _ in range(batch)]
  return spec, heads, kv_heads, batch, lengths


def random_case(rng: random.Random) -> dict:
  rank = rng.choice([1, 2, 3])
  latent, tile = [], []
  for _ in range(rank):
    s = rng.randint(1, 40) if rank == 1 else rng.choice([1, 2, 3, 4, 5, 6, 7, 9])
    t = rng.choice([1, 2, 3, 4, 5, 8, 16, s] if rank == 1 else [1, 2, 3, 4, s, s + 1])
    latent.append(s)
    tile.append(t)
  while math.prod(latent) > 150:
    j = rng.randrange(rank)
    latent[j] = max(1, latent[j] // 2)
  spec, heads, kv_heads, batch, lengths = _random_windows_and_text(
      rng, latent, tile, text_max=[0, 0, 1, 3, 8, 17], batch=[1, 2, 3])
  blocks = (None, None)
  if rng.random() < 0.3:
    divisors = [x for x in range(1, spec.block_align + 1) if spec.block_align % x == 0]
    blocks = rng.choice([(bq, bk) for bq in divisors for bk in divisors
                         if (bq * bk) // math.gcd(bq, bk) ** 2 <= 16])
  return dict(spec=spec, batch=batch, heads=heads, kv_heads=kv_heads,
              head_dim=rng.choice([8, 16, 32, 64]),
              dtype=rng.choice(["float32", "float32", "bfloat16", "float16"]),
              scale=rng.choice([None, None, 0.37, 1.3]), lengths=lengths, blocks=blocks,
              garbage=rng.choice(["nan", "inf", "big", "mix"]), lse=rng.random() < 0.6,
              implementation=rng.choice(["xla", "xla", "auto"]))


MOSAIC_TILES = {3: [(1, 8, 8), (2, 8, 8), (3, 8, 8), (6, 8, 8), (1, 4, 16), (4, 4, 4),
                    (2, 4, 8)],
                2: [(8, 8), (16, 8), (8, 24), (4, 16)], 1: [(64,), (128,), (192,)]}


def random_mosaic_case(rng: random.Random, max_tokens: int = 800) -> dict:
  """A random case the Hopper kernels take: tiles of a multiple of 64 tokens (one to three a
  dimension, ragged edges), head_dim 64 or 128 (or 48 and 96, which the op zero-pads to
  them), bf16 or fp16, the kernels' own blocks, key
  steps "auto" (gathered where they save steps) or blocks; windows, text, lengths, GQA and
  garbage as :func:`random_case`. The implementation is left to the caller."""
  rank = rng.choice([3, 3, 2, 1])
  tile = rng.choice(MOSAIC_TILES[rank])
  latent = [max(1, t * rng.randint(1, 3) - rng.choice([0, 0, rng.randint(0, t - 1)]))
            for t in tile]
  while math.prod(latent) > max_tokens:
    j = rng.randrange(rank)
    latent[j] = max(1, latent[j] // 2)
  spec, heads, kv_heads, batch, lengths = _random_windows_and_text(
      rng, latent, tile, text_max=[0, 0, 1, 17, 64, 100], batch=[1, 2])
  return dict(spec=spec, batch=batch, heads=heads, kv_heads=kv_heads,
              head_dim=rng.choice([64, 128, 64, 128, 48, 96]),
              dtype=rng.choice(["bfloat16", "float16"]),
              scale=rng.choice([None, None, 0.37, 1.3]), lengths=lengths, blocks=(None, None),
              garbage=rng.choice(["nan", "inf", "big", "mix"]), lse=rng.random() < 0.6,
              key_steps=rng.choice(["auto", "auto", "blocks"]))


def _junk(rng, kind, shape):
  if kind == "big":
    return rng.standard_normal(shape) * 1e4
  if kind == "mix":
    return rng.choice([np.nan, np.inf, -np.inf, 1e4, -6e4], size=shape)
  return np.full(shape, {"nan": np.nan, "inf": np.inf}[kind])


def check_case(c: dict, seed: int) -> None:
  spec, b_, h_, kvh, d = c["spec"], c["batch"], c["heads"], c["kv_heads"], c["head_dim"]
  dtype, s_ = DTYPES[c["dtype"]], spec.seq_len
  lengths = c["lengths"] or [spec.text_len] * b_
  windows = spec.head_windows(h_)
  masks, valid = [], []
  for b in range(b_):
    per_window = {w: reference64.mask(spec.latent_shape, spec.tile_shape, w, lengths[b],
                                      spec.text_max_len, spec.text_position, spec.causal_axes)
                  for w in set(windows)}
    masks.append([per_window[w] for w in windows])
    valid.append([ok for _, ok in reference64.layout(spec.latent_shape, spec.tile_shape,
                                                      lengths[b], spec.text_max_len,
                                                      spec.text_position)])
  valid = np.stack(valid)                                        # [batch, seq]
  m = valid[:, :, None, None]
  rng = np.random.default_rng(seed)
  scale = c["scale"]
  sc = d ** -0.5 if scale is None else scale
  rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  # Logits of standard deviation 1.5 (any size at scale 0, where they do not count).
  q = rounded(rng.standard_normal((b_, s_, h_, d)) * 1.5 / ((abs(sc) or 1.0) * d ** 0.5))
  k, v = (rounded(rng.standard_normal((b_, s_, kvh, d))) for _ in range(2))
  do = rounded(rng.standard_normal(q.shape))
  dlse = rng.standard_normal((b_, s_, h_)) if c["lse"] else np.zeros((b_, s_, h_))
  garbage = [np.where(m, x, _junk(rng, c["garbage"], x.shape)) for x in (q, k, v)]
  tl = None if c["lengths"] is None else jnp.asarray(c["lengths"], jnp.int32)

  def op(q, k, v):
    return jsta.sliding_tile_attention(q, k, v, spec, text_lengths=tl, return_lse=c["lse"],
                                       scale=scale, implementation=c["implementation"],
                                       block_q=c["blocks"][0], block_kv=c["blocks"][1])
  out, pull = jax.vjp(op, *(jnp.asarray(x, dtype) for x in garbage))
  o, lse = out if c["lse"] else (out, None)
  cts = (jnp.asarray(do, dtype), jnp.asarray(dlse, jnp.float32)) if c["lse"] else \
      jnp.asarray(do, dtype)
  grads = pull(cts)
  o_ref, lse_ref, *grads_ref = reference64.general_attention(
      q * m, k * m, v * m, do, dlse.transpose(0, 2, 1), masks, sc)
  lse_ref = lse_ref.transpose(0, 2, 1)                           # [batch, seq, heads]
  tol_o, tol_g, tol_lse = TOL[c["dtype"]]
  for name, got, ref, tol in zip(("o", "dq", "dk", "dv"), (o, *grads),
                                 (o_ref, *grads_ref), (tol_o, tol_g, tol_g, tol_g)):
    assert got.dtype == dtype and got.shape == ref.shape, (name, got.dtype, got.shape)
    got = np.asarray(got.astype(jnp.float32), np.float64)
    assert np.isfinite(got).all(), f"{name}: non-finite values"
    assert (got[~valid] == 0).all(), f"{name}: non-zero at padded positions"
    # Floor: a row that attends one key has an exactly zero dq (float32 noise in the op).
    err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-2 * np.sqrt(ref.size))
    assert err < tol, f"{name}: relative L2 {err:.3g} >= {tol}"
  if lse is not None:
    assert lse.dtype == jnp.float32 and lse.shape == (b_, s_, h_)
    lse = np.asarray(lse, np.float64)
    assert np.isposinf(lse[~valid]).all(), "lse is not +inf on padded rows"
    assert np.abs(lse[valid] - lse_ref[valid]).max() < tol_lse


def _describe(c: dict) -> str:
  s = c["spec"]
  return (f"{s} batch={c['batch']} heads={c['heads']}/{c['kv_heads']} d={c['head_dim']} "
          f"{c['dtype']} scale={c['scale']} lengths={c['lengths']} blocks={c['blocks']} "
          f"garbage={c['garbage']} lse={c['lse']} {c['implementation']}")


def test_reference_layout_matches_tile_order():
  """reference64's layout (each position's tile, and padding) is the one jsta.tile_order
  builds, on the random cases' specs."""
  rng = random.Random(SEED)
  for _ in range(30):
    spec = random_case(rng)["spec"]
    pos = reference64.layout(spec.latent_shape, spec.tile_shape, 0, 0)
    x = np.arange(1, spec.video_len + 1, dtype=np.float32)[None, :, None]
    token = np.asarray(jsta.tile_order(x, spec))[0, :, 0].astype(int) - 1   # -1 at padding
    assert token.shape == (len(pos),)
    for t, (tile, ok) in zip(token, pos):
      assert (t >= 0) == ok
      if ok:
        coords = np.unravel_index(t, spec.latent_shape)
        assert tuple(c // n for c, n in zip(coords, spec.tile_shape)) == tuple(tile)


@pytest.mark.parametrize("i", range(NUM_CASES))
def test_op_matches_float64_brute_force(i):
  seed = SEED * 100_003 + i
  c = random_case(random.Random(seed))
  try:
    check_case(c, seed)
  except AssertionError as e:
    raise AssertionError(f"{_describe(c)}: {e}") from None


def _mosaic_case(i: int, interpret: bool, max_tokens: int) -> None:
  from pallas_kernels.mosaic.backend import MosaicBackend
  seed = SEED * 100_003 + 50_000 + i
  c = random_mosaic_case(random.Random(seed), max_tokens)
  c["implementation"] = MosaicBackend(interpret=interpret, key_steps=c.pop("key_steps"))
  try:
    interpreted(check_case, c, seed)
  except AssertionError as e:
    raise AssertionError(f"{_describe(c)}: {e}") from None


@pytest.mark.cpu_only
@pytest.mark.parametrize("i", [i if i == 0 else pytest.param(i, marks=pytest.mark.slow)
                               for i in range(NUM_MOSAIC_CASES)])
def test_mosaic_kernels_match_float64_brute_force(i):
  """The Hopper kernels in GPU interpret mode on random cases they take (a random search of
  this kind found the NaN of REGRESSION_CASES)."""
  _mosaic_case(i, interpret=True, max_tokens=800)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("i", range(NUM_MOSAIC_GPU_CASES))
def test_mosaic_kernels_match_float64_brute_force_on_gpu(i):
  _mosaic_case(i, interpret=False, max_tokens=1600)


# Scales of zero and below, which the contract allows (|scale| <= jsta.checks.MAX_SCALE): the
# kernels take each row's largest score and scale it, so the op hands them a positive scale
# (q negated; at zero, q times zero and scale 1). Each backend on the CPU, with padding, text
# and blocks spanning tiles where it takes them.
SCALE_CASES = [
    ("xla", jsta.STASpec((3, 5, 6), (2, 2, 4), ((3, 1, 3), (1, 1, 1)), text_len=5,
                         text_max_len=8), 16, "float32", (None, None)),
    ("pallas_triton", jsta.STASpec((3, 6, 8), (2, 4, 4), (1, 1, 1), text_len=9,
                                   text_max_len=40), 64, "float16", (16, 32)),
    (MOSAIC_INTERPRET, jsta.STASpec((2, 8, 8), (1, 8, 8), (1, 1, 1), text_len=10,
                                    text_max_len=64), 64, "bfloat16", (None, None)),
]


@pytest.mark.parametrize("scale", [0.0, -0.37])
@pytest.mark.parametrize("implementation,spec,head_dim,dtype,blocks", SCALE_CASES,
                         ids=[backend_id(c[0]) for c in SCALE_CASES])
def test_zero_and_negative_scales_match_float64_brute_force(implementation, spec, head_dim,
                                                            dtype, blocks, scale):
  c = dict(spec=spec, batch=1, heads=2, kv_heads=1, head_dim=head_dim, dtype=dtype,
           scale=scale, lengths=None, blocks=blocks, garbage="nan", lse=True,
           implementation=implementation)
  try:
    interpreted(check_case, c, 7)
  except AssertionError as e:
    raise AssertionError(f"{_describe(c)}: {e}") from None


# Cases the random search found wrong on a backend, kept as regressions, checked against the
# float64 brute force with garbage: in GPU interpret mode on the CPU, compiled on a Hopper GPU.
# - 2026-12-07, pallas_mosaic: a sample whose run-time text length is 0, where the op's
#   masked steps come first: every video row's first key step held no valid key, its running
#   max stayed -inf and exp2(-inf - -inf) made the whole output NaN (text first or last).
REGRESSION_CASES = [
    (jsta.STASpec((16, 16), (8, 8), (3, 5), text_len=0, text_max_len=17,
                  text_position="first"), [17, 0], "float16", "mix"),
    (jsta.STASpec((16, 16), (8, 8), (5, 3), text_len=5, text_max_len=64,
                  text_position="last"), [0, 40], "bfloat16", "nan"),
]
REGRESSION_IDS = ["mosaic_no_text_first", "mosaic_no_text_last"]


def _regression(implementation, spec, lengths, dtype, garbage):
  c = dict(spec=spec, batch=len(lengths), heads=2, kv_heads=1, head_dim=64, dtype=dtype,
           scale=1.3, lengths=lengths, blocks=(None, None), garbage=garbage, lse=True,
           implementation=implementation)
  try:
    interpreted(check_case, c, 11)
  except AssertionError as e:
    raise AssertionError(f"{_describe(c)}: {e}") from None


@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,lengths,dtype,garbage", [
    c if i == 0 else pytest.param(*c, marks=pytest.mark.slow)
    for i, c in enumerate(REGRESSION_CASES)], ids=REGRESSION_IDS)
def test_regressions_match_float64_brute_force(spec, lengths, dtype, garbage):
  _regression(MOSAIC_INTERPRET, spec, lengths, dtype, garbage)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("spec,lengths,dtype,garbage", REGRESSION_CASES, ids=REGRESSION_IDS)
def test_regressions_match_float64_brute_force_on_gpu(spec, lengths, dtype, garbage):
  _regression("pallas_mosaic", spec, lengths, dtype, garbage)
