"""pallas_triton backend compiled for the GPU (Triton) vs the dense float32 reference.

Medium shapes: latent (6, 16, 16) in tiles of (2, 8, 8) = 128 tokens, text 32 of 64 slots,
4 heads with per-head windows, batch 2. Skipped without a GPU (see conftest.py).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta import STASpec, xla_backend
from pallas_kernels import triton_sta as ts
from tests.conftest import PADDING_CASES, check_padding_never_leaks

pytestmark = pytest.mark.gpu

PER_HEAD = ((1, 1, 1), (3, 1, 1), (1, 3, 3), (3, 3, 3))
SPEC = STASpec((6, 16, 16), (2, 8, 8), PER_HEAD, text_len=32, text_max_len=64)
# Padded latent (5, 14, 16) -> (6, 16, 16): masked key blocks and empty query blocks.
PADDED = STASpec((5, 14, 16), (2, 8, 8), (1, 1, 1), text_len=20, text_max_len=64)
TOL = {jnp.bfloat16: 2e-2, jnp.float16: 5e-3, jnp.float32: 1e-3}


def _rel_l2(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def _inputs(spec, b, h, d, dtype, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, w = (jax.random.normal(kk, (b, spec.seq_len, h, d), jnp.float32) for kk in ks)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), w


# (id, spec, head_dim, dtype, block_q, block_kv); None blocks = the backend's defaults.
CASES = [
    ("d64_bf16_default", SPEC, 64, jnp.bfloat16, None, None),
    ("d128_bf16_default", SPEC, 128, jnp.bfloat16, None, None),
    ("d128_fp16_64x64", SPEC, 128, jnp.float16, 64, 64),
    ("d64_fp16_padded", PADDED, 64, jnp.float16, 128, 64),
    ("d64_f32_64x128", SPEC, 64, jnp.float32, 64, 128),
]


def test_runs_compiled_not_interpreted():
  assert jax.default_backend() == "gpu"
  assert ts._use_interpret(None) is False
  assert jsta.resolve_backend("pallas_triton") == "pallas_triton"


@pytest.mark.parametrize("name,spec,d,dtype,bq,bk", CASES, ids=[c[0] for c in CASES])
def test_forward_and_grads_match_reference(name, spec, d, dtype, bq, bk):
  b, h = 2, 4
  q, k, v, w = _inputs(spec, b, h, d, dtype)

  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, spec, backend="pallas_triton", block_q=bq,
                                    block_kv=bk)
    return jnp.sum(o.astype(jnp.float32) * w), o

  def ref_loss(q, k, v):
    o = jsta.reference_attention(q, k, v, spec)
    return jnp.sum(o * w), o

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))
  (_, o), gs = grad(loss)(q, k, v)
  (_, o_r), gs_r = grad(ref_loss)(*(x.astype(jnp.float32) for x in (q, k, v)))
  chex.assert_shape([o, *gs], q.shape)
  chex.assert_type([o, *gs], dtype)
  chex.assert_tree_all_finite((o, gs))
  tol = TOL[dtype]
  for label, x, ref in zip(("o", "dq", "dk", "dv"), (o, *gs), (o_r, *gs_r)):
    err = _rel_l2(x, ref)
    assert err < tol, f"{name}: {label} relative L2 error {err:.2e} >= {tol}"
  if spec.is_padded or spec.text_len < spec.text_max_len:
    invalid = ~jsta.token_valid(spec)
    invalid = np.concatenate([invalid, np.ones(spec.seq_len - invalid.size, bool)])
    for x in (o, *gs):
      np.testing.assert_array_equal(np.asarray(x, np.float32)[:, invalid], 0.0)


def test_matches_xla_backend_on_direct_kernels():
  # Kernel-level: same schedule through sta_forward and the XLA backend (o and lse).
  spec, h, d = SPEC, 4, 128
  sched = jsta.block_schedule(spec, h, 128, 64)
  q, k, v, _ = _inputs(spec, 1, h, d, jnp.bfloat16, seed=1)
  pad = ((0, 0), (0, sched.seq_len - spec.seq_len), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  o, lse = jax.jit(lambda q, k, v: ts.sta_forward(q, k, v, sched, d ** -0.5))(q, k, v)
  o_x, lse_x = jax.jit(lambda q, k, v: xla_backend.forward(q, k, v, sched, d ** -0.5))(q, k, v)
  valid = sched.query_valid
  assert _rel_l2(np.asarray(o, np.float32)[:, valid], np.asarray(o_x, np.float32)[:, valid]) < 2e-2
  np.testing.assert_allclose(np.asarray(lse)[:, :, valid], np.asarray(lse_x)[:, :, valid],
                             rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("garbage", [10.0, "nan"], ids=["random", "nan"])
@pytest.mark.parametrize("case", PADDING_CASES, ids=[c[0] for c in PADDING_CASES])
def test_padding_never_leaks(case, garbage):
  _, spec, heads, head_dim, dtype, bq, bk = case
  check_padding_never_leaks(spec, 1, heads, head_dim, dtype, backend="pallas_triton",
                            scale=0.4 if head_dim == 64 else 0.3, logit_std=8.0,
                            garbage=garbage, block_q=bq, block_kv=bk)
