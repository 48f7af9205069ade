"""The FP8 forward (pallas_kernels.mosaic.fp8, forward_fp8): quantization, the float32
emulation of the quantized algorithm against the dense reference, input checks, the CUDA
lowering of the kernel for every kind of schedule (on the CPU), the kernel in GPU interpret
mode against the emulation, and on a compute capability 9.x GPU the compiled kernel against
the emulation and the float32 reference.

Error bounds (relative L2 against the float32 reference, valid rows, standard normal inputs
unless said): the default recipe (int8 Q K^T, bf16 P V) 3e-2; the all-int8 recipe (P per row
and key step) 3e-2; the all-e4m3 recipe 7e-2 (e4m3's 3 mantissa bits on P and V: about 2.6%
each on random data, docs/PERFORMANCE.md).
Kernel against its emulation: 1e-2 (the output's bf16 rounding, exp2 approximations that
move a P across an e4m3 rounding boundary).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from pallas_kernels.mosaic import fp8
from pallas_kernels.mosaic.config import MosaicConfig

from helpers import interpreted, np_f32, rel_l2

ALL_E4M3 = fp8.ALL_E4M3                         # e4m3 Q K^T and P V, Q scales per 64 rows
INT8_E4M3 = dataclasses.replace(fp8.KERNEL_RECIPE, p_dtype="e4m3")
DEFAULT = fp8.KERNEL_RECIPE
ALL_INT8 = fp8.ALL_INT8                         # int8 Q K^T and P V
BOUND = {DEFAULT: 3e-2, INT8_E4M3: 5.5e-2, ALL_E4M3: 7e-2, ALL_INT8: 3e-2}
EMU_TOL = 1e-2

TEXT = jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1), text_len=10, text_max_len=64)
PLAIN = jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1))
SPANNING = jsta.STASpec((2, 8, 32), (1, 8, 8), (1, 1, 3))
SPANNING_RAGGED = jsta.STASpec((2, 10, 20), (1, 8, 8), (1, 1, 1), text_len=10, text_max_len=40)
PER_HEAD = jsta.STASpec((4, 8, 16), (2, 8, 8), ((3, 1, 1), (1, 1, 1)), text_len=30,
                        text_max_len=64)


def schedule(spec, heads, dynamic_text=False, block_q=128):
  return jsta.block_schedule(spec, heads, block_q, 128, mask_unit=64, dynamic_text=dynamic_text)


def inputs(seed, sched, heads, head_dim, *, kv_heads=None, q_mult=1.0, garbage=None,
           dtype=jnp.bfloat16):
  """q [1, S, heads, D], k, v [1, S, kv_heads, D] on the schedule's seq, standard normal (q x
  ``q_mult``); ``garbage`` (a float) fills the positions that are not valid queries/keys."""
  keys = jax.random.split(jax.random.key(seed), 3)
  kv_heads = kv_heads or heads
  s = sched.seq_len
  q = jax.random.normal(keys[0], (1, s, heads, head_dim)) * q_mult
  k, v = (jax.random.normal(kk, (1, s, kv_heads, head_dim)) for kk in keys[1:])
  if garbage is not None:
    bad = ~np.asarray(sched.query_valid)[None, :, None, None]
    q, k, v = (jnp.where(bad, garbage, x) for x in (q, k, v))
  return tuple(x.astype(dtype) for x in (q, k, v))


def text_key_valid(sched, lengths):
  """bool [B, S]: the run-time validity of per-sample text lengths (text last)."""
  slot = np.arange(sched.seq_len) - sched.spec.padded_video_len
  return jnp.asarray((slot[None] < 0) | (slot[None] < np.asarray(lengths)[:, None]))


def valid_rows(sched, key_valid=None):
  rows = np.asarray(sched.query_valid)[None]
  if key_valid is not None:
    rows = rows & np.asarray(key_valid)
  return rows


def row_errors(got, want, rows):
  """(relative L2 over the rows ``rows`` (bool [B, S]), the worst row's)."""
  got, want = np_f32(got)[rows], np_f32(want)[rows]
  per = np.linalg.norm(got - want, axis=-1) / np.maximum(np.linalg.norm(want, axis=-1), 1e-30)
  return rel_l2(got, want), float(per.max())


# ---- CPU: quantization -------------------------------------------------------------------------
@pytest.mark.parametrize("recipe", [ALL_E4M3, DEFAULT, ALL_INT8],
                         ids=["e4m3", "int8", "all_int8"])
def test_quantize_shapes_ranges_and_error(recipe):
  sched = schedule(TEXT, 4)
  q, k, v = inputs(0, sched, 4, 128, kv_heads=2, garbage=float("nan"))
  qv, kv = fp8.validity(sched)
  ops = fp8.quantize(q, k, v, qv, kv, recipe)
  s = sched.seq_len
  assert ops.q8.shape == (1, s, 4, 128) and ops.k8.shape == (1, s, 2, 128)
  assert ops.q_scale.shape == (1, 4, s // recipe.q_block)
  assert ops.k_scale.shape == (1, 2, s // 128)
  v_int8 = recipe.p_dtype == "int8"
  assert ops.vt8.shape == (1, 2, 128, s)
  assert ops.vt8.dtype == (jnp.int8 if v_int8 else jnp.float8_e4m3fn)
  assert ops.v_scale.shape == ops.k_mean.shape == ops.balance.shape == (1, 2, 128)
  want = jnp.int8 if recipe.qk_dtype == "int8" else jnp.float8_e4m3fn
  assert ops.q8.dtype == ops.k8.dtype == want
  # NaN in padded positions reaches no scale, no mean and no quantized value.
  for x in ops:
    assert np.isfinite(np_f32(x)).all()
  top = 127 if recipe.qk_dtype == "int8" else 448
  assert np.abs(np_f32(ops.q8)).max() <= top
  assert np.abs(np_f32(ops.vt8)).max() == (127 if v_int8 else 448)    # each channel's absmax
  # Dequantized values are close to the inputs on valid positions.
  ok = np.asarray(sched.query_valid)
  t = np_f32(ops.balance)[:, None]                                   # [B, 1, Hkv, D]
  dq = (np_f32(ops.q8) * np.repeat(np_f32(ops.q_scale), recipe.q_block, axis=2).transpose(
      0, 2, 1)[..., None] / np.repeat(t, 2, axis=2))
  dk = (np_f32(ops.k8) * np.repeat(np_f32(ops.k_scale), 128, axis=2).transpose(0, 2, 1)[..., None]
        * t + np_f32(ops.k_mean)[:, None])
  dv = (np_f32(ops.vt8) * np_f32(ops.v_scale)[..., None]).transpose(0, 3, 1, 2)
  qk_tol = 0.03 if recipe.qk_dtype == "int8" else 0.045
  assert rel_l2(dq[:, ok], np_f32(q)[:, ok]) < qk_tol
  assert rel_l2(dk[:, ok], np_f32(k)[:, ok]) < qk_tol
  assert rel_l2(dv[:, ok], np_f32(v)[:, ok]) < 0.045


def test_zero_blocks_get_unit_scales():
  sched = schedule(PLAIN, 1)
  z = jnp.zeros((1, sched.seq_len, 1, 64), jnp.bfloat16)
  ops = fp8.quantize(z, z, z, *fp8.validity(sched))
  assert (np_f32(ops.q_scale) == 1).all() and (np_f32(ops.k_scale) == 1).all()
  assert (np_f32(ops.v_scale) == 1).all() and (np_f32(ops.q8) == 0).all()


def test_recipe_checks():
  with pytest.raises(ValueError, match="p_dtype"):
    fp8.QuantRecipe(p_dtype="e5m2")
  with pytest.raises(ValueError, match="qk_dtype"):
    fp8.QuantRecipe(qk_dtype="int4")
  with pytest.raises(ValueError, match="v_scale"):
    fp8.QuantRecipe(v_scale="row")
  with pytest.raises(ValueError, match="K scales per 128"):
    fp8.kernel_precisions(fp8.QuantRecipe(k_block=1))
  # Per 64 keys: the gathered work items' K scales (the block kernel refuses them at its
  # operands: test_gathered_kernel_lowers_for_cuda).
  assert fp8.kernel_precisions(fp8.QuantRecipe(k_block=64)) == ("int8", "bf16")


# ---- CPU: the emulation ------------------------------------------------------------------------
@pytest.mark.parametrize("spec,kv_heads,lengths", [
    (TEXT, 2, None), (PER_HEAD, 1, None), (TEXT, 2, [3, 64]), (SPANNING_RAGGED, 2, None)],
    ids=["text", "per_head_gqa", "text_lengths", "spanning_ragged"])
def test_unquantized_emulation_matches_dense_reference(spec, kv_heads, lengths):
  """The emulation's blockwise loop (schedule lists, online softmax, masks) without
  quantization is the dense float32 reference, lse included."""
  batch = 1 if lengths is None else len(lengths)
  sched = schedule(spec, 2, dynamic_text=lengths is not None)
  q, k, v = inputs(1, sched, 2, 64, kv_heads=kv_heads, dtype=jnp.float32)
  q, k, v = (jnp.broadcast_to(x, (batch, *x.shape[1:])) for x in (q, k, v))
  key_valid = None if lengths is None else text_key_valid(sched, lengths)
  o, lse = fp8.emulated_forward(q, k, v, sched, 0.125, key_valid=key_valid, recipe=None)
  n = spec.seq_len
  ref = jsta.reference_attention(q[:, :n], k[:, :n], v[:, :n], spec, scale=0.125,
                                 text_lengths=None if lengths is None else jnp.asarray(lengths))
  rows = valid_rows(sched, key_valid)[:, :n]
  rows = np.broadcast_to(rows, (batch, n))
  np.testing.assert_allclose(np_f32(o)[:, :n][rows], np_f32(ref)[rows], atol=2e-5)
  # lse against a direct float32 computation on one head.
  qf, kf = np_f32(q)[:, :n, 0], np_f32(jnp.repeat(k, 2 // kv_heads, axis=2))[:, :n, 0]
  m = fp8._token_mask(sched)[0, :n, :n]
  if key_valid is not None:
    m = m[None] & np.asarray(key_valid)[:, None, :n]
  logits = np.where(m, np.einsum("bqd,bkd->bqk", qf, kf) * 0.125, -np.inf)
  with np.errstate(divide="ignore"):                  # rows that attend nothing: +-inf
    want = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(np.asarray(lse)[:, 0, :n][rows], want[rows], atol=2e-4)


def test_k_smoothing_is_softmax_invariant():
  """Shifting every key by one vector moves each row's scores by a constant: o is unchanged
  and lse moves by scale * q . shift, which lse_shift gives back."""
  sched = schedule(TEXT, 2)
  q, k, v = inputs(2, sched, 2, 64, dtype=jnp.float32)
  shift = jax.random.normal(jax.random.key(9), (1, 1, 2, 64)) * 3
  o1, lse1 = fp8.emulated_forward(q, k, v, sched, 0.125, recipe=None)
  o2, lse2 = fp8.emulated_forward(q, k + shift, v, sched, 0.125, recipe=None)
  rows = valid_rows(sched)
  np.testing.assert_allclose(np_f32(o1)[rows], np_f32(o2)[rows], atol=1e-5)
  corr = fp8.lse_shift(q, shift[:, 0], jnp.asarray(rows), 0.125)
  np.testing.assert_allclose(np.asarray(lse2 - corr)[:, :, rows[0]],
                             np.asarray(lse1)[:, :, rows[0]], atol=1e-4)


def test_smoothing_helps_keys_with_a_shared_offset():
  sched = schedule(TEXT, 2)
  q, k, v = inputs(3, sched, 2, 128)
  k = (k.astype(jnp.float32) + 6 * jax.random.normal(jax.random.key(5), (1, 1, 2, 128))
       ).astype(jnp.bfloat16)
  ref, _ = fp8.emulated_forward(q, k, v, sched, 128 ** -0.5, recipe=None)
  rows = valid_rows(sched)
  errs = {}
  for smooth in (True, False):
    o, _ = fp8.emulated_forward(q, k, v, sched, 128 ** -0.5,
                                recipe=dataclasses.replace(ALL_E4M3, smooth_k=smooth))
    errs[smooth] = row_errors(o, ref, rows)[0]
  assert errs[True] < 0.7 * errs[False], errs


@pytest.mark.parametrize("recipe", [DEFAULT, INT8_E4M3, ALL_E4M3, ALL_INT8],
                         ids=["default", "int8_e4m3", "all_e4m3", "all_int8"])
def test_quantized_emulation_error_bounds(recipe):
  sched = schedule(TEXT, 2)
  q, k, v = inputs(4, sched, 2, 128)
  ref, rlse = fp8.emulated_forward(q, k, v, sched, 128 ** -0.5, recipe=None)
  o, lse = fp8.emulated_forward(q, k, v, sched, 128 ** -0.5, recipe=recipe)
  rows = valid_rows(sched)
  err, worst = row_errors(o, ref, rows)
  assert err < BOUND[recipe], (err, worst)
  live = np.isfinite(np.asarray(rlse))
  assert (np.isfinite(np.asarray(lse)) == live).all()
  assert np.abs(np.asarray(lse - rlse)[live]).max() < 0.1


# ---- CPU: input checks -------------------------------------------------------------------------
def test_bad_inputs_raise():
  sched = schedule(TEXT, 2)
  s = sched.seq_len
  x = jnp.zeros((1, s, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="head_dim"):
    y = jnp.zeros((1, s, 2, 96), jnp.bfloat16)
    fp8.fp8_forward(y, y, y, sched, 0.1)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    y = x.astype(jnp.float32)
    fp8.fp8_forward(y, y, y, sched, 0.1)
  with pytest.raises(ValueError, match="share a dtype"):
    fp8.fp8_forward(x, x.astype(jnp.float16), x.astype(jnp.float16), sched, 0.1)
  with pytest.raises(ValueError, match="kv_heads dividing"):
    y = jnp.zeros((1, s, 3, 128), jnp.bfloat16)
    fp8.fp8_forward(jnp.zeros((1, s, 2, 128), jnp.bfloat16), y, y, sched, 0.1)
  with pytest.raises(ValueError, match="schedule is for"):
    fp8.fp8_forward(x[:, :128], x[:, :128], x[:, :128], sched, 0.1)
  with pytest.raises(ValueError, match="128-row"):
    fp8.fp8_forward(x, x, x, jsta.block_schedule(TEXT, 2, 128, 64, mask_unit=64), 0.1)
  with pytest.raises(ValueError, match="config blocks"):
    fp8.fp8_forward(x, x, x, sched, 0.1, config=MosaicConfig(block_kv=64))


def test_three_warpgroup_blocks_checked():
  """192-row query blocks are the 8-bit forward's alone, with schedule and config agreeing."""
  from pallas_kernels.mosaic import backend, config as config_lib
  sched, sched192 = schedule(TEXT, 2), schedule(TEXT, 2, block_q=192)
  x = jnp.zeros((1, sched.seq_len, 2, 128), jnp.bfloat16)
  y = jnp.zeros((1, sched192.seq_len, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="config blocks"):
    fp8.fp8_forward(y, y, y, sched192, 0.1, config=fp8.default_config(128))
  with pytest.raises(ValueError, match="config blocks"):
    fp8.fp8_forward(x, x, x, sched, 0.1, config=fp8.default_config(128, block_q=192))
  with pytest.raises(ValueError, match="block_q must be 128 or 192"):
    fp8.default_config(128, block_q=64)
  with pytest.raises(ValueError, match="block_q must be 64, 128 or 192"):
    MosaicConfig(block_q=256)
  with pytest.raises(ValueError, match="bf16 kernels"):
    backend.forward(y, y, y, sched192, 0.1)
  with pytest.raises(ValueError, match="bf16 kernels"):
    backend.backward(y, y, y, y, y, y, sched192, 0.1)
  with pytest.raises(ValueError, match="block_q must be 64 or 128"):   # what the op checks
    config_lib.check(TEXT, 128, jnp.bfloat16, 192, 128)


def test_differentiation_raises():
  sched = schedule(TEXT, 2)
  x = jax.ShapeDtypeStruct((1, sched.seq_len, 2, 128), jnp.bfloat16)
  loss = lambda q: jnp.sum(fp8.fp8_forward(q, q, q, sched, 0.1)[0].astype(jnp.float32))
  with pytest.raises(ValueError, match="inference only"):
    jax.jit(jax.grad(loss)).trace(x).lower(lowering_platforms=("cuda",))


# ---- CPU: what the kernel lowers to ------------------------------------------------------------
def _mosaic_calls(fn, *args) -> int:
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return text.count("stablehlo.custom_call @mosaic_gpu")


@pytest.mark.parametrize("spec,heads,kv_heads,head_dim,lengths", [
    (TEXT, 2, 2, 128, None), (PLAIN, 2, 1, 128, None), (SPANNING, 2, 2, 128, None),
    (SPANNING_RAGGED, 2, 2, 64, None), (PER_HEAD, 2, 1, 128, None), (TEXT, 2, 2, 128, [5, 64])],
    ids=["padded", "unpadded_gqa", "spanning", "spanning_ragged_d64", "per_head_gqa",
         "text_lengths"])
@pytest.mark.parametrize("recipe", [DEFAULT, INT8_E4M3, ALL_E4M3],
                         ids=["default", "int8_e4m3", "all_e4m3"])
def test_kernel_lowers_for_cuda(spec, heads, kv_heads, head_dim, lengths, recipe):
  sched = schedule(spec, heads, dynamic_text=lengths is not None)
  batch = 1 if lengths is None else len(lengths)
  q = jax.ShapeDtypeStruct((batch, sched.seq_len, heads, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((batch, sched.seq_len, kv_heads, head_dim), jnp.bfloat16)
  key_valid = None if lengths is None else text_key_valid(sched, lengths)
  f = lambda q, k, v: fp8.fp8_forward(q, k, v, sched, head_dim ** -0.5, key_valid=key_valid,
                                      recipe=recipe)
  assert _mosaic_calls(f, q, kv, kv) == 1


@pytest.mark.parametrize("head_dim", [pytest.param(64, marks=pytest.mark.slow), 128])
def test_gathered_kernel_lowers_for_cuda(head_dim):
  """The 8-bit kernel with gathered work items (``MosaicBackend(fp8_gathered_steps=True)``,
  the default, through the op: "qk_int8" with bf16 P V; "fp8" with e4m3 P V, V^T's units in
  buffers of their own, ``fp8_gathered_e4m3_pv``) passes the whole Mosaic GPU
  lowering at 192-token tiles with text and per-head windows, and differs from the block
  kernel."""
  from benchmarks.tools.mosaic_fingerprint import module_fingerprints
  from pallas_kernels.mosaic.backend import MosaicBackend
  spec = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                      text_max_len=64)
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, head_dim), jnp.bfloat16)

  def modules(precision, **fields):
    impl = MosaicBackend(device_check=False, **fields)
    op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=impl,
                                                     precision=precision)
    return module_fingerprints(op, x, x, x)

  gathered = modules("qk_int8")                      # the default
  assert len(gathered) == 1 and gathered != modules("qk_int8", fp8_gathered_steps=False)
  e4m3_pv = modules("fp8")                           # gathered by default too
  assert len(e4m3_pv) == 1 and e4m3_pv != modules("fp8", fp8_gathered_e4m3_pv=False)
  assert modules("fp8", fp8_gathered_e4m3_pv=False) == modules("fp8", fp8_gathered_steps=False)
  # K scales per 64 keys only where the kernel reads them so (gathered steps).
  sched = schedule(spec, 2)
  fine_k = dataclasses.replace(DEFAULT, k_block=64)
  blocks = fp8.default_config(head_dim, gather=False)
  jax.jit(lambda q: fp8.fp8_forward(q, q, q, sched, 0.1, recipe=fine_k)).trace(x)   # gathered
  with pytest.raises(ValueError, match="k_scale holds"):
    jax.jit(lambda q: fp8.fp8_forward(q, q, q, sched, 0.1, recipe=fine_k, config=blocks)
            ).trace(x)
  with pytest.raises(TypeError, match="fp8_gathered_steps must be a bool"):
    MosaicBackend(fp8_gathered_steps="yes")
  with pytest.raises(TypeError, match="fp8_gathered_e4m3_pv must be a bool"):
    MosaicBackend(fp8_gathered_e4m3_pv=1)


@pytest.mark.parametrize("recipe", [DEFAULT, ALL_E4M3], ids=["default", "all_e4m3"])
def test_kernel_lowers_for_cuda_fp16(recipe):
  sched = schedule(TEXT, 2)
  x = jax.ShapeDtypeStruct((1, sched.seq_len, 2, 128), jnp.float16)
  f = lambda q, k, v: fp8.fp8_forward(q, k, v, sched, 0.1, recipe=recipe)
  assert _mosaic_calls(f, x, x, x) == 1


@pytest.mark.parametrize("recipe", [DEFAULT, ALL_E4M3], ids=["default", "all_e4m3"])
def test_three_warpgroup_kernel_lowers_for_cuda(recipe):
  sched = schedule(TEXT, 2, block_q=192)
  x = jax.ShapeDtypeStruct((1, sched.seq_len, 2, 128), jnp.bfloat16)
  f = lambda q, k, v: fp8.fp8_forward(q, k, v, sched, 0.1, recipe=recipe)
  assert _mosaic_calls(f, x, x, x) == 1


# ---- CPU: the kernel in GPU interpret mode -----------------------------------------------------
def _kernel_vs_emulation(spec, heads, kv_heads, head_dim, recipe, *, lengths=None, q_mult=1.0,
                         garbage=None, interpret=False, seed=0, dtype=jnp.bfloat16,
                         p_registers=False, masks_apart=False, fma_columns=0, gather=False,
                         biased_scores=True, block_q=128):
  """``gather``: True / False, or None for the default (gathered where it saves steps).
  ``block_q``: the schedule's and the kernel's query block (192: three compute warpgroups)."""
  sched = schedule(spec, heads, dynamic_text=lengths is not None, block_q=block_q)
  q, k, v = inputs(seed, sched, heads, head_dim, kv_heads=kv_heads, q_mult=q_mult,
                   garbage=garbage, dtype=dtype)
  if lengths is not None:
    q, k, v = (jnp.broadcast_to(x, (len(lengths), *x.shape[1:])) for x in (q, k, v))
  key_valid = None if lengths is None else text_key_valid(sched, lengths)
  scale = head_dim ** -0.5
  config = fp8.default_config(head_dim, recipe, interpret=interpret, p_registers=p_registers,
                              masked_steps_apart=masks_apart, exp2_fma_columns=fma_columns,
                              biased_scores=biased_scores, block_q=block_q,
                              **({} if gather is None else dict(gather=gather)))
  assert gather is None or fp8.uses_gathered_steps(sched, config, recipe) == gather
  o, lse = interpreted(fp8.fp8_forward, q, k, v, sched, scale, config=config,
                       key_valid=key_valid, recipe=recipe)
  assert o.dtype == q.dtype and o.shape == q.shape and lse.shape == (q.shape[0], heads,
                                                                        sched.seq_len)
  # The emulation quantizes as the kernel does (K per 64 keys with gathered work items).
  eo, else_ = fp8.emulated_forward(q, k, v, sched, scale, key_valid=key_valid,
                                   recipe=fp8.kernel_recipe(sched, config, recipe))
  ro, rlse = fp8.emulated_forward(q, k, v, sched, scale, key_valid=key_valid, recipe=None)
  rows = np.broadcast_to(valid_rows(sched, key_valid), (q.shape[0], sched.seq_len))
  got = np_f32(o)
  assert np.isfinite(got[rows]).all()
  emu_err = row_errors(o, eo, rows)[0]
  ref_err, worst = row_errors(o, ro, rows)
  lse, else_, rlse = (np.asarray(x).transpose(0, 2, 1) for x in (lse, else_, rlse))
  live = np.isfinite(rlse[rows])
  assert (np.isfinite(lse[rows]) == live).all()
  assert np.abs(lse[rows][live] - else_[rows][live]).max() < 2e-2
  # Rows that attend nothing: o = 0, lse = +inf.
  empty = rows[..., None] & ~np.isfinite(rlse)
  assert (got.transpose(0, 2, 1, 3)[empty.transpose(0, 2, 1)] == 0).all()
  return emu_err, ref_err, worst


@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,heads,kv_heads,recipe,lengths,garbage,p_registers,fma", [
    (TEXT, 2, 1, DEFAULT, None, float("nan"), False, 0),
    (SPANNING_RAGGED, 2, 2, ALL_E4M3, None, 1e4, False, 0),
    # (The options off by default, exp2_fma_columns and fp8_p_registers: slow.)
    pytest.param(PER_HEAD, 2, 1, INT8_E4M3, [7, 64], None, False, 32, marks=pytest.mark.slow),
    pytest.param(SPANNING_RAGGED, 2, 1, ALL_E4M3, None, float("nan"), True, 128,
                 marks=pytest.mark.slow),
    (TEXT, 2, 1, ALL_INT8, None, float("nan"), False, 0),
    pytest.param(PER_HEAD, 2, 1, ALL_INT8, [7, 64], 1e4, False, 32, marks=pytest.mark.slow)],
    ids=["text_gqa_nan_default", "spanning_ragged_garbage_e4m3",
         "per_head_lengths_int8_e4m3_fma32", "spanning_ragged_gqa_nan_e4m3_p_registers_fma128",
         "text_gqa_nan_all_int8", "per_head_lengths_garbage_all_int8_fma32"])
def test_interpreted_kernel_matches_emulation(spec, heads, kv_heads, recipe, lengths, garbage,
                                              p_registers, fma):
  """The kernel in GPU interpret mode against its float32 emulation and the reference. With
  ``p_registers`` (MosaicConfig.fp8_p_registers) V^T's keys come in the register key order
  and interpret mode stages P's columns in that order: wrong orders would not match. ``fma``
  (MosaicConfig.exp2_fma_columns): that many of a step's exponentials on the FMA pipe."""
  emu, ref, _ = _kernel_vs_emulation(spec, heads, kv_heads, 128, recipe, lengths=lengths,
                                     garbage=garbage, interpret=True, p_registers=p_registers,
                                     fma_columns=fma)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[recipe], ref


@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,heads,kv_heads,recipe,lengths,garbage", [
    (TEXT, 2, 1, DEFAULT, None, float("nan")),
    pytest.param(PER_HEAD, 2, 2, ALL_E4M3, [7, 64], 1e4, marks=pytest.mark.slow)],
    ids=["text_gqa_nan_default", "per_head_lengths_garbage_e4m3"])
def test_interpreted_three_warpgroup_kernel_matches_emulation(spec, heads, kv_heads, recipe,
                                                              lengths, garbage):
  """192-row query blocks (three compute warpgroups, ``default_config(block_q=192)``) in GPU
  interpret mode against the float32 emulation and the reference: each warpgroup's rows,
  scales and key steps come from its own third of the block."""
  emu, ref, _ = _kernel_vs_emulation(spec, heads, kv_heads, 128, recipe, lengths=lengths,
                                     garbage=garbage, interpret=True, block_q=192)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[recipe], ref


@pytest.mark.cpu_only
@pytest.mark.slow
def test_interpreted_kernel_with_unbiased_scores():
  """MosaicConfig.fp8_biased_scores=False (int8 scores converted exactly, an integer add and a
  float subtract each, instead of kept as 1.5 * 2 ** 23 + s with the bias taken out of the row
  maxima and folded into the exponent's offset, the default that every other interpreted
  case runs): against the emulation and the reference with a run-time text length, NaN in
  the padded positions and gathered work items (two K scales a step)."""
  spec = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                      text_max_len=64)
  emu, ref, _ = _kernel_vs_emulation(spec, 2, 1, 128, DEFAULT, lengths=[40],
                                     garbage=float("nan"), interpret=True, masks_apart=True,
                                     gather=True, biased_scores=False)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[DEFAULT], ref


