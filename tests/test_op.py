"""The op itself (backend "xla" on the CPU): the reference checked independently, custom
scale, eager = jit = vmap, numerical gradients, fully padded query blocks, backend selection
and every error of its input checks. The per-backend correctness suite is test_attention.py.
"""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jsta
from jsta.spec import STASpec

from helpers import check_matches_reference, random_qkv

# (spec, heads, head_dim, block_q, block_kv); None blocks = the backend's defaults.
CASES = {
    "3d": (STASpec((4, 4, 8), (2, 2, 4), (1, 3, 1)), 2, 16, None, None),
    "3d_padded_text": (STASpec((3, 5, 6), (2, 2, 4), (3, 1, 3), text_len=5, text_max_len=8),
                       2, 16, 8, 4),
    "2d_per_head_text": (STASpec((6, 8), (2, 4), ((3, 1), (1, 1), (5, 3)), text_len=3,
                                 text_max_len=3), 3, 8, 4, 8),
    "2d_padded": (STASpec((7, 5), (3, 2), (3, 3)), 1, 8, 3, 6),
    "1d_padded_text": (STASpec((13,), (4,), (3,), text_len=1, text_max_len=5), 2, 8, 2, 4),
}


def _op_and_vjp(spec, block_q, block_kv, fn_is_ref: bool):
  if fn_is_ref:
    f = functools.partial(jsta.reference_attention, spec=spec)
  else:
    f = functools.partial(jsta.sliding_tile_attention, spec=spec, backend="xla",
                          block_q=block_q, block_kv=block_kv)

  @jax.jit
  def run(q, k, v, do):
    o, pull = jax.vjp(lambda a, b, c: f(a, b, c), q, k, v)
    return (o, *pull(do.astype(o.dtype)))
  return run


def test_matches_dense_attention_for_whole_volume_window():
  # An independent check of reference + op: a window covering the volume is plain attention.
  spec = STASpec((4, 4, 4), (2, 2, 2), jsta.full_window((4, 4, 4), (2, 2, 2)))
  q, k, v = random_qkv(2, spec, 2, 2, 8)
  o = jsta.sliding_tile_attention(q, k, v, spec, backend="xla")
  dense = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(np.asarray(o), np.asarray(dense), atol=2e-5, rtol=2e-5)


def test_reference_matches_explicit_softmax_on_one_row():
  # Spot-check the reference itself: softmax over the mask row, written out for one query.
  spec = STASpec((4, 6), (2, 2), (1, 3), text_len=2, text_max_len=3)
  q, k, v = random_qkv(3, spec, 1, 1, 4)
  ref = np.asarray(jsta.reference_attention(q, k, v, spec))
  m = jsta.token_mask(spec)
  qn, kn, vn = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  for row in (0, 5, spec.padded_video_len):   # a video edge query, another video query, text
    logits = kn[m[row]] @ qn[row] / 2.0
    p = np.exp(logits - logits.max())
    p /= p.sum()
    np.testing.assert_allclose(ref[0, row, 0], p @ vn[m[row]], atol=1e-5)


def test_reference_attention_rows_equals_reference_rows():
  spec, heads, head_dim, _, _ = CASES["2d_per_head_text"]
  q, k, v = random_qkv(9, spec, 2, heads, head_dim)
  rows = np.array([0, 7, 20, spec.padded_video_len, spec.seq_len - 1])
  got = jsta.reference.reference_attention_rows(q, k, v, spec, rows, scale=0.3)
  chex.assert_shape(got, (2, 5, heads, head_dim))
  want = jsta.reference_attention(q, k, v, spec, scale=0.3)[:, rows]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)
  with pytest.raises(ValueError, match="q has seq 5"):
    jsta.reference.reference_attention_rows(q[:, :5], k[:, :5], v[:, :5], spec, rows)


def test_custom_scale():
  spec, heads, head_dim, bq, bk = CASES["2d_padded"]
  q, k, v = random_qkv(4, spec, 1, heads, head_dim)
  o = jsta.sliding_tile_attention(q, k, v, spec, scale=0.7, backend="xla")
  ref = jsta.reference_attention(q, k, v, spec, scale=0.7)
  np.testing.assert_allclose(np.asarray(o), np.asarray(ref), atol=2e-5, rtol=2e-5)
  other = jsta.reference_attention(q, k, v, spec)
  assert np.abs(np.asarray(other) - np.asarray(ref)).max() > 1e-3


