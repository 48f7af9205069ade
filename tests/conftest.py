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
