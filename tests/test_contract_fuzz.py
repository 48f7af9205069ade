"""Randomized check of the op against docs/SEMANTICS.md: a float64 NumPy brute force built from
the documented rules alone (layout, clamped or causal tile window, text slots first or last,
run-time text lengths, per-head windows, GQA), compared with the op's output, lse and
gradients on random specs with garbage (NaN, inf, 1e4) in every padded position.

Each case compiles a forward and a backward (about 2 s on a CPU), so the default run keeps few
cases; ``JSTA_FUZZ_CASES=300`` (and ``JSTA_FUZZ_SEED``) runs a longer fuzz.
"""

from __future__ import annotations

import itertools
import math
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta

NUM_CASES = int(os.environ.get("JSTA_FUZZ_CASES", "4"))
SEED = int(os.environ.get("JSTA_FUZZ_SEED", "0"))
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Relative L2 (o, gradients) and max abs lse error against the float64 brute force.
TOL = {"float32": (2e-5, 1e-4, 1e-4), "bfloat16": (6e-3, 1.5e-2, 1e-3),
       "float16": (1.5e-3, 3e-3, 1e-3)}


# ---- the brute force, from docs/SEMANTICS.md ----------------------------------------------------
def _layout(latent, tile):
  """Per video position (tile order): the row-major token index (-1 at padding) and the tile's
  coordinates."""
  size = math.prod(tile)
  align = 64 if size % 64 == 0 else size
  src, coords = [], []
  for tc in itertools.product(*[range(-(-s // t)) for s, t in zip(latent, tile)]):
    ext = [min(t, s - c * t) for c, t, s in zip(tc, tile, latent)]
    real = math.prod(ext)
    for loc in itertools.product(*[range(e) for e in ext]):
      src.append(int(np.ravel_multi_index([c * t + x for c, t, x in zip(tc, tile, loc)], latent)))
    src += [-1] * (-(-real // align) * align - real)
    coords += [tc] * (-(-real // align) * align)
  return np.array(src), np.array(coords).reshape(len(src), len(latent))


def _axis_attend(qd, kd, w, n, causal):
  if causal:
    return (kd >= qd - (w - 1)) & (kd <= qd)
  if w >= n:
    return np.ones(np.broadcast_shapes(qd.shape, kd.shape), bool)
  half = w // 2
  return np.abs(kd - np.clip(qd, half, n - 1 - half)) <= half


def brute_mask(spec: jsta.STASpec, window, text_len: int):
  """(mask [seq, seq] (query, key), valid [seq]) of one sample with ``text_len`` valid slots."""
  src, coords = _layout(spec.latent_shape, spec.tile_shape)
  n = [-(-s // t) for s, t in zip(spec.latent_shape, spec.tile_shape)]
  real = src >= 0
  video = real[:, None] & real[None, :]
  for d in range(len(n)):
    video &= _axis_attend(coords[:, d, None], coords[None, :, d], window[d], n[d],
                          d in spec.causal_axes)
  nv, nt = len(src), spec.text_max_len
  text = np.arange(nt) < text_len
  valid = np.concatenate([real, text])
  mask = valid[:, None] & valid[None, :]           # text rows and columns: every valid token
  mask[:nv, :nv] = video
  if spec.text_position == "first":
    perm = np.concatenate([np.arange(nv, nv + nt), np.arange(nv)])
    mask, valid = mask[perm][:, perm], valid[perm]
  return mask, valid


def brute_attention(q, k, v, masks, scale, do, dlse):
  """float64 o, lse [b, s, h] and the gradients of sum(o * do) + sum(lse * dlse)."""
  b_, s_, h_, _ = q.shape
  group = h_ // k.shape[2]
  o, lse = np.zeros_like(q), np.full((b_, s_, h_), np.inf)
  dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
  for b, h in itertools.product(range(b_), range(h_)):
    kh, m = h // group, masks[b][h]
    rows = m.any(1)
    s = np.where(m, scale * q[b, :, h] @ k[b, :, kh].T, -np.inf)[rows]
    e = np.exp(s - s.max(1, keepdims=True))
    p = np.zeros((s_, s_))
    p[rows] = e / e.sum(1, keepdims=True)
    lse[b, rows, h] = s.max(1) + np.log(e.sum(1))
    o[b, :, h] = p @ v[b, :, kh]
    d_o = do[b, :, h] * rows[:, None]
    ds = p * (d_o @ v[b, :, kh].T - (o[b, :, h] * d_o).sum(1)[:, None]
              + np.where(rows, dlse[b, :, h], 0.0)[:, None])
    dq[b, :, h] = scale * ds @ k[b, :, kh]
    dk[b, :, kh] += scale * ds.T @ q[b, :, h]
    dv[b, :, kh] += p.T @ d_o
  return o, lse, dq, dk, dv


# ---- random cases ---------------------------------------------------------------------------
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
  n = [-(-s // t) for s, t in zip(latent, tile)]
  causal = tuple(d for d in range(rank) if rng.random() < 0.15)

  def window():
    return tuple(rng.randint(1, n[d] + 2) if d in causal else
                 rng.choice([1, 3, 5, 2 * n[d] - 1, 2 * n[d] + 1]) for d in range(rank))
  heads = rng.choice([1, 2, 3, 4])
  kv_heads = rng.choice([x for x in range(1, heads + 1) if heads % x == 0])
  win = tuple(window() for _ in range(heads)) if rng.random() < 0.3 else window()
  text_max = rng.choice([0, 0, 1, 3, 8, 17])
  spec = jsta.STASpec(tuple(latent), tuple(tile), win,
                      text_len=rng.choice([0, text_max, rng.randint(0, text_max)]),
                      text_max_len=text_max, text_position=rng.choice(["last", "first"]),
                      causal_axes=causal)
  batch = rng.choice([1, 2, 3])
  lengths = None
  if text_max and rng.random() < 0.5:
    lengths = [rng.choice([0, text_max, rng.randint(0, text_max)]) for _ in range(batch)]
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
    per_window = {w: brute_mask(spec, w, lengths[b]) for w in set(windows)}
    masks.append([per_window[w][0] for w in windows])
    valid.append(per_window[windows[0]][1])
  valid = np.stack(valid)                                        # [batch, seq]
  m = valid[:, :, None, None]
  rng = np.random.default_rng(seed)
  scale = c["scale"]
  sc = d ** -0.5 if scale is None else scale
  rounded = lambda x: np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  q = rounded(rng.standard_normal((b_, s_, h_, d)) * 1.5 / (sc * d ** 0.5))
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
  want = brute_attention(q * m, k * m, v * m, masks, sc, do, dlse)
  tol_o, tol_g, tol_lse = TOL[c["dtype"]]
  for name, got, ref, tol in zip(("o", "dq", "dk", "dv"), (o, *grads),
                                 (want[0], *want[2:]), (tol_o, tol_g, tol_g, tol_g)):
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
    assert np.abs(lse[valid] - want[1][valid]).max() < tol_lse


def _describe(c: dict) -> str:
  s = c["spec"]
  return (f"{s} batch={c['batch']} heads={c['heads']}/{c['kv_heads']} d={c['head_dim']} "
          f"{c['dtype']} scale={c['scale']} lengths={c['lengths']} blocks={c['blocks']} "
          f"garbage={c['garbage']} lse={c['lse']} {c['implementation']}")


def test_brute_force_layout_matches_tile_order():
  """The brute force's layout is the one jsta.tile_order documents (padding at -1)."""
  rng = random.Random(SEED)
  for _ in range(30):
    spec = random_case(rng)["spec"]
    src, _ = _layout(spec.latent_shape, spec.tile_shape)
    x = np.arange(1, spec.video_len + 1, dtype=np.float32)[None, :, None]
    got = np.asarray(jsta.tile_order(x, spec))[0, :, 0]
    np.testing.assert_array_equal(got[src >= 0], src[src >= 0] + 1)
    assert got.shape == src.shape


@pytest.mark.parametrize("i", range(NUM_CASES))
def test_op_matches_float64_brute_force(i):
  seed = SEED * 100_003 + i
  c = random_case(random.Random(seed))
  try:
    check_case(c, seed)
  except AssertionError as e:
    raise AssertionError(f"{_describe(c)}: {e}") from None