@pytest.mark.cpu_only
def test_interpreted_kernel_with_gathered_work_items():
  """The 8-bit kernel with gathered work items (``fp8.default_config(gather=True)``: each
  warpgroup's 64 query rows from a table, two 64-key units a step, one K scale per unit)
  against its emulation (K quantized per 64 keys) and the reference, at 192-token tiles with
  per-head windows, grouped k/v, text, NaN in the padded positions and per-sample text
  lengths; with the masked steps apart, as the backend runs it (both key loops run)."""
  spec = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                      text_max_len=64)
  from pallas_kernels.mosaic import common
  sched = schedule(spec, 2, dynamic_text=True)
  assert common.gather_saves_steps(sched) and common.gathered_partial(sched)
  ops = common.masked_steps_first(sched, common.gathered_operands(sched)[0], gather=True)
  nmask, cnt = np.asarray(ops.masked_steps), np.asarray(ops.kv_count)
  assert ((nmask > 0) & (nmask < cnt)).any()
  emu, ref, _ = _kernel_vs_emulation(spec, 2, 1, 128, DEFAULT, lengths=[5, 40],
                                     garbage=float("nan"), interpret=True,
                                     masks_apart=True, gather=True)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[DEFAULT], ref
  # e4m3 P V from registers (fp8_p_registers) keeps 128 x 128 blocks.
  cfg = fp8.default_config(128, ALL_E4M3, gather=True, p_registers=True)
  assert not fp8.uses_gathered_steps(sched, cfg, ALL_E4M3)


