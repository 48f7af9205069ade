"""Flow-matching Euler sampler for :class:`models.video_dit.VideoDiT`.

Convention (rectified flow): x_t = (1 - t) * x_0 + t * noise, the model predicts the velocity
v = noise - x_0, and sampling integrates dx/dt = v from t = 1 (noise) down to t = 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jsta

from models import attention as attn_lib


def timesteps(steps: int, shift: float = 1.0) -> np.ndarray:
  """[steps + 1] times from 1 to 0, warped by ``shift`` (t' = s t / (1 + (s - 1) t), SD3 and
  HunyuanVideo's schedule shift: s > 1 spends more steps at high noise)."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if not shift > 0:
    raise ValueError(f"shift must be positive, got {shift!r}")
  t = np.linspace(1.0, 0.0, steps + 1)
  return shift * t / (1 + (shift - 1) * t)


@functools.partial(jax.jit, static_argnames=("graphdef", "attention", "text_len", "precision"))
def _euler_step(graphdef, state, x, t, t_next, text, text_mask, attention, text_len,
                precision=None):
  model = nnx.merge(graphdef, state)
  v = model(x, jnp.full((x.shape[0],), t, jnp.float32), text, text_mask, attention=attention,
            text_len=text_len, attention_precision=precision)
  return x + (t_next - t) * v


def euler_sample(model, noise, text, text_mask=None, *, steps: int = 50, shift: float = 1.0,
                 full_attention_steps: int = 0, text_len: int | None = None,
                 attention_precision: str | None = None):
  """Samples latents with ``steps`` Euler steps.

  Args:
    model: a VideoDiT.
    noise: [batch, T, H, W, C] standard normal (the t = 1 sample).
    text, text_mask: [batch, text_len, text_dim], [batch, text_len] bool (None: all valid).
    steps: number of denoising steps (one model forward each).
    shift: timestep schedule shift (see :func:`timesteps`).
    full_attention_steps: the first N steps run with full attention (``attention="full"``
      override), the rest with the model's configured attention, as the STA paper keeps full
      attention for the first denoising steps.
    text_len: None, or a static cap on the attended text slots (see :class:`VideoDiT`); each
      sample's text is masked exactly from ``text_mask``, so one compiled step serves prompts
      of every length.
    attention_precision: None, or jsta's ``precision`` for the STA steps, e.g. "qk_int8" or
      "fp8" (an 8-bit forward on the Hopper kernels, bf16/fp16 compute; the model's attention
      must be "sta"; the full-attention steps are unchanged).
  Returns:
    [batch, T, H, W, C] float32 latents at t = 0.
  """
  if isinstance(full_attention_steps, bool) or not isinstance(
      full_attention_steps, (int, np.integer)) or not 0 <= full_attention_steps <= steps:
    raise ValueError(f"full_attention_steps must be an int in [0, steps={steps}], "
                     f"got {full_attention_steps!r}")
  attention_precision = jsta.ops.check_precision(attention_precision)
  ts = timesteps(steps, shift)
  cfg = model.config
  if attention_precision != "default" and cfg.attention != "sta":
    raise ValueError(f"attention_precision={attention_precision!r} needs a model whose "
                     f"attention is 'sta', got {cfg.attention!r}")
  if text_mask is None:
    text_mask = jnp.ones(text.shape[:2], bool)
  pad = cfg.text_max_len - text.shape[1]
  if pad > 0:  # pad to the model's slot count, so every prompt length has the same shapes
    text = jnp.pad(text, ((0, 0), (0, pad), (0, 0)))
    text_mask = jnp.pad(jnp.asarray(text_mask, bool), ((0, 0), (0, pad)))
  if text_len is not None:
    text_len = attn_lib.static_text_len(None, cfg.text_max_len, text_len)   # validates
  graphdef, state = nnx.split(model)
  x = jnp.asarray(noise, jnp.float32)
  text_mask = jnp.asarray(text_mask, bool)
  for i in range(steps):
    kind = "full" if i < full_attention_steps else None
    precision = attention_precision if kind is None else None
    x = _euler_step(graphdef, state, x, jnp.float32(ts[i]), jnp.float32(ts[i + 1]), text,
                    text_mask, kind, text_len if kind is None else None, precision)
  return x
