"""The op behaves as a JAX user expects from ``jax.nn.dot_product_attention``: "auto" runs any
valid input (falling back from the GPU kernels, with a logged reason), ``implementation=``
takes names or backend objects, the lse is [batch, seq, heads], array-likes and static specs
are accepted, the output carries a checkpoint name, and forward mode raises. Tiny shapes, the
xla backend (GPU detection is faked where the fallback chain needs it)."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
import jsta.backends as backends
import jsta.ops as ops
from pallas_kernels.mosaic import backend as mosaic_backend

from helpers import random_qkv

# 64-token tiles: the Hopper kernels' tile rule holds, so only head_dim or dtype can refuse them.
SPEC64 = jsta.STASpec((2, 8, 8), (1, 8, 8), (1, 1, 1))


@pytest.fixture
def hopper(monkeypatch):
  """JAX's device looks like a compute capability 9.0 GPU to backend selection, and the Hopper
  backend's own device check passes: what "auto" chooses there, on the CPU."""
  monkeypatch.setattr(backends, "gpu_compute_capability", lambda: (9, 0))
  monkeypatch.setattr(mosaic_backend, "check_device", lambda: None)


@pytest.mark.parametrize("head_dim, dtype, spec, want", [
    (64, jnp.bfloat16, SPEC64, "pallas_mosaic"),
    (64, jnp.float32, SPEC64, "pallas_triton"),                # Hopper kernels: bf16/fp16 only
    (72, jnp.bfloat16, SPEC64, "pallas_mosaic"),               # zero-padded to 128
    (40, jnp.float16, SPEC64, "pallas_mosaic"),                # to 64
    (192, jnp.bfloat16, SPEC64, "pallas_triton"),              # Hopper kernels: <= 128; to 256
    (320, jnp.float16, SPEC64, "xla"),                         # neither kernel takes it
    (64, jnp.bfloat16, jsta.STASpec((2, 6, 8), (1, 6, 8), (1, 1, 1)), "pallas_triton"),  # 48
])
def test_auto_falls_back_in_order_on_hopper(hopper, head_dim, dtype, spec, want):
  assert jsta.make_plan(spec, 2, head_dim, dtype).backend == want
  assert jsta.make_plan(spec, 2, head_dim, dtype, implementation="auto").backend == want


def test_auto_on_other_gpus_starts_at_the_portable_kernels(monkeypatch):
  monkeypatch.setattr(backends, "gpu_compute_capability", lambda: (8, 0))
  assert jsta.make_plan(SPEC64, 2, 64, jnp.bfloat16).backend == "pallas_triton"
  assert jsta.make_plan(SPEC64, 2, 80, jnp.bfloat16).backend == "pallas_triton"   # as 128
  assert jsta.make_plan(SPEC64, 2, 320, jnp.bfloat16).backend == "xla"


def test_auto_logs_why_it_skipped_a_backend(hopper, caplog):
  with caplog.at_level(logging.DEBUG, logger="jsta"):
    plan = jsta.make_plan(SPEC64, 2, 320, jnp.bfloat16)
  assert plan.backend == "xla"
  text = "\n".join(r.getMessage() for r in caplog.records if r.name == "jsta")
  assert "pallas_mosaic cannot run this input" in text and "head_dim" in text
  assert "pallas_triton cannot run this input" in text
  assert "runs on xla" in text
  assert all(r.levelno <= logging.INFO for r in caplog.records)
  caplog.clear()
  with caplog.at_level(logging.DEBUG, logger="jsta"):
    jsta.make_plan(SPEC64, 2, 64, jnp.bfloat16)
  assert [r.levelno for r in caplog.records if r.name == "jsta"] == [logging.DEBUG]


def test_auto_runs_an_input_no_kernel_takes(hopper):
  q, k, v = random_qkv(0, SPEC64, 1, 2, 320, jnp.bfloat16)
  o = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, SPEC64))(q, k, v)
  ref = jsta.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), SPEC64)
  np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref), atol=2e-2)


def test_explicit_names_do_not_fall_back(hopper):
  with pytest.raises(ValueError, match="head_dim"):
    jsta.make_plan(SPEC64, 2, 192, jnp.bfloat16, implementation="pallas_mosaic")
  # "auto" inside a sequence expands to its chain, without repeating names.
  plan = jsta.make_plan(SPEC64, 2, 320, jnp.bfloat16, implementation=("pallas_triton", "auto"))
  assert plan.backend == "xla"