@pytest.mark.cpu_only
@pytest.mark.parametrize("recipe", [ALL_E4M3, pytest.param(INT8_E4M3, marks=pytest.mark.slow)],
                         ids=["all_e4m3", "int8_e4m3"])
def test_interpreted_e4m3_pv_kernel_with_gathered_work_items(recipe):
  """The e4m3 P V kernels with gathered work items (each 64-key unit's V^T in a buffer of its
  own, P staged in two halves, two products a step) against their emulation and the reference,
  at 192-token tiles with per-head windows, grouped k/v, text, NaN in the padded positions and
  per-sample text lengths, the masked steps apart: a unit's values paired with the other
  unit's probabilities would not match. The emulation walks the schedule's 128-key blocks in
  order; e4m3 P is rounded against the running row maximum, which here comes in another order
  (units gathered, masked steps first), so the two differ by more than EMU_TOL: 1.7e-2 for
  the block kernel with its masked steps apart on this case, 1.9e-2 gathered (2026-12-07)."""
  spec = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                      text_max_len=64)
  emu, ref, _ = _kernel_vs_emulation(spec, 2, 1, 128, recipe, lengths=[5, 40],
                                     garbage=float("nan"), interpret=True,
                                     masks_apart=True, gather=True)
  assert emu < 2.5 * EMU_TOL, emu
  assert ref < BOUND[recipe], ref
  # Gathered e4m3 P V stages P: P from registers is refused there, not mixed up.
  from pallas_kernels.mosaic.forward_fp8 import fp8_forward_call
  sched = schedule(spec, 2)
  x = jnp.ones((1, sched.seq_len, 2, 128), jnp.bfloat16)
  config = fp8.default_config(128, recipe, gather=True)
  call = fp8.kernel_call(x, x, x, sched, 0.1, recipe, config=config)
  assert call.flags["gather"] and call.flags["pv"] == "e4m3"
  with pytest.raises(ValueError, match="fp8_p_registers must be False"):
    fp8_forward_call(*call.args, out_dtype=jnp.bfloat16, **call.flags,
                     config=dataclasses.replace(config, fp8_p_registers=True))


