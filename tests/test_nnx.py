"""jsta.nnx: SlidingTileAttention and make_attention_fn for flax.nnx.MultiHeadAttention."""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jsta
from jsta.spec import STASpec

SPEC = STASpec((3, 4, 4), (2, 2, 2), (1, 3, 1), text_len=3, text_max_len=4)   # padded t, text
HEADS, FEATURES = 2, 16


def _x(spec=SPEC, batch=2, features=FEATURES, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), (batch, spec.seq_len, features), dtype)


def _hand_built(layer: jsta.nnx.SlidingTileAttention, x, rotary=None):
  """The layer's computation written out with its weights and jsta.reference_attention."""
  b, s, _ = x.shape
  h, kh, d = layer.num_heads, layer.num_kv_heads, layer.head_dim
  if layer.fused_qkv:
    qkv = x @ layer.qkv.kernel[...] + layer.qkv.bias[...]
    q, k, v = jnp.split(qkv, [h * d, (h + kh) * d], axis=-1)
    q, k, v = q.reshape(b, s, h, d), k.reshape(b, s, kh, d), v.reshape(b, s, kh, d)
    w_out, b_out = layer.out.kernel[...], layer.out.bias[...]
  else:
    q, k, v = (jnp.einsum("bsf,fhd->bshd", x, m.kernel[...]) + m.bias[...]
               for m in (layer.query, layer.key, layer.value))
    w_out, b_out = layer.out.kernel[...].reshape(h * d, -1), layer.out.bias[...]
  if layer.q_norm is not None:
    def rms(t, scale):
      return t * jax.lax.rsqrt(jnp.mean(t * t, axis=-1, keepdims=True) + 1e-6) * scale
    q, k = rms(q, layer.q_norm.scale[...]), rms(k, layer.k_norm.scale[...])
  if rotary is not None:
    q, k = rotary(q, k)
  o = jsta.reference_attention(q, k, v, layer.spec)
  return o.reshape(b, s, h * d) @ w_out + b_out


def _rotate_half(q, k):
  # A stand-in rotary: any fixed, position-dependent map of q and k will do for the check.
  pos = jnp.arange(q.shape[1], dtype=q.dtype)[None, :, None, None] * 0.1
  def rot(t):
    a, b = jnp.split(t, 2, axis=-1)
    c, s = jnp.cos(pos), jnp.sin(pos)
    return jnp.concatenate([a * c - b * s, a * s + b * c], axis=-1)
  return rot(q), rot(k)


@pytest.mark.parametrize("qk_norm, rotary", [(False, None), (True, _rotate_half)],
                         ids=["plain", "qknorm_rotary"])
def test_layer_equals_hand_built(qk_norm, rotary):
  layer = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, qk_norm=qk_norm, rotary=rotary,
                                        implementation="xla", rngs=nnx.Rngs(0))
  if qk_norm:
    # Non-trivial norm scales so that a skipped norm would be noticed.
    layer.q_norm.scale[...] = jnp.linspace(0.5, 1.5, layer.head_dim)
    layer.k_norm.scale[...] = jnp.linspace(1.5, 0.5, layer.head_dim)
  x = _x()
  y = layer(x)
  chex.assert_shape(y, (2, SPEC.seq_len, FEATURES))
  chex.assert_type(y, jnp.float32)
  np.testing.assert_allclose(np.asarray(y), np.asarray(_hand_built(layer, x, rotary)),
                             atol=1e-4, rtol=1e-4)
  # Padded positions carry only the output bias (zero attention output there).
  invalid = ~jsta.token_valid(SPEC)
  np.testing.assert_allclose(np.asarray(y)[:, invalid],
                             np.broadcast_to(np.asarray(layer.out.bias[...]),
                                             (2, int(invalid.sum()), FEATURES)), atol=1e-6)


def test_shapes_per_head_windows_and_features():
  spec = STASpec((4, 8), (2, 4), ((1, 1), (3, 1), (1, 3)))
  layer = jsta.nnx.SlidingTileAttention(3, 10, spec, qkv_features=24, out_features=7,
                                        implementation="xla", rngs=nnx.Rngs(1))
  assert layer.head_dim == 8
  chex.assert_shape(layer.qkv.kernel[...], (10, 72))
  y = layer(_x(spec, batch=1, features=10))
  chex.assert_shape(y, (1, spec.seq_len, 7))
  np.testing.assert_allclose(np.asarray(y), np.asarray(_hand_built(layer, _x(spec, 1, 10))),
                             atol=1e-4, rtol=1e-4)


