"""3D rotary position embedding over (t, h, w) for video tokens, computed in tile order.

The head dimension is split into three even chunks (t, h, w); each chunk rotates its pairs by
``position_axis * theta ** (-2j / dim_axis)``. Tables are numpy constants built once per layout
and already permuted into tile order, so the model never re-permutes them per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jsta


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
  """Split of ``head_dim`` over (t, h, w): HunyuanVideo's (16, 56, 56) for 128, scaled otherwise.

  Spatial axes get 7/16 of the dimensions each (rounded down to even), time gets the rest.
  """
  if head_dim % 2 or head_dim < 6:
    raise ValueError(f"head_dim must be even and >= 6 for 3D rotary embedding, got {head_dim}")
  spatial = 2 * ((head_dim * 7 // 16) // 2)
  temporal = head_dim - 2 * spatial
  if temporal <= 0:
    spatial -= 2
    temporal = head_dim - 2 * spatial
  return (temporal, spatial, spatial)


@functools.lru_cache(maxsize=16)
def rope_tables(spec: jsta.STASpec, axes_dim: tuple[int, int, int],
                theta: float) -> tuple[np.ndarray, np.ndarray]:
  """cos, sin tables: each [spec.padded_video_len, head_dim // 2] float32, in tile order.

  Padded latent positions (where the token grid is not a tile multiple) get position 0; they are
  masked out of every softmax, so their rotation does not matter.
  """
  if len(axes_dim) != 3 or any(d <= 0 or d % 2 for d in axes_dim):
    raise ValueError(f"axes_dim must be three positive even ints, got {axes_dim}")
  t, h, w = spec.latent_shape
  grid = np.stack(np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij"), -1)
  pos = grid.reshape(1, t * h * w, 3).astype(np.float64)
  angles = []
  for axis, dim in enumerate(axes_dim):
    inv_freq = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)  # [dim // 2]
    angles.append(pos[..., axis:axis + 1] * inv_freq)  # [1, N, dim // 2]
  ang = np.concatenate(angles, -1)  # [1, N, head_dim // 2]
  # Eager even when first called under jit: these are constants, never traced values.
  with jax.ensure_compile_time_eval():
    ang = np.asarray(jsta.tile_order(jnp.asarray(ang, jnp.float32), spec))[0]
  cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
  cos.setflags(write=False)
  sin.setflags(write=False)
  return cos, sin


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
  """Rotates adjacent pairs of the head dimension.

  Args:
    x: [batch, seq, heads, head_dim] (the video part of q or k, tile order).
    cos, sin: [seq, head_dim // 2] float32.
  Returns:
    [batch, seq, heads, head_dim] in ``x.dtype`` (the rotation is computed in float32).
  """
  b, s, h, d = x.shape
  xf = x.astype(jnp.float32).reshape(b, s, h, d // 2, 2)
  x0, x1 = xf[..., 0], xf[..., 1]
  c, sn = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([x0 * c - x1 * sn, x0 * sn + x1 * c], axis=-1)
  return out.reshape(b, s, h, d).astype(x.dtype)
