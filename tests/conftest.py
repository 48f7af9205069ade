"""pytest hooks: GPU-only tests (marked ``gpu`` or ``hopper``) are skipped where JAX sees no
such GPU. Shared helpers live in helpers.py."""

from __future__ import annotations

import jax
import pytest


def pytest_collection_modifyitems(config, items):
  dev = jax.devices()[0]
  cc = str(getattr(dev, "compute_capability", "") or "") if dev.platform == "gpu" else ""
  for item in items:
    if dev.platform != "gpu" and ("gpu" in item.keywords or "hopper" in item.keywords):
      item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU"))
    elif "hopper" in item.keywords and not cc.startswith("9."):
      item.add_marker(pytest.mark.skip(reason="needs a compute capability 9.x GPU"))
    elif "cpu_only" in item.keywords and dev.platform == "gpu":
      item.add_marker(pytest.mark.skip(reason="a CPU-only case (interpret mode)"))
