"""A small video diffusion transformer (DiT) in Flax NNX with pluggable joint attention.

Layout of one forward pass (``VideoDiT.__call__``):

  latent [batch, T, H, W, C]
    -> 3D patch embedding                          [batch, T'*H'*W', hidden]  (T' = T / pt, ...)
    -> jsta.tile_order (ONCE)                      [batch, padded_video_len, hidden]
    -> concat text tokens (text_dim -> hidden)     [batch, seq_len, hidden]   (seq_len = spec.seq_len)
    -> depth x single-stream block (HunyuanVideo style: one joint self-attention over video and
       text with per-head RMS QK-norm and 3D rotary embedding on video q/k, a parallel MLP,
       AdaLN-Zero modulation from the timestep + pooled-text vector)
    -> final AdaLN layer on the video tokens       [batch, padded_video_len, patch_dim]
    -> jsta.untile_order (ONCE) and unpatchify     [batch, T, H, W, C] float32

Rotary tables are built directly in tile order, so no layer ever permutes tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jsta
from models import attention as attn_lib
from models import rope as rope_lib

Window = tuple[int, int, int]
_CONFIGURED = object()  # "use the config's own window" (None already means the whole volume)


def _to_tuple(x):
  """Lists (e.g. from JSON) -> nested tuples."""
  if isinstance(x, (list, tuple)):
    return tuple(_to_tuple(v) for v in x)
  return x


def _is_window(w) -> bool:
  return isinstance(w, tuple) and len(w) > 0 and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in w)


def _all_true(mask) -> bool:
  """True iff ``mask`` is concrete (not traced) and all True."""
  if isinstance(mask, jax.core.Tracer):
    return False
  return bool(np.asarray(mask).all())


def _dtype_name(value, name: str) -> str:
  try:
    dt = jnp.dtype(value)
  except TypeError:
    raise ValueError(f"{name} must be a floating dtype (float32, bfloat16, float16), "
                     f"got {value!r}") from None
  if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dt}")
  return dt.name


@dataclasses.dataclass(frozen=True)
class VideoDiTConfig:
  """Static description of a :class:`VideoDiT`. Frozen and hashable.

  Attributes:
    latent_shape: (T, H, W, C) of the latent video.
    patch: (pt, ph, pw) patch size; must divide (T, H, W). Tokens form a (T/pt, H/ph, W/pw) grid.
    hidden, heads: model width and attention heads (head_dim = hidden / heads, even).
    depth: number of transformer blocks.
    mlp_ratio: MLP hidden width / hidden.
    text_dim, text_max_len: text embedding width and number of text slots.
    text_position: "last" (text slots after the video tokens, HunyuanVideo) or "first"
      (before them, SD3/FLUX-style); the attention rules are the same.
    attention: "full", "sta" or "reference" (see :mod:`models.attention`).
    tile: STA tile (in tokens of the grid). Grid axes that are not tile multiples are padded.
    window: STA window in tiles. None: the whole volume (``jsta.full_window``). One window
      (k_t, k_h, k_w) for every layer, or a tuple with one entry per layer, each a window or a
      tuple of per-head windows.
    backend: jsta backend for "sta" ("auto", "xla", "pallas_triton", "pallas_mosaic").
    dtype: compute dtype; param_dtype: parameter dtype (float32 params + bf16 compute is the
      usual mixed-precision setting).
    rope_axes_dim: head_dim split over (t, h, w) for rotary embedding; None: HunyuanVideo-like.
    rope_theta: rotary base. freq_dim: sinusoidal timestep embedding width.
  """

  latent_shape: tuple[int, int, int, int] = (4, 8, 8, 4)
  patch: tuple[int, int, int] = (1, 2, 2)
  hidden: int = 64
  heads: int = 4
  depth: int = 2
  mlp_ratio: float = 4.0
  text_dim: int = 32
  text_max_len: int = 8
  text_position: str = "last"
  attention: str = "sta"
  tile: tuple[int, int, int] = (2, 2, 2)
  window: Any = None
  backend: str = "auto"
  dtype: str = "float32"
  param_dtype: str = "float32"
  rope_axes_dim: tuple[int, int, int] | None = None
  rope_theta: float = 256.0
  freq_dim: int = 256

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    for name, rank in (("latent_shape", 4), ("patch", 3), ("tile", 3)):
      v = _to_tuple(getattr(self, name))
      if not _is_window(v) or len(v) != rank or any(x <= 0 for x in v):
        raise ValueError(f"{name} must be {rank} positive ints, got {getattr(self, name)!r}")
      set_(name, tuple(int(x) for x in v))
    for t, p, axis in zip(self.latent_shape[:3], self.patch, "THW"):
      if t % p:
        raise ValueError(f"patch {self.patch} must divide latent {axis} ({t}) in latent_shape "
                         f"{self.latent_shape}")
    for name in ("hidden", "heads", "depth", "text_dim", "text_max_len", "freq_dim"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    if self.hidden % self.heads or (self.hidden // self.heads) % 2:
      raise ValueError(f"hidden ({self.hidden}) must be heads ({self.heads}) x an even head_dim")
    if self.freq_dim % 2:
      raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
    if not self.mlp_ratio > 0:
      raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
    if self.text_position not in ("last", "first"):
      raise ValueError(f"text_position must be 'last' or 'first', got {self.text_position!r}")
    if self.attention not in attn_lib.ATTENTION_KINDS:
      raise ValueError(f"attention must be one of {attn_lib.ATTENTION_KINDS}, got "
                       f"{self.attention!r}")
    set_("dtype", _dtype_name(self.dtype, "dtype"))
    set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
    if self.rope_axes_dim is None:
      set_("rope_axes_dim", rope_lib.default_axes_dim(self.head_dim))
    else:
      r = _to_tuple(self.rope_axes_dim)
      if (not _is_window(r) or len(r) != 3 or any(x <= 0 or x % 2 for x in r)
          or sum(r) != self.head_dim):
        raise ValueError(f"rope_axes_dim must be 3 positive even ints summing to head_dim "
                         f"({self.head_dim}), got {self.rope_axes_dim!r}")
      set_("rope_axes_dim", tuple(int(x) for x in r))
    set_("window", _to_tuple(self.window))
    self.layer_windows(self.window)  # validates

  # ---- derived ---------------------------------------------------------------------------------
  @property
  def grid(self) -> tuple[int, int, int]:
    """Token grid (T/pt, H/ph, W/pw)."""
    return tuple(s // p for s, p in zip(self.latent_shape[:3], self.patch))

  @property
  def channels(self) -> int:
    return self.latent_shape[3]

  @property
  def head_dim(self) -> int:
    return self.hidden // self.heads

  @property
  def patch_dim(self) -> int:
    return math.prod(self.patch) * self.channels

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden * self.mlp_ratio)

  def layer_windows(self, window=_CONFIGURED) -> tuple:
    """Per-layer windows (each a window or a tuple of per-head windows), validated.

    Args:
      window: the same forms as the ``window`` attribute (None: the whole volume for every
        layer); default: the configured ``window``.
    Returns:
      a tuple of ``depth`` entries.
    """
    window = _to_tuple(self.window if window is _CONFIGURED else window)
    if window is None:
      window = jsta.full_window(self.grid, self.tile)
    if _is_window(window):
      per_layer = (window,) * self.depth
    elif isinstance(window, tuple) and len(window) == self.depth:
      per_layer = window
    else:
      raise ValueError(
          f"window must be None, one window (k_t, k_h, k_w) in tiles, or a tuple of {self.depth} "
          f"per-layer entries (a window or per-head windows), got {window!r}")
    for i, w in enumerate(per_layer):
      if not _is_window(w) and not (isinstance(w, tuple) and len(w) == self.heads
                                    and all(_is_window(h) for h in w)):
        raise ValueError(f"window[{i}] must be a window (k_t, k_h, k_w) or {self.heads} per-head "
                         f"windows, got {w!r}")
      jsta.STASpec(self.grid, self.tile, w)  # odd, positive, rank 3
    return per_layer

  def spec(self, window, text_len: int | None = None) -> jsta.STASpec:
    """The STA layout of one layer: grid, tile, ``window``, text slots (text_len default all)."""
    text_len = self.text_max_len if text_len is None else text_len
    return jsta.STASpec(self.grid, self.tile, window, text_len=text_len,
                        text_max_len=self.text_max_len, text_position=self.text_position)

  def base_spec(self, text_len: int | None = None) -> jsta.STASpec:
    """A layout with the whole-volume window (used for tiling and rotary tables)."""
    return self.spec(jsta.full_window(self.grid, self.tile), text_len)

  def with_strategy(self, strategy) -> "VideoDiTConfig":
    """This config with the per-(layer, head) windows of a ``jsta.strategy.WindowStrategy``
    (e.g. from ``jsta.calibrate``); raises ValueError if its layers, heads, token grid or tile
    do not match this model."""
    strategy.validate(self.depth, self.heads, self.base_spec())
    return dataclasses.replace(self, window=strategy.windows)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_json(cls, d: dict) -> "VideoDiTConfig":
    return cls(**{k: _to_tuple(v) for k, v in d.items()})


def video_dit_config(name: str, **overrides) -> VideoDiTConfig:
  """Presets.

  "tiny": CPU tests (seconds): latent (4, 8, 8, 4), patch (1, 2, 2) -> 4x4x4 tokens, hidden 64,
    4 heads, depth 2, tile (2, 2, 2), 8 text slots.
  "small": trainable on one GPU in minutes: latent (8, 32, 32, 4) -> 8x16x16 = 2048 tokens,
    hidden 384, 6 heads, depth 6, 16 text slots, tile (2, 4, 8) = 64 tokens (a multiple of 64,
    the block size the GPU kernels want) -> 4x4x2 tiles, window (3, 3, 1) = 71.9% sparse.
  "hunyuan-shape": HunyuanVideo 720p geometry: hidden 3072 = 24 heads x 128, latent
    (30, 96, 160, 16), patch (1, 2, 2) -> 30x48x80 = 115,200 tokens, tile (6, 8, 8), 256 text
    slots, depth 2 (override ``depth=``), bf16 compute and params, window (3, 3, 3).
  "wan14b-720p-shape": Wan 2.1 14B 720p geometry: hidden 5120 = 40 heads x 128, latent
    (21, 90, 160, 16), patch (1, 2, 2) -> 21x45x80 = 75,600 tokens, tile (3, 8, 8) (the H axis
    ends in partial tiles), window (5, 3, 3), 256 text slots, depth 2, bf16.
  Keyword overrides replace fields (e.g. ``depth=4, attention="full"``).
  """
  presets = {
      "tiny": dict(latent_shape=(4, 8, 8, 4), patch=(1, 2, 2), hidden=64, heads=4, depth=2,
                   text_dim=32, text_max_len=8, tile=(2, 2, 2), window=None),
      "small": dict(latent_shape=(8, 32, 32, 4), patch=(1, 2, 2), hidden=384, heads=6, depth=6,
                    text_dim=64, text_max_len=16, tile=(2, 4, 8), window=(3, 3, 1)),
      "hunyuan-shape": dict(latent_shape=(30, 96, 160, 16), patch=(1, 2, 2), hidden=3072,
                            heads=24, depth=2, text_dim=4096, text_max_len=256, tile=(6, 8, 8),
                            window=(3, 3, 3), dtype="bfloat16", param_dtype="bfloat16"),
      "wan14b-720p-shape": dict(latent_shape=(21, 90, 160, 16), patch=(1, 2, 2), hidden=5120,
                                heads=40, depth=2, text_dim=4096, text_max_len=256,
                                tile=(3, 8, 8), window=(5, 3, 3), dtype="bfloat16",
                                param_dtype="bfloat16"),
  }
  if name not in presets:
    raise ValueError(f"name must be one of {sorted(presets)}, got {name!r}")
  return VideoDiTConfig(**(presets[name] | overrides))


# ---- modules -------------------------------------------------------------------------------------
def timestep_embedding(t: jnp.ndarray, dim: int, max_period: float = 10000.0) -> jnp.ndarray:
  """Sinusoidal embedding. t: [batch] (flow time in [0, 1], scaled by 1000). Returns [batch, dim]
  float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (t.astype(jnp.float32) * 1000.0)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], -1)


