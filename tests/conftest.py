"""Shared test helpers: random q/k/v, GPU skips, and a few small specs used across files."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta


def _platform() -> str:
  return jax.devices()[0].platform


def pytest_collection_modifyitems(config, items):
  # GPU-only tests are marked `gpu` (or `hopper`); skip them where JAX sees no GPU.
  platform = _platform()
  cc = None
  if platform == "gpu":
    cc = getattr(jax.devices()[0], "compute_capability", None)
  for item in items:
    if platform != "gpu" and ("gpu" in item.keywords or "hopper" in item.keywords):
      item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
    elif "hopper" in item.keywords and not str(cc or "").startswith("9."):
      item.add_marker(pytest.mark.skip(reason="needs a compute capability 9.x GPU"))


def random_qkv(seed: int, spec: jsta.STASpec, batch: int, heads: int, head_dim: int,
               dtype=jnp.float32):
  """q, k, v: [batch, spec.seq_len, heads, head_dim] standard normal, in ``dtype``."""
  keys = jax.random.split(jax.random.key(seed), 3)
  shape = (batch, spec.seq_len, heads, head_dim)
  return tuple(jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys)


def np_f32(x) -> np.ndarray:
  return np.asarray(jnp.asarray(x, jnp.float32))


def run_on_cpu_devices(args: list[str], devices: int, timeout: float):
  """Runs ``python *args`` in a subprocess on ``devices`` fake CPU devices (XLA_FLAGS must be
  set before JAX starts, hence the subprocess); returns the CompletedProcess (text output)."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                        timeout=timeout)


def padded_inputs(seed: int, spec: jsta.STASpec, batch: int, heads: int, head_dim: int, dtype,
                  *, scale: float, logit_std: float = 1.0, garbage: float | str = 10.0):
  """(q, k, v, valid) for checking that padded positions never matter.

  q is scaled so that the logits q.k * scale of valid tokens have standard deviation
  ``logit_std``; k, v are standard normal. Padded positions (``valid`` False: padded latent
  positions and padded text slots, bool[spec.seq_len]) hold ``garbage``: a float is the
  standard deviation of random values there (as a previous layer could leave), "nan" or
  "inf" fills them with that value.
  """
  valid = np.asarray(jsta.token_valid(spec))
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (batch, spec.seq_len, heads, head_dim)
  q_std = logit_std / (scale * head_dim ** 0.5)
  clean = [jax.random.normal(kk, shape, jnp.float32) * s
           for kk, s in zip(keys[:3], (q_std, 1.0, 1.0))]
  if isinstance(garbage, str):
    junk = jnp.full(shape, {"nan": jnp.nan, "inf": jnp.inf}[garbage], jnp.float32)
  else:
    junk = jax.random.normal(keys[3], shape, jnp.float32) * garbage
  m = jnp.asarray(valid)[None, :, None, None]
  return (*(jnp.where(m, x, junk).astype(dtype) for x in clean), valid)