def test_bf16_dtype():
  layer = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, qk_norm=True, implementation="xla",
                                        dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
  y = layer(_x())
  chex.assert_type(y, jnp.bfloat16)
  assert np.isfinite(np.asarray(y, np.float32)).all()


def test_grads_flow_and_jit():
  layer = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, qk_norm=True,
                                        rotary=_rotate_half, implementation="xla", rngs=nnx.Rngs(3))
  x = _x(seed=4)

  @nnx.jit
  def loss_and_grad(model, x):
    return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(model)

  loss, grads = loss_and_grad(layer, x)
  assert np.isfinite(float(loss))
  leaves = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
  assert len(leaves) == 6   # qkv kernel/bias, out kernel/bias, q/k norm scales
  for path, g in leaves:
    assert np.isfinite(np.asarray(g)).all(), path
    assert np.abs(np.asarray(g)).max() > 0, path
  np.testing.assert_allclose(float(loss), float(jnp.mean(layer(x) ** 2)), rtol=1e-5)


def _mha(spec, attention_fn, seed=5):
  return nnx.MultiHeadAttention(HEADS, FEATURES, attention_fn=attention_fn, decode=False,
                                rngs=nnx.Rngs(seed))


def test_whole_volume_window_equals_dense_multihead_attention():
  latent, tile = (4, 4, 4), (2, 2, 2)
  spec = STASpec(latent, tile, jsta.full_window(latent, tile))
  x = _x(spec, batch=2)
  dense = _mha(spec, nnx.dot_product_attention)
  sta = _mha(spec, jsta.nnx.make_attention_fn(spec, implementation="xla"))
  nnx.update(sta, nnx.state(dense))          # same weights
  want = dense(x)
  got = sta(x)
  chex.assert_equal_shape((got, want))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-5)
  # And the sparse case matches the reference through the MHA projections.
  sparse_spec = spec.with_window((1, 1, 1))
  sparse = _mha(sparse_spec, jsta.nnx.make_attention_fn(sparse_spec, implementation="xla"))
  nnx.update(sparse, nnx.state(dense))
  ref = _mha(sparse_spec, lambda q, k, v, **kw: jsta.reference_attention(q, k, v, sparse_spec))
  nnx.update(ref, nnx.state(dense))
  np.testing.assert_allclose(np.asarray(sparse(x)), np.asarray(ref(x)), atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(sparse(x)) - np.asarray(want)).max() > 1e-3


def test_attention_fn_under_jit_and_grad():
  spec = SPEC
  mha = _mha(spec, jsta.nnx.make_attention_fn(spec, implementation="xla"))
  x = _x(spec, batch=1)
  g = nnx.jit(nnx.grad(lambda m, x: jnp.sum(m(x) ** 2)))(mha, x)
  assert all(np.isfinite(np.asarray(l)).all() for l in jax.tree_util.tree_leaves(g))


def test_attention_fn_rejects_bias_causal_dropout_and_masks_sta_cannot_express():
  fn = jsta.nnx.make_attention_fn(SPEC, implementation="xla")
  n = SPEC.seq_len
  q = jnp.zeros((1, n, 2, 8))
  causal = jnp.tril(jnp.ones((n, n), bool))[None, None]
  with pytest.raises(ValueError, match="bias must be None"):
    fn(q, q, q, bias=jnp.zeros((1, 2, n, n), jnp.float32))
  with pytest.raises(ValueError, match="is_causal"):
    fn(q, q, q, is_causal=True)
  with pytest.raises(ValueError, match="dropout"):
    fn(q, q, q, dropout_rate=0.1, deterministic=False)
  chex.assert_shape(fn(q, q, q, dropout_rate=0.1, deterministic=True), q.shape)
  with pytest.raises(ValueError, match="the mask cannot be expressed by the spec"):
    fn(q, q, q, mask=causal)
  # MultiHeadAttention forwards a call-time mask to attention_fn: it is checked the same way.
  mha = _mha(SPEC, fn)
  with pytest.raises(ValueError, match="the mask cannot be expressed by the spec"):
    mha(_x(batch=1), mask=causal)
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec"):
    jsta.nnx.make_attention_fn((3, 3, 3))
  # Checked when the function is made, not at its first call.
  with pytest.raises(ValueError, match=r"implementation must be one of \['auto', "):
    jsta.nnx.make_attention_fn(SPEC, implementation="pallas_tritonn")
  with pytest.raises(ValueError, match=r"backend must be one of \['auto', "):
    jsta.nnx.make_attention_fn(SPEC, backend="pallas_tritonn")
  with pytest.raises(ValueError, match="scale must be finite"):
    jsta.nnx.make_attention_fn(SPEC, scale=float("nan"))


