"""The 8-bit forward's quantization kernels (pallas_kernels.mosaic.fp8_quantize, Pallas in
interpret mode on the CPU) against the jnp reference :func:`fp8.quantize` and
:func:`fp8.lse_shift`: every recipe the kernel takes, grouped heads, per-sample key validity,
garbage (NaN, inf) on invalid positions, large and offset inputs."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.mosaic import fp8, fp8_quantize

from helpers import np_f32

RECIPES = {
    "default": fp8.KERNEL_RECIPE,
    "default_k64": dataclasses.replace(fp8.KERNEL_RECIPE, k_block=64),
    "int8_e4m3": dataclasses.replace(fp8.KERNEL_RECIPE, p_dtype="e4m3", v_scale="head"),
    "all_e4m3": fp8.ALL_E4M3,
    "plain_q128": dataclasses.replace(fp8.KERNEL_RECIPE, q_block=128, smooth_k=False,
                                      balance_channels=False),
}


def _inputs(seed, b=2, s=384, h=4, hkv=2, d=64):
  """q [b, s, h, d] (x 20: large), k (mean 3 on every channel: the smoothing matters), v,
  with NaN / inf where positions are invalid; validity: the last 64 queries invalid, keys
  invalid at random per sample."""
  kq, kk, kv_, kvalid = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(kq, (b, s, h, d)) * 20.0
  k = jax.random.normal(kk, (b, s, hkv, d)) + 3.0
  v = jax.random.normal(kv_, (b, s, hkv, d))
  qv = jnp.asarray(np.arange(s) < s - 64)[None]
  kv = jax.random.uniform(kvalid, (b, s)) > 0.25
  q = jnp.where(qv[:, :, None, None], q, jnp.nan)
  k = jnp.where(kv[:, :, None, None], k, jnp.inf)
  v = jnp.where(kv[:, :, None, None], v, -jnp.inf)
  return tuple(x.astype(jnp.bfloat16) for x in (q, k, v)), qv, kv


def _close_8bit(got, want, dtype: str):
  """8-bit values equal but for a rare one-step difference (a rounding tie moved by a last-bit
  change of K's mean, summed in another order)."""
  got, want = np_f32(got), np_f32(want)
  step = 1.0 if dtype == "int8" else np.maximum(np.abs(want), 2.0 ** -6) / 8
  diff = np.abs(got - want)
  assert (diff <= step + 1e-6).all(), diff.max()
  assert (diff > 0).mean() < 1e-3


def _assert_matches(got, shift, want, q, qv, recipe):
  """The kernels' Q and K operands, scales, mean and balance, and lse shift (softmax scale
  0.125) against the reference's ``want``; returns the reference shift."""
  _close_8bit(got.q8, want.q8, recipe.qk_dtype)
  _close_8bit(got.k8, want.k8, recipe.qk_dtype)
  for field in ("q_scale", "k_scale", "balance"):
    np.testing.assert_allclose(np_f32(getattr(got, field)), np_f32(getattr(want, field)),
                               rtol=1e-6, err_msg=field)
  np.testing.assert_allclose(np_f32(got.k_mean), np_f32(want.k_mean), atol=1e-5)
  want_shift = np_f32(fp8.lse_shift(q, want.k_mean, qv, 0.125))
  np.testing.assert_allclose(np_f32(shift), want_shift, rtol=1e-5,
                             atol=1e-5 * np.abs(want_shift).max())
  return want_shift


@pytest.mark.parametrize("name", list(RECIPES))
def test_kernels_match_reference_quantize(name):
  recipe = RECIPES[name]
  (q, k, v), qv, kv = _inputs(0)
  want = fp8.quantize(q, k, v, qv, kv, recipe)
  got, shift = fp8.quantize_with("pallas", q, k, v, qv, kv, recipe, 0.125, interpret=True)
  for field in want._fields:
    a, g = getattr(want, field), getattr(got, field)
    assert a.shape == g.shape and a.dtype == g.dtype, field
    assert np.isfinite(np_f32(g)).all(), field
  want_shift = _assert_matches(got, shift, want, q, qv, recipe)
  np.testing.assert_array_equal(np_f32(got.vt8), np_f32(want.vt8))
  np.testing.assert_array_equal(np_f32(got.v_scale), np_f32(want.v_scale))
  assert (np_f32(shift)[:, :, -64:] == 0).all()          # invalid query rows: no shift
  if recipe.smooth_k:
    assert np.abs(want_shift).max() > 1.0                # the correction is not trivially zero


def test_zero_inputs_get_unit_scales():
  z = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
  valid = jnp.ones((1, 256), bool)
  ops, shift = fp8.quantize_with("pallas", z, z, z, valid, valid, fp8.KERNEL_RECIPE, 0.1,
                                     interpret=True)
  assert (np_f32(ops.q_scale) == 1).all() and (np_f32(ops.k_scale) == 1).all()
  assert (np_f32(ops.balance) == 1).all() and (np_f32(ops.q8) == 0).all()
  assert (np_f32(shift) == 0).all()


def test_round_half_even_matches_numpy():
  x = np.array([-127.5, -2.5, -1.5, -0.5, -0.49999997, 0.0, 0.49999997, 0.5, 1.5, 2.5, 2.5000002,
                3.4999998, 126.5, 127.0, 1e-30], np.float32)
  x = np.concatenate([x, np.random.default_rng(0).uniform(-130, 130, 1000).astype(np.float32)])
  got = np.asarray(jax.jit(fp8_quantize.round_half_even)(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.round(x))


def test_bad_shapes_and_quantizer_raise():
  x = jnp.zeros((1, 200, 1, 64), jnp.bfloat16)
  valid = jnp.ones((1, 200), bool)
  with pytest.raises(ValueError, match="multiple of 128"):
    fp8.quantize_with("pallas", x, x, x, valid, valid, fp8.KERNEL_RECIPE, 0.1, interpret=True)
  x = jnp.zeros((1, 256, 1, 64), jnp.bfloat16)
  valid = jnp.ones((1, 256), bool)
  with pytest.raises(ValueError, match="q_block"):
    fp8.quantize_with("pallas", x, x, x, valid, valid,
                          dataclasses.replace(fp8.KERNEL_RECIPE, q_block=32), 0.1, interpret=True)
  with pytest.raises(ValueError, match="quantizer"):
    fp8.quantize_with("cuda", x, x, x, valid, valid, fp8.KERNEL_RECIPE, 0.1)


def test_default_quantizer():
  """The reference where no GPU runs the kernels; the Pallas passes where a program is lowered
  for a GPU (an abstract mesh on a GPU, as deviceless compilation uses)."""
  assert fp8.default_quantizer(fp8.default_config(128, interpret=True)) == "xla"
  if jax.default_backend() == "cpu":
    assert fp8.default_quantizer() == "xla"
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=None,
                                         platform="cuda")
    with jax.sharding.use_abstract_mesh(
        jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)):
      assert fp8.default_quantizer() == "pallas"
  else:
    assert fp8.default_quantizer() == "pallas"


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["default", "all_e4m3"])
def test_compiled_kernels_match_reference_quantize(name):
  """The kernels compiled through Triton on the GPU: the same comparison at a longer
  sequence, one batch with per-sample key validity."""
  recipe = RECIPES[name]
  (q, k, v), qv, kv = _inputs(1, b=2, s=4096, h=8, hkv=4, d=128)
  want = fp8.quantize(q, k, v, qv, kv, recipe)
  got, shift = fp8.quantize_with("pallas", q, k, v, qv, kv, recipe, 0.125)
  _assert_matches(got, shift, want, q, qv, recipe)


def test_launch_configs_compute_the_same():
  """The grid's order (heads or blocks first) changes no value; bad warps are refused."""
  (q, k, v), qv, kv = _inputs(2, s=256)
  outs = [fp8.quantize_with("pallas", q, k, v, qv, kv, fp8.KERNEL_RECIPE, 0.125, interpret=True,
                            quantize_config=fp8_quantize.QuantizeConfig(heads_minor=minor))
          for minor in (True, False)]
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
    np.testing.assert_array_equal(np_f32(a), np_f32(b))
  with pytest.raises(ValueError, match="num_warps"):
    fp8_quantize.QuantizeConfig(num_warps=3)