def test_int8_pv_emulation_quantizes_p_per_row_and_step():
  """The all-int8 recipe's emulation: P V of one 128-key step (every key attended) is the
  attention of P rounded to 127 levels at each row's maximum and V quantized per channel,
  weighed back exactly: against float64 with the same roundings, 1e-5."""
  spec = jsta.STASpec((1, 8, 16), (1, 8, 16), (1, 1, 1))            # one 128-token tile
  sched = schedule(spec, 1)
  q, k, v = inputs(9, sched, 1, 64, q_mult=2.0)
  o, _ = fp8.emulated_forward(q, k, v, sched, 0.125, recipe=ALL_INT8)
  qv, kv = fp8.validity(sched)
  ops = fp8.quantize(q, k, v, qv, kv, ALL_INT8)
  qf = np_f32(ops.q8)[0, :, 0].astype(np.float64) * np_f32(ops.q_scale)[0, 0][:, None]
  kf = np_f32(ops.k8)[0, :, 0].astype(np.float64) * np_f32(ops.k_scale)[0, 0, 0]
  x = (qf @ kf.T) * 0.125 * np.log2(np.e)          # log2-domain scores (K smoothing: a row shift)
  p = np.round(np.exp2(x - x.max(axis=1, keepdims=True) + np.log2(127.0)))
  vf = np_f32(ops.vt8)[0, 0].T.astype(np.float64) * np_f32(ops.v_scale)[0, 0]
  want = (p @ vf) / np.exp2(x - x.max(axis=1, keepdims=True) + np.log2(127.0)).sum(axis=1,
                                                                                     keepdims=True)
  assert rel_l2(np_f32(o)[0, :, 0], want) < 1e-5
  assert np.abs(p).max() == 127 and set(np.unique(p)) <= set(range(128))