# ---- implementation=: one name, names or backend objects ----------------------------------------
SMALL = jsta.STASpec((4, 4), (2, 2), (3, 1), text_len=2, text_max_len=4)


def test_implementation_takes_a_backend_object_with_its_own_config():
  q, k, v = random_qkv(1, SMALL, 2, 2, 8)
  small_steps = ops.XlaBackend(memory_bytes=2 ** 12)     # a few block pairs per step
  plan = jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation=small_steps)
  assert plan.backend == "xla" and plan.implementation is small_steps
  assert plan.runner() is small_steps
  hash(plan)
  assert plan == jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation=ops.XlaBackend(
      memory_bytes=2 ** 12))                             # equal objects: one plan, one trace
  assert jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation=[small_steps, "xla"]) == plan
  assert plan != jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation="xla")
  loss = lambda q, impl: jnp.sum(jsta.sliding_tile_attention(q, k, v, SMALL,
                                                              implementation=impl) ** 2)
  run = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (got, g), (want, rg) = run(q, small_steps), run(q, "xla")
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=1e-5, rtol=1e-5)


def test_a_sequence_skips_a_backend_object_that_cannot_run_the_input():
  split = mosaic_backend.MosaicBackend(backward_variant="split", device_check=False)
  plan = jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation=(split, "xla"))
  assert plan.backend == "xla"
  with pytest.raises(ValueError, match="float32 is not supported"):
    jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation=split)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(implementation="xla", backend="auto"), ValueError, "not both"),
    (dict(implementation=ops.XlaBackend(), backend="xla"), ValueError, "not both"),
    (dict(implementation=3), TypeError, r"implementation \(or its alias backend\) must be None"),
    (dict(backend=object()), TypeError, "got backend=<object"),
    (dict(implementation=("xla", 3)), TypeError, "implementation must name backends with str"),
    (dict(implementation="cuda"), ValueError, "implementation must be one of"),
])
def test_implementation_and_its_alias_are_checked(kwargs, exc, match):
  q = jnp.zeros((1, SMALL.seq_len, 2, 8))
  with pytest.raises(exc, match=match):
    jsta.sliding_tile_attention(q, q, q, SMALL, **kwargs)
  with pytest.raises(exc, match=match):
    jsta.make_plan(SMALL, 2, 8, jnp.float32, **kwargs)


def test_the_alias_with_the_same_value_is_accepted():
  assert ops.check_implementation("xla", "xla") == "xla"
  assert ops.check_implementation(["xla"], ("xla",)) == ("xla",)
  assert ops.check_implementation() == "auto"
  assert ops.check_implementation(backend="pallas_triton") == "pallas_triton"
  q = jnp.zeros((1, SMALL.seq_len, 2, 8))
  jsta.sliding_tile_attention(q, q, q, SMALL, implementation="xla", backend="xla")


def test_a_backend_object_must_be_hashable():
  class Unhashable:                     # the protocol, but __eq__ without __hash__
    name = "mine"
    default_blocks = check = forward = backward = staticmethod(lambda *a, **k: None)

    def __eq__(self, other):
      return self is other
  with pytest.raises(TypeError, match="a backend object must be hashable"):
    jsta.make_plan(SMALL, 2, 8, jnp.float32, implementation=Unhashable())


# ---- lse: [batch, seq, heads], as jax.nn.dot_product_attention's residual ------------------------
def test_lse_is_laid_out_as_jax_nn_residual():
  spec = jsta.STASpec((4, 4), (2, 2), jsta.full_window((4, 4), (2, 2)))   # dense attention
  q, k, v = random_qkv(2, spec, 2, 3, 8)
  o, lse = jsta.sliding_tile_attention(q, k, v, spec, return_lse=True)
  want_o, want_lse = jax.nn.dot_product_attention(q, k, v, return_residual=True)
  assert lse.shape == want_lse.shape == (2, spec.seq_len, 3) and lse.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(o), np.asarray(want_o), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), atol=2e-5, rtol=2e-5)


