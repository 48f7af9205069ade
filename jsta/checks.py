"""Argument checks shared by the public API, raised before any tracing or kernel work.

The convention everywhere in jsta: ``TypeError`` for an argument of the wrong type (not an
array, not an int, a traced value where a static one is needed, a dtype the op does not take),
``ValueError`` for a wrong value of the right type (a shape, a size, a name), each message
naming the argument and what is allowed.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np


def check_array(name: str, x) -> None:
  """``x`` must be a jax or numpy array (lists and tuples are not arrays here)."""
  if not isinstance(x, (jax.Array, np.ndarray)):
    raise TypeError(f"{name} must be a jax or numpy array, got {type(x).__name__}")


def check_int(name: str, value, minimum: int | None = None) -> int:
  """``value`` must be an int (not a bool), at least ``minimum`` when given."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
  if minimum is not None and value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")
  return int(value)


def check_scale(scale) -> float | None:
  """The softmax scale: None, or a finite real number known before tracing."""
  if scale is None:
    return None
  if isinstance(scale, jax.core.Tracer):
    raise TypeError(
        "scale must be a static number (a Python or NumPy float), got a traced value: it is "
        "compiled into the kernels. For a traced scale s, pass q * s and scale=1.0 (the same "
        "result, differentiable in s)")
  if isinstance(scale, (jax.Array, np.ndarray)) and np.ndim(scale) == 0:
    scale = scale.item()
  if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
    raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} "
                    f"{scale!r}")
  scale = float(scale)
  if not math.isfinite(scale):
    raise ValueError(f"scale must be finite, got {scale}")
  return scale


def check_backend_name(backend) -> None:
  if not isinstance(backend, str):
    raise TypeError(f"backend must be a str (a backend name), got {type(backend).__name__}")