def test_eager_equals_jit_and_vmap():
  spec, heads, head_dim, bq, bk = CASES["1d_padded_text"]
  q, k, v = random_qkv(5, spec, 2, heads, head_dim)
  op = functools.partial(jsta.sliding_tile_attention, spec=spec, backend="xla",
                         block_q=bq, block_kv=bk)
  eager = op(q, k, v)
  jitted = jax.jit(op)(q, k, v)
  vmapped = jax.jit(jax.vmap(lambda a, b, c: op(a[None], b[None], c[None])[0]))(q, k, v)
  ref = jsta.reference_attention(q, k, v, spec)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(ref), atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(vmapped), np.asarray(eager), atol=1e-6, rtol=1e-6)

  # Gradients through vmap (the custom VJP batched).
  def loss(a, b, c):
    return jnp.sum(jax.vmap(lambda x, y, z: op(x[None], y[None], z[None])[0])(a, b, c) ** 2)

  def ref_loss(a, b, c):
    return jnp.sum(jsta.reference_attention(a, b, c, spec) ** 2)
  g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  rg = jax.grad(ref_loss, argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g, rg):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5, rtol=5e-5)


def test_check_grads_numerically():
  spec = STASpec((6,), (2,), (3,), text_len=1, text_max_len=2)
  q, k, v = random_qkv(6, spec, 1, 2, 4)
  op = jax.jit(functools.partial(jsta.sliding_tile_attention, spec=spec, backend="xla",
                                 block_q=1, block_kv=2))
  check_grads(op, (q, k, v), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)


def test_no_nan_when_a_query_block_is_fully_padded():
  # Text slots 1..7 are padding: whole padded query blocks, count 0 in the schedule.
  spec = STASpec((4,), (4,), (1,), text_len=1, text_max_len=8)
  q, k, v = random_qkv(8, spec, 1, 1, 4)
  sched = jsta.block_schedule(spec, 1, 4, 4)
  assert (sched.kv_count[0] == 0).any()
  o, dq, dk, dv = _op_and_vjp(spec, 4, 4, False)(q, k, v, jnp.ones_like(q))
  for x in (o, dq, dk, dv):
    assert np.isfinite(np.asarray(x)).all()
  assert not np.asarray(o)[:, 5:].any()


# ---- ValueError paths ---------------------------------------------------------------------------
SPEC = STASpec((4, 4), (2, 2), (1, 1))   # seq_len 16


def _x(shape=(1, 16, 2, 8), dtype=jnp.float32):
  return jnp.zeros(shape, dtype)


@pytest.mark.parametrize("exc, args, kwargs, match", [
    (TypeError, (_x(), _x(), _x(), "spec"), {}, "spec must be a jsta.STASpec, got str"),
    (ValueError, (_x((16, 2, 8)), _x(), _x(), SPEC), {},
     r"q must be \[batch, seq, heads, head_dim\], got shape \(16, 2, 8\)"),
    (TypeError, (_x(), np.zeros(3).tolist(), _x(), SPEC), {},
     "k must be a jax or numpy array, got list"),
    (TypeError, ((_x(),), _x(), _x(), SPEC), {}, "q must be a jax or numpy array, got tuple"),
    (ValueError, (_x(), _x(), _x((1, 16, 2, 4)), SPEC), {}, "k and v must have the same shape"),
    (TypeError, (_x(), _x(dtype=jnp.bfloat16), _x(), SPEC), {}, "q, k and v must share a dtype"),
    # float64 NumPy input is computed in float32: the message names both.
    (TypeError, (np.asarray(_x(), np.float64), _x(dtype=jnp.bfloat16), _x(dtype=jnp.bfloat16),
                 SPEC), {},
     r"must share a dtype, got float64 \(computed as float32\), bfloat16, bfloat16"),
    (TypeError, (_x(dtype=jnp.int32), _x(dtype=jnp.int32), _x(dtype=jnp.int32), SPEC), {},
     "dtype must be float32, bfloat16 or float16, got int32"),
    (ValueError, (_x((1, 15, 2, 8)), _x((1, 15, 2, 8)), _x((1, 15, 2, 8)), SPEC), {},
     r"q has seq 15 but the spec needs seq_len = padded_video_len \(16\)"),
    (ValueError, (_x((1, 16, 2, 0)),) * 3 + (SPEC,), {}, r"head_dim \(axis 3\) must be >= 1"),
    (ValueError, (_x((1, 16, 0, 8)),) * 3 + (SPEC,), {}, r"heads \(axis 2\) must be >= 1"),
    (ValueError, (_x((0, 16, 2, 8)),) * 3 + (SPEC,), {}, r"batch \(axis 0\) must be >= 1"),
    (ValueError, (_x(), _x(), _x(), SPEC.with_window(((1, 1), (1, 1), (3, 3)))), {},
     "gives 3 per-head windows but there are 2 heads"),
    (ValueError, (_x(), _x(), _x(), SPEC), {"backend": "nope"},
     r"backend must be one of \['auto', .*'xla'"),
    (TypeError, (_x(), _x(), _x(), SPEC), {"backend": 3}, r"backend\) must be None, a backend name \(a str\)"),
    (ValueError, (_x(), _x(), _x(), SPEC), {"backend": "xla", "block_q": 3, "block_kv": 8},
     "block_q=3 and block_kv=8 span too many tiles"),
    (ValueError, (_x(), _x(), _x(), SPEC), {"backend": "xla", "block_kv": 0},
     "block_kv must be >= 1"),
    (TypeError, (_x(), _x(), _x(), SPEC), {"backend": "xla", "block_kv": 4.0},
     "block_kv must be an int"),
    (TypeError, (_x(), _x(), _x(), SPEC), {"scale": "a"}, "scale must be a real number"),
    (TypeError, (_x(), _x(), _x(), SPEC), {"scale": True}, "scale must be a real number"),
    (ValueError, (_x(), _x(), _x(), SPEC), {"scale": float("nan")}, "scale must be finite"),
    (ValueError, (_x(), _x(), _x(), SPEC), {"scale": np.float32(np.inf)}, "scale must be finite"),
])
def test_bad_inputs_raise(exc, args, kwargs, match):
  with pytest.raises(exc, match=match):
    jsta.sliding_tile_attention(*args, **kwargs)