def test_layer_bad_arguments_raise():
  with pytest.raises(ValueError, match=r"num_heads \(3\) must be positive and divide"):
    jsta.nnx.SlidingTileAttention(3, 16, SPEC, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="per-head windows but there are 2 heads"):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC.with_window(((1, 1, 1),) * 3), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec"):
    jsta.nnx.SlidingTileAttention(2, 16, "spec", rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="rotary must be a callable"):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, rotary=3, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"backend must be one of \['auto', "):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, backend="cuda", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"implementation must be one of \['auto', "):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, implementation=("xla", "cuda"), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError,
                     match=r"implementation \(or its alias backend\) must be None, a backend name"):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, implementation=(), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="num_heads must be an int"):
    jsta.nnx.SlidingTileAttention(2.0, 16, SPEC, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="in_features must be >= 1"):
    jsta.nnx.SlidingTileAttention(2, 0, SPEC, qkv_features=16, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="x must be a jax or numpy array"):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, rngs=nnx.Rngs(0))([[0.0]])
  layer = jsta.nnx.SlidingTileAttention(2, 16, SPEC, implementation="xla", rngs=nnx.Rngs(0))
  n = SPEC.seq_len
  assert n == 4 * 4 * 4 + 4
  with pytest.raises(ValueError, match=r"x must be \[batch, seq_len=68, in_features=16\]"):
    layer(jnp.zeros((1, n - 1, 16)))
  with pytest.raises(ValueError, match="x must be"):
    layer(jnp.zeros((1, n, 8)))
  with pytest.raises(ValueError, match="x must be"):
    layer(jnp.zeros((n, 16)))


@pytest.mark.parametrize("rngs, got", [(None, "NoneType"), (0, "int"),
                                       (jax.random.key(0), "PRNGKeyArray")])
def test_layer_rngs_must_be_nnx_rngs(rngs, got):
  with pytest.raises(TypeError, match=rf"rngs must be a flax.nnx.Rngs \(e.g. nnx.Rngs\(0\)\), "
                                      rf"got {got}"):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, rngs=rngs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype=jnp.int32), "dtype must be float32, bfloat16, float16 or None, got int32"),
    (dict(dtype="int8"), "dtype must be float32, .* got int8"),
    (dict(dtype=bool), "dtype must be .* got bool"),
    (dict(dtype=jnp.float64), "dtype must be float32, .* got float64"),
    (dict(dtype="nope"), "dtype must be .* got 'nope'"),
    (dict(param_dtype=jnp.int32), "param_dtype must be a floating dtype, got int32"),
    (dict(param_dtype=None), "param_dtype must be a floating dtype"),
])
def test_layer_refuses_dtypes_the_op_cannot_take_at_construction(kwargs, match):
  with pytest.raises(TypeError, match=match):
    jsta.nnx.SlidingTileAttention(2, 16, SPEC, rngs=nnx.Rngs(0), **kwargs)


def test_import_jsta_does_not_import_flax():
  import subprocess
  import sys
  code = "import sys, jsta; assert 'flax' not in sys.modules; jsta.nnx; assert 'flax' in sys.modules"
  subprocess.run([sys.executable, "-c", code], check=True)


def test_text_lengths_through_the_layer_and_multihead_attention_mask():
  # Per-sample text lengths: the layer's text_lengths=, and MultiHeadAttention's mask= carrying
  # an int [batch] array; both equal the op with those lengths.
  x = _x(batch=2)
  lengths = jnp.array([4, 1], jnp.int32)
  layer = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, implementation="xla",
                                        rngs=nnx.Rngs(0))
  got = layer(x, text_lengths=lengths)
  for b in range(2):
    one = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, dataclasses.replace(
        SPEC, text_len=int(lengths[b])), implementation="xla", rngs=nnx.Rngs(0))
    np.testing.assert_allclose(got[b:b + 1], one(x[b:b + 1]), atol=1e-5, rtol=1e-5)
  fn = jsta.nnx.make_attention_fn(SPEC, implementation="xla")
  mha = _mha(SPEC, fn)
  out = jax.jit(lambda x, t: mha(x, mask=t))(x, lengths)
  for b in range(2):
    spec_b = dataclasses.replace(SPEC, text_len=int(lengths[b]))
    mha_b = _mha(spec_b, jsta.nnx.make_attention_fn(spec_b, implementation="xla"))
    np.testing.assert_allclose(out[b:b + 1], mha_b(x[b:b + 1]), atol=1e-5, rtol=1e-5)