@pytest.mark.cpu_only
def test_interpreted_int8_pv_kernel_with_gathered_work_items():
  """The all-int8 kernel with gathered work items (each 64-key unit's int8 V^T in a buffer of
  its own, P staged in two halves, both products into the step's s32 accumulator) against its
  emulation and the reference, at 192-token tiles with per-head windows, grouped k/v, text,
  NaN in the padded positions, per-sample text lengths and the masked steps apart."""
  spec = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                      text_max_len=64)
  sched = schedule(spec, 2)
  config = fp8.default_config(128, ALL_INT8, gather=True)
  x = jnp.ones((1, sched.seq_len, 2, 128), jnp.bfloat16)
  call = fp8.kernel_call(x, x, x, sched, 0.1, ALL_INT8, config=config)
  assert call.flags["gather"] and call.flags["pv"] == "int8"
  assert call.args[2].dtype == jnp.int8 and call.args[2].shape == (1, 2, 128, sched.seq_len)
  emu, ref, _ = _kernel_vs_emulation(spec, 2, 1, 128, ALL_INT8, lengths=[5, 40],
                                     garbage=float("nan"), interpret=True,
                                     masks_apart=True, gather=True)
  # The step maxima come in another order than the emulation's (units gathered, masked
  # steps first), and int8 P is rounded against them: 5.9e-3 (2026-12-07), where the e4m3 P V
  # kernels' test measures 1.9e-2.
  assert emu < EMU_TOL, emu
  assert ref < BOUND[ALL_INT8], ref


def test_int8_pv_kernel_lowers_for_cuda_and_refuses_three_warpgroups():
  """The all-int8 kernel lowers for CUDA as one Mosaic GPU module (blocks and gathered work
  items, head_dim 64 and 128, run-time text lengths); three compute warpgroups (192-row
  blocks) are refused: the step's s32 accumulator beside O's does not fit their registers."""
  tile192 = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                        text_max_len=64)
  for spec, d, lengths, gather in ((TEXT, 128, [5, 64], False), (tile192, 64, None, True)):
    sched = schedule(spec, 2, dynamic_text=lengths is not None)
    batch = 1 if lengths is None else len(lengths)
    q = jax.ShapeDtypeStruct((batch, sched.seq_len, 2, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((batch, sched.seq_len, 1, d), jnp.bfloat16)
    key_valid = None if lengths is None else text_key_valid(sched, lengths)
    config = fp8.default_config(d, ALL_INT8, gather=gather)
    assert fp8.uses_gathered_steps(sched, config, ALL_INT8) == gather
    f = lambda q, k, v: fp8.fp8_forward(q, k, v, sched, d ** -0.5, config=config,
                                        key_valid=key_valid, recipe=ALL_INT8)
    assert _mosaic_calls(f, q, kv, kv) == 1
  sched192 = schedule(TEXT, 2, block_q=192)
  y = jax.ShapeDtypeStruct((1, sched192.seq_len, 2, 128), jnp.bfloat16)
  config = fp8.default_config(128, ALL_INT8, block_q=192)
  with pytest.raises(ValueError, match="int8 P V runs on two compute warpgroups"):
    _mosaic_calls(lambda q, k, v: fp8.fp8_forward(q, k, v, sched192, 0.1, config=config,
                                                  recipe=ALL_INT8), y, y, y)


@pytest.mark.cpu_only
@pytest.mark.parametrize("recipe", [DEFAULT, pytest.param(ALL_INT8, marks=pytest.mark.slow)],
                         ids=["default", "all_int8"])
def test_interpreted_kernel_with_a_sample_without_text(recipe):
  """A sample whose run-time text length is 0, text first, NaN in every invalid slot: the
  masked steps (text) come first, so every video row's first step holds no valid key; its
  running max stays -inf there and must not make exp2(-inf - -inf) (found by a random search
  on the bf16 forward, 2026-12-07)."""
  spec = jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1), text_len=5, text_max_len=64,
                      text_position="first")
  emu, ref, _ = _kernel_vs_emulation(spec, 2, 1, 128, recipe, lengths=[0, 40],
                                     garbage=float("nan"), interpret=True, masks_apart=True)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[recipe], ref


@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,heads,kv_heads,recipe,lengths,garbage", [
    pytest.param(SPANNING_RAGGED, 2, 2, ALL_E4M3, None, 1e4, marks=pytest.mark.slow),
    (PER_HEAD, 2, 1, DEFAULT, [7, 64], float("nan"))],
    ids=["spanning_ragged_garbage_e4m3", "per_head_lengths_nan_default"])
def test_interpreted_kernel_with_masked_steps_apart(spec, heads, kv_heads, recipe, lengths,
                                                    garbage):
  """The 8-bit kernel with each query block's masked steps in a loop of their own
  (MosaicConfig.masked_steps_apart; the K step scales reordered with the steps) against its
  emulation and the reference, as the single loop."""
  from pallas_kernels.mosaic import common
  sched = schedule(spec, heads, dynamic_text=lengths is not None)
  ops = common.masked_steps_first(sched, common.schedule_operands(sched), gather=False)
  nmask, cnt = np.asarray(ops.masked_steps), np.asarray(ops.kv_count)
  assert ((nmask > 0) & (nmask < cnt)).any()           # both loops run
  emu, ref, _ = _kernel_vs_emulation(spec, heads, kv_heads, 128, recipe, lengths=lengths,
                                     garbage=garbage, interpret=True, masks_apart=True)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[recipe], ref