def test_row_major_lse_follows_its_tokens():
  spec = jsta.STASpec((3, 5), (2, 2), (1, 3), text_len=2, text_max_len=3,
                      text_position="first")
  b, h, d = 1, 2, 8
  keys = jax.random.split(jax.random.key(3), 2)
  video = jax.random.normal(keys[0], (b, spec.video_len, h, d))
  text = jax.random.normal(keys[1], (b, spec.text_max_len, h, d))
  row_major = jnp.concatenate([text, video], axis=1)
  tiled = jsta.join_video_text(jsta.tile_order(video, spec), text, spec)
  _, lse = jsta.sliding_tile_attention(tiled, tiled, tiled, spec, return_lse=True)
  _, rlse = jsta.sliding_tile_attention_row_major(row_major, row_major, row_major, spec,
                                                  return_lse=True)
  assert rlse.shape == (b, spec.video_len + spec.text_max_len, h)
  lse_video, lse_text = jsta.split_video_text(lse, spec)
  want = jnp.concatenate([lse_text, jsta.untile_order(lse_video, spec)], axis=1)
  np.testing.assert_array_equal(np.asarray(rlse), np.asarray(want))


# ---- array-likes, static specs, remat names, forward mode ---------------------------------------
def test_numpy_and_float64_input_are_accepted_as_jax_nn_does():
  q, k, v = random_qkv(4, SMALL, 1, 2, 8)
  want = jsta.sliding_tile_attention(q, k, v, SMALL)
  for dtype in (np.float32, np.float64):
    q64, k64, v64 = (np.asarray(x, dtype) for x in (q, k, v))
    got = jsta.sliding_tile_attention(q64, k64, v64, SMALL)
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32     # float64 -> float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  # As jax.nn.dot_product_attention does with the same inputs.
  dense = jsta.STASpec((4, 4), (2, 2), jsta.full_window((4, 4), (2, 2)))
  q, k, v = (np.asarray(x, np.float64) for x in random_qkv(4, dense, 1, 2, 8))
  np.testing.assert_allclose(np.asarray(jsta.sliding_tile_attention(q, k, v, dense)),
                             np.asarray(jax.nn.dot_product_attention(q, k, v)), atol=2e-5)


def test_lists_and_int_arrays_are_refused_by_name():
  q = jnp.zeros((1, SMALL.seq_len, 2, 8))
  with pytest.raises(TypeError, match="k must be a jax or numpy array, got list"):
    jsta.sliding_tile_attention(q, np.asarray(q).tolist(), q, SMALL)
  with pytest.raises(TypeError, match="dtype must be float32, bfloat16 or float16, got int"):
    z = np.zeros(q.shape, np.int64)
    jsta.sliding_tile_attention(z, z, z, SMALL)


def test_spec_is_a_static_argument_of_jit():
  f = jax.jit(lambda q, spec: jsta.sliding_tile_attention(q, q, q, spec), static_argnames="spec")
  q = random_qkv(5, SMALL, 1, 2, 8)[0]
  a = f(q, spec=SMALL)
  # An equal spec built anew (lists for tuples) hits the same executable.
  again = jsta.STASpec([4, 4], [2, 2], [3, 1], text_len=2, text_max_len=4)
  assert again == SMALL and hash(again) == hash(SMALL)
  b = f(q, spec=again)
  assert f._cache_size() == 1
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  f(q, spec=SMALL.with_window((1, 1)))
  assert f._cache_size() == 2


def test_output_carries_a_checkpoint_name_for_remat_policies(capsys):
  q, k, v = random_qkv(6, SMALL, 1, 2, 8)
  w = jax.random.normal(jax.random.key(7), (8, 8))

  def loss(q):
    x = jnp.tanh(q @ w)
    return jnp.sum(jnp.sin(jsta.sliding_tile_attention(x, k, v, SMALL) @ w))

  want = jax.grad(loss)(q)
  names = jax.checkpoint_policies.save_only_these_names
  for policy in (names("sta_output"), names("sta_output", "sta_lse"),
                 jax.checkpoint_policies.nothing_saveable):
    got = jax.jit(jax.grad(jax.checkpoint(loss, policy=policy)))(q)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=names("sta_output")), q)
  saved = capsys.readouterr().out
  assert "named 'sta_output'" in saved and "named 'sta_lse'" not in saved
  jax.ad_checkpoint.print_saved_residuals(
      jax.checkpoint(loss, policy=jax.checkpoint_policies.nothing_saveable), q)
  assert "named" not in capsys.readouterr().out


def test_forward_mode_raises_a_clear_error():
  q, k, v = random_qkv(8, SMALL, 1, 2, 8)
  op = lambda q: jsta.sliding_tile_attention(q, k, v, SMALL)
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff \\(jvp\\) to a "
                                      "custom_vjp function"):
    jax.jvp(op, (q,), (jnp.ones_like(q),))
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jacfwd(lambda q: op(q).sum())(q)