def check_padding_never_leaks(spec: jsta.STASpec, batch: int, heads: int, head_dim: int, dtype,
                              *, backend: str, scale: float, logit_std: float = 1.0,
                              garbage: float | str = 10.0, block_q=None, block_kv=None,
                              seed: int = 0, tol: float = 2e-2):
  """The op's output and the gradients of sum(o * w) (w random, padded rows included) are
  finite, exactly zero at padded positions, and match the float32 reference on the valid ones.
  The reference sees zeros at padded positions: what is stored there must not matter."""
  q, k, v, valid = padded_inputs(seed, spec, batch, heads, head_dim, dtype, scale=scale,
                                 logit_std=logit_std, garbage=garbage)
  w = jax.random.normal(jax.random.key(seed + 1), q.shape, jnp.float32)

  def loss_fn(attend):
    def loss(q, k, v):
      o = attend(q, k, v)
      return jnp.sum(o.astype(jnp.float32) * w), o
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))

  (_, o), grads = loss_fn(lambda q, k, v: jsta.sliding_tile_attention(
      q, k, v, spec, scale=scale, backend=backend, block_q=block_q, block_kv=block_kv))(q, k, v)
  m = jnp.asarray(valid)[None, :, None, None]
  clean = [jnp.where(m, x, 0).astype(jnp.float32) for x in (q, k, v)]
  (_, ro), rgrads = loss_fn(lambda q, k, v: jsta.reference_attention(q, k, v, spec,
                                                                     scale=scale))(*clean)
  for name, got, want in zip(("o", "dq", "dk", "dv"), (o, *grads), (ro, *rgrads)):
    got, want = np_f32(got), np_f32(want)
    assert np.isfinite(got).all(), f"{name}: {int((~np.isfinite(got)).sum())} non-finite values"
    assert (got[:, ~valid] == 0).all(), f"{name}: non-zero values at padded positions"
    err = float(np.linalg.norm(got[:, valid] - want[:, valid]) / np.linalg.norm(want[:, valid]))
    assert err < tol, f"{name}: relative L2 error {err:.3g} against the float32 reference"


# Padded latent + padded text + 64-row blocks + large logits, random values in the padded
# positions. The first is a case whose dK/dV had NaN: the dK/dV kernels did not mask padded
# keys before the exponent, so exp2 of a padded key's score overflowed (fp16: > 65504) and the
# final zeroing multiplied inf by 0. (name, spec, heads, head_dim, dtype, block_q, block_kv)
PADDING_CASES = [
    ("2d_tile128_d64_fp16", jsta.STASpec((40, 336), (4, 32), (1, 5), text_len=70,
                                         text_max_len=104), 2, 64, jnp.float16, 64, 64),
    ("2d_tile128_d64_bf16", jsta.STASpec((40, 336), (4, 32), (1, 5), text_len=70,
                                         text_max_len=104), 2, 64, jnp.bfloat16, 64, 64),
    ("3d_tile128_d128_fp16", jsta.STASpec((5, 10, 72), (1, 4, 32), (3, 1, 3), text_len=30,
                                          text_max_len=64), 2, 128, jnp.float16, 64, 64),
    ("2d_tile64_d64_fp16", jsta.STASpec((20, 100), (2, 32), (3, 3), text_len=20,
                                        text_max_len=40), 2, 64, jnp.float16, 64, 64),
    ("3d_tile128_d128_bf16_b128", jsta.STASpec((5, 10, 72), (1, 4, 32), (3, 3, 3),
                                               text_len=10, text_max_len=64), 2, 128,
     jnp.bfloat16, 128, 128),
]


def check_valid_nan_propagates(spec: jsta.STASpec, heads: int, head_dim: int, dtype, *,
                               backend: str, block_q=None, block_kv=None, seed: int = 0):
  """A NaN in one valid key (and, separately, one valid value) reaches exactly the queries
  that attend it, as in dense attention: real bugs upstream stay visible."""
  from jsta.reference import reference_mask
  q, k, v = random_qkv(seed, spec, 1, heads, head_dim, dtype)
  valid = np.flatnonzero(jsta.token_valid(spec))
  pos = int(valid[np.random.default_rng(seed).integers(valid.size)])
  attends = reference_mask(spec, heads)[:, :, pos]                  # [heads, seq]
  attend = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(
      q, k, v, spec, backend=backend, block_q=block_q, block_kv=block_kv))
  for poisoned in ("k", "v"):
    args = dict(q=q, k=k, v=v)
    args[poisoned] = args[poisoned].at[:, pos].set(jnp.nan)
    o = np_f32(attend(**args))[0]                                    # [seq, heads, dim]
    nan_rows = np.isnan(o).any(axis=-1).T                            # [heads, seq]
    np.testing.assert_array_equal(nan_rows, attends, err_msg=f"NaN in {poisoned}[{pos}]")
