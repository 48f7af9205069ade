"""Bad input to the public functions: each raises a TypeError (wrong type) or ValueError (wrong
value) that names the argument, before any tracing; and inputs that used to give a silent wrong
result now raise or give the right one. Tiny shapes, the xla backend only."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from jsta.spec import STASpec, full_window

SPEC3 = STASpec((4, 4, 4), (2, 2, 2), (1, 1, 1))


# ---- STASpec and its methods --------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(causal_axes=False), "causal_axes must be a tuple of ints, got the bool False"),
    (dict(causal_axes=True), "causal_axes must be a tuple of ints, got the bool True"),
    (dict(causal_axes=np.bool_(True)), "causal_axes must be a tuple of ints"),
    (dict(latent_shape=True, tile_shape=1, window=1), "latent_shape must be a tuple of ints"),
    (dict(tile_shape=True, latent_shape=4, window=1), "tile_shape must be a tuple of ints"),
    (dict(window=True), "window must be a tuple of odd ints"),
    (dict(window=(True, 1, 1)), "window must be a tuple of ints"),
])
def test_spec_refuses_bools_for_sizes_and_axes(kwargs, match):
  args = dict(latent_shape=(4, 4, 4), tile_shape=(2, 2, 2), window=(1, 3, 3)) | kwargs
  with pytest.raises(TypeError, match=match):
    STASpec(**args)


@pytest.mark.parametrize("call, exc, match", [
    (lambda s: s.sparsity((3, 3)), ValueError, r"window \(3, 3\) has rank 2 but .* rank is 3"),
    (lambda s: s.sparsity((2, 3, 3)), ValueError, "window sizes must be odd"),
    (lambda s: s.sparsity("333"), TypeError, "window must be a tuple of ints"),
    (lambda s: s.effective_window((3, 3)), ValueError, "window .* has rank 2"),
    (lambda s: s.flops("64"), TypeError, "head_dim must be an int, got str"),
    (lambda s: s.flops(-64), ValueError, "head_dim must be >= 1, got -64"),
    (lambda s: s.flops(True), TypeError, "head_dim must be an int, got bool"),
    (lambda s: s.flops(64, num_heads="2"), TypeError, "num_heads must be an int"),
    (lambda s: s.attended_pairs("2"), TypeError, "num_heads must be an int"),
    (lambda s: s.attended_pairs(True), TypeError, "num_heads must be an int"),
    (lambda s: s.attended_pairs(-1), ValueError, "num_heads .* must be >= 1"),
    (lambda s: s.head_windows(2.0), TypeError, "num_heads must be an int"),
])
def test_spec_methods_check_their_arguments(call, exc, match):
  with pytest.raises(exc, match=match):
    call(SPEC3)


def test_spec_methods_keep_their_answers():
  assert SPEC3.sparsity((1, 1, 1)) == 1 - 1 / 8
  assert SPEC3.sparsity([3, 3, 3]) == 0.0
  assert SPEC3.flops(2, num_heads=2) == 4 * SPEC3.attended_pairs(2) * 2
  causal = STASpec((4, 4, 4), (2, 2, 2), (2, 1, 1), causal_axes=(0,))
  assert causal.sparsity((2, 1, 1)) == causal.sparsity()


@pytest.mark.parametrize("latent, tile, exc, match", [
    ((4, 4), (2, 2, 2), ValueError, r"tile_shape \(2, 2, 2\) has rank 3 but latent_shape"),
    ((4, 0), (2, 2), ValueError, "latent_shape sizes must be positive"),
    ((4, 4), (2, 0), ValueError, "tile_shape sizes must be positive"),
    ((4, 4), (2, -1), ValueError, "tile_shape sizes must be positive"),
    ((4, 4), (2.0, 2), TypeError, "tile_shape must be a tuple of ints"),
    ((4, True), (2, 1), TypeError, "latent_shape must be a tuple of ints"),
    ((4, 4, 4, 4), (1, 1, 1, 1), ValueError, "latent_shape must have rank 1, 2 or 3"),
    (None, (2, 2), TypeError, "latent_shape must be a tuple of ints"),
])
def test_full_window_checks_its_arguments(latent, tile, exc, match):
  with pytest.raises(exc, match=match):
    full_window(latent, tile)


def test_full_window_answers():
  assert full_window((4, 4), (2, 2)) == (3, 3)
  assert full_window(8, 2) == (5,)
  assert full_window((30, 48, 80), (6, 8, 8)) == (5, 7, 11)


# ---- masks and schedules ------------------------------------------------------------------------
@pytest.mark.parametrize("call, exc, match", [
    (lambda: jsta.token_valid(None), TypeError, "spec must be a jsta.STASpec, got NoneType"),
    (lambda: jsta.token_valid([1, 2]), TypeError, "spec must be a jsta.STASpec, got list"),
    (lambda: jsta.token_mask(None), TypeError, "spec must be a jsta.STASpec"),
    (lambda: jsta.token_mask(SPEC3, (2, 2, 2)), ValueError, "window sizes must be odd"),
    (lambda: jsta.token_mask(SPEC3, (3, 3)), ValueError, r"window \(3, 3\) has rank 2"),
    (lambda: jsta.token_mask(SPEC3, [3, 3, 3, 3]), ValueError, "has rank 4"),
    (lambda: jsta.token_mask(SPEC3, 3.0), TypeError, "window must be a tuple of ints"),
    (lambda: jsta.mask.token_mask_rows(SPEC3, (2, 1, 1), [0]), ValueError, "must be odd"),
    (lambda: jsta.mask.attended_pairs(SPEC3, (1, 1)), ValueError, "has rank 2"),
    (lambda: jsta.block_schedule(None, 1, 8, 8), TypeError, "spec must be a jsta.STASpec"),
    (lambda: jsta.block_schedule(SPEC3, "1", 8, 8), TypeError, "num_heads must be an int"),
    (lambda: jsta.block_schedule(SPEC3, 1, 8, 8, mask_unit="8"), TypeError, "mask_unit must be"),
    (lambda: jsta.block_schedule(SPEC3, 1, 8, 8, dynamic_text="yes"), TypeError,
     "dynamic_text must be a bool"),
])
def test_masks_and_schedules_check_their_arguments(call, exc, match):
  with pytest.raises(exc, match=match):
    call()


def test_token_mask_keeps_even_windows_on_causal_axes():
  spec = STASpec((4, 4), (2, 2), (2, 1), causal_axes=(0,))
  assert jsta.token_mask(spec, (2, 1)).shape == (spec.seq_len, spec.seq_len)
  np.testing.assert_array_equal(jsta.token_mask(spec, [2, 1]), jsta.token_mask(spec))


def test_block_schedule_validation_does_not_depend_on_the_cache():
  spec = STASpec((4, 4, 4), (2, 2, 2), (1, 1, 1))
  jsta.block_schedule(spec, 2, 8, 8)                    # now (spec, 2, 8, 8) is cached
  for args in [(2.0, 8, 8), (2, 8.0, 8), (2, 8, 8.0), (True, 8, 8)]:
    with pytest.raises(TypeError, match="must be"):
      jsta.block_schedule(spec, *args)
  assert jsta.block_schedule(spec, np.int64(2), 8, 8) is jsta.block_schedule(spec, 2, 8, 8)


def test_blocks_that_do_not_divide_the_tile_say_so():
  with pytest.raises(ValueError, match=r"block_q=7 does not divide 8, the gcd of the tile "
                                       r"lengths .* use block sizes that divide 8"):
    jsta.block_schedule(SPEC3, 1, 7, 8)


# ---- the op -------------------------------------------------------------------------------------
TEXT = STASpec((4, 4), (2, 2), (1, 1), text_len=2, text_max_len=4)
PADDED = STASpec((3, 4), (2, 2), (1, 1), text_len=1, text_max_len=3)


def _qkv(spec, heads=2, head_dim=8, batch=1, seed=0):
  import jax
  return tuple(jax.random.normal(k, (batch, spec.seq_len, heads, head_dim))
               for k in jax.random.split(jax.random.key(seed), 3))


@pytest.mark.parametrize("scale", [1e39, -1e39, 3e38, np.float64(1e300)])
def test_scale_must_be_finite_in_float32(scale):
  q, k, v = _qkv(TEXT)
  with pytest.raises(ValueError, match="scale must be finite in float32"):
    jsta.sliding_tile_attention(q, k, v, TEXT, scale=scale, backend="xla")
  with pytest.raises(ValueError, match="scale must be finite in float32"):
    jsta.make_plan(TEXT, 2, 8, np.float32, scale=scale)


def test_a_large_scale_below_the_bound_is_taken():
  q, k, v = _qkv(TEXT)
  o = jsta.sliding_tile_attention(q * 2.0 ** -70, k, v, TEXT, scale=2.0 ** 70, backend="xla")
  want = jsta.sliding_tile_attention(q, k, v, TEXT, scale=1.0, backend="xla")
  np.testing.assert_allclose(np.asarray(o), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("value", ["False", "True", 0, 1, None, np.array([True])])
def test_return_lse_must_be_a_bool(value):
  q, k, v = _qkv(TEXT)
  with pytest.raises(TypeError, match="return_lse must be a bool"):
    jsta.sliding_tile_attention(q, k, v, TEXT, return_lse=value, backend="xla")


def test_return_lse_traced_is_a_clear_type_error():
  import jax
  q, k, v = _qkv(TEXT)
  f = jax.jit(lambda q, r: jsta.sliding_tile_attention(q, k, v, TEXT, return_lse=r,
                                                       backend="xla"))
  with pytest.raises(TypeError, match="return_lse must be a static bool"):
    f(q, True)
  o, lse = jsta.sliding_tile_attention(q, k, v, TEXT, return_lse=np.bool_(True), backend="xla")
  assert lse.shape == (1, TEXT.seq_len, 2)


def test_traced_unsigned_text_lengths_are_clamped_not_wrapped():
  import jax
  import jax.numpy as jnp
  spec = STASpec((3, 4), (2, 2), (1, 1), text_len=1, text_max_len=3, text_position="first")
  q, k, v = _qkv(spec, batch=2)
  want = jsta.sliding_tile_attention(q, k, v, spec, text_lengths=np.array([spec.text_max_len, 1]),
                                     backend="xla")
  op = jax.jit(lambda tl: jsta.sliding_tile_attention(q, k, v, spec, text_lengths=tl,
                                                      backend="xla"))
  ref = jax.jit(lambda tl: jsta.reference_attention(q, k, v, spec, text_lengths=tl))
  for dtype, big in ((jnp.uint32, 2 ** 32 - 1), (jnp.uint32, 2 ** 31), (jnp.uint8, 255)):
    tl = jnp.array([big, 1], dtype)
    np.testing.assert_array_equal(np.asarray(op(tl)), np.asarray(want))
    np.testing.assert_allclose(np.asarray(ref(tl)), np.asarray(want), atol=1e-5)
  # Negative traced lengths are clamped to 0, as documented.
  zero = jsta.sliding_tile_attention(q, k, v, spec, text_lengths=np.array([0, 0]), backend="xla")
  np.testing.assert_array_equal(np.asarray(op(jnp.array([-5, -(2 ** 31)], jnp.int32))),
                                np.asarray(zero))


@pytest.mark.parametrize("spec", [TEXT, PADDED])
def test_heads_before_seq_gets_the_axis_order_hint(spec):
  q, k, v = (np.swapaxes(np.asarray(x), 1, 2) for x in _qkv(spec))
  with pytest.raises(ValueError, match=r"q has shape .* looks like \[batch, heads, seq, "
                                       r"head_dim\]; the op takes \[batch, seq, heads"):
    jsta.sliding_tile_attention(q, k, v, spec, backend="xla")
  n = spec.video_len + spec.text_max_len
  rm = np.zeros((1, 2, n, 8), np.float32)
  with pytest.raises(ValueError, match="looks like .*swapaxes"):
    jsta.sliding_tile_attention_row_major(rm, rm, rm, spec, backend="xla")
  # Grouped-query attention in that order: the hint, not the head-count message.
  kv = k[:, :1]
  with pytest.raises(ValueError, match="looks like"):
    jsta.sliding_tile_attention(q, kv, kv, spec, backend="xla")


# ---- tile order and the video/text split ---------------------------------------------------------
@pytest.mark.parametrize("pad, exc, match", [
    ("a", TypeError, "pad_value must be a real number .*got str"),
    (None, TypeError, "pad_value must be a real number .*got NoneType"),
    ([1.0, 2.0], TypeError, "pad_value must be a real number .*got list"),
    (np.zeros(3), ValueError, r"pad_value must be a scalar .*shape \(3,\)"),
    (1 + 2j, TypeError, "pad_value must be a real number"),
    (np.array(["a"])[0], TypeError, "pad_value must be a real number"),
])
def test_tile_order_pad_value_is_a_real_scalar(pad, exc, match):
  import jax.numpy as jnp
  x = np.zeros((1, PADDED.video_len, 2), np.float32)
  with pytest.raises(exc, match=match):
    jsta.tile_order(x, PADDED, pad_value=pad)
  with pytest.raises(exc, match=match):   # checked on unpadded specs too
    jsta.tile_order(np.zeros((1, 16, 2)), STASpec((4, 4), (2, 2), (1, 1)), pad_value=pad)
  if exc is ValueError:
    with pytest.raises(exc, match=match):
      jsta.tile_order(x, PADDED, pad_value=jnp.zeros(3))


def test_tile_order_pad_values_that_work():
  import jax
  import jax.numpy as jnp
  x = np.ones((1, PADDED.video_len, 2), np.float32)
  for pad in (0, 1.5, np.float32(-1), jnp.asarray(2.0), np.asarray(3)):
    out = np.asarray(jsta.tile_order(x, PADDED, pad_value=pad))
    np.testing.assert_array_equal(out[0, ~jsta.mask.video_token_valid(PADDED)], float(pad))
  traced = jax.jit(lambda x, p: jsta.tile_order(x, PADDED, pad_value=p))(x, 7.0)
  assert float(np.asarray(traced).max()) == 7.0


@pytest.mark.parametrize("video_shape, text_shape", [
    ((2, 16, 3), (1, 4, 3)),       # batch
    ((1, 16, 3), (1, 4, 5)),       # trailing dims
    ((1, 16, 3), (1, 4)),          # rank
    ((1, 16, 3, 2), (1, 4, 3)),    # rank
])
def test_join_video_text_refuses_parts_that_do_not_fit(video_shape, text_shape):
  with pytest.raises(ValueError, match=r"video and text must agree .* got video "):
    jsta.join_video_text(np.zeros(video_shape), np.zeros(text_shape), TEXT)


# ---- suggest_tile -------------------------------------------------------------------------------
@pytest.mark.parametrize("latent, window, match", [
    ((8, 16, 16), 24, r"window_tokens must be a sequence of ints, one per axis of the rank-3 "
                      r"latent_shape \(e.g. \(18, 24, 24\)\), got int 24"),
    ((8, 16, 16), "24", "window_tokens must be a sequence of ints.* got str"),
    ((8, 16, 16), 24.0, "window_tokens must be a sequence of ints.* got float"),
    ((16, 16), None, r"window_tokens must be .*rank-2 .*\(24, 24\)"),
    (None, (3,), "latent_shape must be a sequence of ints .* got NoneType"),
    ((8, 16, 16), (24, 24.0, 24), r"window_tokens\[1\] must be an int"),
])
def test_suggest_tile_says_what_window_tokens_must_be(latent, window, match):
  with pytest.raises(TypeError, match=match):
    jsta.suggest_tile(latent, window)


def test_suggest_tile_takes_an_int_for_one_axis():
  want = jsta.suggest_tile((256,), (24,))
  assert jsta.suggest_tile(256, 24) == want == jsta.suggest_tile([256], np.int64(24))
  assert jsta.suggest_tile(np.array([8, 16, 16]), np.array([4, 8, 8])).tile_shape == (4, 8, 8)


# ---- backend objects ---------------------------------------------------------------------------
@pytest.mark.parametrize("value, exc, match", [
    ("x", TypeError, "memory_bytes must be an int, got str 'x'"),
    (1.5, TypeError, "memory_bytes must be an int, got float 1.5"),
    (True, TypeError, "memory_bytes must be an int, got bool True"),
    (-5, ValueError, "memory_bytes must be >= 1, got -5"),
    (0, ValueError, "memory_bytes must be >= 1, got 0"),
])
def test_xla_backend_checks_memory_bytes(value, exc, match):
  from jsta.ops import XlaBackend
  with pytest.raises(exc, match=match):
    XlaBackend(memory_bytes=value)


def test_xla_backend_takes_an_int_memory_bytes():
  from jsta.ops import XlaBackend
  assert XlaBackend(memory_bytes=np.int64(1 << 20)).memory_bytes == 1 << 20
  assert XlaBackend().memory_bytes is None


@pytest.mark.parametrize("dtype, match", [
    (jnp.int32, "dtype must be float32, bfloat16 or float16, got int32"),
    ("x", "dtype must be a dtype .* got str 'x'"),
    (None, "dtype must be a dtype .* got NoneType None"),
])
def test_make_plan_checks_dtype(dtype, match):
  spec = jsta.STASpec((2, 8, 8), (2, 4, 4), (3, 3, 3))
  with pytest.raises(TypeError, match=match):
    jsta.make_plan(spec, 2, 8, dtype)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(spec=None), TypeError, "spec must be a jsta.STASpec, got NoneType"),
    (dict(head_dim=8.5), TypeError, "head_dim must be an int, got float 8.5"),
    (dict(head_dim=True), TypeError, "head_dim must be an int, got bool"),
    (dict(head_dim=0), ValueError, "head_dim must be >= 1, got 0"),
    (dict(num_heads=-2), ValueError, "num_heads must be >= 1, got -2"),
    (dict(num_heads=3), ValueError, "window gives 2 per-head windows but there are 3 heads"),
    (dict(dynamic_text="no"), TypeError, "dynamic_text must be a bool"),
])
def test_make_plan_checks_spec_heads_head_dim_and_dynamic_text(kwargs, exc, match):
  """Each of these built a plan (head_dim 8.5 with scale 8.5 ** -0.5; True as head_dim 1;
  "no" as dynamic text) or failed deep inside (ZeroDivisionError, AttributeError)."""
  args = dict(spec=jsta.STASpec((2, 8, 8), (2, 4, 4), ((3, 3, 3), (1, 1, 1))), num_heads=2,
              head_dim=8, dtype=jnp.float32, dynamic_text=False) | kwargs
  with pytest.raises(exc, match=match):
    jsta.make_plan(args.pop("spec"), args.pop("num_heads"), args.pop("head_dim"),
                   args.pop("dtype"), **args)
  assert jsta.make_plan(STASpec((2, 8, 8), (2, 4, 4), (3, 3, 3)), np.int64(2), np.int64(8),
                        jnp.float32).head_dim == 8


# ---- unordered containers, dense masks, the reference ------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(latent_shape={3, 16, 8}), "latent_shape must be a tuple of ints .*unordered set"),
    (dict(tile_shape=frozenset({1, 4, 2})), "tile_shape must be a tuple of ints .*unordered"),
    (dict(window={(3, 3, 3), (1, 1, 1)}), "window must be a tuple .*unordered set"),
    (dict(window=({1: 0, 3: 0, 5: 0})), "window must be a tuple .*unordered dict"),
    (dict(causal_axes={0, 1}), "causal_axes must be a tuple of ints .*unordered set"),
])
def test_spec_refuses_unordered_containers(kwargs, match):
  """A set's order is not the caller's: {3, 16, 8} became latent_shape (16, 8, 3)."""
  args = dict(latent_shape=(3, 16, 8), tile_shape=(1, 4, 4), window=(1, 1, 1)) | kwargs
  with pytest.raises(TypeError, match=match):
    STASpec(**args)


@pytest.mark.parametrize("window, exc, match", [
    ((3, 3), ValueError, r"window \(3, 3\) has rank 2 but the latent/tile rank is 3"),
    ((0, 3, 3), ValueError, "window sizes must be positive"),
    ((-1, 3, 3), ValueError, "window sizes must be positive"),
    ((2, 2, 2), ValueError, "window sizes must be odd"),
    ((3.0, 3, 3), TypeError, "window must be a tuple of ints"),
])
def test_tile_mask_checks_its_window(window, exc, match):
  """tile_mask built a mask of the wrong size for a window of the wrong rank, and masks for
  windows the spec refuses."""
  spec = STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3))
  with pytest.raises(exc, match=match):
    jsta.tile_mask(spec, window)


def test_tile_mask_takes_lists_and_the_spec_window():
  spec = STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3))
  np.testing.assert_array_equal(jsta.tile_mask(spec, [3, 3, 3]), jsta.tile_mask(spec))
  assert jsta.tile_mask(spec).shape == (8, 8) and jsta.tile_mask(spec, (1, 1, 1)).sum() == 8
  with pytest.raises(TypeError, match="spec must be a jsta.STASpec, got NoneType"):
    jsta.tile_mask(None, (3, 3, 3))
  with pytest.raises(ValueError, match="per-head windows; pass window="):
    jsta.tile_mask(STASpec((4, 8, 8), (2, 4, 4), ((3, 3, 3), (1, 1, 1))))


REF_SPEC = STASpec((4, 8, 8), (2, 4, 4), (3, 3, 3), text_len=3, text_max_len=5)


def _ref_qkv(batch=1, heads=2, kv_heads=2):
  rng = np.random.default_rng(0)
  q = rng.standard_normal((batch, REF_SPEC.seq_len, heads, 8)).astype(np.float32)
  k, v = (rng.standard_normal((batch, REF_SPEC.seq_len, kv_heads, 8)).astype(np.float32)
          for _ in range(2))
  return q, k, v


@pytest.mark.parametrize("call, exc, match", [
    (lambda q, k, v: jsta.reference_attention(q, k, v, REF_SPEC, text_lengths=np.array([99])),
     ValueError, r"text_lengths must lie in \[0, text_max_len=5\], got \[99\]"),
    (lambda q, k, v: jsta.reference_attention(q, k, v, REF_SPEC, text_lengths=np.array([1, 2])),
     ValueError, r"text_lengths must be \[batch\] = \[1\], got shape \(2,\)"),
    (lambda q, k, v: jsta.reference_attention(q, np.concatenate([k, k]), np.concatenate([v, v]),
                                              REF_SPEC),
     ValueError, "q, k and v must have the same shape"),
    (lambda q, k, v: jsta.reference_attention(q, k, v, REF_SPEC, scale=float("nan")),
     ValueError, "scale must be finite"),
    (lambda q, k, v: jsta.reference_attention(q, k, v, REF_SPEC, scale=True),
     TypeError, "scale must be a real number or None, got bool"),
    (lambda q, k, v: jsta.reference_attention(q.tolist(), k, v, REF_SPEC),
     TypeError, "q must be a jax or numpy array, got list"),
    (lambda q, k, v: jsta.reference_attention(q[0], k, v, REF_SPEC),
     ValueError, r"q must be \[batch, seq, heads, head_dim\]"),
    (lambda q, k, v: jsta.reference_attention(q, k, v, None),
     TypeError, "spec must be a jsta.STASpec, got NoneType"),
    (lambda q, k, v: jsta.reference_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(
        3, 2), REF_SPEC), ValueError, "may have fewer heads dividing q's"),
    (lambda q, k, v: jsta.reference_attention(q, k, v, REF_SPEC, text_lengths=2),
     TypeError, "text_lengths must be an int array"),
    (lambda q, k, v: jsta.reference.reference_attention_rows(q, k, v, REF_SPEC, [1.5]),
     TypeError, "rows must be a 1-D list or array of ints, got dtype float64"),
    (lambda q, k, v: jsta.reference.reference_attention_rows(q, k, v, REF_SPEC, [True]),
     TypeError, "rows must be a 1-D list or array of ints, got dtype bool"),
    (lambda q, k, v: jsta.reference.reference_attention_rows(q, k, v, REF_SPEC, [REF_SPEC.seq_len]),
     ValueError, r"rows must be a non-empty 1D list of positions in \[0, 261\)"),
])
def test_reference_checks_its_inputs_as_the_op(call, exc, match):
  """The dense reference clamped out-of-range text lengths, broadcast mismatched batches and
  lengths, took NaN and bool scales and truncated 1.5 to row 1; now it raises as the op does."""
  with pytest.raises(exc, match=match):
    call(*_ref_qkv())


def test_reference_rows_equal_the_reference_with_grouped_kv():
  q, k, v = _ref_qkv(kv_heads=1)
  full = np.asarray(jsta.reference_attention(q, k, v, REF_SPEC))
  rows = np.array([0, 5, REF_SPEC.seq_len - 1])
  np.testing.assert_allclose(
      np.asarray(jsta.reference.reference_attention_rows(q, k, v, REF_SPEC, rows)),
      full[:, rows], rtol=1e-6, atol=1e-6)


# ---- backends as values ------------------------------------------------------------------------
def test_a_backend_class_is_not_a_backend_object():
  from jsta.ops import XlaBackend
  x = np.zeros((1, SPEC3.seq_len, 1, 8), np.float32)
  for impl in (XlaBackend, (XlaBackend, "xla")):
    with pytest.raises(TypeError, match="not classes: pass an instance, e.g. XlaBackend()"):
      jsta.sliding_tile_attention(x, x, x, SPEC3, implementation=impl)
  assert jsta.sliding_tile_attention(x, x, x, SPEC3, implementation=XlaBackend()).shape == x.shape


def test_registry_lookups_take_names_and_refuse_reserved_ones():
  from jsta.ops import XlaBackend
  for fn in (jsta.get_backend, jsta.resolve_backend):
    with pytest.raises(TypeError, match="backend must be a str .* got XlaBackend"):
      fn(XlaBackend())
  for name in ("auto", "", "  "):
    with pytest.raises(ValueError, match="other than 'auto' and not empty"):
      jsta.register_backend(name, XlaBackend)
  assert jsta.backends.backend_names().count("auto") == 1


@pytest.mark.parametrize("dtype, pad", [
    (np.int8, 300), (np.uint8, -1), (np.int32, 1.5), (jnp.bfloat16, 1e40), (np.float16, 7e4),
    (np.bool_, 2),
])
def test_tile_order_pad_value_must_fit_the_dtype(dtype, pad):
  """jnp.full wrapped 300 to 44 in int8, -1 to 255 in uint8, truncated 1.5 to 1 and overflowed
  1e40 to inf in bfloat16."""
  x = jnp.ones((1, PADDED.video_len, 2), dtype)
  with pytest.raises(ValueError, match=f"pad_value must be representable in x's dtype"):
    jsta.tile_order(x, PADDED, pad_value=pad)


def test_tile_order_pad_values_that_fit_the_dtype():
  for dtype, pad in ((np.int8, -128), (np.uint8, 255), (np.int32, 2.0), (jnp.bfloat16, 0.1),
                     (np.float32, float("-inf")), (np.bool_, True)):
    x = jnp.zeros((1, PADDED.video_len, 2), dtype)
    out = np.asarray(jsta.tile_order(x, PADDED, pad_value=pad).astype(jnp.float32))
    assert out[0, ~jsta.mask.video_token_valid(PADDED)].flat[0] == np.float32(
        jnp.asarray(pad, dtype).astype(jnp.float32))
