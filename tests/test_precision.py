"""The op's ``precision=`` argument: checks, backend choice and the inference-only VJP of the
8-bit precisions, with a backend object whose quantized forward is the xla forward (the
routing, not the 8-bit kernels: tests/test_fp8.py has those)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta.ops import XlaBackend

from helpers import random_qkv

SPEC = jsta.STASpec((4, 8, 8), (2, 4, 4), (1, 3, 3), text_len=5, text_max_len=16,
                    text_position="first")
CALLS = []


@dataclasses.dataclass(frozen=True)
class FakeFp8Backend(XlaBackend):
  """The xla backend with a ``forward_quantized`` that records its calls and runs the plain
  forward."""

  name: str = "fake_fp8"

  def forward_quantized(self, q, k, v, sched, scale, key_valid=None, *, precision):
    CALLS.append((q.shape, q.dtype, precision))
    return self.forward(q, k, v, sched, scale, key_valid)


@pytest.mark.parametrize("precision,error", [
    (8, TypeError), ("fp16", ValueError), ("FP8", ValueError), (("fp8",), TypeError),
    ("int4", ValueError)])
def test_bad_precision_is_refused(precision, error):
  q, k, v = random_qkv(0, SPEC, 1, 2, 16, jnp.bfloat16)
  with pytest.raises(error, match="precision must be None or one of"):
    jsta.sliding_tile_attention(q, k, v, SPEC, precision=precision)


def test_8bit_needs_a_backend_with_an_8bit_forward():
  q, k, v = random_qkv(0, SPEC, 1, 2, 16, jnp.bfloat16)
  with pytest.raises(ValueError, match="precision='fp8' needs a backend with an 8-bit forward"):
    jsta.sliding_tile_attention(q, k, v, SPEC, precision="fp8", implementation="xla")
  if jax.default_backend() == "cpu":
    # "auto" tries only backends with an 8-bit forward: none runs on a CPU.
    with pytest.raises(ValueError, match="8-bit forward"):
      jsta.sliding_tile_attention(q, k, v, SPEC, precision="qk_int8")


def test_fp8_takes_bf16_or_fp16_only():
  q, k, v = random_qkv(0, SPEC, 1, 2, 16, jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float16"):
    jsta.sliding_tile_attention(q, k, v, SPEC, precision="fp8", implementation=FakeFp8Backend())


def test_fp8_runs_the_fp8_forward_and_keeps_the_op_around_it():
  """Layout passes, padding and the lse are the op's: the FP8 forward sees the text-last,
  padded arrays and the result matches the default precision's (the fake runs the same
  forward)."""
  q, k, v = random_qkv(1, SPEC, 2, 2, 16, jnp.bfloat16)
  lengths = jnp.array([3, 5])
  be = FakeFp8Backend()
  CALLS.clear()
  o8, lse8 = jax.jit(lambda q, k, v, n: jsta.sliding_tile_attention(
      q, k, v, SPEC, text_lengths=n, return_lse=True, precision="fp8", implementation=be))(
          q, k, v, lengths)
  assert len(CALLS) == 1 and CALLS[0][2] == "fp8"
  o, lse = jsta.sliding_tile_attention(q, k, v, SPEC, text_lengths=lengths, return_lse=True,
                                       implementation=be)
  assert o8.dtype == q.dtype and o8.shape == q.shape and lse8.shape == lse.shape
  np.testing.assert_array_equal(np.asarray(o8, np.float32), np.asarray(o, np.float32))
  np.testing.assert_array_equal(np.asarray(lse8), np.asarray(lse))
  alone = jsta.sliding_tile_attention(q, k, v, SPEC, text_lengths=lengths, precision="fp8",
                                      implementation=be)
  np.testing.assert_array_equal(np.asarray(alone, np.float32), np.asarray(o, np.float32))


def test_fp8_has_no_gradient():
  q, k, v = random_qkv(2, SPEC, 1, 2, 16, jnp.bfloat16)
  be = FakeFp8Backend()

  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, SPEC, precision="fp8", implementation=be)
    return jnp.sum(o.astype(jnp.float32))

  with pytest.raises(ValueError, match="precision='fp8'.* is for inference only"):
    jax.grad(loss)(q, k, v)
  # Inputs under stop_gradient: nothing to differentiate through the FP8 call.
  g = jax.grad(lambda q: loss(jax.lax.stop_gradient(q), k, v) + jnp.sum(q))(q)
  np.testing.assert_array_equal(np.asarray(g, np.float32), 1.0)


def test_nnx_layer_and_attention_fn_pass_the_precision():
  from flax import nnx
  be = FakeFp8Backend()
  layer = jsta.nnx.SlidingTileAttention(2, 32, SPEC, implementation=be, dtype=jnp.bfloat16,
                                        attention_precision="fp8", rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (1, SPEC.seq_len, 32), jnp.float32)
  CALLS.clear()
  y8 = layer(x)
  assert len(CALLS) == 1
  y = layer(x, attention_precision="default")
  assert len(CALLS) == 1
  np.testing.assert_array_equal(np.asarray(y8, np.float32), np.asarray(y, np.float32))
  with pytest.raises(ValueError, match="precision must be None or one of"):
    jsta.nnx.SlidingTileAttention(2, 32, SPEC, attention_precision="int4", rngs=nnx.Rngs(0))
  fn = jsta.nnx.make_attention_fn(SPEC, implementation=be, attention_precision="fp8")
  q, k, v = random_qkv(3, SPEC, 1, 2, 16, jnp.bfloat16)
  fn(q, k, v)
  assert len(CALLS) == 2
  with pytest.raises(TypeError, match="precision must be None or one of"):
    jsta.nnx.make_attention_fn(SPEC, attention_precision=1)


def test_sampler_runs_the_sta_steps_in_8_bits():
  from flax import nnx
  from models import sampling
  from models.video_dit import VideoDiT, video_dit_config
  cfg = video_dit_config("tiny", window=(1, 1, 1), dtype=jnp.bfloat16,
                         backend=FakeFp8Backend())
  model = VideoDiT(cfg, rngs=nnx.Rngs(0))
  noise = jax.random.normal(jax.random.key(1), (1, *cfg.latent_shape), jnp.float32)
  text = jax.random.normal(jax.random.key(2), (1, cfg.text_max_len, cfg.text_dim))
  CALLS.clear()
  out8 = sampling.euler_sample(model, noise, text, steps=2, full_attention_steps=1,
                               attention_precision="qk_int8")
  assert len(CALLS) == cfg.depth          # one traced STA step: every layer once
  assert {c[2] for c in CALLS} == {"qk_int8"}
  out = sampling.euler_sample(model, noise, text, steps=2, full_attention_steps=1)
  np.testing.assert_array_equal(np.asarray(out8), np.asarray(out))
  full = nnx.merge(*nnx.split(model))
  full.config = video_dit_config("tiny", attention="full")
  with pytest.raises(ValueError, match="needs a model whose attention is 'sta'"):
    sampling.euler_sample(full, noise, text, steps=1, attention_precision="fp8")
  with pytest.raises(TypeError, match="precision must be None or one of"):
    sampling.euler_sample(model, noise, text, steps=1, attention_precision=True)


@dataclasses.dataclass(frozen=True)
class GroupedFake(FakeFp8Backend):
  """Takes grouped k/v in its 8-bit forward (repeats them itself, to run the xla forward)."""

  name: str = "fake_grouped"
  quantized_takes_grouped_kv = True

  def forward_quantized(self, q, k, v, sched, scale, key_valid=None, *, precision):
    CALLS.append((k.shape, precision))
    rep = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, rep, axis=2) for x in (k, v))
    return self.forward(q, k, v, sched, scale, key_valid)


@dataclasses.dataclass(frozen=True)
class RepeatedFake(GroupedFake):
  """The same, without saying it takes grouped k/v: the op repeats them."""

  name: str = "fake_repeated"
  quantized_takes_grouped_kv = False


def test_8bit_forward_may_take_grouped_kv():
  """A backend that says so gets k and v with their own heads (no repeat in the op); others
  get them repeated to the query heads. Same result."""
  q, _, _ = random_qkv(4, SPEC, 1, 4, 16, jnp.bfloat16)
  _, k, v = random_qkv(5, SPEC, 1, 2, 16, jnp.bfloat16)
  CALLS.clear()
  grouped = jsta.sliding_tile_attention(q, k, v, SPEC, precision="qk_int8",
                                        implementation=GroupedFake())
  assert CALLS[-1][0][2] == 2
  plain = jsta.sliding_tile_attention(q, k, v, SPEC, precision="qk_int8",
                                      implementation=RepeatedFake())
  assert CALLS[-1][0][2] == 4
  np.testing.assert_array_equal(np.asarray(grouped, np.float32), np.asarray(plain, np.float32))
