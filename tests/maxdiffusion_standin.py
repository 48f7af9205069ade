"""A stand-in for the part of MaxDiffusion that docs/INTEGRATIONS.md plugs into, for machines
without ``maxdiffusion``: the attention-kernel registry of ``maxdiffusion/models/attention_flax.py``
with its call shape, and a Wan-shaped attention that dispatches through it.

The call shape (as MaxDiffusion reads at commit 7cfb880): ``register_kernel(name)`` is a
decorator storing ``kernel(query, key, value, context)`` in ``KERNEL_REGISTRY[name]``; an attention
module calls ``KERNEL_REGISTRY[attention_kernel](query, key, value, context)`` with ``context`` a
dict ("heads", "dim_head", "scale", "attention_mask", ...); every kernel returns ``[batch, seq,
heads * dim_head]``. In Wan's self-attention q, k, v arrive as ``[batch, heads, seq, dim_head]``
(after the rotary embedding), in its cross-attention as ``[batch, seq, heads * dim_head]``.

Imported as ``import maxdiffusion_standin`` (the tests directory is on sys.path under pytest);
:func:`modules` makes a fresh registry each time, to be put into ``sys.modules``.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp


def _heads_split(x, heads):
  """[b, h, s, d] or [b, s, h * d] -> [b, s, h, d]."""
  return jnp.swapaxes(x, 1, 2) if x.ndim == 4 else x.reshape(*x.shape[:2], heads, -1)


def dot_product_kernel(query, key, value, context):
  """Dense softmax attention with the registry's call shape (MaxDiffusion's "dot_product")."""
  q, k, v = (_heads_split(x, context["heads"]) for x in (query, key, value))
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * context["scale"]
  if context.get("attention_mask") is not None:                         # [batch, kv_len] keep
    scores = jnp.where(context["attention_mask"][:, None, None, :], scores, -1e9)
  o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
  return o.reshape(*o.shape[:2], -1)


def modules() -> dict[str, types.ModuleType]:
  """{"maxdiffusion": ..., "maxdiffusion.models": ..., "maxdiffusion.models.attention_flax": ...},
  fresh modules (an empty registry but for "dot_product")."""
  af = types.ModuleType("maxdiffusion.models.attention_flax")
  af.KERNEL_REGISTRY = {}

  def register_kernel(name: str):
    def decorator(func):
      af.KERNEL_REGISTRY[name] = func
      return func
    return decorator

  def apply_attention(query, key, value, *, attention_kernel, heads, dim_head,
                      attention_mask=None):
    """The registry dispatch, with a context of the keys the recipe reads."""
    context = {"heads": heads, "dim_head": dim_head, "scale": dim_head ** -0.5,
               "attention_mask": attention_mask, "dtype": query.dtype}
    return af.KERNEL_REGISTRY[attention_kernel](query, key, value, context)

  def wan_attention(x, text, rotary, attention_kernel, heads):
    """A Wan block's two attentions, without projections: self-attention on the row-major video
    tokens x [b, s, heads * d] (rotary on q and k, then [b, heads, s, d]) and cross-attention
    from the result to the text tokens [b, text_len, heads * d] (no rotary, 3D)."""
    d = x.shape[-1] // heads
    q = k = v = jnp.swapaxes(x.reshape(*x.shape[:2], heads, d), 1, 2)  # [b, heads, s, d]
    q, k = rotary(q), rotary(k)
    x = x + apply_attention(q, k, v, attention_kernel=attention_kernel, heads=heads, dim_head=d)
    return x + apply_attention(x, text, text, attention_kernel=attention_kernel, heads=heads,
                               dim_head=d)

  af.register_kernel = register_kernel
  af.apply_attention = apply_attention
  af.wan_attention = wan_attention
  register_kernel("dot_product")(dot_product_kernel)
  models = types.ModuleType("maxdiffusion.models")
  models.attention_flax = af
  root = types.ModuleType("maxdiffusion")
  root.models = models
  return {"maxdiffusion": root, "maxdiffusion.models": models,
          "maxdiffusion.models.attention_flax": af}