def test_implementation_and_its_alias_backend():
  # implementation= is the op's name; backend= stays an alias. Both with different values is
  # a ValueError; equal values are accepted.
  x = _x(batch=1)
  make = lambda **kw: jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, rngs=nnx.Rngs(0), **kw)
  ref = make(implementation="xla")
  assert ref.implementation == "xla"
  assert make().implementation == "auto"
  assert make(implementation=["pallas_triton", "xla"]).implementation == ("pallas_triton", "xla")
  for kw in (dict(backend="xla"), dict(implementation="xla", backend="xla")):
    layer = make(**kw)
    assert layer.implementation == "xla"
    np.testing.assert_array_equal(layer(x), ref(x))
  with pytest.raises(ValueError, match="give implementation= or its alias backend=, not both"):
    make(implementation="xla", backend="auto")
  with pytest.raises(ValueError, match="give implementation= or its alias backend=, not both"):
    jsta.nnx.make_attention_fn(SPEC, implementation="xla", backend="auto")
  q = jnp.ones((1, SPEC.seq_len, 2, 8))
  np.testing.assert_array_equal(jsta.nnx.make_attention_fn(SPEC, backend="xla")(q, q, q),
                                jsta.nnx.make_attention_fn(SPEC, implementation="xla")(q, q, q))


# ---- grouped-query attention, initializers, sharding metadata, MultiHeadAttention's layout ----

@pytest.mark.parametrize("fused_qkv", [True, False], ids=["fused", "separate"])
@pytest.mark.parametrize("num_kv_heads", [1, 2])
def test_grouped_query_layer_equals_hand_built(fused_qkv, num_kv_heads):
  layer = jsta.nnx.SlidingTileAttention(4, FEATURES, SPEC, num_kv_heads=num_kv_heads,
                                        qkv_features=16, fused_qkv=fused_qkv, qk_norm=True,
                                        rotary=_rotate_half, implementation="xla",
                                        rngs=nnx.Rngs(7))
  assert (layer.num_heads, layer.num_kv_heads, layer.head_dim) == (4, num_kv_heads, 4)
  if fused_qkv:
    chex.assert_shape(layer.qkv.kernel[...], (FEATURES, (4 + 2 * num_kv_heads) * 4))
  else:
    chex.assert_shape(layer.query.kernel[...], (FEATURES, 4, 4))
    chex.assert_shape(layer.key.kernel[...], (FEATURES, num_kv_heads, 4))
    chex.assert_shape(layer.value.bias[...], (num_kv_heads, 4))
    chex.assert_shape(layer.out.kernel[...], (4, 4, FEATURES))
  x = _x(seed=8)
  np.testing.assert_allclose(np.asarray(layer(x)),
                             np.asarray(_hand_built(layer, x, _rotate_half)), atol=1e-4,
                             rtol=1e-4)
  with pytest.raises(ValueError, match=r"num_kv_heads \(3\) must divide num_heads \(4\)"):
    jsta.nnx.SlidingTileAttention(4, FEATURES, SPEC, num_kv_heads=3, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("fused_qkv", [True, False], ids=["fused", "separate"])
def test_kernel_and_bias_init(fused_qkv):
  layer = jsta.nnx.SlidingTileAttention(
      HEADS, FEATURES, SPEC, fused_qkv=fused_qkv, kernel_init=nnx.initializers.constant(0.5),
      bias_init=nnx.initializers.constant(-1.0), rngs=nnx.Rngs(0))
  params = nnx.state(layer, nnx.Param)
  for path, p in jax.tree_util.tree_leaves_with_path(params):
    want = 0.5 if "kernel" in jax.tree_util.keystr(path) else -1.0
    np.testing.assert_array_equal(np.asarray(p), want, err_msg=jax.tree_util.keystr(path))
  # The defaults are nnx.Linear's: the fused layout draws exactly what it drew before.
  default = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, rngs=nnx.Rngs(0))
  linear = nnx.Linear(FEATURES, 3 * FEATURES, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(default.qkv.kernel[...], linear.kernel[...])
  with pytest.raises(TypeError, match="kernel_init must be an initializer"):
    jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, kernel_init=0.0, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="fused_qkv must be a bool"):
    jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, fused_qkv="no", rngs=nnx.Rngs(0))