def test_scale_may_be_a_concrete_scalar_but_not_traced():
  q, k, v = random_qkv(0, SPEC, 1, 2, 8)
  want = jsta.sliding_tile_attention(q, k, v, SPEC, scale=0.5)
  for s in (np.float32(0.5), jnp.asarray(0.5), np.asarray(0.5)):
    np.testing.assert_array_equal(np.asarray(jsta.sliding_tile_attention(q, k, v, SPEC, scale=s)),
                                  np.asarray(want))
  traced = jax.jit(lambda q, s: jsta.sliding_tile_attention(q, q, q, SPEC, scale=s))
  with pytest.raises(TypeError, match="scale must be a static number .* pass q \\* s"):
    traced(q, 0.5)
  # The suggested workaround: the same result, and differentiable in the scale.
  via_q = jax.jit(lambda q, k, v, s: jsta.sliding_tile_attention(q * s, k, v, SPEC, scale=1.0))
  np.testing.assert_allclose(np.asarray(via_q(q, k, v, 0.5)), np.asarray(want), rtol=1e-6,
                             atol=1e-6)


def test_unknown_backend_raises_everywhere():
  with pytest.raises(ValueError, match="backend must be one of"):
    jsta.get_backend("cuda")
  with pytest.raises(ValueError, match="backend must be one of"):
    jsta.resolve_backend("cuda")
  with pytest.raises(ValueError, match="backend must be one of"):
    jsta.make_plan(SPEC, 2, 8, jnp.float32, backend="cuda")


def test_resolve_backend_on_cpu_and_plan():
  if jax.devices()[0].platform != "gpu":
    assert jsta.resolve_backend("auto") == "xla"
  plan = jsta.make_plan(SPEC, 2, 16, jnp.float32, backend="xla")
  assert (plan.block_q, plan.block_kv, plan.backend) == (4, 4, "xla")
  assert plan.scale == pytest.approx(0.25)
  assert plan.schedule is jsta.block_schedule(SPEC, 2, 4, 4)
  hash(plan)


def test_reference_seq_mismatch_raises():
  with pytest.raises(ValueError, match=r"q has seq 15 but the spec needs seq_len = .* = 16"):
    jsta.reference_attention(_x((1, 15, 2, 8)), _x((1, 15, 2, 8)), _x((1, 15, 2, 8)), SPEC)


def test_reference_attention_rows_single_window_multi_head():
  spec, _, head_dim, _, _ = CASES["3d_padded_text"]
  q, k, v = random_qkv(10, spec, 1, 3, head_dim)
  rows = np.arange(0, spec.seq_len, 7)
  got = jsta.reference.reference_attention_rows(q, k, v, spec, rows)
  want = jsta.reference_attention(q, k, v, spec)[:, rows]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)



