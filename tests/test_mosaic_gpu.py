"""pallas_mosaic backend (Hopper kernels): forward and gradients vs the float32 reference.

GPU tests are marked ``gpu`` and ``hopper`` (skipped unless a compute capability 9.x GPU is
present). The CPU tests check argument validation and run the kernels' logic in GPU interpret
mode on a small shape.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from pallas_kernels import mosaic_sta
from tests.conftest import (PADDING_CASES, check_padding_never_leaks, check_valid_nan_propagates,
                            np_f32, random_qkv)

TOL = 2e-2


def _rel(a, b, rows=None) -> float:
  a, b = np_f32(a), np_f32(b)
  if rows is not None:
    a, b = a[:, rows], b[:, rows]
  assert np.isfinite(a).all(), "non-finite values"
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _valid_rows(spec: jsta.STASpec) -> np.ndarray:
  sched = jsta.block_schedule(spec.with_window(spec.head_windows(len(spec.window))[0])
                              if spec.is_per_head else spec, 1, 64, 64)
  return sched.query_valid[:spec.seq_len]


def _random_inputs(sched, batch, heads, head_dim, seed, n=4, dtype=jnp.bfloat16):
  """``n`` standard-normal arrays [batch, sched.seq_len, heads, head_dim] in ``dtype``
  (q, k, v and, for n = 4, do, which is zero on the schedule's invalid query rows)."""
  ks = jax.random.split(jax.random.key(seed), n)
  shape = (batch, sched.seq_len, heads, head_dim)
  xs = [jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in ks]
  if n == 4:
    xs[3] = xs[3] * jnp.asarray(sched.query_valid, dtype)[None, :, None, None]
  return xs


def _xla_reference(sched, scale, q, k, v, do=None):
  """float32 XLA backend: (o, lse), and the gradients (dq, dk, dv) too when ``do`` is given."""
  f32 = lambda x: x.astype(jnp.float32)
  o, lse = jsta.xla_backend.forward(f32(q), f32(k), f32(v), sched, scale)
  if do is None:
    return o, lse
  return o, lse, jsta.xla_backend.backward(f32(q), f32(k), f32(v), o, lse, f32(do), sched, scale)


def _interpreted(fn, *args, **kwargs):
  """``fn(*args, **kwargs)`` with kernels in GPU interpret mode: after an error the
  interpreter's global state must be reset before its next use."""
  try:
    return fn(*args, **kwargs)
  except Exception:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
    interpret_pallas_call.reset_gpu_interpret_mode_state()
    raise


def _check_fwd_bwd(spec, batch, heads, head_dim, dtype, seed=0, block_q=None, block_kv=None):
  q, k, v = random_qkv(seed, spec, batch, heads, head_dim, dtype)
  rows = _valid_rows(spec)
  ct = jax.random.normal(jax.random.key(seed + 100), q.shape, jnp.float32)
  ct = ct * jnp.asarray(rows, jnp.float32)[None, :, None, None]

  def sta(q, k, v):
    return jsta.sliding_tile_attention(q, k, v, spec, backend="pallas_mosaic", block_q=block_q,
                                       block_kv=block_kv)

  o, vjp = jax.vjp(jax.jit(sta), q, k, v)
  chex.assert_shape(o, q.shape)
  chex.assert_type(o, dtype)
  grads = vjp(ct.astype(dtype))

  f32 = lambda x: x.astype(jnp.float32)
  ref = lambda q, k, v: jsta.reference_attention(q, k, v, spec)
  ro, rvjp = jax.vjp(ref, f32(q), f32(k), f32(v))
  rgrads = rvjp(ct)
  assert _rel(o, ro, rows) < TOL
  for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
    chex.assert_type(g, dtype)
    err = _rel(g, rg)
    assert err < TOL, f"{name}: relative L2 error {err}"


GPU_CASES = [
    # (name, spec, batch, heads, head_dim, dtype, block_q, block_kv)
    ("bf16_d64_b2", jsta.STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3)), 2, 2, 64, jnp.bfloat16,
     None, None),
    ("fp16_d128", jsta.STASpec((6, 16, 16), (2, 8, 8), (3, 1, 3)), 1, 3, 128, jnp.float16,
     None, None),
    ("bf16_d128_text", jsta.STASpec((6, 16, 16), (2, 8, 8), (3, 3, 3), text_len=32,
                                    text_max_len=64), 1, 2, 128, jnp.bfloat16, None, None),
    ("bf16_d64_padded", jsta.STASpec((5, 14, 16), (2, 8, 8), (3, 1, 3), text_len=20,
                                     text_max_len=64), 1, 2, 64, jnp.bfloat16, None, None),
    ("fp16_d64_per_head", jsta.STASpec((6, 16, 16), (2, 8, 8),
                                       ((1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 1)),
                                       text_len=16, text_max_len=64),
     1, 4, 64, jnp.float16, None, None),
    ("bf16_d128_bkv64", jsta.STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3)), 1, 2, 128,
     jnp.bfloat16, 128, 64),
    ("bf16_d64_tile192_bq64", jsta.STASpec((6, 16, 16), (3, 8, 8), (1, 1, 1), text_len=32,
                                           text_max_len=64), 2, 2, 64, jnp.bfloat16, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_mosaic_matches_reference(case):
  _, spec, batch, heads, head_dim, dtype, bq, bk = case
  _check_fwd_bwd(spec, batch, heads, head_dim, dtype, block_q=bq, block_kv=bk)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("garbage", [10.0, "nan"], ids=["random", "nan"])
@pytest.mark.parametrize("case", PADDING_CASES, ids=[c[0] for c in PADDING_CASES])
def test_mosaic_padding_never_leaks(case, garbage):
  _, spec, heads, head_dim, dtype, bq, bk = case
  check_padding_never_leaks(spec, 1, heads, head_dim, dtype, backend="pallas_mosaic",
                            scale=0.4 if head_dim == 64 else 0.3, logit_std=8.0,
                            garbage=garbage, block_q=bq, block_kv=bk)


@pytest.mark.gpu
@pytest.mark.hopper
def test_mosaic_nan_in_a_valid_key_propagates_as_in_dense():
  spec = jsta.STASpec((5, 14, 16), (2, 8, 8), (3, 1, 3), text_len=20, text_max_len=64)
  check_valid_nan_propagates(spec, 2, 64, jnp.bfloat16, backend="pallas_mosaic")


def test_interpret_nan_in_a_valid_key_propagates_cpu():
  spec = jsta.STASpec((4, 40), (4, 32), (1, 1), text_len=10, text_max_len=40)
  jsta.register_backend("pallas_mosaic_interpret",
                        lambda: mosaic_sta.MosaicBackend(interpret=True))
  _interpreted(check_valid_nan_propagates, spec, 1, 64, jnp.bfloat16,
               backend="pallas_mosaic_interpret", block_q=64, block_kv=64)


@pytest.mark.parametrize("head_dim", [64, 128], ids=["split_d64", "fused_d128"])
def test_interpret_padding_never_leaks_cpu(head_dim):
  """The same class of case in GPU interpret mode, small: fp16, large logits, random values in
  padded latent positions and padded text slots, 64-row blocks; head_dim 64 takes the split
  backward, 128 the fused one."""
  spec = jsta.STASpec((4, 40), (4, 32), (1, 1), text_len=10, text_max_len=40)
  jsta.register_backend("pallas_mosaic_interpret",
                        lambda: mosaic_sta.MosaicBackend(interpret=True))
  _interpreted(check_padding_never_leaks, spec, 1, 1, head_dim, jnp.float16,
               backend="pallas_mosaic_interpret", scale=0.4, logit_std=8.0, block_q=64,
               block_kv=64)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("case", [GPU_CASES[2], GPU_CASES[6]], ids=["text_d128", "tile192_d64"])
def test_mosaic_split_backward_matches_reference(case):
  """backward_variant="split" (the dQ and dK/dV kernels; "auto" takes the fused backward
  where it applies) against the float32 reference."""
  _, spec, batch, heads, head_dim, dtype, bq, bk = case
  bq, bk = (bq, bk) if bq else mosaic_sta.default_blocks(spec, head_dim, dtype)
  sched = jsta.block_schedule(spec, heads, bq, bk)
  q, k, v, do = _random_inputs(sched, batch, heads, head_dim, seed=0, dtype=dtype)
  scale = head_dim ** -0.5
  cfg = mosaic_sta.MosaicConfig(block_q=sched.block_q, block_kv=sched.block_kv,
                                backward_variant="split")
  o, lse = mosaic_sta.forward(q, k, v, sched, scale, cfg)
  grads = mosaic_sta.backward(q, k, v, o, lse, do, sched, scale, cfg)
  *_, rgrads = _xla_reference(sched, scale, q, k, v, do)
  for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
    assert _rel(g, rg) < TOL, name


@pytest.mark.gpu
@pytest.mark.hopper
def test_auto_picks_mosaic_on_hopper():
  assert jsta.resolve_backend("auto") == "pallas_mosaic"


@pytest.mark.gpu
@pytest.mark.hopper
def test_forward_lse_and_empty_rows():
  # Padded latent: the last query blocks of the padded volume hold only padding; lse is +inf
  # on invalid rows and o is zero there.
  spec = jsta.STASpec((5, 8, 8), (2, 8, 8), (3, 1, 1))
  sched = jsta.block_schedule(spec, 2, 64, 64)   # the last query block is all padding
  assert (sched.kv_count[0] == 0).any()
  q, k, v = random_qkv(3, spec, 1, 2, 64, jnp.bfloat16)
  o, lse = mosaic_sta.BACKEND.forward(q, k, v, sched, 0.125)
  ro, rlse = jsta.xla_backend.forward(*(x.astype(jnp.float32) for x in (q, k, v)), sched, 0.125)
  valid = sched.query_valid
  assert _rel(o, ro, valid) < TOL
  lse, rlse = np.asarray(lse), np.asarray(rlse)
  assert np.isinf(lse[:, :, ~valid]).all()
  np.testing.assert_allclose(lse[:, :, valid], rlse[:, :, valid], atol=2e-2)
  assert (np_f32(o)[:, sched.kv_count[0].repeat(64) == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.hopper
def test_autotune_returns_a_config():
  spec = jsta.STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3))
  cands = [mosaic_sta.MosaicConfig(block_kv=128, max_concurrent_steps=2),
           mosaic_sta.MosaicConfig(block_kv=64, max_concurrent_steps=4),
           mosaic_sta.MosaicConfig(block_kv=128, max_concurrent_steps=4)]  # may not fit
  cfg = mosaic_sta.autotune(spec, 2, 128, jnp.bfloat16, candidates=cands, iters=2)
  assert cfg in cands


# ---- CPU: validation and GPU interpret mode ---------------------------------------------------
def test_check_rejects_unsupported():
  spec = jsta.STASpec((4, 8, 8), (2, 8, 8), (1, 1, 1))
  with pytest.raises(ValueError, match="float32 is not supported"):
    mosaic_sta.check(spec, 64, jnp.float32, 128, 128)
  with pytest.raises(ValueError, match="head_dim"):
    mosaic_sta.check(spec, 96, jnp.bfloat16, 128, 128)
  with pytest.raises(ValueError, match="block_kv"):
    mosaic_sta.check(spec, 64, jnp.bfloat16, 128, 32)
  odd = jsta.STASpec((4, 6, 8), (2, 6, 8), (1, 1, 1))   # 96-token tiles
  with pytest.raises(ValueError, match="must divide"):
    mosaic_sta.check(odd, 64, jnp.bfloat16, 128, 64)
  mosaic_sta.check(spec, 128, jnp.float16, 128, 64)
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    mosaic_sta.MosaicConfig(max_concurrent_steps=5)


def test_autotune_candidates_cover_the_forward_kernels():
  paper = jsta.STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  cands = mosaic_sta._default_candidates(paper, 128)
  assert {c.forward_variant for c in cands} == {"overlap", "general", "unpadded"}
  assert {c.block_kv for c in cands} == {64, 128}
  padded = jsta.STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3), text_len=100, text_max_len=256)
  assert "unpadded" not in {c.forward_variant for c in mosaic_sta._default_candidates(padded, 128)}