SEPARATE_AXES = {"query": ("embed", "heads", "kv"), "key": ("embed", "kv_heads", "kv"),
                 "value": ("embed", "kv_heads", "kv"), "out": ("heads", "kv", "embed")}


def _partition_specs(layer) -> dict[str, tuple]:
  specs = nnx.get_partition_spec(nnx.state(layer, nnx.Param))
  return {"/".join(map(str, path)): tuple(v.get_value())
          for path, v in nnx.to_flat_state(specs)}


def test_kernel_axes_put_sharding_metadata_on_the_parameters():
  # Logical names as metadata only (no mesh needed without eager sharding).
  with nnx.use_eager_sharding(False):
    layer = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, fused_qkv=False,
                                          kernel_axes=SEPARATE_AXES, rngs=nnx.Rngs(0))
    fused = jsta.nnx.SlidingTileAttention(
        HEADS, FEATURES, SPEC, kernel_axes={"qkv": ("embed", "heads")}, rngs=nnx.Rngs(0))
  assert _partition_specs(layer) == {
      "query/kernel": ("embed", "heads", "kv"), "query/bias": ("heads", "kv"),
      "key/kernel": ("embed", "kv_heads", "kv"), "key/bias": ("kv_heads", "kv"),
      "value/kernel": ("embed", "kv_heads", "kv"), "value/bias": ("kv_heads", "kv"),
      "out/kernel": ("heads", "kv", "embed"), "out/bias": ("embed",)}
  # A kernel left out of the mapping gets no metadata (an empty spec: replicated).
  assert _partition_specs(fused) == {"qkv/kernel": ("embed", "heads"), "qkv/bias": ("heads",),
                                     "out/kernel": (), "out/bias": ()}
  # With eager sharding (Flax's default) under a mesh: the parameters are placed by it.
  mesh = jax.make_mesh((1,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
  with jax.set_mesh(mesh):
    sharded = jsta.nnx.SlidingTileAttention(
        HEADS, FEATURES, SPEC, fused_qkv=False, implementation="xla",
        kernel_axes={"query": (None, "model", None), "out": ("model", None, None)},
        rngs=nnx.Rngs(0))
    y = sharded(_x(batch=1))
  assert sharded.query.kernel[...].sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
  assert _partition_specs(sharded)["out/kernel"] == ("model", None, None)
  chex.assert_shape(y, (1, SPEC.seq_len, FEATURES))


@pytest.mark.parametrize("kernel_axes, error, match", [
    (("embed", "heads"), TypeError, "kernel_axes must be None or a mapping"),
    ({"query": ("embed", "heads")}, ValueError, r"unknown kernel 'query'; with fused_qkv=True"),
    ({"qkv": ("embed",)}, ValueError, r"kernel_axes\['qkv'\] must name each of the kernel's 2"),
    ({"qkv": "embed"}, TypeError, r"kernel_axes\['qkv'\] must be a tuple of axis names"),
    ({"qkv": ("embed", 3)}, TypeError, r"entries must be str, None or tuples of str"),
])
def test_kernel_axes_bad_values(kernel_axes, error, match):
  with pytest.raises(error, match=match):
    jsta.nnx.SlidingTileAttention(HEADS, FEATURES, SPEC, kernel_axes=kernel_axes,
                                  rngs=nnx.Rngs(0))


@pytest.mark.parametrize("num_kv_heads", [None, 1], ids=["mha", "gqa"])
def test_separate_projections_load_multihead_attention_weights(num_kv_heads):
  # The same parameters in an nnx.MultiHeadAttention (attention_fn = STA) and in the layer with
  # fused_qkv=False give the same output.
  spec = SPEC.with_window((1, 1, 1))
  mha = nnx.MultiHeadAttention(HEADS, FEATURES, num_kv_heads=num_kv_heads,
                               attention_fn=jsta.nnx.make_attention_fn(spec, implementation="xla"),
                               decode=False, rngs=nnx.Rngs(11))
  layer = jsta.nnx.SlidingTileAttention(HEADS, FEATURES, spec, num_kv_heads=num_kv_heads,
                                        fused_qkv=False, implementation="xla", rngs=nnx.Rngs(0))
  assert jax.tree.map(jnp.shape, nnx.state(layer, nnx.Param)) == jax.tree.map(
      jnp.shape, nnx.state(mha, nnx.Param))
  nnx.update(layer, nnx.state(mha, nnx.Param))
  x = _x(spec, seed=12)
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(mha(x)), atol=1e-6, rtol=1e-6)
  lengths = jnp.array([1, 4])
  np.testing.assert_allclose(np.asarray(layer(x, text_lengths=lengths)),
                             np.asarray(mha(x, mask=lengths)), atol=1e-6, rtol=1e-6)


# ---- make_attention_fn: Flax's keyword arguments and key-padding masks --------------------------

def _valid(spec, lengths, real_video=True):
  """[batch, seq] bool: the video positions (only the real ones, or all) and each sample's first
  lengths[b] text slots."""
  video = np.zeros(spec.seq_len, bool)
  video[spec.video_offset:spec.video_offset + spec.padded_video_len] = True
  if real_video:
    video &= jsta.token_valid(dataclasses.replace(spec, text_len=0))
  slot = np.arange(spec.seq_len) - spec.text_offset
  text = (slot >= 0) & (slot < spec.text_max_len)
  return video[None] | (text[None] & (slot[None] < np.asarray(lengths)[:, None]))


@pytest.mark.parametrize("text_position", ["last", "first"])
def test_key_padding_masks_equal_text_lengths(text_position):
  spec = dataclasses.replace(SPEC, text_position=text_position)
  assert spec.is_padded                         # partial tiles: padded latent positions exist
  x = _x(spec, batch=2, seed=13)
  lengths = np.array([3, 0])
  mha = _mha(spec, jsta.nnx.make_attention_fn(spec, implementation="xla"))
  want = mha(x, mask=jnp.asarray(lengths))
  valid, valid_all = _valid(spec, lengths), _valid(spec, lengths, real_video=False)
  ones = np.ones_like(valid)
  masks = {
      "query_and_key": nnx.make_attention_mask(valid, valid, dtype=bool),
      "key_only": nnx.make_attention_mask(ones, valid, dtype=bool),
      "float_default_dtype": nnx.make_attention_mask(valid, valid),
      "one_row": valid[:, None, None, :],
      "padded_latent_true": nnx.make_attention_mask(valid_all, valid_all, dtype=bool),
      "per_head": np.broadcast_to(valid[:, None, None, :], (2, HEADS, 1, spec.seq_len)),
  }
  # Each form is accepted (checked: the masks are concrete) and read as the same lengths; one
  # mask for the whole batch gives its lengths to every sample.
  for name, mask in masks.items():
    np.testing.assert_array_equal(
        jsta.nnx._text_lengths_from_mask(jnp.asarray(mask), spec, 2, HEADS), lengths, name)
  shared = _valid(spec, [2])[:, None, None]
  np.testing.assert_array_equal(
      jsta.nnx._text_lengths_from_mask(jnp.asarray(shared), spec, 2, HEADS), [2, 2])
  # End to end, eager (checked) and under jit (a traced mask: read, not checked).
  np.testing.assert_allclose(np.asarray(mha(x, mask=jnp.asarray(masks["padded_latent_true"]))),
                             np.asarray(want), atol=1e-6, rtol=1e-6)
  got = nnx.jit(lambda m, x, mask: m(x, mask=mask))(mha, x, jnp.asarray(masks["query_and_key"]))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", ["video_key_masked", "text_not_a_prefix", "heads_differ",
                                  "valid_query_row_empty", "padded_query_attends_other"])
