"""interpret_callbacks.py, the tests' faster host side of GPU interpret mode: the kernels compute
the same with it, bit for bit, and it is put in place only where it was written for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interpret_callbacks
import jsta

from helpers import MOSAIC_INTERPRET, interpreted, random_qkv


@pytest.fixture
def faster_callbacks():
  """The replacement in place for the test (also under JSTA_PLAIN_INTERPRET=1), the state
  before it restored after."""
  was = interpret_callbacks.installed()
  if not interpret_callbacks.install():
    pytest.skip(f"written for JAX {interpret_callbacks.JAX_VERSION}, this is {jax.__version__}")
  yield
  if not was:
    interpret_callbacks.uninstall()


def test_kernels_compute_the_same_with_and_without_it(faster_callbacks):
  # Text, a partial tile and garbage in the padded text slots: the key bias, the masked steps
  # and the lse's +inf rows all go through the simulated barriers, copies and wgmmas.
  spec = jsta.STASpec((3, 8, 8), (2, 8, 8), (3, 1, 1), text_len=5, text_max_len=64)
  q, k, v = random_qkv(7, spec, 1, 2, 64, jnp.bfloat16)
  garbage = jnp.arange(spec.seq_len) >= spec.seq_len - (spec.text_max_len - spec.text_len)
  k = jnp.where(garbage[None, :, None, None], jnp.nan, k)

  @jax.jit
  def attend(q, k, v):
    return jsta.sliding_tile_attention(q, k, v, spec, backend=MOSAIC_INTERPRET, return_lse=True)

  fast = interpreted(attend, q, k, v)
  with interpret_callbacks.plain_interpreter():
    assert not interpret_callbacks.installed()
    plain = interpreted(attend, q, k, v)
  assert interpret_callbacks.installed()
  for got, want in zip(jax.tree.leaves(fast), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.isfinite(np.asarray(fast[0], np.float32)).all()


def test_install_and_uninstall_swap_the_two_functions(monkeypatch):
  from jax._src import callback
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory
  if not interpret_callbacks.installable():
    pytest.skip(f"written for JAX {interpret_callbacks.JAX_VERSION}, this is {jax.__version__}")
  # JAX's own functions for the test, the state before it restored after (the version's
  # monkeypatch undone first, as the inner context ends before the outer one).
  with interpret_callbacks.plain_interpreter():
    jax_impl, jax_to_int = callback.io_callback_impl, shared_memory._to_int
    assert interpret_callbacks.install() and interpret_callbacks.install()   # idempotent
    assert callback.io_callback_impl is not jax_impl
    assert shared_memory._to_int(np.int32(3)) == 3 and shared_memory._to_int(5) == 5
    with pytest.raises(ValueError, match="Unsupported type"):
      shared_memory._to_int("3")                      # JAX's own checks still apply
    interpret_callbacks.uninstall()
    assert callback.io_callback_impl is jax_impl and shared_memory._to_int is jax_to_int
    # Another JAX version: nothing is replaced.
    with monkeypatch.context() as m:
      m.setattr(jax, "__version__", "0.0.1")
      assert not interpret_callbacks.installable() and not interpret_callbacks.install()
      assert callback.io_callback_impl is jax_impl


def test_the_variable_keeps_jax_own_callbacks(monkeypatch):
  import conftest
  for value, want in (("", False), ("0", False), ("1", True)):
    monkeypatch.setenv("JSTA_PLAIN_INTERPRET", value)
    assert conftest.plain_interpret() == want
  monkeypatch.setenv("JSTA_PLAIN_INTERPRET", "yes")
  with pytest.raises(pytest.UsageError, match="JSTA_PLAIN_INTERPRET"):
    conftest.plain_interpret()