def test_default_blocks_and_stages():
  spec = jsta.STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  assert mosaic_sta.default_blocks(spec, 128, jnp.bfloat16) == (128, 128)
  assert mosaic_sta.default_stages(128, 128, 128) == 2
  assert mosaic_sta.default_stages(128, 64, 128) == 4


def test_interpret_forward_backward_cpu():
  """Kernel logic (schedule reads, dynamic loops, masks, barriers) in GPU interpret mode."""
  spec = jsta.STASpec((6, 8, 8), (2, 8, 8), (1, 1, 1), text_len=20, text_max_len=64)
  heads, head_dim = 2, 64
  sched = jsta.block_schedule(spec, heads, 128, 64)
  q, k, v, do = _random_inputs(sched, 1, heads, head_dim, seed=7)
  valid = sched.query_valid
  be = mosaic_sta.MosaicBackend(interpret=True)
  scale = head_dim ** -0.5

  def fwd_bwd():
    o, lse = be.forward(q, k, v, sched, scale)
    return o, lse, be.backward(q, k, v, o, lse, do, sched, scale)

  o, lse, grads = _interpreted(fwd_bwd)
  ro, rlse, rgrads = _xla_reference(sched, scale, q, k, v, do)
  assert _rel(o, ro, valid) < TOL
  np.testing.assert_allclose(np.asarray(lse)[:, :, valid], np.asarray(rlse)[:, :, valid],
                             atol=1e-3)
  assert np.isinf(np.asarray(lse)[:, :, ~valid]).all()
  for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
    assert _rel(g, rg) < TOL, name


