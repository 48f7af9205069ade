"""Run-time text lengths, text first, grouped-query attention, causal axes and the lse output:
each against the independent float64 brute force (:mod:`reference64`), alone and combined, on
every backend (xla, pallas_triton in interpret mode, pallas_mosaic in GPU interpret mode), with
NaN in every position the mask never attends."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
import reference64
from helpers import MOSAIC_INTERPRET, backend_id, interpreted, np_f32

XLA, TRITON = "xla", "pallas_triton"


@dataclasses.dataclass(frozen=True)
class Feature:
  name: str
  spec: jsta.STASpec
  heads: int
  kv_heads: int
  head_dim: int
  dtype: object
  backends: tuple
  text_lengths: tuple | None = None      # per sample; None: spec.text_len for every sample
  batch: int = 1
  tol: float = 2e-4
  blocks: tuple = (None, None)
  gpu: bool = False


S = jsta.STASpec
FEATURES = [
    Feature("text_lengths", S((3, 4, 6), (1, 4, 4), (3, 1, 1), text_len=2, text_max_len=16),
            2, 2, 16, jnp.float32, (XLA, TRITON), text_lengths=(0, 9, 16), batch=3),
    Feature("text_first", S((3, 4, 6), (1, 4, 4), (1, 1, 3), text_len=5, text_max_len=16,
                            text_position="first"), 2, 2, 16, jnp.float32, (XLA,)),
    Feature("gqa", S((3, 4, 6), (1, 4, 4), (1, 3, 1)), 4, 2, 16, jnp.float32, (XLA,)),
    Feature("mqa_per_head", S((5, 6), (2, 3), ((1, 1), (3, 3), (5, 1))), 3, 1, 8,
            jnp.float32, (XLA,)),
    Feature("causal_time", S((5, 4, 4), (1, 4, 4), (2, 1, 1), text_len=3, text_max_len=16,
                             causal_axes=(0,)), 2, 2, 16, jnp.float32, (XLA,)),
    Feature("causal_two_axes", S((4, 5), (1, 2), (3, 6), causal_axes=(0, 1)), 2, 2, 8,
            jnp.float32, (XLA,)),
    Feature("all_combined", S((4, 4, 6), (1, 4, 4), ((2, 1, 3), (3, 3, 1), (1, 1, 1), (4, 1, 3)), text_len=4,
                              text_max_len=16, text_position="first", causal_axes=(0,)),
            # pallas_triton runs every feature at once here.
            4, 2, 16, jnp.float32, (XLA, TRITON), text_lengths=(16, 3), batch=2),
    # 64-token tiles with 128-row blocks spanning them (partial edge tile on W), text slots
    # over a whole block, two samples of different text lengths. head_dim 128 runs the fused
    # backward: one kernel per program (two interpreted kernels in one program can wait on
    # each other for ever on a machine with few cores).
    Feature("hopper_combined", S((2, 8, 12), (1, 8, 8), (2, 1, 1), text_len=0,
                                 text_max_len=64, text_position="first", causal_axes=(0,)),
            2, 1, 128, jnp.bfloat16, (MOSAIC_INTERPRET,), text_lengths=(40, 0), batch=2,
            tol=2e-2, blocks=(128, 128)),
    # On the GPU: the compiled kernels, 192-token tiles with ragged edges, everything at once.
    Feature("gpu_combined", S((6, 14, 20), (3, 8, 8), (2, 3, 3), text_max_len=70,
                              text_position="first", causal_axes=(0,)),
            4, 2, 128, jnp.bfloat16, ("pallas_mosaic", TRITON), text_lengths=(70, 11), batch=2,
            tol=2e-2, gpu=True),
    Feature("gpu_text_lengths_fp16", S((4, 16, 16), (2, 8, 8), (1, 1, 3), text_max_len=64),
            2, 2, 64, jnp.float16, ("pallas_mosaic", TRITON), text_lengths=(5, 64), batch=2,
            tol=2e-2, gpu=True),
]
CASES = [pytest.param(f, be, id=f"{f.name}-{backend_id(be)}",
                      marks=[pytest.mark.gpu] if f.gpu else [])
         for f in FEATURES for be in f.backends]


def _sample_masks(spec: jsta.STASpec, heads: int, lengths):
  """masks[b][h] bool[seq, seq] of the brute force: sample b's text length, head h's window."""
  windows = spec.head_windows(heads)
  out = []
  for t in lengths:
    per_window = {w: reference64.mask(spec.latent_shape, spec.tile_shape, w, t,
                                      spec.text_max_len, spec.text_position, spec.causal_axes)
                  for w in set(windows)}
    out.append([per_window[w] for w in windows])
  return out


def _inputs(f: Feature, lengths, seed: int = 0):
  keys = jax.random.split(jax.random.key(seed), 5)
  s = f.spec.seq_len
  q = jax.random.normal(keys[0], (f.batch, s, f.heads, f.head_dim)) * 2.0
  k, v = (jax.random.normal(kk, (f.batch, s, f.kv_heads, f.head_dim)) for kk in keys[1:3])
  w = jax.random.normal(keys[3], (f.batch, s, f.heads, f.head_dim))
  w_lse = jax.random.normal(keys[4], (f.batch, f.heads, s))
  # NaN wherever the mask never looks: padded latent positions and text slots beyond each
  # sample's length.
  valid = np.stack([reference64.mask(f.spec.latent_shape, f.spec.tile_shape,
                                     f.spec.head_windows(1)[0] if not f.spec.is_per_head
                                     else f.spec.window[0], t, f.spec.text_max_len,
                                     f.spec.text_position, f.spec.causal_axes).any(axis=0)
                    for t in lengths])                                 # [batch, seq] keys
  nan = lambda x: jnp.where(jnp.asarray(valid)[:, :, None, None], x, jnp.nan).astype(f.dtype)
  return nan(q), nan(k), nan(v), w, w_lse, valid


@pytest.mark.parametrize("f, backend", CASES)
def test_feature_matches_float64_brute_force(f: Feature, backend):
  lengths = f.text_lengths or (f.spec.text_len,) * f.batch
  q, k, v, w, w_lse, valid = _inputs(f, lengths)
  masks = _sample_masks(f.spec, f.heads, lengths)
  scale = f.head_dim ** -0.5
  tl = None if f.text_lengths is None else jnp.asarray(f.text_lengths, jnp.int32)

  def loss(q, k, v, tl):
    o, lse = jsta.sliding_tile_attention(q, k, v, f.spec, text_lengths=tl, return_lse=True,
                                         implementation=backend, block_q=f.blocks[0],
                                         block_kv=f.blocks[1])
    assert lse.shape == (f.batch, f.spec.seq_len, f.heads)     # jax.nn's residual layout
    lse = jnp.swapaxes(lse, 1, 2)                                # the reference's [b, h, s]
    lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0) * w_lse
    return (o.astype(jnp.float32) * w).sum() + lse_term.sum(), (o, lse)

  # Forward and backward as separate calls (GPU interpret mode, see helpers._loss_and_grads).
  fwd = jax.jit(lambda q, k, v: loss(q, k, v, tl))
  val, pullback, (o, lse) = interpreted(jax.vjp, fwd, q, k, v, has_aux=True)
  dq, dk, dv = interpreted(jax.jit(pullback), jnp.ones((), val.dtype))
  want = reference64.general_attention(np_f32(jnp.nan_to_num(q)), np_f32(jnp.nan_to_num(k)),
                                       np_f32(jnp.nan_to_num(v)), np_f32(w), np_f32(w_lse),
                                       masks, scale)
  wo, wlse, wdq, wdk, wdv = want
  q_valid = valid                                 # a query is valid iff its key is
  for name, got, ref in (("o", o, wo), ("dq", dq, wdq), ("dk", dk, wdk), ("dv", dv, wdv)):
    got = np_f32(got)
    assert np.isfinite(got).all(), f"{name} has non-finite values"
    norm = max(np.linalg.norm(ref), 1e-30)
    err = np.linalg.norm(got - ref) / norm
    assert err < f.tol, f"{name}: rel L2 {err:.2e} >= {f.tol}"
    inval = ~q_valid
    assert (got[inval] == 0).all(), f"{name} is not exactly zero at padded positions"
  lse = np_f32(lse)
  np.testing.assert_array_equal(np.isinf(lse), np.isinf(wlse))
  fin = np.isfinite(wlse)
  np.testing.assert_allclose(lse[fin], wlse[fin], atol=10 * f.tol, rtol=f.tol)


def test_text_lengths_compile_once_for_every_length():
  spec = S((2, 4, 4), (1, 4, 4), (1, 1, 1), text_max_len=16)
  q = jax.random.normal(jax.random.key(0), (1, spec.seq_len, 2, 8))
  f = jax.jit(lambda q, t: jsta.sliding_tile_attention(q, q, q, spec, text_lengths=t,
                                                       implementation=XLA))
  outs = [f(q, jnp.array([t], jnp.int32)) for t in (0, 5, 16)]
  assert f._cache_size() == 1
  for t, o in zip((0, 5, 16), outs):
    want = jsta.sliding_tile_attention(q, q, q, dataclasses.replace(spec, text_len=t),
                                       implementation=XLA)
    np.testing.assert_allclose(np_f32(o), np_f32(want), atol=1e-5)


def test_text_lengths_traced_values_are_clamped():
  spec = S((2, 4, 4), (1, 4, 4), (1, 1, 1), text_max_len=16)
  q = jax.random.normal(jax.random.key(1), (2, spec.seq_len, 1, 8))
  f = jax.jit(lambda t: jsta.sliding_tile_attention(q, q, q, spec, text_lengths=t,
                                                    implementation=XLA))
  got = f(jnp.array([-3, 99], jnp.int32))
  want = f(jnp.array([0, 16], jnp.int32))
  np.testing.assert_array_equal(np_f32(got), np_f32(want))


def test_gqa_equals_repeated_heads_and_sums_gradients():
  spec = S((4, 6), (2, 3), (1, 3), text_len=2, text_max_len=4)
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (1, spec.seq_len, 6, 8))
  k, v = (jax.random.normal(kk, (1, spec.seq_len, 2, 8)) for kk in keys[1:])
  attend = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=XLA)
  rep = lambda x: jnp.repeat(x, 3, axis=2)
  np.testing.assert_array_equal(np_f32(attend(q, k, v)), np_f32(attend(q, rep(k), rep(v))))
  g = jax.grad(lambda k: attend(q, k, v).sum())(k)
  g_rep = jax.grad(lambda kr: attend(q, kr, rep(v)).sum())(rep(k))
  np.testing.assert_allclose(np_f32(g), np_f32(g_rep.reshape(1, -1, 2, 3, 8).sum(3)),
                             atol=1e-5)


def test_text_first_is_a_permutation_of_text_last():
  last = S((3, 5), (2, 2), (1, 3), text_len=3, text_max_len=5)
  first = dataclasses.replace(last, text_position="first")
  perm = np.concatenate([last.padded_video_len + np.arange(5), np.arange(last.padded_video_len)])
  np.testing.assert_array_equal(jsta.token_valid(first), jsta.token_valid(last)[perm])
  np.testing.assert_array_equal(jsta.token_mask(first), jsta.token_mask(last)[np.ix_(perm, perm)])
  x = jnp.arange(first.seq_len)[None]
  video, text = jsta.split_video_text(x, first)
  np.testing.assert_array_equal(np.asarray(text)[0], np.arange(5))
  np.testing.assert_array_equal(np.asarray(jsta.join_video_text(video, text, first)),
                                np.asarray(x))


@pytest.mark.parametrize("spec", [
    S((5, 4, 4), (1, 4, 4), (2, 1, 1), causal_axes=(0,)),
    S((7,), (1,), (3,), causal_axes=(0,)),
    S((4, 5), (1, 2), (3, 6), causal_axes=(0, 1), text_len=2, text_max_len=3),
    S((6, 4), (2, 2), (9, 1), causal_axes=(0,)),
])
def test_causal_masks_counts_and_sparsity_match_the_brute_force(spec):
  want = reference64.mask(spec.latent_shape, spec.tile_shape, spec.window, spec.text_len,
                          spec.text_max_len, spec.text_position, spec.causal_axes)
  np.testing.assert_array_equal(jsta.token_mask(spec), want)
  assert spec.attended_pairs() == int(want.sum())
  n = spec.num_tiles
  tm = jsta.tile_mask(spec, spec.window)
  assert spec.sparsity() == pytest.approx(1 - tm.mean())
  # Time-causal with window w: tile t sees tiles max(0, t - w + 1) .. t.
  if spec.causal_axes == (0,) and spec.rank == 1:
    for t in range(n[0]):
      assert list(np.flatnonzero(tm[t])) == list(range(max(0, t - spec.window[0] + 1), t + 1))


def test_implementation_sequence_skips_what_cannot_run():
  spec = S((4, 8, 8), (1, 8, 8), (1, 1, 1))
  q = jnp.zeros((1, spec.seq_len, 1, 64), jnp.float32)
  # float32 is outside the Hopper kernels: the next name runs it.
  plan = jsta.make_plan(spec, 1, 64, jnp.float32, backend=("pallas_mosaic", XLA))
  assert plan.backend == XLA
  o = jsta.sliding_tile_attention(q, q, q, spec, implementation=["pallas_mosaic", XLA])
  assert o.shape == q.shape
  with pytest.raises(ValueError, match=r"no backend of \['pallas_mosaic'\] .*|pallas_mosaic"):
    jsta.sliding_tile_attention(q, q, q, spec, implementation=["pallas_mosaic"])
  with pytest.raises(ValueError, match="pallas_mosaic: .*; pallas_triton: "):
    jsta.sliding_tile_attention(q, q, q, spec, implementation=("pallas_mosaic", TRITON),
                                block_q=3)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(text_lengths=[1.5]), TypeError, "text_lengths must have an integer dtype"),
    (dict(text_lengths="3"), TypeError, "text_lengths must be an int array"),
    (dict(text_lengths=np.array([1, 2])), ValueError, r"text_lengths must be \[batch\] = \[1\]"),
    (dict(text_lengths=np.array([5])), ValueError, r"must lie in \[0, text_max_len=4\]"),
    (dict(implementation="xla", backend="pallas_triton"), ValueError, "not both"),
    (dict(implementation=()), TypeError, "non-empty sequence of names"),
    (dict(implementation=["xla", "nope"]), ValueError, "implementation must be one of"),
])
def test_bad_feature_arguments_raise(kwargs, exc, match):
  spec = S((4, 4), (2, 2), (1, 1), text_len=1, text_max_len=4)
  q = jnp.zeros((1, spec.seq_len, 2, 8))
  with pytest.raises(exc, match=match):
    jsta.sliding_tile_attention(q, q, q, spec, **kwargs)


def test_bad_gqa_and_spec_arguments_raise():
  spec = S((4, 4), (2, 2), (1, 1))
  q = jnp.zeros((1, spec.seq_len, 3, 8))
  with pytest.raises(ValueError, match="fewer heads dividing"):
    jsta.sliding_tile_attention(q, q[:, :, :2], q[:, :, :2], spec)
  with pytest.raises(ValueError, match="k and v must have the same shape"):
    jsta.sliding_tile_attention(q, q[:, :, :1], q, spec)
  with pytest.raises(ValueError, match="text_position must be one of"):
    S((4, 4), (2, 2), (1, 1), text_position="middle")
  with pytest.raises(TypeError, match="text_position must be one of"):
    S((4, 4), (2, 2), (1, 1), text_position=None)
  with pytest.raises(ValueError, match=r"causal_axes must be distinct axes in \[0, 2\)"):
    S((4, 4), (2, 2), (1, 1), causal_axes=(2,))
  with pytest.raises(ValueError, match="must be odd .* not causal"):
    S((4, 4), (2, 2), (2, 2), causal_axes=(0,))
  assert S((4, 4), (2, 2), (2, 1), causal_axes=(0,)).window == (2, 1)


def test_row_major_entry_point_equals_tile_order_by_hand():
  spec = S((3, 5), (2, 2), (1, 3), text_len=2, text_max_len=3, text_position="first")
  keys = jax.random.split(jax.random.key(3), 2)
  q = jax.random.normal(keys[0], (2, spec.video_len + 3, 2, 8))
  kv = jax.random.normal(keys[1], (2, spec.video_len + 3, 1, 8))

  def by_hand(q, kv):
    tiles = lambda x: jsta.join_video_text(jsta.tile_order(x[:, 3:], spec), x[:, :3], spec)
    o = jsta.sliding_tile_attention(tiles(q), tiles(kv), tiles(kv), spec, implementation=XLA)
    video, text = jsta.split_video_text(o, spec)
    return jnp.concatenate([text, jsta.untile_order(video, spec)], axis=1)

  row_major = lambda q, kv: jsta.sliding_tile_attention_row_major(q, kv, kv, spec,
                                                                  implementation=XLA)
  np.testing.assert_allclose(np_f32(row_major(q, kv)), np_f32(by_hand(q, kv)), atol=1e-6)
  g1 = jax.grad(lambda q, kv: (row_major(q, kv) ** 2).sum(), argnums=(0, 1))(q, kv)
  g2 = jax.grad(lambda q, kv: (by_hand(q, kv) ** 2).sum(), argnums=(0, 1))(q, kv)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(np_f32(a), np_f32(b), atol=1e-5)
  with pytest.raises(ValueError, match=r"video_len \+ text_max_len = 18"):
    jsta.sliding_tile_attention_row_major(q[:, 1:], kv, kv, spec)