def test_key_padding_masks_sta_cannot_express_raise(case):
  n = SPEC.seq_len
  fn = jsta.nnx.make_attention_fn(SPEC, implementation="xla")
  q = jnp.zeros((2, n, HEADS, 8))
  valid = _valid(SPEC, [3, 1])
  mask = np.array(nnx.make_attention_mask(valid, valid, dtype=bool))
  mask = np.broadcast_to(mask, (2, HEADS, n, n)).copy()
  t0 = SPEC.text_offset
  if case == "video_key_masked":
    mask[0, :, :, 0] = False
  elif case == "text_not_a_prefix":
    mask[1, :, :, t0] = False
    mask[1, :, :, t0 + 1] = valid[1, :, None][:, 0]
  elif case == "heads_differ":
    mask[0, 1, :, t0 + 2] = False
  elif case == "valid_query_row_empty":
    mask[0, :, 5, :] = False
  elif case == "padded_query_attends_other":
    mask[1, :, t0 + 3, :] = True                  # a padded text query attending every key
  with pytest.raises(ValueError, match="the mask cannot be expressed by the spec") as info:
    fn(q, q, q, mask=jnp.asarray(mask))
  assert "Pass a key-padding mask of that form or the text lengths" in str(info.value)


def test_mask_shapes_and_types():
  n = SPEC.seq_len
  fn = jsta.nnx.make_attention_fn(SPEC, implementation="xla")
  q = jnp.zeros((2, n, HEADS, 8))
  with pytest.raises(ValueError, match=r"mask must be \[batch=2 or 1, heads=2 or 1, q_len=68"):
    fn(q, q, q, mask=jnp.ones((2, 1, n, n - 1), bool))
  with pytest.raises(ValueError, match=r"mask must be \[batch=2 or 1"):
    fn(q, q, q, mask=jnp.ones((3, 1, n, n), bool))
  with pytest.raises(ValueError, match="mask must be None, an integer array \\[batch\\]"):
    fn(q, q, q, mask=jnp.ones((2, n), bool))
  with pytest.raises(TypeError, match="mask must be a jax or numpy array"):
    fn(q, q, q, mask=[3, 1])


