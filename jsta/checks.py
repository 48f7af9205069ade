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
import jax.numpy as jnp
import numpy as np

# The largest softmax scale whose float32 value, and its product with log2(e) (the kernels
# compute exp2(scale * log2(e) * q.k) in float32), are finite: about 2.36e38.
MAX_SCALE = float(np.finfo(np.float32).max) / math.log2(math.e)


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


def check_positions(name: str, positions, limit: int) -> np.ndarray:
  """``positions``: a non-empty 1-D list or array of ints in [0, ``limit``), known before
  tracing -> int64 numpy array. Floats and bools are refused, not truncated."""
  if isinstance(positions, jax.core.Tracer):
    raise TypeError(f"{name} must be concrete positions (a list or a numpy array of ints), got "
                    "a traced value")
  try:
    arr = np.asarray(positions)
  except Exception:
    raise TypeError(f"{name} must be a 1-D list or array of ints, got "
                    f"{type(positions).__name__}") from None
  if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
    raise TypeError(f"{name} must be a 1-D list or array of ints, got dtype {arr.dtype}")
  if arr.ndim != 1 or arr.size == 0 or arr.min() < 0 or arr.max() >= limit:
    raise ValueError(f"{name} must be a non-empty 1D list of positions in [0, {limit}), "
                     f"got {positions!r}")
  return arr.astype(np.int64)


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
  if abs(scale) > MAX_SCALE:
    raise ValueError(
        f"scale must be finite in float32, where the kernels apply it: |scale| <= "
        f"{MAX_SCALE:.4g} (float32's largest value / log2(e)), got {scale}")
  return scale


def check_bool(name: str, value) -> bool:
  """``value`` must be a Python or NumPy bool known before tracing (it shapes the outputs)."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{name} must be a static bool (True or False), got a traced value: it "
                    "decides what the function returns, so it must be known before tracing")
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__} "
                    f"{value!r}")
  return bool(value)


def clamp_lengths(lengths, maximum: int, name: str = "text_lengths"):
  """Integer lengths (a jax or numpy array, possibly traced) -> int32 clamped to
  [0, maximum]. The clamp is done in the lengths' own dtype, before the cast: a uint32
  2**32 - 1 becomes ``maximum``, not -1 (then 0)."""
  x = jnp.asarray(lengths)
  if not jnp.issubdtype(x.dtype, jnp.integer):
    raise TypeError(f"{name} must have an integer dtype, got {x.dtype}")
  info = np.iinfo(x.dtype)
  return jnp.clip(x, max(0, int(info.min)), min(maximum, int(info.max))).astype(jnp.int32)


def check_real_scalar(name: str, value):
  """``value`` must be a real number: a Python or NumPy int, float or bool, or a 0-d jax or
  numpy array of such a dtype (possibly traced). Returns it unchanged."""
  if isinstance(value, (jax.Array, np.ndarray)):
    if value.ndim != 0:
      raise ValueError(f"{name} must be a scalar (a real number or a 0-d array), got an array "
                       f"of shape {value.shape}")
    if not (jnp.issubdtype(value.dtype, jnp.integer) or jnp.issubdtype(value.dtype, jnp.floating)
            or value.dtype == np.bool_):
      raise TypeError(f"{name} must be a real number, got an array of dtype {value.dtype}")
    return value
  if not isinstance(value, (numbers.Real, np.bool_)):
    raise TypeError(f"{name} must be a real number (int or float), got "
                    f"{type(value).__name__} {value!r}")
  return value


def check_backend_name(backend) -> None:
  if not isinstance(backend, str):
    raise TypeError(f"backend must be a str (a backend name), got {type(backend).__name__}")