@pytest.mark.parametrize("variant,padded", [
    ("overlap", False), ("overlap", True), ("general", False), ("general", True),
    ("unpadded", False)])
def test_interpret_forward_variants_cpu(variant, padded):
  """The forward kernels' logic in GPU interpret mode (for "overlap": peeled first and last
  steps, the two-barrier ping-pong; for all: schedule reads, dynamic counts, key mask).
  Unpadded: per-head windows (two schedule groups), text rows with every slot valid (dense
  text rows and columns, yet no key needs a mask), batch 2; padded: text padding (masked key
  blocks; "unpadded" rejects such specs)."""
  if padded:
    spec, batch = jsta.STASpec((6, 8, 8), (2, 8, 8), (1, 1, 1), text_len=20, text_max_len=64), 1
  else:
    spec = jsta.STASpec((4, 8, 8), (2, 8, 8), ((1, 1, 1), (3, 1, 1)), text_len=128,
                        text_max_len=128)
    batch = 2
  heads, head_dim = 2, 64
  sched = jsta.block_schedule(spec, heads, 128, 128)
  assert sched.has_masked_keys == padded
  assert sched.num_q_blocks > sched.num_video_q_blocks
  assert padded or sched.query_valid.all()      # unpadded: the checks below cover every row
  q, k, v = _random_inputs(sched, batch, heads, head_dim, seed=11, n=3)
  scale = head_dim ** -0.5
  cfg = mosaic_sta.MosaicConfig(forward_variant=variant, interpret=True)
  o, lse = _interpreted(mosaic_sta.forward, q, k, v, sched, scale, cfg)
  ro, rlse = _xla_reference(sched, scale, q, k, v)
  valid = sched.query_valid
  chex.assert_type(o, jnp.bfloat16)
  assert _rel(o, ro, valid) < TOL
  np.testing.assert_allclose(np.asarray(lse)[:, :, valid], np.asarray(rlse)[:, :, valid],
                             atol=1e-3)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "text_padded"])