def test_xla_backend_in_many_small_chunks_matches_reference():
  """A memory budget this small processes one query block and one key block per step: the
  chunked loops (padding of the last chunk, counts, text rows walked apart) still give the
  reference's output and gradients."""
  jsta.register_backend("xla_one_block_steps",
                        lambda: jsta.ops.XlaBackend(name="xla_one_block_steps", memory_bytes=1))
  spec = STASpec((3, 5, 6), (2, 2, 4), ((3, 1, 3), (1, 3, 1)), text_len=5, text_max_len=8)
  check_matches_reference(spec, 2, 2, 16, jnp.float32, backend="xla_one_block_steps",
                          block_q=8, block_kv=4)
  chunk_sizes = jsta.xla_backend._chunk_sizes
  assert chunk_sizes(2, 2, 8, 4, 16, 100, 5, 1) == (1, 1)
  # A large budget: one chunk of all the query blocks, one step of all the key blocks.
  assert chunk_sizes(1, 1, 8, 4, 16, 100, 5, 2 ** 30) == (100, 5)
  # 1536 bytes a pair: room for 10 pairs: steps of 5 key blocks, chunks of 2 query blocks.
  assert chunk_sizes(1, 1, 8, 4, 16, 100, 5, 15360) == (2, 5)
  # Room for 3 pairs of a count of 5: two even steps of 3 (not 3 + 2 of 3 padded).
  assert chunk_sizes(1, 1, 8, 4, 16, 100, 5, 3 * 1536) == (1, 3)
  # Room for 45 query blocks of 7: chunks of 34 + 33 (two), not 45 + 22 padded to 90.
  assert chunk_sizes(1, 1, 8, 4, 16, 67, 1, 45 * 1536) == (34, 1)


def test_backend_names_are_listed_once():
  jsta.get_backend("pallas_triton")          # instantiated: in both registries internally
  names = jsta.ops.backend_names()
  assert len(names) == len(set(names)) and {"auto", "xla", "pallas_triton", "pallas_mosaic"} <= set(names)
  with pytest.raises(ValueError) as err:
    jsta.resolve_backend("cuda")
  assert str(err.value).count("'pallas_triton'") == 1
  with pytest.raises(TypeError, match="factory must be a callable"):
    jsta.register_backend("x", None)


def test_kernels_run_the_next_head_dim_they_take():
  """A head_dim the kernels do not run is zero-padded to the next one they do (the plan says
  which); the default scale stays the input's head_dim ** -0.5; larger ones are refused with
  the head_dim named, and a backend object's kernel_head_dim is checked."""
  from pallas_kernels.mosaic.backend import MosaicBackend
  spec = STASpec((2, 8, 8), (1, 8, 8), (1, 1, 1))
  mosaic = MosaicBackend(interpret=True)
  for d, want in ((40, 64), (64, None), (96, 128), (128, None)):
    plan = jsta.make_plan(spec, 2, d, jnp.bfloat16, implementation=mosaic)
    assert (plan.kernel_head_dim, plan.head_dim, plan.scale) == (want, d, d ** -0.5)
    assert plan.run_head_dim == (want or d)
  for d, want in ((8, 16), (24, 32), (200, 256), (256, None)):
    plan = jsta.make_plan(spec, 2, d, jnp.float32, implementation="pallas_triton")
    assert plan.kernel_head_dim == want
  assert jsta.make_plan(spec, 2, 24, jnp.float32, implementation="xla").kernel_head_dim is None
  with pytest.raises(ValueError, match="head_dim must be one of .* got 192"):
    jsta.make_plan(spec, 2, 192, jnp.bfloat16, implementation=mosaic)
  with pytest.raises(ValueError, match=r"power of two in \[16, 256\].* got 320"):
    jsta.make_plan(spec, 2, 320, jnp.float32, implementation="pallas_triton")
  narrowing = dataclasses.replace(jsta.ops.XlaBackend(), name="narrow")
  object.__setattr__(narrowing, "kernel_head_dim", lambda d: d - 1)
  with pytest.raises(TypeError, match=r"kernel_head_dim\(24\) must return an int >= 24"):
    jsta.make_plan(spec, 2, 24, jnp.float32, implementation=narrowing)


