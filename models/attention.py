"""Pluggable joint (video + text) attention for the video DiT.

All functions take ``q, k, v: [batch, seq, heads, head_dim]`` with seq = ``spec.seq_len``: video
tokens in tile order and ``spec.text_max_len`` text slots, after the video or, with
``spec.text_position == "first"``, before it.

Kinds (each masks the text of every sample exactly, from ``text_mask``, whose valid slots
come first; without a mask the first ``spec.text_len`` slots are valid):
  "full"       dense attention (``jax.nn.dot_product_attention``) over the real tokens: cuDNN on
               GPU for bf16/fp16, XLA otherwise. Padded video positions are left out (gathered
               away) and invalid text slots masked as keys (key lengths for cuDNN).
  "sta"        ``jsta.sliding_tile_attention`` with the layer's window and the samples' text
               lengths as ``text_lengths`` (run-time values: one executable for every prompt
               length).
  "reference"  ``jsta.reference_attention`` (dense float32, small shapes only), same masks as
               "sta".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta import mask as mask_lib

ATTENTION_KINDS = ("full", "sta", "reference")


def full_attention_implementation(dtype) -> str:
  """'cudnn' on a GPU for bf16/fp16 (flash attention), 'xla' otherwise."""
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    return "cudnn"
  return "xla"


def full_attention(q, k, v, spec: jsta.STASpec, text_mask=None, *,
                   implementation: str | None = None) -> jnp.ndarray:
  """Dense joint attention over the real tokens, as a model without STA would run it.

  Where the layout has padded video positions (partial edge tiles) or the text first, the real
  video tokens and the text slots are gathered into one dense sequence (text last), attended
  without any [batch, 1, 1, keys] mask where possible (cuDNN takes only key lengths, and
  refuses a broadcast mask), and scattered back.

  Args:
    q, k, v: [batch, spec.seq_len, heads, head_dim].
    spec: the layout (its window is ignored; ``text_len`` is ignored when ``text_mask`` is given).
    text_mask: [batch, spec.text_max_len] bool, True for valid text slots; None: the first
      ``spec.text_len`` slots are valid. With cuDNN the valid slots must come first (a prefix).
    implementation: "cudnn" or "xla"; default from :func:`full_attention_implementation`.
  Returns:
    [batch, seq, heads, head_dim] in q's dtype. Rows of padded video positions are zeros; rows
    of invalid text slots are finite, unspecified.
  """
  b, s, _, _ = q.shape
  if s != spec.seq_len:
    raise ValueError(f"q has seq {s}, spec.seq_len is {spec.seq_len}")
  impl = implementation or full_attention_implementation(q.dtype)
  if impl not in ("cudnn", "xla"):
    raise ValueError(f"implementation must be 'cudnn' or 'xla', got {impl!r}")
  video_valid = mask_lib.video_token_valid(spec)
  dense = bool(video_valid.all()) and spec.text_position == "last"
  all_text = text_mask is None and spec.text_len == spec.text_max_len
  if dense and all_text:
    # Every key is valid: no mask at all (cuDNN's plain flash path, the fastest and most robust).
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
  if text_mask is None:
    text_mask = jnp.broadcast_to(jnp.arange(spec.text_max_len) < spec.text_len,
                                 (b, spec.text_max_len))
  text_mask = jnp.asarray(text_mask, bool)
  if text_mask.shape != (b, spec.text_max_len):
    raise ValueError(
        f"text_mask must be [batch, text_max_len] = {(b, spec.text_max_len)}, got {text_mask.shape}")
  # The real tokens (static positions): the valid video positions, then every text slot.
  pos = np.concatenate([spec.video_offset + np.flatnonzero(video_valid),
                        spec.text_offset + np.arange(spec.text_max_len)])
  n_video = int(video_valid.sum())
  qc, kc, vc = (x if dense else x[:, pos] for x in (q, k, v))
  if all_text:
    o = jax.nn.dot_product_attention(qc, kc, vc, implementation=impl)
  elif impl == "cudnn":
    # cuDNN's flash kernel takes key lengths, not a dense mask (a dense mask becomes a slow bias
    # or is refused): keys = the real video tokens + the valid text prefix.
    kv_len = n_video + text_mask.sum(-1).astype(jnp.int32)
    o = jax.nn.dot_product_attention(qc, kc, vc, key_value_seq_lengths=kv_len,
                                     implementation="cudnn")
  else:
    key_valid = jnp.concatenate([jnp.ones((b, n_video), bool), text_mask], axis=1)
    o = jax.nn.dot_product_attention(qc, kc, vc, mask=key_valid[:, None, None, :],
                                     implementation=impl)
  if dense:
    return o
  return jnp.zeros_like(q).at[:, pos].set(o)


def joint_attention(kind: str, q, k, v, spec: jsta.STASpec, text_mask=None, *,
                    backend: str = "auto", precision: str | None = None) -> jnp.ndarray:
  """Dispatches to one attention kind. Shapes as in :func:`full_attention`; output in q's dtype.
  ``text_mask`` [batch, text_max_len] bool (valid slots first) or None. ``precision``: the
  op's for "sta" (e.g. "fp8" for inference); the other kinds ignore it."""
  if kind == "full":
    return full_attention(q, k, v, spec, text_mask)
  lengths = None if text_mask is None else jnp.asarray(text_mask, jnp.int32).sum(-1)
  if kind == "sta":
    return jsta.sliding_tile_attention(q, k, v, spec, text_lengths=lengths,
                                       implementation=backend, precision=precision)
  if kind == "reference":
    return jsta.reference_attention(q, k, v, spec, text_lengths=lengths).astype(q.dtype)
  raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {kind!r}")


def static_text_len(text_mask, text_max_len: int, text_len: int | None = None) -> int:
  """The number of text slots the STA spec treats as valid (a Python int, static under jit).

  ``text_len`` wins when given. Otherwise it is read from a concrete ``text_mask``
  ([batch, text_max_len] bool): one past the last valid slot of any sample (the batch maximum of
  the valid lengths when valid slots form a prefix). With no mask, all slots are valid.
  """
  if text_len is not None:
    if isinstance(text_len, bool) or not isinstance(text_len, (int, np.integer)) or not (
        0 <= text_len <= text_max_len):
      raise ValueError(f"text_len must be an int in [0, {text_max_len}], got {text_len!r}")
    return int(text_len)
  if text_mask is None:
    return text_max_len
  try:
    m = np.asarray(text_mask, dtype=bool)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    raise ValueError(
        "text_len: text_mask is traced (inside jit), so the static text length the STA spec "
        "needs cannot be read from it; pass text_len=<max valid text length> explicitly") from None
  if m.ndim != 2 or m.shape[1] != text_max_len:
    raise ValueError(f"text_mask must be [batch, {text_max_len}], got shape {m.shape}")
  any_valid = m.any(0)
  return int(np.nonzero(any_valid)[0].max() + 1) if any_valid.any() else 0
