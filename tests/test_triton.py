"""The portable kernels (pallas_triton) beyond the shared correctness suite: lse and padded
rows of the kernels themselves, backward blocks that differ from the forward's, the masked-last
row order, launch heuristics and input checks, int32 offsets, and lowering to Triton for an
H100 without a GPU. The GPU tests check that the kernels run compiled and agree with the XLA
backend kernel by kernel.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta import STASpec, xla_backend
from pallas_kernels.triton import common, config
from pallas_kernels.triton.backward import sta_backward
from pallas_kernels.triton.forward import sta_forward

from helpers import rel_l2

BACKEND = "pallas_triton"


def _inputs(spec: STASpec, b: int, h: int, d: int, dtype, seed: int = 0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  q, k, v, w = (jax.random.normal(kk, (b, spec.seq_len, h, d), jnp.float32) for kk in ks)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  return q, k, v, w


def _op_and_grads(spec, q, k, v, w, **kw):
  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, spec, backend=BACKEND, **kw)
    return jnp.sum(o.astype(jnp.float32) * w), o

  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, grads


def test_padded_rows_are_zero_and_lse_inf():
  # Latent T=3 padded to 4: the second half of the last time-tiles is padding, so whole query
  # blocks of 16 are empty (count 0); text slots 16..47 are padding too.
  spec = STASpec((3, 8, 8), (2, 4, 4), (1, 1, 1), text_len=5, text_max_len=40)
  sched = jsta.block_schedule(spec, 2, 16, 16)
  assert (sched.kv_count == 0).any(), "the case must contain count-0 query blocks"
  q, k, v, w = _inputs(spec, 2, 2, 64, jnp.float32, seed=3)
  pad = ((0, 0), (0, sched.seq_len - spec.seq_len), (0, 0), (0, 0))
  qp, kp, vp = (jnp.pad(x, pad) for x in (q, k, v))
  o, lse = jax.jit(lambda q, k, v: sta_forward(q, k, v, sched, 0.125))(qp, kp, vp)
  valid = sched.query_valid
  chex.assert_tree_all_finite(o)
  np.testing.assert_array_equal(np.asarray(o)[:, ~valid], 0.0)
  assert np.isinf(np.asarray(lse)[:, :, ~valid]).all()
  assert np.isfinite(np.asarray(lse)[:, :, valid]).all()

  o_op, (dq, dk, dv) = _op_and_grads(spec, q, k, v, w, block_q=16, block_kv=16)
  tv = np.zeros(spec.seq_len, bool)
  tv[:] = sched.key_valid[:spec.seq_len]
  chex.assert_tree_all_finite((o_op, dq, dk, dv))
  for x in (o_op, dq, dk, dv):
    np.testing.assert_array_equal(np.asarray(x)[:, ~tv], 0.0)


def test_lse_matches_logsumexp():
  spec = STASpec((4, 8, 8), (2, 4, 4), (1, 1, 1), text_len=3, text_max_len=16)
  sched = jsta.block_schedule(spec, 2, 32, 16)
  q, k, v, _ = _inputs(spec, 1, 2, 32, jnp.float32, seed=5)
  scale = 0.3
  pad = ((0, 0), (0, sched.seq_len - spec.seq_len), (0, 0), (0, 0))
  qp, kp, vp = (jnp.pad(x, pad) for x in (q, k, v))
  _, lse = jax.jit(lambda q, k, v: sta_forward(q, k, v, sched, scale))(qp, kp, vp)
  lse = np.asarray(lse)[:, :, :spec.seq_len]
  mask = jsta.reference.reference_mask(spec, 2)
  logits = np.einsum("bqhd,bkhd->bhqk", np.asarray(q, np.float64), np.asarray(k, np.float64))
  logits = np.where(mask[None], logits * scale, -np.inf)
  with np.errstate(invalid="ignore"):
    ref = np.logaddexp.reduce(logits, axis=-1)
  valid = sched.query_valid[:spec.seq_len]
  np.testing.assert_allclose(lse[:, :, valid], ref[:, :, valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bwd_blocks,fwd_blocks", [((16, 16), (32, 32)), ((32, 32), (16, 16))])
def test_backward_blocks_differ_from_forward(bwd_blocks, fwd_blocks):
  # The backward schedule's text padding differs from the forward's (shorter or longer seq).
  spec = STASpec((4, 8, 8), (2, 4, 4), (1, 1, 1), text_len=5, text_max_len=12)
  h = 2
  fs = jsta.block_schedule(spec, h, *fwd_blocks)
  bs = jsta.block_schedule(spec, h, *bwd_blocks)
  assert fs.seq_len != bs.seq_len
  cfg = config.KernelConfig(bwd_block_q=bwd_blocks[0], bwd_block_kv=bwd_blocks[1])
  q, k, v, w = _inputs(spec, 2, h, 32, jnp.float32, seed=7)
  pad = ((0, 0), (0, fs.seq_len - spec.seq_len), (0, 0), (0, 0))
  qp, kp, vp, wp = (jnp.pad(x, pad) for x in (q, k, v, w))
  wp = wp * jnp.asarray(fs.query_valid, jnp.float32)[None, :, None, None]

  def run(q, k, v):
    o, lse = sta_forward(q, k, v, fs, 0.2)
    return sta_backward(q, k, v, o, lse, wp.astype(q.dtype), fs, 0.2, config=cfg)

  got = jax.jit(run)(qp, kp, vp)
  ref_loss = lambda q, k, v: jnp.sum(jsta.reference_attention(q, k, v, spec, scale=0.2) * w)
  want = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  for x, ref in zip(got, want):
    chex.assert_shape(x, qp.shape)
    assert rel_l2(x[:, :spec.seq_len], ref) < 1e-4
    np.testing.assert_array_equal(np.asarray(x)[:, spec.seq_len:], 0.0)


def test_partitioned_rows_put_masked_blocks_last():
  spec = STASpec((3, 6, 8), (2, 4, 4), ((1, 1, 1), (3, 3, 3)), text_len=9, text_max_len=40)
  sched = jsta.block_schedule(spec, 2, 16, 32)
  idx, plain = common.partitioned_rows(sched)
  for g in range(idx.shape[0]):
    for i in range(idx.shape[1]):
      c, p = sched.kv_count[g, i], plain[g, i]
      row = idx[g, i, :c]
      assert sorted(row.tolist()) == sched.kv_index[g, i, :c].tolist()
      assert not sched.kv_needs_mask[row[:p]].any()
      assert sched.kv_needs_mask[row[p:]].all()
  assert (plain < sched.kv_count).any(), "the case must contain masked key blocks"


def test_default_blocks_and_check():
  be = jsta.get_backend(BACKEND)
  assert be.name == "pallas_triton"
  big = STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  assert be.default_blocks(big, 128, jnp.bfloat16) == (128, 64)
  assert be.default_blocks(big, 64, jnp.bfloat16) == (128, 128)
  assert be.default_blocks(big, 256, jnp.bfloat16) == (64, 64)
  small = STASpec((4, 8, 12), (1, 4, 4), (1, 1, 1))
  assert be.default_blocks(small, 64, jnp.float32) == (16, 16)
  with pytest.raises(ValueError, match="tile_shape"):
    be.default_blocks(STASpec((10,), (10,), (1,)), 64, jnp.float32)
  with pytest.raises(ValueError, match="head_dim"):
    be.check(big, 96, jnp.bfloat16, 128, 64)
  with pytest.raises(ValueError, match="head_dim"):
    be.check(big, 8, jnp.bfloat16, 128, 64)
  with pytest.raises(ValueError, match="dtype"):
    be.check(big, 64, jnp.int32, 128, 64)
  with pytest.raises(ValueError, match="block_kv"):
    be.check(big, 64, jnp.bfloat16, 128, 48)
  with pytest.raises(ValueError, match="block_q"):
    be.check(STASpec((12,), (48,), (1,)), 64, jnp.float32, 32, 16)
  with pytest.raises(ValueError, match="bwd_block_q"):
    config.check_config(big, 64, jnp.float32, 128, 64, config.KernelConfig(bwd_block_q=24))
  # Through the op, head_dims up to 256 are zero-padded to a power of two; larger are refused.
  with pytest.raises(ValueError, match="head_dim"):
    q = jnp.zeros((1, 48, 1, 320))
    spec = STASpec((48,), (16,), (1,))
    jsta.sliding_tile_attention(q, q, q, spec, backend=BACKEND)


def test_int32_offset_overflow_is_refused():
  spec = STASpec((1024,), (16,), (1,))
  sched = jsta.block_schedule(spec, 16, 16, 16)
  x = jax.ShapeDtypeStruct((1024, spec.seq_len, 16, 128), jnp.bfloat16)   # 2**31 elements
  with pytest.raises(ValueError, match="int32"):
    jax.eval_shape(lambda q, k, v: sta_forward(q, k, v, sched, 0.1), x, x, x)


def test_config_heuristics():
  cfg = config.KernelConfig()
  assert cfg.resolved_fwd_warps(64) == 4 and cfg.resolved_fwd_warps(128) == 8
  assert cfg.resolved_bwd_blocks(128, 64) == (64, 64)
  assert cfg.resolved_bwd_blocks(32, 16) == (32, 16)
  assert cfg.resolved_bwd_warps(64, 64) == 4 and cfg.resolved_bwd_warps(128, 64) == 8
  assert config.KernelConfig(fwd_num_warps=2).resolved_fwd_warps(128) == 2


@pytest.mark.parametrize("d,dtype", [(64, jnp.bfloat16), (128, jnp.float16), (64, jnp.float32)])
def test_lowers_to_triton_for_h100(d, dtype):
  """AOT-lowers forward, dq and dk/dv for an abstract H100 (catches Triton lowering errors
  such as non-power-of-two tensors or unsupported primitives without a GPU)."""
  from jax.sharding import AbstractDevice, AbstractMesh

  spec = STASpec((6, 16, 16), (2, 8, 8), ((1, 1, 1), (3, 1, 1)), text_len=32, text_max_len=64)
  h = 2
  bq, bk = config.default_blocks(spec, d, dtype)
  sched = jsta.block_schedule(spec, h, bq, bk)
  x = jax.ShapeDtypeStruct((1, sched.seq_len, h, d), dtype)

  def fwd_bwd(q, k, v):
    o, lse = sta_forward(q, k, v, sched, d ** -0.5, interpret=False)
    return sta_backward(q, k, v, o, lse, o, sched, d ** -0.5, interpret=False)

  dev = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
  mesh = AbstractMesh((1,), ("x",), abstract_device=dev)
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = jax.jit(fwd_bwd).trace(x, x, x).lower(lowering_platforms=("cuda",))
  text = lowered.as_text()
  assert text.count("__gpu$xla.gpu.triton") == 3


@pytest.mark.gpu
def test_runs_compiled_not_interpreted():
  assert jax.default_backend() == "gpu"
  assert common.use_interpret(None) is False
  assert jsta.resolve_backend("pallas_triton") == "pallas_triton"


@pytest.mark.gpu
def test_kernels_match_xla_backend():
  """Kernel level, compiled: the same schedule through sta_forward and the XLA backend (o and
  lse on every valid row)."""
  spec = STASpec((6, 16, 16), (2, 8, 8), ((1, 1, 1), (3, 1, 1), (1, 3, 3), (3, 3, 3)),
                 text_len=32, text_max_len=64)
  h, d = 4, 128
  sched = jsta.block_schedule(spec, h, 128, 64)
  q, k, v, _ = _inputs(spec, 1, h, d, jnp.bfloat16, seed=1)
  pad = ((0, 0), (0, sched.seq_len - spec.seq_len), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  o, lse = jax.jit(lambda q, k, v: sta_forward(q, k, v, sched, d ** -0.5))(q, k, v)
  o_x, lse_x = jax.jit(lambda q, k, v: xla_backend.forward(q, k, v, sched, d ** -0.5))(q, k, v)
  valid = sched.query_valid
  assert rel_l2(np.asarray(o, np.float32)[:, valid], np.asarray(o_x, np.float32)[:, valid]) < 2e-2
  np.testing.assert_allclose(np.asarray(lse)[:, :, valid], np.asarray(lse_x)[:, :, valid],
                             rtol=1e-3, atol=1e-3)
