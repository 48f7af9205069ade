"""Row-major <-> tile order permutations of video tokens, with the padding of partial edge
tiles (einops where no tile is partial, a gather of :mod:`jsta.positions`'s index otherwise).

Put tokens in tile order once at a model's input and restore them once at its output: the
permutation is a full pass over the activations, too costly to repeat per attention call.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
import numpy as np

from jsta import checks, positions
from jsta.spec import STASpec

_AXES = ("t", "h", "w")


def _names(spec: STASpec) -> tuple[list[str], list[str]]:
  axes = _AXES[-spec.rank:] if spec.rank < 3 else _AXES
  return [f"n{a}" for a in axes], [f"{a}{a}" for a in axes]


def _row_major(spec: STASpec) -> str:
  """The flat video axis as row-major (t, h, w): '(nt tt nh th nw tw)'."""
  n, t = _names(spec)
  return "(" + " ".join(f"{a} {b}" for a, b in zip(n, t)) + ")"


def _tile_major(spec: STASpec) -> str:
  """The flat video axis in tile order: '(nt nh nw tt th tw)'."""
  n, t = _names(spec)
  return "(" + " ".join(n + t) + ")"


def _sizes(spec: STASpec) -> dict[str, int]:
  n, t = _names(spec)
  return dict(zip(n, spec.num_tiles)) | dict(zip(t, spec.tile_shape))


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
  """Row-major video tokens to tile order (docs/SEMANTICS.md).

  Args:
    x: [batch, T*H*W, ...] video tokens in row-major (t, h, w) order (no text tokens).
    spec: the layout. A partial edge tile holds its real tokens, then ``pad_value`` (a real
      number or a 0-d array) up to a multiple of ``spec.tile_align`` positions.
  Returns:
    [batch, spec.padded_video_len, ...] tokens, the tokens of one tile contiguous.
  """
  _check_spec(spec)
  _check_tokens(x, spec, spec.video_len, "x", "video_len (prod(latent_shape))")
  checks.check_real_scalar("pad_value", pad_value)
  _check_representable("pad_value", pad_value, x.dtype)
  if not spec.is_padded:
    return einops.rearrange(x, f"b {_row_major(spec)} ... -> b {_tile_major(spec)} ...",
                            **_sizes(spec))
  source = positions.source_index(spec)
  pad = jnp.full((x.shape[0], 1) + x.shape[2:], pad_value, x.dtype)
  # Padding positions read the appended pad row.
  return jnp.take(jnp.concatenate([x, pad], axis=1),
                  jnp.asarray(np.where(source >= 0, source, spec.video_len)), axis=1)


def _check_representable(name: str, value, dtype) -> None:
  """A concrete ``value`` must survive the cast to ``dtype``: jnp.full would wrap 300 to 44 in
  int8, truncate 1.5 to 1 in an integer dtype and overflow 1e40 to inf in bfloat16. Rounding
  to the nearest float of a float dtype is the cast's job, not an error. A traced value is
  cast as given."""
  if isinstance(value, jax.core.Tracer):
    return
  v = np.asarray(value).item()
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating):
    ok = not math.isfinite(v) or abs(v) <= float(jnp.finfo(dtype).max)
  elif dtype == np.bool_:
    ok = v in (0, 1)
  else:
    info = jnp.iinfo(dtype)
    ok = math.isfinite(v) and v == int(v) and info.min <= int(v) <= info.max
  if not ok:
    raise ValueError(f"{name} must be representable in x's dtype {dtype}, got {value!r}")


def untile_order(x: jnp.ndarray, spec: STASpec) -> jnp.ndarray:
  """Inverse of :func:`tile_order`: [batch, padded_video_len, ...] -> [batch, T*H*W, ...]."""
  _check_spec(spec)
  _check_tokens(x, spec, spec.padded_video_len, "x", "padded_video_len")
  if not spec.is_padded:
    return einops.rearrange(x, f"b {_tile_major(spec)} ... -> b {_row_major(spec)} ...",
                            **_sizes(spec))
  return jnp.take(x, jnp.asarray(positions.target_index(spec)), axis=1)


def split_video_text(x: jnp.ndarray, spec: STASpec) -> tuple[jnp.ndarray, jnp.ndarray]:
  """[batch, seq_len, ...] -> (video [batch, padded_video_len, ...], text [batch, text_max_len, ...]),
  the text slots taken from the end or, with ``spec.text_position == "first"``, the start."""
  _check_spec(spec)
  _check_tokens(x, spec, spec.seq_len, "x", "seq_len (padded_video_len + text_max_len)")
  v0, t0 = spec.video_offset, spec.text_offset
  return (x[:, v0:v0 + spec.padded_video_len], x[:, t0:t0 + spec.text_max_len])


def join_video_text(video: jnp.ndarray, text: jnp.ndarray, spec: STASpec) -> jnp.ndarray:
  """Inverse of :func:`split_video_text`: video [batch, padded_video_len, ...] and text
  [batch, text_max_len, ...] -> [batch, seq_len, ...] in the spec's order."""
  _check_spec(spec)
  _check_tokens(video, spec, spec.padded_video_len, "video", "padded_video_len")
  _check_tokens(text, spec, spec.text_max_len, "text", "text_max_len")
  if video.ndim != text.ndim or video.shape[0] != text.shape[0] or (
      video.shape[2:] != text.shape[2:]):
    raise ValueError(
        f"video and text must agree on every axis but the tokens' (axis 1): [batch, tokens, "
        f"...] with the same batch and trailing axes, got video {video.shape}, text "
        f"{text.shape}")
  parts = [text, video] if spec.text_position == "first" else [video, text]
  return jnp.concatenate(parts, axis=1)