# ---- GPU ---------------------------------------------------------------------------------------
GPU_CASES = [
    # spec, heads, kv_heads, head_dim, lengths, q_mult, garbage
    (TEXT, 2, 2, 128, None, 1.0, None),
    (TEXT, 4, 1, 128, None, 1.0, float("nan")),
    (PLAIN, 2, 2, 64, None, 1.0, None),
    (SPANNING, 2, 2, 128, None, 1.0, None),
    (SPANNING_RAGGED, 2, 2, 128, None, 1.0, float("inf")),
    (PER_HEAD, 2, 1, 128, [1, 30], 1.0, float("nan")),
    (TEXT, 2, 2, 128, [0, 64], 1.0, None),
    (jsta.STASpec((12, 16, 16), (6, 8, 8), (3, 3, 3), text_len=100, text_max_len=128),
     2, 2, 128, None, 1.0, None),
    (jsta.STASpec((12, 16, 16), (6, 8, 8), (3, 3, 3), text_len=100, text_max_len=128),
     2, 2, 128, None, 3.0, None),
]
GPU_IDS = ["text", "text_gqa4_nan", "plain_d64", "spanning", "spanning_ragged_inf",
           "per_head_gqa_lengths_nan", "text_lengths_zero", "paper_tiles",
           "paper_tiles_large_logits"]


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", GPU_CASES, ids=GPU_IDS)
def test_kernel_on_gpu(case):
  """The compiled kernel (default recipe) against its emulation (1e-2) and the float32
  reference (3e-2; large logits: 6e-2, as the scores' quantization error grows with them)."""
  _check_on_gpu(case, DEFAULT)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("recipe", [INT8_E4M3, ALL_E4M3], ids=["int8_e4m3", "all_e4m3"])
@pytest.mark.parametrize("case", [GPU_CASES[1], GPU_CASES[4], GPU_CASES[7]],
                         ids=[GPU_IDS[1], GPU_IDS[4], GPU_IDS[7]])
@pytest.mark.parametrize("p_registers", [False, True], ids=["p_smem", "p_registers"])
def test_e4m3_pv_kernels_on_gpu(case, recipe, p_registers):
  """The kernels with e4m3 P V (V^T; P staged in shared memory, or read from registers with
  V^T's keys in the register key order: MosaicConfig.fp8_p_registers), against the same
  bounds scaled to their recipes."""
  _check_on_gpu(case, recipe, p_registers=p_registers)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", [GPU_CASES[1], GPU_CASES[4], GPU_CASES[7], GPU_CASES[8]],
                         ids=[GPU_IDS[1], GPU_IDS[4], GPU_IDS[7], GPU_IDS[8]])
def test_int8_pv_kernel_on_gpu(case):
  """The all-int8 kernel (int8 P per row and key step, V per channel) against its emulation
  and the float32 reference (3e-2; large logits 6e-2)."""
  _check_on_gpu(case, ALL_INT8)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", [GPU_CASES[4], GPU_CASES[5]], ids=[GPU_IDS[4], GPU_IDS[5]])
def test_masked_steps_apart_on_gpu(case):
  """The compiled kernel with its masked steps in a loop of their own
  (MosaicConfig.masked_steps_apart), at the default recipe's bounds."""
  _check_on_gpu(case, DEFAULT, masks_apart=True)


# 192-token tiles, where the default kernel (bf16 P V) runs gathered work items.
GATHERED_CASES = [
    (jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5, text_max_len=64),
     2, 1, 128, [5, 40], 1.0, float("nan")),
    (jsta.STASpec((6, 16, 32), (3, 8, 8), (3, 3, 3)), 2, 2, 64, None, 1.0, None),
    (jsta.STASpec((9, 16, 40), (3, 8, 8), (3, 1, 3), text_len=77, text_max_len=128),
     4, 2, 128, None, 3.0, float("inf")),
]
GATHERED_IDS = ["per_head_lengths_nan", "plain_d64", "text_gqa_large_logits_inf"]


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("masks_apart", [False, True], ids=["together", "apart"])
@pytest.mark.parametrize("case", GATHERED_CASES, ids=GATHERED_IDS)
def test_gathered_kernel_on_gpu(case, masks_apart):
  """The default recipe's kernel with gathered work items (the default where they save steps:
  192-token tiles), its masked steps in one loop or apart, at the default recipe's bounds."""
  _check_gathered_on_gpu(case, DEFAULT, masks_apart=masks_apart)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("recipe", [ALL_E4M3, INT8_E4M3], ids=["all_e4m3", "int8_e4m3"])
@pytest.mark.parametrize("case", GATHERED_CASES, ids=GATHERED_IDS)
def test_gathered_e4m3_pv_kernel_on_gpu(case, recipe):
  """The e4m3 P V recipes' kernels with gathered work items (the default where they save
  steps: each 64-key unit's V^T in a buffer of its own, two products a step), the masked steps
  apart as the backend runs them, at each recipe's bounds (against the emulation as
  test_interpreted_e4m3_pv_kernel_with_gathered_work_items says why)."""
  _check_gathered_on_gpu(case, recipe, masks_apart=True, emu_tol=2.5 * EMU_TOL)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", GATHERED_CASES, ids=GATHERED_IDS)
@pytest.mark.parametrize("masks_apart", [False, True], ids=["together", "apart"])
def test_gathered_int8_pv_kernel_on_gpu(case, masks_apart):
  """The all-int8 kernel (precision "int8") with gathered work items, its masked steps in the
  one key loop (as the backend runs it) or apart, at its recipe's bounds; against the
  emulation as the e4m3 P V kernels (int8 P is rounded against step maxima the gathered steps
  take in another order: 1.07e-2 at plain_d64 with the masked steps apart, 2026-12-07)."""
  _check_gathered_on_gpu(case, ALL_INT8, masks_apart=masks_apart, emu_tol=2.5 * EMU_TOL)


def _check_gathered_on_gpu(case, recipe, **kwargs):
  """:func:`_check_on_gpu` of a case whose kernel (the recipe's default config) runs gathered
  work items."""
  spec, heads, _, _, lengths, *_ = case
  sched = schedule(spec, heads, dynamic_text=lengths is not None)
  assert fp8.uses_gathered_steps(sched, fp8.default_config(128, recipe), recipe)
  _check_on_gpu(case, recipe, **kwargs)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("recipe", [DEFAULT, ALL_E4M3], ids=["default", "all_e4m3"])
@pytest.mark.parametrize("case", [GPU_CASES[1], GPU_CASES[2], GPU_CASES[5], GPU_CASES[8],
                                  GATHERED_CASES[2]],
                         ids=[GPU_IDS[1], GPU_IDS[2], GPU_IDS[5], GPU_IDS[8],
                              "tile192_text_gqa_large_logits_inf"])
def test_three_warpgroup_kernel_on_gpu(case, recipe):
  """192-row query blocks on three compute warpgroups (``default_config(block_q=192)``: 160
  registers a thread, bf16 P staged in shared memory and o staged in P's buffer), at each
  recipe's bounds: padded text, per-sample lengths, garbage, head_dim 64, large logits."""
  _check_on_gpu(case, recipe, block_q=192)


@pytest.mark.gpu
@pytest.mark.hopper
def test_fp16_on_gpu():
  """float16 inputs: P V in float16 (the emulation rounds P to bf16, which the bound holds)."""
  emu, ref, _ = _kernel_vs_emulation(TEXT, 2, 1, 128, DEFAULT, dtype=jnp.float16, gather=None)
  assert emu < EMU_TOL, emu
  assert ref < BOUND[DEFAULT], ref


def _check_on_gpu(case, recipe, p_registers=False, masks_apart=False, block_q=128,
                  emu_tol=EMU_TOL):
  spec, heads, kv_heads, head_dim, lengths, q_mult, garbage = case
  emu, ref, worst = _kernel_vs_emulation(spec, heads, kv_heads, head_dim, recipe,
                                         lengths=lengths, q_mult=q_mult, garbage=garbage,
                                         p_registers=p_registers, masks_apart=masks_apart,
                                         gather=None, block_q=block_q)
  bound = BOUND[recipe] * (2 if q_mult > 1 else 1)
  print(f"emulation {emu:.2e}, reference {ref:.2e} (worst row {worst:.2e})")
  assert emu < emu_tol, emu
  assert ref < bound, (ref, worst)


