"""Flax NNX integration: an STA self-attention layer and an ``attention_fn`` for
``flax.nnx.MultiHeadAttention``.

Both expect the sequence in STA layout: ``spec.seq_len`` tokens, the video tokens in tile order
(:func:`jsta.tile_order`, once at the model input) followed by ``spec.text_max_len`` text slots.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsta import checks
from jsta.mask import video_token_valid
from jsta.ops import (SUPPORTED_DTYPES, check_implementation, check_precision,
                      sliding_tile_attention)
from jsta.spec import STASpec

Rotary = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]
Initializer = Callable[..., Any]

# flax.nnx.Linear's defaults.
_DEFAULT_KERNEL_INIT = nnx.initializers.lecun_normal()
_DEFAULT_BIAS_INIT = nnx.initializers.zeros_init()


class SlidingTileAttention(nnx.Module):
  """Multi-head self-attention whose attention is sliding tile attention.

  x -> q, k, v projections -> (optional per-head RMS QK-norm) -> (optional rotary) ->
  :func:`jsta.sliding_tile_attention` -> output projection.

  Two parameter layouts (``fused_qkv``):

  - True (the default): one :class:`flax.nnx.Linear` ``qkv`` with kernel
    ``[in_features, (num_heads + 2 * num_kv_heads) * head_dim]`` (the columns are q, then k,
    then v) and an :class:`flax.nnx.Linear` ``out`` with kernel ``[num_heads * head_dim,
    out_features]``.
  - False: :class:`flax.nnx.MultiHeadAttention`'s layout, :class:`flax.nnx.LinearGeneral`
    ``query`` ``[in_features, num_heads, head_dim]``, ``key`` and ``value`` ``[in_features,
    num_kv_heads, head_dim]`` and ``out`` ``[num_heads, head_dim, out_features]`` (biases
    ``[heads, head_dim]`` and ``[out_features]``), so that such a model's parameters load as
    they are: ``nnx.update(layer, nnx.state(mha, nnx.Param))`` (a MultiHeadAttention with the
    same sizes and ``normalize_qk=False``; its LayerNorm QK-norm is not this layer's RMSNorm).

  Args:
    num_heads: query heads; must divide ``qkv_features``.
    in_features: features of the input (and, by default, of the output).
    spec: the :class:`jsta.STASpec` layout (one window, or ``num_heads`` per-head windows).
    num_kv_heads: key/value heads (grouped-query attention, as the op: query head h uses key
      and value head ``h // (num_heads // num_kv_heads)``); must divide ``num_heads``. Default
      ``num_heads``.
    qkv_features: query features (num_heads * head_dim); default ``in_features``. Keys and
      values have ``num_kv_heads * head_dim``.
    out_features: output features; default ``in_features``.
    fused_qkv: the parameter layout, see above.
    qk_norm: apply :class:`flax.nnx.RMSNorm` over head_dim to queries and keys (one scale per
      feature, shared by the heads).
    rotary: ``(q, k) -> (q, k)`` on q ``[batch, seq, num_heads, head_dim]`` and k ``[batch,
      seq, num_kv_heads, head_dim]``, applied after the QK-norm (e.g. 3D RoPE computed for the
      tile-order positions, see ``models/rope.py``).
    implementation: the op's ``implementation``: None ("auto"), a backend name ("auto", "xla",
      "pallas_triton", "pallas_mosaic" or a registered one) or a sequence of names tried in
      order. ``backend`` is an alias (giving both with different values is a ValueError).
    attention_precision: the op's ``precision``: None or "default" (the attention's matrix
      products in the computation dtype), or an 8-bit forward for inference ("qk_int8",
      "int8", "qk_int8_pv_fp8", "fp8": the Hopper kernels, bf16/fp16 computation dtype; a
      gradient through the layer raises ValueError). ``__call__`` may override it per call.
    use_bias: biases in the projections.
    kernel_init, bias_init: initializers of the projections' kernels and biases, as
      :class:`flax.nnx.Linear`'s (default LeCun normal and zeros). The fused kernel is
      initialized as one ``[in_features, (num_heads + 2 * num_kv_heads) * head_dim]`` matrix,
      so an init that depends on fan_out (Glorot, say) scales it unlike the separate ones.
    kernel_axes: None (no sharding metadata, as :class:`flax.nnx.Linear`), or a mapping from
      kernel name ("qkv", "out" when fused; "query", "key", "value", "out" otherwise) to the
      names of that kernel's axes, one per axis (a mesh axis name, a logical name resolved by
      Flax's logical axis rules, None, or a tuple of names), e.g. ``{"query": ("embed",
      "heads", "kv"), "key": ("embed", "kv_heads", "kv"), "value": ("embed", "kv_heads",
      "kv"), "out": ("heads", "kv", "embed")}`` or, fused, ``{"qkv": ("embed", "heads"), "out":
      ("heads", "embed")}``. The kernel init is wrapped in ``nnx.with_partitioning(init,
      axes)`` and the bias init in ``nnx.with_partitioning(init, axes of its output dims)``;
      ``nnx.get_partition_spec(nnx.state(layer))`` then shows them. With Flax's eager sharding
      (the default) the layer must then be created under a mesh (``jax.set_mesh``). The fused
      kernel's columns are [q | k | v]: a split of its last axis over devices does not fall on
      head boundaries, so shard heads with ``fused_qkv=False``.
    dtype: computation dtype of projections and attention (float32, bfloat16 or float16);
      None follows the input/parameter promotion.
    param_dtype: dtype of the parameters.
    rngs: :class:`flax.nnx.Rngs` for initialization.
  """

  def __init__(self, num_heads: int, in_features: int, spec: STASpec, *,
               num_kv_heads: int | None = None, qkv_features: int | None = None,
               out_features: int | None = None, fused_qkv: bool = True, qk_norm: bool = False,
               rotary: Rotary | None = None, implementation=None, backend=None,
               attention_precision: str | None = None, use_bias: bool = True,
               kernel_init: Initializer = _DEFAULT_KERNEL_INIT,
               bias_init: Initializer = _DEFAULT_BIAS_INIT,
               kernel_axes: Mapping[str, Sequence] | None = None, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(spec, STASpec):
      raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
    if not isinstance(rngs, nnx.Rngs):
      # flax's layers call rngs.params() and fail deep inside on anything else.
      raise TypeError(f"rngs must be a flax.nnx.Rngs (e.g. nnx.Rngs(0)), got "
                      f"{type(rngs).__name__}")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    qkv_features = in_features if qkv_features is None else qkv_features
    out_features = in_features if out_features is None else out_features
    for name, value in (("num_heads", num_heads), ("num_kv_heads", num_kv_heads),
                        ("in_features", in_features), ("qkv_features", qkv_features),
                        ("out_features", out_features)):
      checks.check_int(name, value, minimum=1)
    if qkv_features % num_heads:
      raise ValueError(
          f"num_heads ({num_heads}) must be positive and divide qkv_features ({qkv_features})")
    if num_heads % num_kv_heads:
      raise ValueError(f"num_kv_heads ({num_kv_heads}) must divide num_heads ({num_heads})")
    spec.head_windows(num_heads)  # a per-head window list must match num_heads
    fused_qkv = checks.check_bool("fused_qkv", fused_qkv)
    qk_norm = checks.check_bool("qk_norm", qk_norm)
    use_bias = checks.check_bool("use_bias", use_bias)
    if rotary is not None and not callable(rotary):
      raise TypeError(f"rotary must be a callable (q, k) -> (q, k) or None, got {rotary!r}")
    for name, init in (("kernel_init", kernel_init), ("bias_init", bias_init)):
      if not callable(init):
        raise TypeError(f"{name} must be an initializer (key, shape, dtype) -> array, got "
                        f"{init!r}")
    implementation = check_implementation(implementation, backend)
    attention_precision = check_precision(attention_precision)
    _check_dtype("dtype", dtype, SUPPORTED_DTYPES, allow_none=True)
    _check_dtype("param_dtype", param_dtype, None)
    head_dim = qkv_features // num_heads
    ranks = {"qkv": 2, "out": 2} if fused_qkv else {"query": 3, "key": 3, "value": 3, "out": 3}
    axes = _check_kernel_axes(kernel_axes, ranks, fused_qkv)
    self.spec = spec
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.in_features = in_features
    self.fused_qkv = fused_qkv
    self.implementation = implementation
    self.attention_precision = attention_precision
    self.rotary = rotary
    self.dtype = dtype

    def inits(name: str, out_rank: int) -> dict:
      # Sharding metadata rides on the initializers (nnx.with_partitioning), as in Flax's own
      # layers; the bias takes the axes of the kernel's output dims.
      if name not in axes:
        return dict(kernel_init=kernel_init, bias_init=bias_init)
      return dict(kernel_init=nnx.with_partitioning(kernel_init, axes[name]),
                  bias_init=nnx.with_partitioning(bias_init, axes[name][-out_rank:]))

    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    kv_features = num_kv_heads * head_dim
    if fused_qkv:
      self.qkv = nnx.Linear(in_features, qkv_features + 2 * kv_features, **inits("qkv", 1),
                            **common)
      self.out = nnx.Linear(qkv_features, out_features, **inits("out", 1), **common)
    else:
      # The order (query, key, value, out) and the shapes are MultiHeadAttention's.
      self.query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **inits("query", 2),
                                     **common)
      self.key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **inits("key", 2),
                                   **common)
      self.value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim),
                                     **inits("value", 2), **common)
      self.out = nnx.LinearGeneral((num_heads, head_dim), out_features, axis=(-2, -1),
                                   **inits("out", 1), **common)
    if qk_norm:
      norm = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
      self.q_norm = nnx.RMSNorm(head_dim, **norm)
      self.k_norm = nnx.RMSNorm(head_dim, **norm)
    else:
      self.q_norm = self.k_norm = None

  def __call__(self, x: jnp.ndarray, text_lengths=None, *,
               attention_precision: str | None = None) -> jnp.ndarray:
    """x: [batch, spec.seq_len, in_features] -> [batch, spec.seq_len, out_features].

    ``text_lengths``: None or int [batch], the valid text slots of each sample at run time
    (see :func:`jsta.sliding_tile_attention`). Outputs at padded token positions (padded
    latent tiles, padded text slots) are the output projection's bias (the attention output
    there is zero). ``attention_precision``: None (the layer's) or the op's ``precision`` for
    this call.
    """
    precision = (self.attention_precision if attention_precision is None
                 else check_precision(attention_precision))
    checks.check_array("x", x)
    if x.ndim != 3 or x.shape[1] != self.spec.seq_len or x.shape[2] != self.in_features:
      raise ValueError(
          f"x must be [batch, seq_len={self.spec.seq_len}, in_features={self.in_features}] "
          f"(video tokens in tile order, then text slots), got shape {x.shape}")
    b, s, _ = x.shape
    h, kh, d = self.num_heads, self.num_kv_heads, self.head_dim
    if self.fused_qkv:
      qkv = self.qkv(x)
      q = qkv[..., :h * d].reshape(b, s, h, d)
      k = qkv[..., h * d:(h + kh) * d].reshape(b, s, kh, d)
      v = qkv[..., (h + kh) * d:].reshape(b, s, kh, d)
    else:
      q, k, v = self.query(x), self.key(x), self.value(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if self.rotary is not None:
      q, k = self.rotary(q, k)
    # Norm scales or a rotary table may promote q/k; the op needs one dtype for q, k and v.
    q, k = q.astype(v.dtype), k.astype(v.dtype)
    o = sliding_tile_attention(q, k, v, self.spec, text_lengths=text_lengths,
                               implementation=self.implementation, precision=precision)
    return self.out(o.reshape(b, s, h * d) if self.fused_qkv else o)


def _check_kernel_axes(kernel_axes, ranks: dict[str, int], fused_qkv: bool) -> dict:
  """kernel_axes -> {kernel name: tuple of axis names}; TypeError/ValueError naming it."""
  if kernel_axes is None:
    return {}
  if not isinstance(kernel_axes, Mapping):
    raise TypeError(f"kernel_axes must be None or a mapping from kernel name to axis names, "
                    f"got {type(kernel_axes).__name__}")
  out = {}
  for name, names in kernel_axes.items():
    if name not in ranks:
      raise ValueError(f"kernel_axes: unknown kernel {name!r}; with fused_qkv={fused_qkv} the "
                       f"kernels are {sorted(ranks)}")
    if isinstance(names, str) or not isinstance(names, Sequence):
      raise TypeError(f"kernel_axes[{name!r}] must be a tuple of axis names (str, None or a "
                      f"tuple of str), got {names!r}")
    names = tuple(tuple(n) if isinstance(n, list) else n for n in names)
    for n in names:
      if not (n is None or isinstance(n, str) or (
          isinstance(n, tuple) and all(isinstance(m, str) for m in n))):
        raise TypeError(f"kernel_axes[{name!r}] entries must be str, None or tuples of str, "
                        f"got {n!r}")
    if len(names) != ranks[name]:
      raise ValueError(f"kernel_axes[{name!r}] must name each of the kernel's {ranks[name]} "
                       f"axes, got {len(names)}: {names!r}")
    out[name] = names
  return out


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


def make_attention_fn(spec: STASpec, *, implementation=None, backend=None,
                      scale: float | None = None,
                      attention_precision: str | None = None) -> Callable[..., jnp.ndarray]:
  """An ``attention_fn`` for :class:`flax.nnx.MultiHeadAttention` that runs STA.

  ``nnx.MultiHeadAttention(..., attention_fn=make_attention_fn(spec))``: the returned function
  takes ``query: [batch, spec.seq_len, heads, head_dim]`` and ``key, value: [batch,
  spec.seq_len, kv_heads, head_dim]`` (self-attention in STA layout; ``num_kv_heads`` of
  MultiHeadAttention gives grouped-query attention) and returns ``[batch, spec.seq_len, heads,
  head_dim]``. It accepts every keyword argument MultiHeadAttention passes (those of
  :func:`flax.nnx.dot_product_attention`, and ``input_positions``).

  STA defines its own mask (the window, padded positions, the text slots). ``mask`` may say
  which text slots of each sample are valid, in one of two forms:

  - an integer array ``[batch]`` of text lengths (``mha(x, mask=text_lengths)``;
    MultiHeadAttention passes a mask through unchanged when not decoding): the op's
    ``text_lengths``;
  - a key-padding mask ``[batch or 1, heads or 1, q_len or 1, kv_len]`` (bool, or numbers where
    nonzero means attend, as :func:`flax.nnx.make_attention_mask` builds, e.g.
    ``make_attention_mask(valid, valid, dtype=bool)`` for a ``[batch, seq_len]`` validity).
    Each sample's text lengths are read from it: the number of text slots it attends. It must
    be one STA can express: in every sample, every valid query row attends exactly the real
    video tokens and the first ``n`` text slots (``n`` per sample, the same for every head),
    and the rows of padded queries (padded latent positions, text slots beyond ``n``) are that
    row or all False (they output zeros). Padded latent positions (the padding of partial
    tiles, which holds no token) may be True or False. Anything else raises ValueError. Under
    ``jit`` a traced mask cannot be checked: its lengths are counted as above.

  A ``bias``, ``is_causal=True``, active dropout (``dropout_rate > 0`` and not
  ``deterministic``) and ``sow_weights`` (``module``) raise ValueError. ``dtype`` casts q, k, v
  before the op (None: their promoted dtype; float32, bfloat16, float16, or float64, computed
  in float32 as the op does); ``precision`` and ``promote_dtype`` are not used
  (the backends pick their own); ``input_positions`` is not used either: token positions are
  the spec's tile order, and a rotary embedding belongs in the projections
  (:class:`SlidingTileAttention`'s ``rotary``). ``implementation`` (alias ``backend``, as in
  :class:`SlidingTileAttention`), ``scale`` and ``attention_precision`` (the op's
  ``precision``, e.g. "qk_int8" for inference; Flax's own ``precision`` keyword is lax's matmul
  precision, unrelated) are checked here, not at the first call.
  """
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  implementation = check_implementation(implementation, backend)
  scale = checks.check_scale(scale)
  attention_precision = check_precision(attention_precision)

  def attention_fn(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                   dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                   precision=None, module=None, promote_dtype=None, is_causal=False,
                   input_positions=None):
    # Dropout's rng and broadcasting only matter with dropout, which is refused below.
    del broadcast_dropout, dropout_rng, precision, promote_dtype, input_positions
    if bias is not None:
      raise ValueError("STA attention_fn: bias must be None; the STA spec defines the mask "
                       "(window, padded tokens, text slots)")
    if is_causal:
      raise ValueError("STA attention_fn: is_causal=True is not supported (a causal time "
                       "axis is the spec's causal_axes)")
    if dropout_rate > 0.0 and not deterministic:
      raise ValueError("STA attention_fn: attention dropout is not supported (set dropout_rate=0)")
    if module is not None:
      raise ValueError("STA attention_fn: sow_weights is not supported (no weights are formed)")
    for name, x in (("query", query), ("key", key), ("value", value)):
      checks.check_array(name, x)
      if x.ndim != 4:
        raise ValueError(f"STA attention_fn: {name} must be [batch, seq_len, heads, head_dim], "
                         f"got shape {x.shape}")
    # float64 is taken as the op takes float64 q, k, v: computed in float32.
    _check_dtype("dtype", dtype, SUPPORTED_DTYPES + (jnp.float64,), allow_none=True)
    text_lengths = None
    if mask is not None:
      checks.check_array("mask", mask)
      if mask.ndim == 1 and jnp.issubdtype(mask.dtype, jnp.integer):
        text_lengths = mask
      elif mask.ndim == 4:
        text_lengths = _text_lengths_from_mask(mask, spec, query.shape[0], query.shape[2])
      else:
        raise ValueError(
            f"STA attention_fn: mask must be None, an integer array [batch] of text lengths, or "
            f"a key-padding mask [batch, 1 or heads, q_len, kv_len]; got shape {mask.shape} "
            f"and dtype {mask.dtype}")
    if dtype is not None:
      query, key, value = (x.astype(dtype) for x in (query, key, value))
    else:
      dt = jnp.result_type(query, key, value)
      query, key, value = (x.astype(dt) for x in (query, key, value))
    return sliding_tile_attention(query, key, value, spec, text_lengths=text_lengths,
                                  scale=scale, implementation=implementation,
                                  precision=attention_precision)

  return attention_fn


def _text_lengths_from_mask(mask, spec: STASpec, batch: int, heads: int):
  """int32 [batch] text lengths read from a key-padding mask (None when the spec has no text
  slots); ValueError for a mask the spec cannot express (checked when the mask is concrete)."""
  s = spec.seq_len
  if (mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, heads)
      or mask.shape[2] not in (1, s) or mask.shape[3] != s):
    raise ValueError(
        f"STA attention_fn: mask must be [batch={batch} or 1, heads={heads} or 1, "
        f"q_len={s} or 1, kv_len={s}] (a key-padding mask over the spec's sequence), got shape "
        f"{mask.shape}")
  keep = mask if mask.dtype == jnp.bool_ else mask != 0
  t0, n = spec.text_offset, spec.text_max_len
  # Each sample's valid keys are those some query attends: rows of padded queries are either
  # that row or all False.
  attended = jnp.any(keep, axis=(1, 2))                                   # [batch or 1, seq]
  lengths = jnp.broadcast_to(jnp.sum(attended[:, t0:t0 + n], axis=-1, dtype=jnp.int32),
                             (batch,))
  try:
    keep, counted = np.asarray(keep), np.asarray(lengths)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return lengths if n else None                       # traced: not checkable, as documented
  # What STA attends in each sample: the real video tokens and the first `counted` text slots.
  pos = np.arange(s)
  video = np.zeros(s, bool)
  video[spec.video_offset:spec.video_offset + spec.padded_video_len] = True
  real = np.zeros(s, bool)
  real[video] = video_token_valid(spec)
  slot = np.where((pos >= t0) & (pos < t0 + n), pos - t0, s)          # s: not a text slot
  want = real[None] | (slot[None] < counted[:keep.shape[0], None])       # [batch or 1, seq]
  care = ~(video & ~real)                       # padded latent positions may hold either value
  same = np.all((keep == want[:, None, None]) | ~care, axis=-1)          # [b, h, q]
  empty = np.all(~keep | ~care, axis=-1)
  query_valid = want if keep.shape[2] == s else np.ones((want.shape[0], 1), bool)
  ok = same | (~query_valid[:, None, :] & empty)
  if not ok.all():
    b, h, q = (int(i) for i in np.argwhere(~ok)[0])
    raise ValueError(
        f"STA attention_fn: the mask cannot be expressed by the spec: in each sample STA "
        f"attends the real video tokens and the first n text slots (n per sample), but the "
        f"mask's row for query {q} of sample {b} (head {h}) differs from that with n = "
        f"{int(counted[b])} (the text slots the sample attends). Pass a key-padding mask of "
        f"that form or the text lengths, an int array [batch]")
  return lengths if n else None
