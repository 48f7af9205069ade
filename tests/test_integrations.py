"""docs/INTEGRATIONS.md: its code blocks run as written (in order, in one namespace), and the
MaxDiffusion glue routes Wan's self-attention to STA and its cross-attention to the kernel it
had, against a stand-in registry (tests/maxdiffusion_standin.py) and, where ``maxdiffusion`` is
importable, against MaxDiffusion's own registry."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
import maxdiffusion_standin

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "INTEGRATIONS.md"
HAVE_MAXDIFFUSION = importlib.util.find_spec("maxdiffusion") is not None


@pytest.fixture(scope="module")
def doc():
  """(the namespace docs/INTEGRATIONS.md's blocks leave, the attention_flax module they
  registered into): MaxDiffusion's (its registry restored afterwards) or, when maxdiffusion is
  not installed, the stand-in's under the same module names. Run once for the module."""
  text = DOC.read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert len(blocks) == 4 and text.count("```") == 2 * len(blocks)   # every block is run
  with pytest.MonkeyPatch.context() as mp:
    if HAVE_MAXDIFFUSION:
      from maxdiffusion.models import attention_flax
      mp.setattr(attention_flax, "KERNEL_REGISTRY", dict(attention_flax.KERNEL_REGISTRY))
    else:
      for name, module in maxdiffusion_standin.modules().items():
        mp.setitem(sys.modules, name, module)
      attention_flax = sys.modules["maxdiffusion.models.attention_flax"]
    scope: dict = {}
    exec(compile("\n".join(blocks), str(DOC), "exec"), scope)
    yield scope, attention_flax


def test_integration_recipes_run(doc):
  scope, registry = doc        # each recipe checked its own result with assert_allclose
  assert scope["y_once"].shape == scope["x"].shape
  assert scope["out"].shape == (2, scope["spec"].seq_len, scope["hidden"])
  wan = scope["wan_spec"]
  assert (wan.video_len, wan.tile_shape, wan.text_max_len) == (21 * 45 * 80, (3, 8, 8), 0)
  assert "jsta" in registry.KERNEL_REGISTRY


SMALL = jsta.STASpec((4, 6, 6), (2, 4, 4), (1, 3, 1))        # no text: Wan's self-attention
HEADS, DIM = 2, 8


def _rotary(x):
  """A position-dependent rotation of [b, heads, s, d] (any fixed map will do for the check)."""
  angle = jnp.arange(x.shape[2], dtype=x.dtype)[:, None] * 0.05
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([a * jnp.cos(angle) - b * jnp.sin(angle),
                          a * jnp.sin(angle) + b * jnp.cos(angle)], axis=-1)


def _context(attention_mask=None):
  # The keys MaxDiffusion's dispatcher puts into the context (the glue reads heads and scale).
  return {"heads": HEADS, "dim_head": DIM, "scale": DIM ** -0.5, "attention_mask": attention_mask,
          "dtype": jnp.float32, "mesh": None, "split_head_dim": False,
          "float32_qk_product": True, "use_memory_efficient_attention": False,
          "axis_names_q": None, "axis_names_kv": None, "flash_block_sizes": None,
          "mask_padding_tokens": True, "residual_checkpoint_name": None, "use_base2_exp": False,
          "use_experimental_scheduler": False, "ulysses_shards": -1,
          "ulysses_attention_chunks": 1, "dpa_layer": None, "is_causal": False}


def _small_kernel(doc):
  scope, registry = doc
  fallback = registry.KERNEL_REGISTRY["dot_product"]
  registry.register_kernel("jsta_small")(
      scope["sta_kernel"]({SMALL.video_len: SMALL}, fallback, implementation="xla"))
  return registry.KERNEL_REGISTRY["jsta_small"], fallback