class Mlp2(nnx.Module):
  """Linear -> SiLU -> Linear."""

  def __init__(self, din: int, dhidden: int, dout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(din, dhidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.fc2 = nnx.Linear(dhidden, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.silu(self.fc1(x)))


def _modulate(x, shift, scale):
  """x: [batch, seq, hidden]; shift, scale: [batch, hidden]."""
  return x * (1 + scale[:, None]) + shift[:, None]


class SingleStreamBlock(nnx.Module):
  """HunyuanVideo/Flux single-stream block: joint attention and MLP in parallel, AdaLN-Zero.

  x' = x + gate * linear2([attention(q, k, v), gelu(mlp_in)]), with
  [q, k, v, mlp_in] = linear1(norm(x) * (1 + scale) + shift) and (shift, scale, gate) from the
  conditioning vector; the modulation is zero-initialised so the block starts as the identity.
  """

  def __init__(self, cfg: VideoDiTConfig, *, rngs: nnx.Rngs):
    h, dt, pdt = cfg.hidden, cfg.dtype, cfg.param_dtype
    self.heads, self.head_dim, self.hidden = cfg.heads, cfg.head_dim, h
    self.norm = nnx.LayerNorm(h, epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32,
                              rngs=rngs)
    self.modulation = nnx.Linear(h, 3 * h, dtype=dt, param_dtype=pdt, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros,
                                 bias_init=nnx.initializers.zeros)
    self.linear1 = nnx.Linear(h, 3 * h + cfg.mlp_hidden, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.q_norm = nnx.RMSNorm(cfg.head_dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=pdt,
                              rngs=rngs)
    self.k_norm = nnx.RMSNorm(cfg.head_dim, epsilon=1e-6, dtype=jnp.float32, param_dtype=pdt,
                              rngs=rngs)
    self.linear2 = nnx.Linear(h + cfg.mlp_hidden, h, dtype=dt, param_dtype=pdt, rngs=rngs)

  def __call__(self, x, vec, cos, sin, attend):
    """x: [batch, seq, hidden]; vec: [batch, hidden]; cos, sin: [seq, head_dim // 2] (identity
    rows for text tokens);
    attend: (q, k, v) -> o, all [batch, seq, heads, head_dim]. Returns [batch, seq, hidden]."""
    dt = x.dtype
    shift, scale, gate = jnp.split(self.modulation(nnx.silu(vec)), 3, axis=-1)
    xm = _modulate(self.norm(x), shift, scale).astype(dt)
    y = self.linear1(xm)
    qkv, mlp = y[..., :3 * self.hidden], y[..., 3 * self.hidden:]
    q, k, v = einops.rearrange(qkv, "b s (three n d) -> three b s n d", three=3, n=self.heads)
    q, k = self.q_norm(q).astype(dt), self.k_norm(k).astype(dt)
    # The tables cover the whole sequence (text rows are the identity rotation), so no slice
    # splits the sequence: under sequence parallelism each device rotates its own shard.
    q, k = rope_lib.apply_rope(q, cos, sin), rope_lib.apply_rope(k, cos, sin)
    o = attend(q, k, v.astype(dt)).astype(dt)
    o = einops.rearrange(o, "b s n d -> b s (n d)")
    out = self.linear2(jnp.concatenate([o, nnx.gelu(mlp, approximate=True)], axis=-1))
    return x + (gate[:, None] * out).astype(dt)


class FinalLayer(nnx.Module):
  """AdaLN (shift, scale) then a zero-initialised projection to patch_dim (DiT)."""

  def __init__(self, cfg: VideoDiTConfig, *, rngs: nnx.Rngs):
    h, dt, pdt = cfg.hidden, cfg.dtype, cfg.param_dtype
    self.norm = nnx.LayerNorm(h, epsilon=1e-6, use_bias=False, use_scale=False, dtype=jnp.float32,
                              rngs=rngs)
    self.modulation = nnx.Linear(h, 2 * h, dtype=dt, param_dtype=pdt, rngs=rngs,
                                 kernel_init=nnx.initializers.zeros,
                                 bias_init=nnx.initializers.zeros)
    self.proj = nnx.Linear(h, cfg.patch_dim, dtype=dt, param_dtype=pdt, rngs=rngs,
                           kernel_init=nnx.initializers.zeros, bias_init=nnx.initializers.zeros)

  def __call__(self, x, vec):
    """x: [batch, tokens, hidden]; vec: [batch, hidden] -> [batch, tokens, patch_dim]."""
    shift, scale = jnp.split(self.modulation(nnx.silu(vec)), 2, axis=-1)
    return self.proj(_modulate(self.norm(x), shift, scale).astype(x.dtype))


class VideoDiT(nnx.Module):
  """Video DiT predicting the flow-matching velocity of a latent video.

  ``VideoDiT(config, rngs=nnx.Rngs(0))``; see the module docstring for the data flow.
  """

  def __init__(self, config: VideoDiTConfig, *, rngs: nnx.Rngs):
    if not isinstance(config, VideoDiTConfig):
      raise ValueError(f"config must be a VideoDiTConfig, got {type(config).__name__}")
    cfg = config
    self.config = cfg
    h, dt, pdt = cfg.hidden, cfg.dtype, cfg.param_dtype
    self.patch_embed = nnx.Linear(cfg.patch_dim, h, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.text_embed = Mlp2(cfg.text_dim, h, h, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.time_embed = Mlp2(cfg.freq_dim, h, h, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.text_pool_embed = Mlp2(cfg.text_dim, h, h, dtype=dt, param_dtype=pdt, rngs=rngs)
    self.blocks = nnx.List([SingleStreamBlock(cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.final = FinalLayer(cfg, rngs=rngs)

  def __call__(self, x, t, text, text_mask=None, *, attention: str | None = None, window=None,
               text_len: int | None = None, parallel=None, attention_precision=None):
    """Predicted velocity.

    Args:
      x: [batch, T, H, W, C] noisy latent video.
      t: [batch] (or scalar) flow time in [0, 1] (1 = pure noise).
      text: [batch, text_len_in, text_dim] text embedding, text_len_in <= text_max_len (padded
        with zeros up to text_max_len).
      text_mask: [batch, text_len_in] bool, True for valid tokens (valid tokens first); None: all
        valid.
      attention: overrides ``config.attention`` for this call ("full", "sta", "reference"),
        e.g. full attention for the first denoising steps.
      window: overrides ``config.window`` for this call: one window or per-layer entries, as
        ``config.window`` (None keeps the config's; for the whole volume pass
        ``jsta.full_window(config.grid, config.tile)``).
      text_len: None, or a static cap: text slots at or beyond it are not attended in any
        sample. Below it every kind masks each sample exactly from ``text_mask`` (STA through
        run-time text lengths, so one executable serves every prompt length).
      parallel: a :class:`models.parallel.Parallelism`: activations sharded over
        (data_axis, seq_axis) of its mesh, attention head-parallel (Ulysses). None: no sharding.
      attention_precision: None, or jsta's ``precision`` for "sta" attention (e.g. "fp8":
        inference only, the Hopper kernels' FP8 forward; a gradient raises ValueError).
    Returns:
      [batch, T, H, W, C] float32.
    """
    cfg = self.config
    kind = cfg.attention if attention is None else attention
    if kind not in attn_lib.ATTENTION_KINDS:
      raise ValueError(f"attention must be one of {attn_lib.ATTENTION_KINDS}, got {kind!r}")
    attention_precision = jsta.ops.check_precision(attention_precision)
    if x.ndim != 5 or x.shape[1:] != cfg.latent_shape:
      raise ValueError(f"x must be [batch, *latent_shape] = [batch, {cfg.latent_shape}], "
                       f"got {x.shape}")
    b = x.shape[0]
    if text.ndim != 3 or text.shape[0] != b or text.shape[2] != cfg.text_dim or (
        text.shape[1] > cfg.text_max_len):
      raise ValueError(f"text must be [batch={b}, <= text_max_len={cfg.text_max_len}, "
                       f"text_dim={cfg.text_dim}], got {text.shape}")
    pad_text = cfg.text_max_len - text.shape[1]
    if text_mask is None:  # numpy, so the static text length is known even under jit
      text_mask = np.ones(text.shape[:2], bool)
    if text_mask.shape != text.shape[:2]:
      raise ValueError(f"text_mask must be [batch, text_len] = {text.shape[:2]}, "
                       f"got {text_mask.shape}")
    if pad_text:
      text = jnp.pad(text, ((0, 0), (0, pad_text), (0, 0)))
      text_mask = (jnp.pad(text_mask, ((0, 0), (0, pad_text))) if isinstance(text_mask, jax.Array)
                   else np.pad(np.asarray(text_mask), ((0, 0), (0, pad_text))))
    windows = cfg.layer_windows() if window is None else cfg.layer_windows(window)
    if text_len is not None:
      text_len = attn_lib.static_text_len(None, cfg.text_max_len, text_len)   # validates
    base = cfg.base_spec()
    dt = jnp.dtype(cfg.dtype)
    # The attention's text mask: the samples' masks, capped at text_len. A mask known (outside
    # jit) to be all True needs no masking at all.
    attn_text = (text_mask if text_len is None else
                 text_mask & (np.arange(cfg.text_max_len) < text_len))
    attn_mask = None if _all_true(attn_text) else jnp.asarray(attn_text, bool)
    text_mask = jnp.asarray(text_mask, bool)

    # Patchify (a stride=kernel Conv3d as one matmul) and put tokens in tile order once.
    pt, ph, pw = cfg.patch
    tokens = einops.rearrange(x.astype(dt), "b (t pt) (h ph) (w pw) c -> b (t h w) (pt ph pw c)",
                              pt=pt, ph=ph, pw=pw)
    video = jsta.tile_order(self.patch_embed(tokens), base)
    text_tokens = self.text_embed(text.astype(dt)) * text_mask[..., None].astype(dt)
    seq = jsta.join_video_text(video, text_tokens.astype(dt), base)   # [b, seq_len, hidden]
    if parallel is not None:
      seq = parallel.constrain(seq)

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
    m = text_mask[..., None].astype(jnp.float32)
    pooled = (text.astype(jnp.float32) * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    vec = (self.time_embed(timestep_embedding(t, cfg.freq_dim).astype(dt))
           + self.text_pool_embed(pooled.astype(dt)))

    cos, sin = rope_lib.rope_tables(cfg.base_spec(0), cfg.rope_axes_dim, cfg.rope_theta)
    n_text = cfg.text_max_len
    # Text slots get the identity rotation.
    cos = jsta.join_video_text(cos[None], np.ones((1, n_text, cos.shape[1]), np.float32), base)[0]
    sin = jsta.join_video_text(sin[None], np.zeros((1, n_text, sin.shape[1]), np.float32),
                               base)[0]
    for block, w in zip(self.blocks, windows):
      spec = cfg.spec(w)
      if parallel is None:
        attend = (lambda q, k, v, spec=spec: attn_lib.joint_attention(
            kind, q, k, v, spec, attn_mask, backend=cfg.backend, precision=attention_precision))
      else:
        attend = _parallel_attend(parallel, kind, spec, cfg, attn_mask, attention_precision)
      seq = block(seq, vec, cos, sin, attend)

    video, _ = jsta.split_video_text(seq, base)
    out = self.final(video, vec)  # [b, padded_video_len, patch_dim]
    out = jsta.untile_order(out, base)
    out = einops.rearrange(out, "b (t h w) (pt ph pw c) -> b (t pt) (h ph) (w pw) c",
                           t=cfg.grid[0], h=cfg.grid[1], w=cfg.grid[2], pt=pt, ph=ph, pw=pw)
    return out.astype(jnp.float32)


def _parallel_attend(parallel, kind: str, spec: jsta.STASpec, cfg: VideoDiTConfig, attn_mask,
                     precision=None):
  """Ulysses attention on ``parallel``'s mesh: each device attends ``heads / n`` heads over the
  whole sequence (per-head windows: each device gets the windows, so schedules, of its heads)."""
  from jsta.sharding import local_head_specs

  specs = local_head_specs(spec, cfg.heads, parallel.seq_shards)

  def local(shard, q, k, v, *mask):
    m = mask[0] if mask else None
    one = lambda q, k, v, sp: attn_lib.joint_attention(kind, q, k, v, sp, m, backend=cfg.backend,
                                                       precision=precision)
    if len(set(specs)) == 1:
      return one(q, k, v, specs[0])
    return jax.lax.switch(shard, [functools.partial(one, sp=sp) for sp in specs], q, k, v)

  extras = () if attn_mask is None else (attn_mask,)
  return lambda q, k, v: parallel.attention(local)(q, k, v, *extras)


def count_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