def test_interpret_fused_backward_cpu(padded):
  """The fused backward (dQ by reduce-adds from the dK/dV kernel; the interpreter's stand-in
  for the TMA reduce-add is a read-add-write) against the XLA backward."""
  spec = jsta.STASpec((6, 8, 8), (2, 8, 8), (3, 1, 1) if not padded else (1, 1, 1),
                      text_len=20 if padded else 0, text_max_len=64 if padded else 0)
  heads, head_dim = 2, 128
  sched = jsta.block_schedule(spec, heads, 128, 128)
  assert sched.has_masked_keys == padded
  q, k, v, do = _random_inputs(sched, 1, heads, head_dim, seed=3)
  scale = head_dim ** -0.5
  ro, rlse, rgrads = _xla_reference(sched, scale, q, k, v, do)
  cfg = mosaic_sta.MosaicConfig(backward_variant="fused", interpret=True)
  grads = _interpreted(mosaic_sta.backward, q, k, v, ro.astype(q.dtype), rlse, do, sched, scale,
                       cfg)
  for name, g, rg in zip(("dq", "dk", "dv"), grads, rgrads):
    chex.assert_type(g, jnp.bfloat16)
    assert _rel(g, rg) < TOL, name


def test_backward_variant_choice():
  assert mosaic_sta._use_fused_backward(128, 128, mosaic_sta.MosaicConfig())
  assert not mosaic_sta._use_fused_backward(64, 128, mosaic_sta.MosaicConfig())   # falls back
  assert not mosaic_sta._use_fused_backward(128, 128,
                                            mosaic_sta.MosaicConfig(backward_variant="split"))
  assert mosaic_sta._use_fused_backward(128, 128,
                                        mosaic_sta.MosaicConfig(backward_variant="fused"))
  assert mosaic_sta._use_fused_backward(64, 64, mosaic_sta.MosaicConfig(backward_variant="fused"))
  with pytest.raises(ValueError, match="multiple of 64"):
    mosaic_sta._use_fused_backward(64, 128, mosaic_sta.MosaicConfig(backward_variant="fused"))
  with pytest.raises(ValueError, match="backward_variant"):
    mosaic_sta.MosaicConfig(backward_variant="fast")