def test_training_step_keeps_one_output_array():
  """In a training step (q, k, v computed in the program, o used after the op) the output's
  padded rows are zeroed in the array the VJP keeps for its backward: XLA rewrites the rows in
  place, where zeroing them after the custom VJP's forward rule made it copy o whole first
  (o was also the saved residual)."""
  spec = STASpec((8, 15, 16), (2, 4, 4), (3, 3, 3))
  b, s, h, d = 1, spec.seq_len, 1, 8
  from jsta import ops
  plan = jsta.make_plan(spec, h, d, jnp.float32, implementation="xla")
  rows = ops._maybe_padded_rows(plan.schedule)
  assert 0 < rows.size * 8 <= s       # the scatter path (few padded rows)

  def loss(w, x, wo):
    qkv = (x @ w).reshape(b, s, 3, h, d)
    o = jsta.sliding_tile_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], spec,
                                    implementation="xla")
    return jnp.sum((o.reshape(b, s, h * d) @ wo) ** 2)

  args = (jnp.ones((h * d, 3 * h * d)), jnp.ones((b, s, h * d)), jnp.ones((h * d, h * d)))
  hlo = jax.jit(jax.grad(loss, argnums=(0, 2))).lower(*args).compile().as_text()
  o_type = f"f32[{b},{s},{h},{d}]"
  copies = [ln.strip() for ln in hlo.splitlines() if f"= {o_type}" in ln and " copy(" in ln]
  assert "scatter(" in hlo and not copies, copies


def test_paper_latent_in_one_token_tiles_runs_on_the_xla_backend():
  """30x48x80 in 1x1x1 tiles: 115,200 tiles, whose dense tile mask (12.4 GiB) used to end the
  process; the schedule, the op and the row reference now work tile box by tile box."""
  spec = STASpec((30, 48, 80), (1, 1, 1), (3, 3, 3))
  q, k, v = (jax.random.normal(kk, (1, spec.seq_len, 1, 8)) for kk in
             jax.random.split(jax.random.key(0), 3))
  o = jax.jit(lambda a, b, c: jsta.sliding_tile_attention(a, b, c, spec, backend="xla"))(q, k, v)
  rows = np.array([0, (15 * 48 + 24) * 80 + 40, spec.seq_len - 1])
  want = jsta.reference.reference_attention_rows(q, k, v, spec, rows)
  np.testing.assert_allclose(np.asarray(o[:, rows]), np.asarray(want), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lengths", [None, (0, 100)], ids=["static", "runtime"])
def test_few_padded_rows_are_zeroed_in_place_of_a_select(lengths):
  """Where few rows can be padded (here only text slots), the op zeroes o's padded rows by
  writing those rows only (jsta.ops._zero_padded_rows): with NaN garbage in padded q, k, v the
  inference output and the gradients are those of the reference on valid rows, zero on the
  rest; with run-time text lengths every text slot is such a row, valid or not."""
  from jsta import ops
  spec = STASpec((8, 16, 16), (2, 8, 8), (1, 1, 1), text_len=120, text_max_len=128)
  plan = jsta.make_plan(spec, 2, 16, jnp.float32, implementation="xla",
                        dynamic_text=lengths is not None)
  rows = ops._maybe_padded_rows(plan.schedule)
  # The scatter path, not the select: few rows, and no block padding beyond the sequence.
  assert plan.schedule.seq_len == spec.seq_len and 0 < rows.size * 8 <= spec.seq_len
  q, k, v = random_qkv(0, spec, 2, 2, 16, jnp.float32)
  if lengths is None:
    valid = np.broadcast_to(np.asarray(jsta.token_valid(spec)), (2, spec.seq_len))
  else:
    slot = np.arange(spec.seq_len) - spec.padded_video_len
    valid = (slot < 0) | (slot < np.asarray(lengths)[:, None])
  m = jnp.asarray(valid)[:, :, None, None]
  q, k, v = (jnp.where(m, x, jnp.nan) for x in (q, k, v))
  kw = {} if lengths is None else {"text_lengths": jnp.asarray(lengths, jnp.int32)}
  attend = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation="xla",
                                                       **kw)
  o = jax.jit(attend)(q, k, v)
  clean = [jnp.where(m, x, 0.0) for x in (q, k, v)]
  want = jsta.reference_attention(*clean, spec, **kw)
  assert np.isfinite(np.asarray(o)).all()
  assert (np.asarray(o)[~valid] == 0).all()
  np.testing.assert_allclose(np.asarray(o)[valid], np.asarray(want)[valid], rtol=1e-5,
                             atol=1e-5)
  grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2)))(
      q, k, v)
  for g in grads:
    assert np.isfinite(np.asarray(g)).all() and (np.asarray(g)[~valid] == 0).all()