# ---- through the op: precision= ------------------------------------------------------------------
OP_BOUND = {"qk_int8": BOUND[DEFAULT], "qk_int8_pv_fp8": BOUND[INT8_E4M3], "fp8": BOUND[ALL_E4M3],
            "int8": BOUND[ALL_INT8]}
# Two query heads with their own windows sharing one k/v head.
OP_SPEC = jsta.STASpec((4, 8, 16), (2, 8, 8), ((3, 1, 1), (1, 1, 3)), text_len=10,
                       text_max_len=64, text_position="first")


def _op_vs_reference(precision, implementation, heads=2, kv_heads=1, head_dim=128,
                     lengths=(10, 40), seed=3):
  """Relative L2 of the op's 8-bit output against the float32 reference on valid rows (text
  first, run-time text lengths, GQA through the op, per-head windows), and its lse's largest
  difference. The text slots beyond each sample's length hold NaN in q, k and v (the op
  leaves them to the 8-bit forward's quantization, which must keep them out)."""
  spec = OP_SPEC
  keys = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(keys[0], (2, spec.seq_len, heads, head_dim)).astype(jnp.bfloat16)
  k, v = (jax.random.normal(kk, (2, spec.seq_len, kv_heads, head_dim)).astype(jnp.bfloat16)
          for kk in keys[1:])
  n = jnp.asarray(lengths)
  slot = np.arange(spec.seq_len)                     # text first: slots 0..text_max_len-1
  padded = jnp.asarray((slot[None] < spec.text_max_len)
                       & (slot[None] >= np.asarray(lengths)[:, None]))          # [batch, seq]
  q, k, v = (jnp.where(padded[:, :, None, None], jnp.nan, x).astype(x.dtype) for x in (q, k, v))
  o, lse = jax.jit(lambda q, k, v, n: jsta.sliding_tile_attention(
      q, k, v, spec, text_lengths=n, return_lse=True, precision=precision,
      implementation=implementation))(q, k, v, n)
  ro, rlse = jsta.sliding_tile_attention(
      *(x.astype(jnp.float32) for x in (q, k, v)), spec, text_lengths=n, return_lse=True,
      implementation="xla")
  assert o.dtype == q.dtype and o.shape == q.shape
  valid = np.isfinite(np.asarray(rlse))[..., 0]                      # [batch, seq]
  err = rel_l2(np_f32(o)[valid], np_f32(ro)[valid])
  dl = np.abs(np.asarray(lse)[valid] - np.asarray(rlse)[valid]).max()
  assert (np_f32(o)[~valid] == 0).all() and np.isinf(np.asarray(lse)[~valid]).all()
  return err, dl


@pytest.mark.cpu_only
@pytest.mark.parametrize("precision,lean", [
    ("qk_int8", False), pytest.param("fp8", True, marks=pytest.mark.slow)],
    ids=["qk_int8", "fp8_untimed_options"])
def test_op_precision_runs_the_8bit_kernel_in_interpret_mode(precision, lean):
  """The 8-bit kernel in interpret mode; e4m3 P V with the options that are off until timed
  (MosaicConfig.overlap_exp's store before the wait)."""
  from helpers import MOSAIC_INTERPRET, MOSAIC_INTERPRET_LEAN
  err, dl = interpreted(_op_vs_reference, precision,
                        MOSAIC_INTERPRET_LEAN if lean else MOSAIC_INTERPRET)
  assert err < OP_BOUND[precision], err
  assert dl < 5e-2, dl


@pytest.mark.cpu_only
def test_op_precision_pads_other_head_dims_in_interpret_mode():
  """head_dim 80 runs on the 128-channel kernel: the op zero-pads q, k, v (all-int8: V's
  zero channels get a scale of their own, K's and Q's no balance) and slices o back."""
  from helpers import MOSAIC_INTERPRET
  err, dl = interpreted(_op_vs_reference, "int8", MOSAIC_INTERPRET, head_dim=80)
  assert err < OP_BOUND["int8"], err
  assert dl < 5e-2, dl


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("head_dim", [40, 96])
def test_op_precision_pads_other_head_dims_on_gpu(precision, head_dim):
  err, dl = _op_vs_reference(precision, "pallas_mosaic", head_dim=head_dim)
  assert err < OP_BOUND[precision], err
  assert dl < 0.2, dl


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("precision", list(OP_BOUND))
def test_op_precision_on_gpu(precision):
  err, dl = _op_vs_reference(precision, "pallas_mosaic")
  print(f"{precision}: relative L2 {err:.2e}, lse {dl:.2e}")
  assert err < OP_BOUND[precision], err
  assert dl < 0.2, dl


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("precision", ["qk_int8", "fp8"])
def test_op_precision_without_auto_barriers_on_gpu(precision):
  """The 8-bit forwards without Pallas's automatic barriers (MosaicConfig.auto_barriers, off
  until timed), same bounds."""
  from helpers import MOSAIC_LEAN
  err, dl = _op_vs_reference(precision, MOSAIC_LEAN)
  assert err < OP_BOUND[precision], err
  assert dl < 0.2, dl