def test_attention_fn_checks_key_value_and_dtype_like_query():
  fn = jsta.nnx.make_attention_fn(SPEC, implementation="xla")
  q = jnp.zeros((2, SPEC.seq_len, HEADS, 8))
  with pytest.raises(TypeError, match="key must be a jax or numpy array, got list"):
    fn(q, q.tolist(), q)
  with pytest.raises(TypeError, match="value must be a jax or numpy array, got NoneType"):
    fn(q, q, None)
  with pytest.raises(ValueError, match=r"value must be \[batch, seq_len, heads, head_dim\], "
                                       r"got shape \(68, 2, 8\)"):
    fn(q, q, q[0])
  # A query of the wrong rank is refused before a 4-D mask is read with its batch and heads.
  with pytest.raises(ValueError, match=r"query must be \[batch, seq_len, heads, head_dim\]"):
    fn(q[0, 0], q, q, mask=jnp.ones((2, 1, SPEC.seq_len, SPEC.seq_len), bool))
  for dtype, got in (("foo", "'foo'"), (jnp.int32, "int32")):
    with pytest.raises(TypeError, match=rf"dtype must be float32, bfloat16, float16, float64 or "
                                        rf"None, got {got}"):
      fn(q, q, q, dtype=dtype)
  assert fn(q, q, q, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  x64 = np.zeros(q.shape, np.float64)       # numpy: cast without JAX's x64 warning
  assert fn(x64, x64, x64, dtype=np.float64).dtype == jnp.float32   # as the op takes float64


def test_attention_fn_takes_every_keyword_multihead_attention_passes():
  # input_positions (forwarded by MultiHeadAttention when given) and the rest of Flax's call.
  x = _x(batch=2, seed=14)
  mha = _mha(SPEC, jsta.nnx.make_attention_fn(SPEC, implementation="xla"))
  pos = jnp.broadcast_to(jnp.arange(SPEC.seq_len), (2, SPEC.seq_len))
  np.testing.assert_array_equal(np.asarray(mha(x, input_positions=pos)), np.asarray(mha(x)))
  fn = jsta.nnx.make_attention_fn(SPEC, implementation="xla")
  q = jax.random.normal(jax.random.key(0), (1, SPEC.seq_len, HEADS, 8))
  got = fn(q, q, q, bias=None, mask=None, broadcast_dropout=True, dropout_rng=jax.random.key(1),
           dropout_rate=0.0, deterministic=True, dtype=jnp.float32,
           precision=jax.lax.Precision.HIGHEST, module=None,
           promote_dtype=lambda *a, **k: a, is_causal=False, input_positions=pos[:1])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(fn(q, q, q)))
  # Flax's own dot_product_attention takes the same arguments (input_positions aside).
  import inspect
  flax_args = set(inspect.signature(nnx.dot_product_attention).parameters)
  assert flax_args | {"input_positions"} <= set(inspect.signature(fn).parameters)