def test_fused_backward_lowers_for_cuda():
  """The fused backward through the whole Mosaic GPU lowering for CUDA on the CPU: this also
  checks that its shared memory fits (the limit is checked at lowering)."""
  spec = jsta.STASpec((4, 8, 8), (2, 8, 8), (3, 1, 1), text_len=10, text_max_len=64)
  sched = jsta.block_schedule(spec, 2, 128, 128)
  x = jax.ShapeDtypeStruct((1, sched.seq_len, 2, 128), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, 2, sched.seq_len), jnp.float32)
  cfg = mosaic_sta.MosaicConfig(backward_variant="fused")
  bwd = jax.jit(lambda q, k, v, o, l, do: mosaic_sta.backward(q, k, v, o, l, do, sched,
                                                              128 ** -0.5, cfg))
  bwd.trace(x, x, x, x, lse, x).lower(lowering_platforms=("cuda",))


@pytest.mark.parametrize("transform", ["vmap", "remat", "scan"])
def test_op_gradient_lowers_for_cuda_under_transforms(transform):
  """The op's default Hopper backward (fused: its dQ accumulator is a mutable ``jax.new_ref``)
  lowers for CUDA under vmap, jax.checkpoint and lax.scan, as the models use it. (GPU interpret
  mode cannot run remat at all: its callbacks carry an ordered effect.)"""
  spec = jsta.STASpec((2, 8, 16), (2, 8, 8), (1, 1, 1))
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 1, 128), jnp.bfloat16)
  assert mosaic_sta._use_fused_backward(128, 128, mosaic_sta.BACKEND.config(128, 128, 128))

  def loss(q, k):
    o = jsta.sliding_tile_attention(q, k, k, spec, backend="pallas_mosaic")
    return jnp.sum(o.astype(jnp.float32) ** 2)

  if transform == "vmap":
    f, args = jax.vmap(jax.grad(loss), in_axes=(0, None)), (x.update(shape=(2, *x.shape)), x)
  elif transform == "remat":
    f, args = jax.grad(jax.checkpoint(loss)), (x, x)
  else:
    f = jax.grad(lambda q, k: jax.lax.scan(lambda c, _: (c + loss(q, k), None), 0.0, None,
                                           length=2)[0])
    args = (x, x)
  text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("mosaic_gpu") >= 2          # forward and fused backward kernels


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_forward_lowers_for_cuda(padded):
  """Both forward routes go through the whole Mosaic GPU lowering for CUDA (no ptxas) on CPU."""
  spec = jsta.STASpec((4, 8, 8), (2, 8, 8), (3, 1, 1), text_len=10 if padded else 0,
                      text_max_len=64 if padded else 0)
  sched = jsta.block_schedule(spec, 2, 128, 128)
  assert sched.has_masked_keys == padded
  x = jax.ShapeDtypeStruct((1, sched.seq_len, 2, 128), jnp.bfloat16)
  variants = ("general", "overlap") if padded else ("general", "unpadded", "overlap")
  for variant in variants:
    cfg = mosaic_sta.MosaicConfig(forward_variant=variant)
    fwd = jax.jit(lambda q, k, v: mosaic_sta.forward(q, k, v, sched, 128 ** -0.5, cfg))
    fwd.trace(x, x, x).lower(lowering_platforms=("cuda",))