def test_op_precision_refuses_other_blocks():
  from helpers import MOSAIC_INTERPRET
  x = jnp.zeros((1, OP_SPEC.seq_len, 2, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="runs 128 x 128 blocks"):
    jsta.sliding_tile_attention(x, x, x, OP_SPEC, precision="qk_int8", block_q=128,
                                block_kv=64, implementation=MOSAIC_INTERPRET)


# ---- CPU: P from registers (MosaicConfig.fp8_p_registers) -----------------------------------------
def _register_elements(layout, shape):
  """{(thread, register index, vector element): (row, column)} of a Mosaic GPU TiledLayout, in
  plain integers (the layout's own thread_idxs builds MLIR values)."""
  from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  def split(idx, dims):
    tiled = layout.tiled_tiling_shape
    sizes = [d.times if isinstance(d, mgpu_fa.Replicated) else tiled[d] for d in dims]
    out = [0] * len(tiled)
    for d, stride, size in zip(dims, mgpu_utils.get_contiguous_strides(tuple(sizes)), sizes):
      if not isinstance(d, mgpu_fa.Replicated):
        out[d] = (idx // stride) % size
    return out

  strides = layout.tiling.tile_strides(tuple(mgpu_utils.get_contiguous_strides(shape)))
  inner = strides[-layout.tiled_tiling_rank:]
  elements = {}
  for t in range(128):
    off = sum(i * st for i, st in zip(split(t // 32, layout.warp_dims) +
                                       split(t % 32, layout.lane_dims), inner + inner))
    for r in np.ndindex(layout.registers_shape(shape)):
      base = off + sum(i * st for i, st in zip(r, strides))
      for e in range(layout.vector_length):
        elements[(t, r, e)] = divmod(base + e * strides[layout.vector_dim], shape[1])
  return elements


@pytest.mark.cpu_only
def test_register_key_order_matches_mosaic_layouts():
  """p_as_8bit_operand joins a thread's float32-layout registers (0, 2j, .., h) and
  (0, 2j + 1, .., h) (e4m3 pairs) into its 8-bit-layout register (0, j, .., h): checked here
  against Mosaic GPU's two layouts that the joined register holds the same row and, in each
  16-key group, key REGISTER_KEY_ORDER[i] where the 8-bit layout places key i."""
  from jax.experimental.mosaic.gpu import fragmented_array as mgpu_fa
  from pallas_kernels.mosaic.forward_fp8 import REGISTER_KEY_ORDER, register_key_order
  shape = (64, 128)
  f32 = _register_elements(mgpu_fa.WGMMA_LAYOUT, shape)
  b8 = _register_elements(mgpu_fa.WGMMA_LAYOUT_8BIT, shape)
  regs8 = mgpu_fa.WGMMA_LAYOUT_8BIT.registers_shape(shape)
  assert mgpu_fa.WGMMA_LAYOUT.registers_shape(shape)[1] == 2 * regs8[1]
  for t in range(128):
    for idx in np.ndindex(regs8):
      pair = [idx[:1] + (2 * idx[1] + half,) + idx[2:] for half in (0, 1)]
      src = [f32[(t, p, e)] for p in pair for e in range(2)]
      dst = [b8[(t, idx, e)] for e in range(4)]
      for (rs, cs), (rd, cd) in zip(src, dst):
        assert rs == rd and cs // 16 == cd // 16
        assert cs % 16 == REGISTER_KEY_ORDER[cd % 16], (t, idx, cs, cd)
  order = register_key_order(64)
  assert sorted(order.tolist()) == list(range(64)) and (order // 16 == np.arange(64) // 16).all()
  # fp8.kernel_call puts V^T's keys in this order by a transpose.
  sched = schedule(TEXT, 1)
  q, k, v = jax.random.normal(jax.random.key(0), (3, 1, sched.seq_len, 1, 128), jnp.bfloat16)
  config = fp8.default_config(128, ALL_E4M3, p_registers=True)
  (_, _, v_in, *_), _, ops8, _ = fp8.kernel_call(q, k, v, sched, 0.1, ALL_E4M3, config=config)
  vt8 = np.asarray(ops8.vt8, np.float32)
  assert np.abs(vt8).max() > 0
  np.testing.assert_array_equal(np.asarray(v_in, np.float32),
                                vt8[..., register_key_order(sched.seq_len)])


@pytest.mark.cpu_only
@pytest.mark.slow
def test_p_registers_lower_for_cuda():
  """The 8-bit forward with e4m3 P read from registers passes the whole Mosaic GPU lowering
  (the inline Mosaic GPU code that reinterprets P's registers included), for both e4m3 P V
  recipes, and differs from the staged kernel."""
  from benchmarks.tools.mosaic_fingerprint import module_fingerprints
  sched = schedule(SPANNING_RAGGED, 2)
  x = jnp.ones((1, sched.seq_len, 2, 128), jnp.bfloat16)
  for recipe in (ALL_E4M3, INT8_E4M3):
    fingerprints = []
    for p_registers in (False, True):
      config = fp8.default_config(128, recipe, p_registers=p_registers)
      f = lambda q, k, v: fp8.fp8_forward(q, k, v, sched, 0.1, config=config, recipe=recipe)
      fingerprints.append(module_fingerprints(f, x, x, x))
    assert len(fingerprints[1]) == 1 and fingerprints[0] != fingerprints[1]


@pytest.mark.cpu_only
def test_biased_scores_lower_for_cuda():
  """MosaicConfig.fp8_biased_scores passes the whole Mosaic GPU lowering for both int8 Q K^T
  recipes and changes their kernels only: the e4m3 Q K^T kernel (float scores) is the same
  module with the option on."""
  from benchmarks.tools.mosaic_fingerprint import module_fingerprints
  sched = schedule(SPANNING_RAGGED, 2)
  x = jnp.ones((1, sched.seq_len, 2, 128), jnp.bfloat16)
  for recipe in (DEFAULT, INT8_E4M3, ALL_E4M3):
    fingerprints = []
    for biased in (False, True):
      config = fp8.default_config(128, recipe, biased_scores=biased)
      f = lambda q, k, v: fp8.fp8_forward(q, k, v, sched, 0.1, config=config, recipe=recipe)
      fingerprints.append(module_fingerprints(f, x, x, x))
    assert len(fingerprints[1]) == 1
    assert (fingerprints[0] != fingerprints[1]) == (recipe.qk_dtype == "int8"), recipe


@pytest.fixture
def fp8_calls(monkeypatch):
  """The (schedule, config) of each fp8.fp8_forward call the backend makes, which returns
  zeros in its place (what the backend chose, without a kernel)."""
  seen = []

  def record(q, k, v, sched, scale, config=None, key_valid=None, recipe=None):
    seen.append((sched, config))
    return jnp.zeros_like(q), jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32)

  monkeypatch.setattr(fp8, "fp8_forward", record)
  return seen


def test_op_runs_three_warpgroups_where_timed_and_the_sequence_fits(fp8_calls):
  """MosaicBackend.fp8_three_warpgroups="auto": the 8-bit forward of "qk_int8" and "fp8"
  runs the 192-row schedule (three compute warpgroups) where it has the sequence's length and
  no padded key; "qk_int8_pv_fp8", padded keys and sequences that 192-row blocks pad further
  keep 128 rows; never in interpret mode; True runs it wherever the length fits, False never,
  and "int8" (int8 P V) never; a non-bool other than "auto" is refused."""
  from pallas_kernels.mosaic import backend as mbackend
  # 2,304 positions in 128- and in 192-row blocks, none padded; with 100 of 128 text slots
  # 2,432 against 2,688; 1,152 in both with text (padded slots), 1,024 against 1,152 without.
  fits = jsta.STASpec((6, 16, 24), (3, 8, 8), (1, 1, 1))
  pads = jsta.STASpec((6, 16, 24), (3, 8, 8), (1, 1, 1), text_len=100, text_max_len=128)
  padded_keys = jsta.STASpec((3, 8, 40), (3, 8, 8), (1, 1, 1), text_len=100, text_max_len=128)
  for spec in (fits, pads, padded_keys):
    sched = jsta.block_schedule(spec, 2, 128, 128)
    x = jnp.zeros((1, sched.seq_len, 2, 128), jnp.bfloat16)
    wide = jsta.block_schedule(spec, 2, 192, 128, mask_unit=64)
    for be, precision, want in (
        (mbackend.MosaicBackend(device_check=False), "qk_int8", 192),
        (mbackend.MosaicBackend(device_check=False), "fp8", 192),
        (mbackend.MosaicBackend(device_check=False), "qk_int8_pv_fp8", 128),
        (mbackend.MosaicBackend(device_check=False, fp8_three_warpgroups=False), "fp8", 128),
        (mbackend.MosaicBackend(device_check=False, fp8_three_warpgroups=True),
         "qk_int8_pv_fp8", 192),
        (mbackend.MosaicBackend(device_check=False), "int8", 128),
        (mbackend.MosaicBackend(device_check=False, fp8_three_warpgroups=True), "int8", 128),
        (mbackend.MosaicBackend(interpret=True), "fp8", 128)):
      fp8_calls.clear()
      be.forward_quantized(x, x, x, sched, 0.1, precision=precision)
      seen = [(s.block_q, c.block_q, s.seq_len) for s, c in fp8_calls]
      if spec is pads:
        assert wide.seq_len != sched.seq_len
        want = 128
      if spec is padded_keys:
        assert wide.seq_len == sched.seq_len and wide.has_masked_keys
        want = 192 if be.fp8_three_warpgroups is True and precision != "int8" else 128
      assert seen == [(want, want, sched.seq_len)], (spec, precision, be.fp8_three_warpgroups)
  with pytest.raises(ValueError, match="fp8_three_warpgroups"):
    mbackend.MosaicBackend(fp8_three_warpgroups="yes")


def test_op_keeps_int8_pv_masked_steps_in_one_loop(fp8_calls):
  """precision "int8" runs its masked steps in the one key loop unless masked_steps_apart is
  True (a second loop spills); the other recipes follow masked_steps_apart ("auto": apart)."""
  from pallas_kernels.mosaic import backend as mbackend
  sched = jsta.block_schedule(TEXT, 2, 128, 128)
  x = jnp.zeros((1, sched.seq_len, 2, 128), jnp.bfloat16)
  for apart, precision, want in (("auto", "int8", False), ("auto", "qk_int8", True),
                                 (True, "int8", True), (False, "qk_int8", False),
                                 (False, "int8", False)):
    fp8_calls.clear()
    be = mbackend.MosaicBackend(device_check=False, masked_steps_apart=apart)
    be.forward_quantized(x, x, x, sched, 0.1, precision=precision)
    assert [c.masked_steps_apart for _, c in fp8_calls] == [want], (apart, precision)