def test_glue_runs_sta_on_self_attention_and_the_fallback_on_cross_attention(doc):
  kernel, fallback = _small_kernel(doc)
  keys = jax.random.split(jax.random.key(0), 3)
  n = SMALL.video_len
  x = jax.random.normal(keys[0], (2, n, HEADS * DIM))                 # row-major video tokens
  text = jax.random.normal(keys[1], (2, 12, HEADS * DIM))
  # Self-attention as Wan's reaches the kernel: [b, heads, s, d], after the rotary embedding.
  q4 = k4 = v4 = jnp.swapaxes(x.reshape(2, n, HEADS, DIM), 1, 2)
  q4, k4 = _rotary(q4), _rotary(k4)
  got = kernel(q4, k4, v4, _context())
  want = jsta.sliding_tile_attention_row_major(
      *(jnp.swapaxes(t, 1, 2) for t in (q4, k4, v4)), SMALL).reshape(2, n, HEADS * DIM)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  # The same call in the [b, s, heads * d] layout.
  flat = lambda t: jnp.swapaxes(t, 1, 2).reshape(2, n, HEADS * DIM)
  np.testing.assert_allclose(np.asarray(kernel(flat(q4), flat(k4), flat(v4), _context())),
                             np.asarray(want), atol=1e-6)
  # STA, not dense attention: a 1x3x1 window of 2x2x2 tiles skips some keys.
  dense = fallback(q4, k4, v4, _context())
  assert np.abs(np.asarray(dense) - np.asarray(want)).max() > 1e-3
  # Cross-attention (text keys), and any call with a key mask: the fallback, unchanged.
  np.testing.assert_array_equal(np.asarray(kernel(x, text, text, _context())),
                                np.asarray(fallback(x, text, text, _context())))
  keep = jnp.ones((2, n), bool).at[1, -5:].set(False)
  np.testing.assert_array_equal(np.asarray(kernel(x, x, x, _context(keep))),
                                np.asarray(fallback(x, x, x, _context(keep))))
  # Another resolution (no spec for its length): the fallback too.
  short = x[:, :50]
  np.testing.assert_array_equal(np.asarray(kernel(short, short, short, _context())),
                                np.asarray(fallback(short, short, short, _context())))


@pytest.mark.skipif(HAVE_MAXDIFFUSION, reason="the stand-in's Wan-shaped attention")
def test_glue_in_a_wan_shaped_block_of_the_stand_in(doc):
  # Both of a Wan block's attentions dispatch through one kernel name, as in MaxDiffusion.
  _small_kernel(doc)
  registry = doc[1]
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (1, SMALL.video_len, HEADS * DIM))
  text = jax.random.normal(keys[1], (1, 12, HEADS * DIM))
  got = registry.wan_attention(x, text, _rotary, "jsta_small", HEADS)
  q = k = v = x.reshape(1, -1, HEADS, DIM)
  q, k = (jnp.swapaxes(_rotary(jnp.swapaxes(t, 1, 2)), 1, 2) for t in (q, k))
  h = x + jsta.sliding_tile_attention_row_major(q, k, v, SMALL).reshape(x.shape)
  want = h + maxdiffusion_standin.dot_product_kernel(h, text, text, _context())
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


@pytest.mark.skipif(not HAVE_MAXDIFFUSION, reason="maxdiffusion is not installed")
def test_recipe_registers_in_maxdiffusion(doc):
  # MaxDiffusion's own registry: the recipe's kernel is found by name, and a cross-attention
  # call goes to MaxDiffusion's dot-product kernel.
  kernel, fallback = _small_kernel(doc)
  registry = doc[1]
  assert registry.KERNEL_REGISTRY["jsta"] is not None
  x = jax.random.normal(jax.random.key(2), (1, SMALL.video_len, HEADS * DIM))
  text = jax.random.normal(jax.random.key(3), (1, 12, HEADS * DIM))
  np.testing.assert_array_equal(np.asarray(kernel(x, text, text, _context())),
                                np.asarray(fallback(x, text, text, _context())))
  want = jsta.sliding_tile_attention_row_major(
      *(x.reshape(1, -1, HEADS, DIM),) * 3, SMALL).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(kernel(x, x, x, _context())), np.asarray(want),
                             atol=1e-6)