def test_forward_variant_choice():
  paper = lambda w, **kw: jsta.block_schedule(jsta.STASpec((30, 48, 80), (6, 8, 8), w, **kw),
                                              24, 128, 128)
  auto = mosaic_sta.MosaicConfig()
  route = mosaic_sta.forward_route
  assert route(paper((3, 3, 3)), auto) == "overlap"                           # 81 blocks
  assert route(paper((5, 5, 5)), auto) == "overlap"                           # 375 blocks
  assert route(paper((5, 5, 5), text_len=100, text_max_len=256), auto) == "overlap"  # padded
  assert route(paper((5, 5, 5)), mosaic_sta.MosaicConfig(forward_variant="unpadded")) == "unpadded"
  assert route(paper((3, 3, 3)), mosaic_sta.MosaicConfig(forward_variant="general")) == "general"
  with pytest.raises(ValueError, match="no padded key"):
    route(paper((5, 5, 5), text_len=100, text_max_len=256),
          mosaic_sta.MosaicConfig(forward_variant="unpadded"))
  with pytest.raises(ValueError, match="forward_variant"):
    mosaic_sta.MosaicConfig(forward_variant="fast")


def test_auto_falls_back_from_mosaic_for_unsupported_input(monkeypatch):
  """On Hopper, "auto" resolves to pallas_mosaic; float32 or head_dim 32 go to pallas_triton."""
  import jsta.ops as ops
  monkeypatch.setattr(ops, "resolve_backend", lambda b: "pallas_mosaic" if b == "auto" else b)
  spec = jsta.STASpec((4, 8, 8), (2, 8, 8), (1, 1, 1))
  assert ops.make_plan(spec, 2, 64, jnp.bfloat16).backend == "pallas_mosaic"
  assert ops.make_plan(spec, 2, 64, jnp.float32).backend == "pallas_triton"
  assert ops.make_plan(spec, 2, 32, jnp.float16).backend == "pallas_triton"
  with pytest.raises(ValueError, match="float32 is not supported"):
    ops.make_plan(spec, 2, 64, jnp.float32, backend="pallas_mosaic")
