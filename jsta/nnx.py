"""Flax NNX integration: an STA self-attention layer and an ``attention_fn`` for
``flax.nnx.MultiHeadAttention``.

Both expect the sequence in STA layout: ``spec.seq_len`` tokens, the video tokens in tile order
(:func:`jsta.tile_order`, once at the model input) followed by ``spec.text_max_len`` text slots.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp
from flax import nnx

from jsta import checks
from jsta.ops import SUPPORTED_DTYPES, backend_names, sliding_tile_attention
from jsta.spec import STASpec

Rotary = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


class SlidingTileAttention(nnx.Module):
  """Multi-head self-attention whose attention is sliding tile attention.

  x -> fused qkv projection -> (optional per-head RMS QK-norm) -> (optional rotary) ->
  :func:`jsta.sliding_tile_attention` -> output projection.

  Args:
    num_heads: attention heads; must divide ``qkv_features``.
    in_features: features of the input (and, by default, of the output).
    spec: the :class:`jsta.STASpec` layout (one window, or ``num_heads`` per-head windows).
    qkv_features: total query/key/value features (heads * head_dim); default ``in_features``.
    out_features: output features; default ``in_features``.
    qk_norm: apply :class:`flax.nnx.RMSNorm` over head_dim to queries and keys (one scale per
      feature, shared by the heads).
    rotary: ``(q, k) -> (q, k)`` on ``[batch, seq, heads, head_dim]``, applied after the QK-norm
      (e.g. 3D RoPE computed for the tile-order positions).
    implementation: the op's ``implementation``: None ("auto"), a backend name ("auto", "xla",
      "pallas_triton", "pallas_mosaic" or a registered one) or a sequence of names tried in
      order. ``backend`` is an alias (giving both with different values is a ValueError).
    use_bias: biases in the projections.
    dtype: computation dtype of projections and attention (float32, bfloat16 or float16);
      None follows the input/parameter promotion.
    param_dtype: dtype of the parameters.
    rngs: :class:`flax.nnx.Rngs` for initialization.
  """

  def __init__(self, num_heads: int, in_features: int, spec: STASpec, *,
               qkv_features: int | None = None, out_features: int | None = None,
               qk_norm: bool = False, rotary: Rotary | None = None, implementation=None,
               backend=None, use_bias: bool = True, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    if not isinstance(spec, STASpec):
      raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    for name, value in (("num_heads", num_heads), ("in_features", in_features),
                        ("qkv_features", qkv_features), ("out_features", out_features)):
      checks.check_int(name, value, minimum=1)
    if qkv_features % num_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be positive and divide qkv_features ({qkv_features})")
    spec.head_windows(num_heads)  # a per-head window list must match num_heads
    if rotary is not None and not callable(rotary):
      raise TypeError(f"rotary must be a callable (q, k) -> (q, k) or None, got {rotary!r}")
    implementation = _implementation(implementation, backend)
    _check_dtype("dtype", dtype, SUPPORTED_DTYPES, allow_none=True)
    _check_dtype("param_dtype", param_dtype, None)
    self.spec = spec
    self.num_heads = num_heads
    self.head_dim = qkv_features // num_heads
    self.in_features = in_features
    self.implementation = implementation
    self.rotary = rotary
    self.dtype = dtype
    linear = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.qkv = nnx.Linear(in_features, 3 * qkv_features, **linear)
    self.out = nnx.Linear(qkv_features, out_features, **linear)
    if qk_norm:
      norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.q_norm = nnx.RMSNorm(self.head_dim, **norm)
      self.k_norm = nnx.RMSNorm(self.head_dim, **norm)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jnp.ndarray, text_lengths=None) -> jnp.ndarray:
    """x: [batch, spec.seq_len, in_features] -> [batch, spec.seq_len, out_features].

    ``text_lengths``: None or int [batch], the valid text slots of each sample at run time
    (see :func:`jsta.sliding_tile_attention`). Outputs at padded token positions (padded
    latent tiles, padded text slots) are the output projection's bias (the attention output
    there is zero).
    """
    checks.check_array("x", x)
    if x.ndim != 3 or x.shape[1] != self.spec.seq_len or x.shape[2] != self.in_features:
      raise ValueError(
          f"x must be [batch, seq_len={self.spec.seq_len}, in_features={self.in_features}] "
          f"(video tokens in tile order, then text slots), got shape {x.shape}")
    b, s, _ = x.shape
    qkv = self.qkv(x).reshape(b, s, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rotary is not None:
      q, k = self.rotary(q, k)
    # Norm scales or a rotary table may promote q/k; the op needs one dtype for q, k and v.
    q, k = q.astype(v.dtype), k.astype(v.dtype)
    o = sliding_tile_attention(q, k, v, self.spec, text_lengths=text_lengths,
                               implementation=self.implementation)
    return self.out(o.reshape(b, s, self.num_heads * self.head_dim))


def _check_dtype(name: str, dtype, allowed, allow_none: bool = False) -> None:
  """TypeError unless ``dtype`` is a floating dtype (one of ``allowed`` when given)."""
  if dtype is None and allow_none:
    return
  try:
    dt = None if dtype is None else jnp.dtype(dtype)
  except TypeError:
    dt = None
  names = ", ".join(jnp.dtype(d).name for d in allowed) if allowed else "a floating dtype"
  if dt is None or not jnp.issubdtype(dt, jnp.floating) or (
      allowed and dt not in map(jnp.dtype, allowed)):
    got = dt.name if dt is not None else repr(dtype)
    raise TypeError(f"{name} must be {names}{' or None' * allow_none}, got {got}")


def _implementation(implementation, backend):
  """The op's ``implementation`` from the argument and its alias ``backend``, checked now
  (not at the first call): "auto" for neither, a name, or a tuple of names."""
  if implementation is not None and backend is not None and implementation != backend:
    raise ValueError(f"give implementation= or its alias backend=, not both (got "
                     f"implementation={implementation!r}, backend={backend!r})")
  arg = "backend" if implementation is None and backend is not None else "implementation"
  choice = implementation if implementation is not None else backend
  if choice is None:
    return "auto"
  names = [choice] if isinstance(choice, str) else choice
  if not isinstance(names, (list, tuple)) or not names:
    raise TypeError(f"{arg} must be None, a backend name (a str) or a non-empty sequence of "
                    f"names, got {choice!r}")
  for name in names:
    if not isinstance(name, str):
      raise TypeError(f"{arg} must name backends with str, got {type(name).__name__} {name!r}")
    if name not in backend_names():
      raise ValueError(f"{arg} must be one of {backend_names()} (or a sequence of them), got "
                       f"{name!r}")
  return choice if isinstance(choice, str) else tuple(choice)


def make_attention_fn(spec: STASpec, *, implementation=None, backend=None,
                      scale: float | None = None) -> Callable[..., jnp.ndarray]:
  """An ``attention_fn`` for :class:`flax.nnx.MultiHeadAttention` that runs STA.

  The returned function takes ``query, key, value: [batch, spec.seq_len, heads, head_dim]``
  (self-attention in STA layout) and the keyword arguments MultiHeadAttention passes. STA defines
  its own mask; the ``mask`` argument may carry per-sample text lengths instead: an integer
  array [batch] (``mha(x, mask=text_lengths)``; MultiHeadAttention passes it through
  unchanged when not decoding) becomes the op's ``text_lengths``. A boolean mask, a ``bias``,
  ``is_causal=True``, active dropout, or ``sow_weights`` (``module``) raise ValueError.
  ``implementation`` (alias ``backend``, as in :class:`SlidingTileAttention`) and ``scale`` are
  checked here, not at the first call. ``dtype`` casts q, k, v before the op;
  ``precision`` is ignored (the backends pick their own).
  """
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  implementation = _implementation(implementation, backend)
  scale = checks.check_scale(scale)

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, promote_dtype=None, is_causal=False):
    del broadcast_dropout, dropout_rng, precision, promote_dtype
    text_lengths = None
    if mask is not None and jnp.issubdtype(jnp.asarray(mask).dtype, jnp.integer):
      text_lengths, mask = mask, None
    if mask is not None or bias is not None:
      raise ValueError(
          "STA attention_fn: bias must be None and mask None or an integer array [batch] of "
          "text lengths; the STA spec defines the mask (window, padded tokens, text_len)")
    if is_causal:
      raise ValueError("STA attention_fn: is_causal=True is not supported")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError("STA attention_fn: attention dropout is not supported (set dropout_rate=0)")
    if module is not None:
      raise ValueError("STA attention_fn: sow_weights is not supported (no weights are formed)")
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    else:
      dt = jnp.result_type(query, key, value)
      query, key, value = (x.astype(dt) for x in (query, key, value))
    return sliding_tile_attention(query, key, value, spec, text_lengths=text_lengths,
                                  scale=scale, implementation=implementation)

  return attention_fn
