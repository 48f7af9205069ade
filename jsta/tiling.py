"""Row-major <-> tile order permutations of video tokens (einops), with padding.

Put tokens in tile order once at a model's input and restore them once at its output: the
permutation is a full pass over the activations, too costly to repeat per attention call.
"""

from __future__ import annotations

import einops
import jax.numpy as jnp

from jsta import checks
from jsta.spec import STASpec

_AXES = ("t", "h", "w")


def _names(spec: STASpec) -> tuple[list[str], list[str]]:
  axes = _AXES[-spec.rank:] if spec.rank < 3 else _AXES
  return [f"n{a}" for a in axes], [f"{a}{a}" for a in axes]


def _check_spec(spec) -> None:
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")


def _check_tokens(x, spec: STASpec, expected: int, name: str, what: str) -> None:
  checks.check_array(name, x)
  if x.ndim < 2:
    raise ValueError(f"{name} must be [batch, tokens, ...], got shape {x.shape}")
  if x.shape[1] != expected:
    raise ValueError(
        f"{name} has {x.shape[1]} tokens on axis 1 but the spec's {what} is {expected} "
        f"(latent_shape={spec.latent_shape}, tile_shape={spec.tile_shape})")


def tile_order(x: jnp.ndarray, spec: STASpec, pad_value: float = 0.0) -> jnp.ndarray:
  """Row-major video tokens to tile order.

  Args:
    x: [batch, T*H*W, ...] video tokens in row-major (t, h, w) order (no text tokens).
    spec: the layout; axes that are not tile multiples are padded with ``pad_value``.
  Returns:
    [batch, spec.padded_video_len, ...] tokens, the tokens of one tile contiguous.
  """
  _check_spec(spec)
  _check_tokens(x, spec, spec.video_len, "x", "video_len (prod(latent_shape))")
  n, t = _names(spec)
  dims = dict(zip([a for a in _AXES[-spec.rank:]], spec.latent_shape))
  spatial = " ".join(_AXES[-spec.rank:])
  x = einops.rearrange(x, f"b ({spatial}) ... -> b {spatial} ...", **dims)
  pads = [(0, 0)] + [(0, p - s) for p, s in zip(spec.padded_latent_shape, spec.latent_shape)]
  pads += [(0, 0)] * (x.ndim - 1 - spec.rank)
  if spec.is_padded:
    x = jnp.pad(x, pads, constant_values=pad_value)
  src = " ".join(f"({a} {b})" for a, b in zip(n, t))
  dst = "(" + " ".join(n + t) + ")"
  tiles = dict(zip(t, spec.tile_shape))
  return einops.rearrange(x, f"b {src} ... -> b {dst} ...", **tiles)


def untile_order(x: jnp.ndarray, spec: STASpec) -> jnp.ndarray:
  """Inverse of :func:`tile_order`: [batch, padded_video_len, ...] -> [batch, T*H*W, ...]."""
  _check_spec(spec)
  _check_tokens(x, spec, spec.padded_video_len, "x", "padded_video_len")
  n, t = _names(spec)
  src = "(" + " ".join(n + t) + ")"
  dst = " ".join(f"({a} {b})" for a, b in zip(n, t))
  sizes = dict(zip(n, spec.num_tiles)) | dict(zip(t, spec.tile_shape))
  x = einops.rearrange(x, f"b {src} ... -> b {dst} ...", **sizes)
  if spec.is_padded:
    x = x[(slice(None),) + tuple(slice(0, s) for s in spec.latent_shape)]
  return einops.rearrange(x, "b " + " ".join(_AXES[-spec.rank:]) + " ... -> b (" +
                          " ".join(_AXES[-spec.rank:]) + ") ...")


def split_video_text(x: jnp.ndarray, spec: STASpec) -> tuple[jnp.ndarray, jnp.ndarray]:
  """[batch, seq_len, ...] -> (video [batch, padded_video_len, ...], text [batch, text_max_len, ...])."""
  _check_spec(spec)
  _check_tokens(x, spec, spec.seq_len, "x", "seq_len (padded_video_len + text_max_len)")
  return x[:, :spec.padded_video_len], x[:, spec.padded_video_len:]
