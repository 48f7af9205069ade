"""The Hopper kernels (pallas_mosaic) beyond the shared correctness suite (test_attention.py):
configuration and input checks, the backward choice, autotuning, the modules each path lowers
to (CUDA lowering on the CPU: whole Mosaic GPU pipeline, shared-memory limits included), and on
a compute capability 9.x GPU the lse convention and a tuned config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jsta
from pallas_kernels.mosaic import autotune as autotune_lib
from pallas_kernels.mosaic import backend, common, config

from helpers import (MOSAIC_SPLIT, interpreted, np_f32, random_qkv, rel_l2,
                     run_on_cpu_devices)

TOL = 2e-2


@pytest.fixture
def no_device_check(monkeypatch):
  """Plans for the compiled kernels on a machine without a Hopper GPU (to lower them for CUDA,
  or to see what "auto" picks on one): the device check passes."""
  monkeypatch.setattr(backend, "check_device", lambda: None)


# ---- CPU: checks and choices --------------------------------------------------------------------
def test_check_rejects_unsupported():
  spec = jsta.STASpec((4, 8, 8), (2, 8, 8), (1, 1, 1))
  with pytest.raises(ValueError, match="float32 is not supported"):
    config.check(spec, 64, jnp.float32, 128, 128)
  with pytest.raises(ValueError, match="head_dim"):
    config.check(spec, 96, jnp.bfloat16, 128, 128)
  with pytest.raises(ValueError, match="block_kv"):
    config.check(spec, 64, jnp.bfloat16, 128, 32)
  odd = jsta.STASpec((4, 6, 8), (2, 6, 8), (1, 1, 1))   # 96-token tiles
  with pytest.raises(ValueError, match="needs tiles of a multiple of 64 tokens"):
    config.check(odd, 64, jnp.bfloat16, 128, 64)
  config.check(spec, 128, jnp.float16, 128, 64)
  with pytest.raises(ValueError, match="max_concurrent_steps"):
    config.MosaicConfig(max_concurrent_steps=5)
  with pytest.raises(ValueError, match="backward_variant"):
    config.MosaicConfig(backward_variant="fast")


def test_default_blocks_and_stages():
  spec = jsta.STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  assert config.default_blocks(spec, 128, jnp.bfloat16) == (128, 128)
  # 192-token tiles: 128-row blocks span tiles (masked per warpgroup), not 64-row blocks.
  assert config.default_blocks(jsta.STASpec((6, 8, 8), (3, 8, 8), (1, 1, 1)), 128,
                               jnp.bfloat16) == (128, 128)
  assert config.default_stages(128, 128, 128) == 2
  assert config.default_stages(128, 64, 128) == 4
  assert config.default_stages(128, 64, 64) == 4


def test_backward_variant_choice():
  use = backend.use_fused_backward
  assert use(128, 128, config.MosaicConfig())
  assert not use(64, 128, config.MosaicConfig())   # a warpgroup's 32 dQ columns: split
  assert use(64, 64, config.MosaicConfig())
  assert not use(128, 128, config.MosaicConfig(backward_variant="split"))
  assert use(64, 64, config.MosaicConfig(backward_variant="fused"))
  with pytest.raises(ValueError, match="multiple of 64"):
    use(64, 128, config.MosaicConfig(backward_variant="fused"))
  assert backend.MosaicBackend(backward_variant="split").config(128, 128, 128) == (
      config.MosaicConfig(backward_variant="split", masked_steps_apart=True))
  tuned = config.MosaicConfig(max_concurrent_steps=3)
  assert backend.MosaicBackend(configs=(((128, 128, 128), tuned),)).config(128, 128, 128) is tuned


def test_auto_falls_back_from_mosaic_for_unsupported_input(monkeypatch, no_device_check):
  """On Hopper, "auto" resolves to pallas_mosaic (head_dim 32 zero-padded to 64); float32 or
  head_dim 192 go to pallas_triton."""
  import jsta.backends as backends
  import jsta.ops as ops
  monkeypatch.setattr(backends, "resolve_backend", lambda b: "pallas_mosaic" if b == "auto" else b)
  spec = jsta.STASpec((4, 8, 8), (2, 8, 8), (1, 1, 1))
  assert ops.make_plan(spec, 2, 64, jnp.bfloat16).backend == "pallas_mosaic"
  assert ops.make_plan(spec, 2, 64, jnp.float32).backend == "pallas_triton"
  assert ops.make_plan(spec, 2, 32, jnp.float16).backend == "pallas_mosaic"
  assert ops.make_plan(spec, 2, 192, jnp.float16).backend == "pallas_triton"
  with pytest.raises(ValueError, match="float32 is not supported"):
    ops.make_plan(spec, 2, 64, jnp.float32, backend="pallas_mosaic")


@pytest.mark.cpu_only
def test_explicit_mosaic_without_a_hopper_gpu_says_what_it_needs():
  spec = jsta.STASpec((2, 8, 8), (1, 8, 8), (1, 1, 1))
  q = jnp.zeros((1, spec.seq_len, 1, 64), jnp.bfloat16)
  match = r"pallas_mosaic backend needs an NVIDIA GPU of compute capability 9.x .* device is cpu"
  with pytest.raises(ValueError, match=match):
    jsta.sliding_tile_attention(q, q, q, spec, implementation="pallas_mosaic")
  with pytest.raises(ValueError, match=match):      # under jit: before the kernels are traced
    jax.jit(lambda q: jsta.sliding_tile_attention(q, q, q, spec, backend="pallas_mosaic"))(q)
  with pytest.raises(ValueError, match=match):
    jsta.make_plan(spec, 1, 64, jnp.bfloat16, backend="pallas_mosaic")
  # A list of names goes on to the next; GPU interpret mode, and lowering without the device
  # check, need no GPU.
  assert jsta.make_plan(spec, 1, 64, jnp.bfloat16, backend=("pallas_mosaic", "xla")).backend == (
      "xla")
  backend.MosaicBackend(interpret=True).check(spec, 64, jnp.bfloat16, 128, 128)
  backend.MosaicBackend(device_check=False).check(spec, 64, jnp.bfloat16, 128, 128)


def test_autotune_candidates():
  paper = jsta.STASpec((30, 48, 80), (6, 8, 8), (3, 3, 3))
  cands = autotune_lib.default_candidates(paper, 128)
  assert all(c.block_q == 128 for c in cands)
  assert {(c.block_kv, c.max_concurrent_steps, c.use_schedule_barrier) for c in cands} == {
      (bk, s, sb) for bk in (64, 128) for s in (2, 3, 4) for sb in (True, False)}


def test_autotune_keeps_the_fastest_and_skips_what_does_not_fit(monkeypatch):
  spec = jsta.STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3))
  cands = [config.MosaicConfig(block_kv=128, max_concurrent_steps=s) for s in (2, 3, 4)]
  times = {2: 3.0, 3: 2.0, 4: None}     # the deepest pipeline does not fit

  def fake_time(spec, heads, head_dim, dtype, cfg, **kw):
    t = times[cfg.max_concurrent_steps]
    if t is None:
      raise ValueError("kernel exceeds available shared memory")
    return t

  monkeypatch.setattr(autotune_lib, "time_forward", fake_time)
  assert autotune_lib.autotune(spec, 2, 128, jnp.bfloat16, candidates=cands) == cands[1]
  times.update({2: None, 3: None})
  with pytest.raises(ValueError, match="no candidate config fits"):
    autotune_lib.autotune(spec, 2, 128, jnp.bfloat16, candidates=cands)
  monkeypatch.setattr(autotune_lib, "time_forward",
                      lambda *a, **k: (_ for _ in ()).throw(RuntimeError("real failure")))
  with pytest.raises(RuntimeError, match="real failure"):
    autotune_lib.autotune(spec, 2, 128, jnp.bfloat16, candidates=cands)


# ---- CPU: what each path lowers to --------------------------------------------------------------
def _mosaic_calls(fn, *args) -> int:
  """Mosaic GPU kernels in the CUDA lowering of jit(fn)(*args) (no GPU needed)."""
  text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
  return text.count("stablehlo.custom_call @mosaic_gpu")


TEXT = jsta.STASpec((4, 8, 8), (2, 8, 8), (3, 1, 1), text_len=10, text_max_len=64)
PLAIN = jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1))
# 64-token tiles under 128-row blocks: partly attended block pairs, with and without padding.
SPANNING = jsta.STASpec((2, 8, 32), (1, 8, 8), (1, 1, 3))
SPANNING_RAGGED = jsta.STASpec((2, 10, 20), (1, 8, 8), (1, 1, 1), text_len=10, text_max_len=40)


@pytest.mark.parametrize("spec", [TEXT, PLAIN, SPANNING, SPANNING_RAGGED],
                         ids=["padded", "unpadded", "spanning", "spanning_ragged"])
@pytest.mark.parametrize("backend_name,head_dim,kernels", [
    ("pallas_mosaic", 128, 2),     # forward + fused backward
    (MOSAIC_SPLIT, 128, 3),        # forward + dQ + dK/dV
    ("pallas_mosaic", 64, 3),      # head_dim 64 with 128-row key blocks: split
], ids=["fused_d128", "split_d128", "d64"])
def test_forward_and_backward_kernel_count(spec, backend_name, head_dim, kernels,
                                           no_device_check):
  sched = jsta.block_schedule(spec, 2, 128, 128)
  assert sched.has_partial_pairs == (spec in (SPANNING, SPANNING_RAGGED))
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, head_dim), jnp.bfloat16)
  op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, backend=backend_name)
  assert _mosaic_calls(op, x, x, x) == 1
  loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32))
  assert _mosaic_calls(jax.grad(loss, argnums=(0, 1, 2)), x, x, x) == kernels


@pytest.mark.parametrize("transform,kernels", [("vmap", 2), ("remat", 2), ("scan", 2)])
def test_op_gradient_lowers_for_cuda_under_transforms(transform, kernels, no_device_check):
  """The op's default Hopper backward (fused: its dQ accumulator is a mutable ``jax.new_ref``)
  lowers for CUDA under vmap, jax.checkpoint and lax.scan, as the models use it. (GPU interpret
  mode cannot run remat at all: its callbacks carry an ordered effect.)"""
  spec = jsta.STASpec((2, 8, 16), (2, 8, 8), (1, 1, 1))
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 1, 128), jnp.bfloat16)

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
  assert _mosaic_calls(f, *args) == kernels


# ---- GPU ----------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.hopper
def test_auto_picks_mosaic_on_hopper():
  assert jsta.resolve_backend("auto") == "pallas_mosaic"


@pytest.mark.gpu
@pytest.mark.hopper
def test_forward_lse_and_empty_rows():
  # Padded latent and text slots: the last query blocks hold only padding; lse is +inf on
  # invalid rows and o is zero there.
  spec = jsta.STASpec((5, 8, 8), (2, 8, 8), (3, 1, 1), text_len=10, text_max_len=200)
  sched = jsta.block_schedule(spec, 2, 64, 64)   # the last query blocks are all padding
  assert (sched.kv_count[0] == 0).any()
  pad = ((0, 0), (0, sched.seq_len - spec.seq_len), (0, 0), (0, 0))
  q, k, v = (jnp.pad(x, pad) for x in random_qkv(3, spec, 1, 2, 64, jnp.bfloat16))
  o, lse = backend.BACKEND.forward(q, k, v, sched, 0.125)
  ro, rlse = jsta.xla_backend.forward(*(x.astype(jnp.float32) for x in (q, k, v)), sched, 0.125)
  valid = sched.query_valid
  assert rel_l2(np_f32(o)[:, valid], np_f32(ro)[:, valid]) < TOL
  lse, rlse = np.asarray(lse), np.asarray(rlse)
  assert np.isinf(lse[:, :, ~valid]).all()
  np.testing.assert_allclose(lse[:, :, valid], rlse[:, :, valid], atol=2e-2)
  assert (np_f32(o)[:, sched.kv_count[0].repeat(64) == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.hopper
def test_autotuned_config_runs_correctly():
  """autotune on the real kernels picks a config that fits, and the backend configured with it
  matches the float32 reference."""
  spec = jsta.STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3))
  cands = [config.MosaicConfig(block_kv=128, max_concurrent_steps=2),
           config.MosaicConfig(block_kv=128, max_concurrent_steps=2, use_schedule_barrier=False),
           config.MosaicConfig(block_kv=128, max_concurrent_steps=4)]   # does not fit
  cfg = autotune_lib.autotune(spec, 2, 128, jnp.bfloat16, candidates=cands, iters=2)
  assert cfg.max_concurrent_steps == 2
  tuned = dataclasses.replace(backend.BACKEND, configs=(((128, 128, 128), cfg),))
  q, k, v = random_qkv(4, spec, 1, 2, 128, jnp.bfloat16)
  o = jsta.sliding_tile_attention(q, k, v, spec, implementation=tuned)
  ref = jsta.reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), spec)
  assert rel_l2(np_f32(o), np_f32(ref)) < TOL


def test_launch_order_runs_long_lists_first():
  """Text rows attend every key block: their CTAs start first on every head (longest first),
  the others keep the natural order; without outliers the order is the identity."""
  from pallas_kernels.mosaic.common import launch_order
  spec = jsta.STASpec((4, 16, 16), (2, 8, 8), (1, 1, 1), text_len=100, text_max_len=128)
  sched = jsta.block_schedule(spec, 3, 128, 128)
  order = launch_order(sched.kv_count, sched.head_to_group)
  nq = sched.num_q_blocks
  assert order.shape == (3, nq) and sorted(order.ravel()) == list(range(3 * nq))
  counts = sched.kv_count[0][order.ravel() % nq]
  n_long = 3 * (nq - sched.num_video_q_blocks)          # the text query blocks of each head
  assert (counts[:n_long] == sched.kv_count[0].max()).all()
  rest = order.ravel()[n_long:]
  assert (np.diff(rest) > 0).all()                       # natural order otherwise
  plain = jsta.block_schedule(jsta.STASpec((4, 16, 16), (2, 8, 8), (1, 3, 3)), 2, 128, 128)
  assert (launch_order(plain.kv_count, plain.head_to_group).ravel()
          == np.arange(2 * plain.num_q_blocks)).all()


def test_window_axes_put_the_window_longest_axis_fastest():
  """The axes (slowest first) that keep the readers of a tile's data closest in launch order:
  a 3x1x1 window launches time fastest, Wan-14B 720p's 5x3x3 window on its 7x6x10 tiles
  time, then rows, then columns; ties (a 1x1x1 window, a square one) keep the natural order."""
  assert common.window_axes((7, 6, 10), (3, 1, 1))[-1] == 0
  assert common.window_axes((7, 6, 10), (5, 3, 3)) == (2, 1, 0)
  assert common.window_axes((16, 6, 10), (3, 3, 3)) == (0, 2, 1)
  assert common.window_axes((5, 6, 10), (1, 1, 1)) == (0, 1, 2)
  assert common.window_axes((16, 16), (7, 7)) == (0, 1)
  assert common.window_axes((4, 2, 2), (9, 1, 1))[-1] == 0       # clipped to the grid


def test_window_launch_order_follows_the_window():
  """launch_order with window_item_order: a permutation of every head's items, the text
  query blocks (lists over twice the median) first, then the video blocks with the frames of one
  spatial position side by side (a 3x1x1 window); per-head windows order each head by its
  own; a follow that is not a permutation is refused."""
  from pallas_kernels.mosaic.common import launch_order, window_item_order
  spec = jsta.STASpec((6, 16, 16), (2, 8, 8), ((3, 1, 1), (1, 1, 3)), text_len=100,
                      text_max_len=128)
  sched = jsta.block_schedule(spec, 2, 128, 128)
  nq = sched.num_q_blocks
  rows = np.broadcast_to(np.arange(nq) * 128, (sched.num_groups, nq))
  follow = window_item_order(sched, rows)
  order = launch_order(sched.kv_count, sched.head_to_group, follow, 2.0)
  assert order.shape == (2, nq) and sorted(order.ravel()) == list(range(2 * nq))
  flat = order.ravel()
  n_text = 2 * (nq - sched.num_video_q_blocks)
  assert (flat[:n_text] % nq >= sched.num_video_q_blocks).all()
  tiles = spec.num_tiles
  for h, window in enumerate(spec.window):
    video = [i % nq for i in flat[n_text:] if i // nq == h and i % nq < sched.num_video_q_blocks]
    coords = np.stack(np.unravel_index(np.asarray(video), tiles), -1)   # one block a tile
    axes = common.window_axes(tiles, window)
    assert [tuple(c[list(axes)]) for c in coords] == sorted(tuple(c[list(axes)]) for c in coords)
  assert common.window_axes(tiles, (3, 1, 1))[-1] == 0
  with pytest.raises(ValueError, match="follow must hold a permutation"):
    launch_order(sched.kv_count, sched.head_to_group, np.zeros_like(follow), 2.0)
  # The default config gives the sequence order with the 2x rule, as before.
  np.testing.assert_array_equal(
      common.item_launch_order(sched, sched.kv_count, rows, config.MosaicConfig()),
      launch_order(sched.kv_count, sched.head_to_group))


def test_launch_order_config_checks():
  with pytest.raises(ValueError, match="launch_order must be 'sequence' or 'window'"):
    config.MosaicConfig(launch_order="hilbert")
  with pytest.raises(TypeError, match="long_items_first must be a number"):
    config.MosaicConfig(long_items_first="4")
  with pytest.raises(ValueError, match="long_items_first must be 0"):
    config.MosaicConfig(long_items_first=0.5)
  assert config.MosaicConfig(long_items_first=0).long_items_first == 0


@pytest.mark.cpu_only
def test_window_launch_order_gives_the_same_results_in_interpret_mode():
  """The window's launch order (MosaicConfig.launch_order="window", long lists over 4x the
  median first) moves work items only: the forward's o and lse and the backward's dK, dV are
  bit for bit the default's, dQ (float32 reduce-adds in another order) within rounding."""
  spec = jsta.STASpec((6, 8, 16), (2, 8, 8), (3, 1, 1), text_len=20, text_max_len=64)
  fused = backend.MosaicBackend(interpret=True, backward_variant="fused")
  key = (128, 128, 128)
  window = dataclasses.replace(fused, configs=((key, dataclasses.replace(
      fused.config(*key), launch_order="window", long_items_first=4.0)),))
  sched = jsta.block_schedule(spec, 1, 128, 128)
  assert not (np.asarray(backend.forward_operands(sched, window.config(*key))[0].launch_order)
              == np.asarray(backend.forward_operands(sched, fused.config(*key))[0].launch_order)
              ).all()
  q, k, v = random_qkv(3, spec, 1, 1, 128, jnp.bfloat16)
  fit = lambda x: jnp.pad(x, ((0, 0), (0, sched.seq_len - x.shape[1]), (0, 0), (0, 0)))
  q, k, v = map(fit, (q, k, v))
  do = jax.random.normal(jax.random.key(4), q.shape).astype(q.dtype)
  want = fused.forward(q, k, v, sched, 128 ** -0.5)
  got = window.forward(q, k, v, sched, 128 ** -0.5)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np_f32(a), np_f32(b))
  o, lse = want[:2]
  g_want = fused.backward(q, k, v, o, lse, do, sched, 128 ** -0.5)
  g_got = window.backward(q, k, v, o, lse, do, sched, 128 ** -0.5)
  assert rel_l2(np_f32(g_got[0]), np_f32(g_want[0])) < 1e-3
  for a, b in zip(g_got[1:], g_want[1:]):
    np.testing.assert_array_equal(np_f32(a), np_f32(b))


@pytest.mark.parametrize("spec", [
    jsta.STASpec((2, 8, 40), (1, 8, 8), ((1, 1, 3), (1, 1, 1)), text_len=10, text_max_len=40),
    jsta.STASpec((3, 8, 16), (3, 8, 8), (1, 1, 1)),        # 192-token tiles
    jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1)),        # whole blocks: every piece kept
], ids=["64_tokens_text", "192_tokens", "whole"])
def test_query_pieces_are_the_attending_64_row_units(spec):
  _check_query_pieces(spec)


def _random_piece_specs(n: int, seed: int = 0):
  """Small random specs the Hopper kernels take (tiles of a multiple of 64 tokens): partial
  edge tiles, per-head windows, text first or last, causal time."""
  rng = np.random.default_rng(seed)
  tiles = [(1, 8, 8), (3, 8, 8), (2, 4, 8), (1, 8, 16), (2, 8, 8)]
  out = []
  for _ in range(n):
    tile = tiles[rng.integers(len(tiles))]
    latent = tuple(int(t * rng.integers(1, 4) - rng.integers(0, t)) for t in tile)
    latent = tuple(max(1, x) for x in latent)
    causal = (0,) if rng.random() < 0.3 else ()

    def window():
      return tuple(int(rng.integers(1, 3)) if d in causal else int(2 * rng.integers(0, 3) + 1)
                   for d in range(3))
    win = (window(), window()) if rng.random() < 0.5 else window()
    text_max = int(rng.choice([0, 40, 64, 100]))
    out.append(jsta.STASpec(latent, tile, win, text_len=int(rng.integers(0, text_max + 1)),
                            text_max_len=text_max, causal_axes=causal,
                            text_position=str(rng.choice(["last", "first"]))))
  return out


@pytest.mark.parametrize("spec", _random_piece_specs(12), ids=lambda s: str(s.latent_shape))
def test_query_pieces_on_random_specs(spec):
  _check_query_pieces(spec)


def _check_query_pieces(spec):
  """The dK/dV kernels' query lists: for every key block, exactly the 64-row pieces of which
  some row attends some of its keys, ascending, with bit w set where a row attends compute
  warpgroup w's 64 keys (checked on the token mask)."""
  from pallas_kernels.mosaic.common import query_pieces, transposed_schedule
  heads = 2
  spec = spec.text_last()          # the kernels' layout (the op moves text-first slots)
  sched_t = transposed_schedule(jsta.block_schedule(spec, heads, 128, 128))
  index, count, codes = query_pieces(sched_t)
  bk = sched_t.block_kv
  wgs = bk // 64
  for h in range(heads):
    g = sched_t.head_to_group[h]
    m = jsta.token_mask(spec, spec.head_windows(heads)[h])
    pad = sched_t.seq_len - spec.seq_len
    m = np.pad(m, ((0, pad), (0, pad)))
    units = m.reshape(sched_t.seq_len // 64, 64, sched_t.seq_len // 64, 64).any(axis=(1, 3))
    for j in range(sched_t.num_kv_blocks):
      want = np.flatnonzero(units[:, j * wgs:(j + 1) * wgs].any(axis=1))
      got = index[g, j, :count[g, j]]
      np.testing.assert_array_equal(got, want)
      want_codes = sum(units[want, j * wgs + w].astype(int) << w for w in range(wgs))
      np.testing.assert_array_equal(codes[g, j, :count[g, j]], want_codes)
  if not sched_t.has_partial_pairs and sched_t.query_valid.all() and sched_t.key_valid.all():
    assert (count == sched_t.q_count * (sched_t.block_q // 64)).all()


def _unit_attention(spec, sched, heads: int):
  """Per head, bool[units, units]: query unit r (64 rows) attends key unit c (token mask) and
  c holds a valid key; and the units' query validity bool[units]."""
  seq = sched.seq_len
  key_live = sched.key_valid.reshape(-1, 64).any(axis=1)
  query_live = sched.query_valid.reshape(-1, 64).any(axis=1)
  out = []
  for h in range(heads):
    m = np.pad(jsta.token_mask(spec, spec.head_windows(heads)[h]),
               ((0, seq - spec.seq_len),) * 2)
    out.append(m.reshape(seq // 64, 64, seq // 64, 64).any(axis=(1, 3)) & key_live[None, :])
  return out, query_live


@pytest.mark.parametrize("spec", [
    jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5, text_max_len=64),
    jsta.STASpec((3, 10, 12), (1, 8, 8), (1, 3, 3), text_len=10, text_max_len=40),
    jsta.STASpec((4, 8, 16), (2, 8, 8), (3, 1, 1)),
    *_random_piece_specs(8, seed=1),
], ids=lambda s: str(s.latent_shape))
def test_gathered_steps_visit_each_attended_unit_once(spec):
  """Gathered work items (two 64-row query pieces, steps of two 64-key units): every query
  piece is in exactly one item; for each item and compute warpgroup, the units its step codes
  mark as attended are exactly the 64-key units that some valid row of its piece attends and
  that hold a valid key (token mask), each once; an item takes ceil(units of the union / 2)
  steps, and no more steps in all than 128 x 128 blocks of consecutive rows would."""
  from pallas_kernels.mosaic.common import gathered_operands
  heads = 2
  spec = spec.text_last()
  sched = jsta.block_schedule(spec, heads, 128, 128)
  ops, partial = gathered_operands(sched)
  index, count = np.asarray(ops.kv_index), np.asarray(ops.kv_count)
  info, pieces = np.asarray(ops.step_info), np.asarray(ops.query_pieces)
  seq = sched.seq_len
  per_head, query_live = _unit_attention(spec, sched, heads)
  any_partial = False
  for g in range(sched.num_groups):
    assert sorted(pieces[g].ravel()) == list(range(seq // 64))
  for h, attends in enumerate(per_head):
    g = sched.head_to_group[h]
    for i in range(sched.num_q_blocks):
      seen = np.zeros((2, seq // 64), int)
      for step in range(count[g, i]):
        code = info[g, i, step] >> 1
        any_partial |= code != 15
        pad = False
        for c in range(2):
          u = index[g, i, 2 * step + c]
          pad |= not sched.key_valid[u * 64:(u + 1) * 64].all()
          for w in range(2):
            seen[w, u] += (code >> (2 * w + c)) & 1
        assert (info[g, i, step] & 1) == pad
      union = 0
      for w in range(2):
        piece = pieces[g, i, w]
        if query_live[piece]:
          np.testing.assert_array_equal(seen[w], attends[piece].astype(int))
        else:
          assert seen[w].max() <= 1
        union |= attends[piece] if query_live[piece] else seen[w].astype(bool)
      assert count[g, i] <= (union.sum() + 1) // 2 + (not query_live[pieces[g, i]].all())
  assert partial == any_partial
  assert count[sched.head_to_group].sum() <= sched.visited_blocks()


@pytest.mark.parametrize("spec", [
    jsta.STASpec((9, 8, 16), (3, 8, 8), ((3, 1, 1), (1, 1, 3)), text_len=20, text_max_len=64),
    jsta.STASpec((8, 7, 16), (3, 8, 8), (3, 1, 1), text_len=20, text_max_len=64,
                 text_position="first"),
    jsta.STASpec((3, 10, 12), (1, 8, 8), (1, 3, 3), text_len=10, text_max_len=40),
    *_random_piece_specs(6, seed=2),
], ids=lambda s: str(s.latent_shape))
def test_gathered_dkdv_items_stream_each_attending_piece(spec):
  """Gathered dK/dV work items (two 64-key units per CTA): every key unit is in exactly one
  item; an item streams exactly the 64-row pieces of valid rows that attend one of its units
  (token mask), ascending, with bit w set where the piece attends warpgroup w's unit; fewer
  or as many pieces in all as 128-key blocks (query_pieces)."""
  from pallas_kernels.mosaic.common import (gathered_transposed_operands, query_pieces,
                                            transposed_schedule)
  heads = 2
  spec = spec.text_last()
  sched = jsta.block_schedule(spec, heads, 128, 128)
  ops, partial = gathered_transposed_operands(sched)
  index, count = np.asarray(ops.piece_index), np.asarray(ops.piece_count)
  codes, units = np.asarray(ops.piece_codes), np.asarray(ops.key_units)
  per_head, query_live = _unit_attention(spec, sched, heads)
  any_partial = False
  for g in range(sched.num_groups):
    assert sorted(units[g].ravel()) == list(range(sched.seq_len // 64))
  for h, attends in enumerate(per_head):
    g = sched.head_to_group[h]
    attends = attends & query_live[:, None]
    for j in range(units.shape[1]):
      a, b = units[g, j]
      want = np.flatnonzero(attends[:, a] | attends[:, b])
      np.testing.assert_array_equal(index[g, j, :count[g, j]], want)
      want_codes = attends[want, a].astype(int) | attends[want, b].astype(int) << 1
      np.testing.assert_array_equal(codes[g, j, :count[g, j]], want_codes)
      any_partial |= bool((want_codes != 3).any())
  assert partial == any_partial
  sched_t = transposed_schedule(sched)
  if sched_t.block_kv == 128:
    assert count.sum() <= query_pieces(sched_t)[1].sum()


def test_query_pieces_pair_inside_tiles_then_across_the_longest_window_axis():
  """192-token tiles (3 pieces each) under a 5x3x3 window: two pieces of each tile pair
  together; the odd pieces pair with the next tile in time (the axis of the largest window),
  whose key list adds the fewest units; fewer steps than consecutive rows."""
  from pallas_kernels.mosaic.common import (gathered_operands, pair_query_units,
                                            unit_schedule)
  spec = jsta.STASpec((12, 48, 48), (3, 8, 8), (5, 3, 3))    # 4 x 6 x 6 tiles
  sched = jsta.block_schedule(spec, 1, 128, 128)
  units = unit_schedule(sched)
  lists = [units.kv_index[0, i, :units.kv_count[0, i]] for i in range(units.num_q_blocks)]
  pairs = pair_query_units(spec, lists)
  tile = lambda u: u // 3                                     # 3 units per tile, no padding
  inside = [p for p in pairs if tile(p[0]) == tile(p[1])]
  across = [p for p in pairs if tile(p[0]) != tile(p[1])]
  assert len(inside) == 144 and len(across) == 72
  union = lambda a, b: np.union1d(lists[a], lists[b]).size
  for a, b in across:
    assert tile(b) - tile(a) in (1, 6, 36)                     # neighbours in the tile grid
    if tile(a) < 108:                                          # the next tile in time
      assert union(a, b) <= union(a, a + 3 * 36)
  ops, _ = gathered_operands(sched)
  consecutive = sum((union(2 * i, 2 * i + 1) + 1) // 2 for i in range(len(lists) // 2))
  assert int(np.asarray(ops.kv_count).sum()) < consecutive


def test_key_steps_choice_and_checks(no_device_check):
  """"auto" gathers 64-key units where that saves steps (192-token tiles), never where blocks
  lie inside tiles; bad values are refused when the config or backend is made."""
  from pallas_kernels.mosaic.common import gather_saves_pieces, gather_saves_steps
  tile192 = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                         text_max_len=64)
  assert gather_saves_steps(jsta.block_schedule(tile192, 2, 128, 128))
  assert not gather_saves_steps(jsta.block_schedule(PLAIN, 2, 128, 128))
  # The dK/dV kernels gather where pairing key units with their neighbour in time saves
  # query pieces (not in the one-tile-high tile192 above).
  in_time = jsta.block_schedule(jsta.STASpec((9, 8, 16), (3, 8, 8), (3, 1, 1)), 2, 128, 128)
  assert gather_saves_pieces(in_time) and not gather_saves_pieces(
      jsta.block_schedule(tile192, 2, 128, 128))
  assert not gather_saves_pieces(jsta.block_schedule(PLAIN, 2, 128, 128))
  assert backend.backward_operands(in_time, config.MosaicConfig())[3]
  assert not backend.backward_operands(in_time, config.MosaicConfig(key_steps="blocks"))[3]
  assert not gather_saves_steps(jsta.block_schedule(tile192, 2, 128, 64))
  cfg = config.MosaicConfig()
  assert backend.uses_gathered_steps(jsta.block_schedule(tile192, 2, 128, 128), cfg)
  blocks = config.MosaicConfig(key_steps="blocks")
  assert not backend.uses_gathered_steps(jsta.block_schedule(tile192, 2, 128, 128), blocks)
  with pytest.raises(ValueError, match="key_steps must be"):
    config.MosaicConfig(key_steps="units")
  with pytest.raises(ValueError, match="block_kv must be 128"):
    config.MosaicConfig(block_kv=64, key_steps="gathered")
  with pytest.raises(ValueError, match="key_steps must be"):
    backend.MosaicBackend(key_steps="always")
  with pytest.raises(ValueError, match="block_kv=128"):
    backend.MosaicBackend(key_steps="gathered", device_check=False).check(
        tile192, 128, jnp.bfloat16, 128, 64)
  with pytest.raises(ValueError, match="block_q and block_kv must be 128"):
    config.MosaicConfig(block_q=64, key_steps="gathered")
  with pytest.raises(ValueError, match="block_q=128"):
    backend.MosaicBackend(key_steps="gathered", device_check=False).check(
        tile192, 128, jnp.bfloat16, 64, 128)
  for name in ("use_schedule_barrier", "interpret", "bwd_step_descriptors", "auto_barriers",
               "fused_bwd_auto_barriers", "overlap_exp", "bwd_early_loads"):
    for bad in ("yes", 1, None):
      with pytest.raises(TypeError, match=f"{name} must be a bool"):
        config.MosaicConfig(**{name: bad})
  with pytest.raises(TypeError, match="interpret must be a bool"):
    backend.MosaicBackend(interpret="no")
  with pytest.raises(TypeError, match="bwd_early_loads must be a bool"):
    backend.MosaicBackend(bwd_early_loads="no")
  assert config.MosaicConfig().bwd_early_loads
  assert not backend.MosaicBackend(bwd_early_loads=False).config(128, 128, 128).bwd_early_loads
  with pytest.raises(TypeError, match="bwd_step_descriptors must be a bool"):
    backend.MosaicBackend(bwd_step_descriptors="no")
  assert backend.MosaicBackend(bwd_step_descriptors=True, auto_barriers=False,
                               overlap_exp=True).config(128, 128, 128) == (
      config.MosaicConfig(bwd_step_descriptors=True, auto_barriers=False,
                          overlap_exp=True, masked_steps_apart=True))
  # Pallas's automatic barriers are dropped only when compiled (interpret mode keeps them).
  from pallas_kernels.mosaic.common import compiler_params
  assert compiler_params(config.MosaicConfig(auto_barriers=False)).unsafe_no_auto_barriers
  assert not compiler_params(config.MosaicConfig()).unsafe_no_auto_barriers
  assert not compiler_params(config.MosaicConfig(auto_barriers=False, interpret=True)
                             ).unsafe_no_auto_barriers
  # The fused backward's own setting (off by default) overrides auto_barriers there.
  assert compiler_params(config.MosaicConfig(), auto_barriers=False).unsafe_no_auto_barriers
  assert not compiler_params(config.MosaicConfig(auto_barriers=False),
                             auto_barriers=True).unsafe_no_auto_barriers
  assert (config.MosaicConfig().bwd_step_descriptors,
          config.MosaicConfig().fused_bwd_auto_barriers) == (True, False)


@pytest.mark.parametrize("variant,kernels", [("auto", 2), ("split", 3)])
def test_gathered_steps_lower_for_cuda(variant, kernels, no_device_check):
  """The forward and dQ kernels with gathered key steps (two TMA copies per buffer into the
  halves of a swizzled slot, barriers of two arrivals) pass the whole Mosaic GPU lowering."""
  spec = jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                      text_max_len=64)
  impl = backend.MosaicBackend(key_steps="gathered", backward_variant=variant,
                               device_check=False)
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, 128), jnp.bfloat16)
  op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=impl)
  assert _mosaic_calls(op, x, x, x) == 1
  loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32))
  assert _mosaic_calls(jax.grad(loss, argnums=(0, 1, 2)), x, x, x) == kernels


def _grad_modules(impl, spec, heads: int, kv_heads: int) -> list[str]:
  """Fingerprints of the Mosaic GPU modules of the op's gradient under ``impl`` (bf16,
  head_dim 128), lowered for CUDA: [forward, backward kernels]."""
  from benchmarks.tools.mosaic_fingerprint import module_fingerprints
  q = jax.ShapeDtypeStruct((1, spec.seq_len, heads, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, spec.seq_len, kv_heads, 128), jnp.bfloat16)
  loss = lambda q, k, v: jnp.sum(jsta.sliding_tile_attention(
      q, k, v, spec, implementation=impl).astype(jnp.float32))
  return module_fingerprints(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)


@pytest.mark.parametrize("spec,heads,kv_heads", [
    (TEXT, 2, 2),                                   # key padding, text
    (SPANNING_RAGGED, 2, 1),                        # partial pieces, grouped k/v
    (jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                  text_max_len=64), 2, 2),          # gathered pieces, per-head windows
], ids=["padded", "spanning_gqa", "gathered_per_head"])
@pytest.mark.slow
def test_fused_backward_late_loads_lower_for_cuda(spec, heads, kv_heads, no_device_check):
  """The fused backward that loads each piece's lse and dQ row where they are used
  (bwd_early_loads=False, the order before 2026-12-06) passes the whole Mosaic GPU lowering;
  its backward module differs from the default's, its forward is the same."""
  modules = lambda impl: _grad_modules(impl, spec, heads, kv_heads)
  late = modules(backend.MosaicBackend(backward_variant="fused", bwd_early_loads=False))
  default = modules(backend.MosaicBackend(backward_variant="fused"))
  assert len(late) == len(default) == 2
  assert late[0] == default[0] and late[1] != default[1]


SEEN_KV_HEADS = []


@dataclasses.dataclass(frozen=True)
class _RecordingMosaic(backend.MosaicBackend):
  """The Hopper backend in interpret mode, recording the k/v heads its kernels get."""

  def forward(self, q, k, v, sched, scale, key_valid=None, with_o_low=False):
    SEEN_KV_HEADS.append(("fwd", k.shape[2]))
    return super().forward(q, k, v, sched, scale, key_valid, with_o_low)

  def backward(self, q, k, v, o, lse, do, sched, scale, key_valid=None, dlse=None):
    SEEN_KV_HEADS.append(("bwd", k.shape[2]))
    return super().backward(q, k, v, o, lse, do, sched, scale, key_valid, dlse)


def _gqa_grads(impl, spec, heads: int, kv_heads: int, seed: int = 0):
  """(dq, dk, dv) of the op with grouped k/v (bf16 inputs, head_dim 128) under ``impl``, and
  the float32 xla reference's."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (1, spec.seq_len, heads, 128)).astype(jnp.bfloat16)
  k, v = (jax.random.normal(kk, (1, spec.seq_len, kv_heads, 128)).astype(jnp.bfloat16)
          for kk in keys[1:3])
  w = jax.random.normal(keys[3], q.shape)

  def grads(impl, q, k, v):
    attend = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=impl)
    return jax.vjp(attend, q, k, v)[1](w.astype(q.dtype))

  from helpers import interpreted
  got = interpreted(grads, impl, q, k, v)
  return got, grads("xla", *(x.astype(jnp.float32) for x in (q, k, v)))


# Two query heads with different windows sharing one k/v head.
GQA_SPEC = jsta.STASpec((4, 8, 16), (2, 8, 8), ((3, 1, 1), (1, 1, 3)), text_len=10,
                        text_max_len=64)


@pytest.mark.cpu_only
@pytest.mark.parametrize("fragments", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_grouped_kv_inside_the_kernels(fragments):
  """Grouped-query attention: with the fused backward, k and v reach the kernels with their own
  heads (the group's dK/dV summed in float32 in the kernel), and the gradients match the
  float32 reference (fragments: the dQ and dK/dV accumulators in the fragments' order,
  MosaicConfig.bwd_dq_fragments, staged by rearranging in interpret mode)."""
  SEEN_KV_HEADS.clear()
  got, want = _gqa_grads(_RecordingMosaic(interpret=True, bwd_dq_fragments=fragments),
                         GQA_SPEC, 2, 1)
  assert SEEN_KV_HEADS == [("fwd", 1), ("bwd", 1)]
  for g, r in zip(got, want):
    assert g.shape == r.shape
    assert rel_l2(np_f32(g), np_f32(r)) < TOL


def test_split_backward_gets_repeated_kv_heads(no_device_check):
  """With the split backward the op repeats k and v to the query heads before the kernels
  (forward and backward: the split kernels index one k/v head per query head), which tracing
  the gradient shows without running it; its numerics are the split kernels' on repeated
  heads (tests of the split backward) and jnp.repeat's transpose (a sum per group)."""
  SEEN_KV_HEADS.clear()
  q = jax.ShapeDtypeStruct((1, GQA_SPEC.seq_len, 2, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((1, GQA_SPEC.seq_len, 1, 128), jnp.bfloat16)
  impl = _RecordingMosaic(backward_variant="split")
  loss = lambda q, k, v: jnp.sum(jsta.sliding_tile_attention(
      q, k, v, GQA_SPEC, implementation=impl).astype(jnp.float32))
  dq, dk, dv = jax.eval_shape(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
  assert SEEN_KV_HEADS == [("fwd", 2), ("bwd", 2)]
  assert (dq.shape, dk.shape, dv.shape) == (q.shape, kv.shape, kv.shape)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("heads,kv_heads,fragments", [(8, 2, False), (4, 1, False),
                                                      (8, 2, True)])
def test_grouped_kv_inside_the_kernels_on_gpu(heads, kv_heads, fragments):
  """(fragments: the group's float32 dK/dV accumulators in the fragments' order too.)"""
  spec = jsta.STASpec((12, 16, 16), (6, 8, 8), (3, 3, 3), text_len=100, text_max_len=128)
  impl = backend.MosaicBackend(bwd_dq_fragments=True) if fragments else "pallas_mosaic"
  got, want = _gqa_grads(impl, spec, heads, kv_heads)
  for g, r in zip(got, want):
    assert rel_l2(np_f32(g), np_f32(r)) < TOL


@pytest.mark.cpu_only
@pytest.mark.parametrize("kv_heads", [2, 1])
@pytest.mark.slow
def test_text_dq_copies_match_one_copy_in_interpret_mode(kv_heads):
  """MosaicConfig.bwd_text_dq_copies=3: each key block adds the text rows' dQ into its copy
  (block % 3), summed with the final scale and cast: the gradients of one copy (float32 sums
  in another order), and the float32 reference's; plain and grouped k/v."""
  fused = backend.MosaicBackend(interpret=True, backward_variant="fused")
  key = (128, 128, 128)
  copies = dataclasses.replace(fused, configs=((key, dataclasses.replace(
      fused.config(*key), bwd_text_dq_copies=3)),))
  one, want = _gqa_grads(fused, GQA_SPEC, 2, kv_heads)
  three, _ = _gqa_grads(copies, GQA_SPEC, 2, kv_heads)
  for a, b, r in zip(one, three, want):
    assert rel_l2(np_f32(b), np_f32(a)) < 2e-3
    assert rel_l2(np_f32(b), np_f32(r)) < TOL


@pytest.mark.cpu_only
@pytest.mark.slow
def test_text_dq_copies_kernel_adds_into_the_copies():
  """The fused kernel with bwd_text_dq_copies=3 adds text rows' dQ into the copies after row
  S (every copy gets some: the video key blocks j % 3 all occur), nothing into video rows'
  copies, and the copies folded back give one copy's accumulator (float32, another order)."""
  from pallas_kernels.mosaic import backward_fused
  spec, heads = GQA_SPEC, 2
  sched = jsta.block_schedule(spec, heads, 128, 128)
  base = dataclasses.replace(backend.MosaicBackend(interpret=True).config(128, 128, 128),
                             backward_variant="fused")
  ops, bkd, partial, gather = backend.backward_operands(sched, base)
  q, k, v = random_qkv(5, spec, 1, heads, 128, jnp.bfloat16)
  q, k, v = (jnp.pad(x, ((0, 0), (0, sched.seq_len - spec.seq_len), (0, 0), (0, 0)))
             for x in (q, k, v))
  do = jax.random.normal(jax.random.key(6), q.shape).astype(q.dtype)
  o, lse = jsta.xla_backend.forward(q, k, v, sched, 128 ** -0.5)[:2]
  delta = jnp.einsum("bshd,bshd->bhs", o.astype(jnp.float32), do.astype(jnp.float32))
  video, seq = spec.padded_video_len, sched.seq_len

  def accumulate(copies):
    cfg = dataclasses.replace(base, bwd_text_dq_copies=copies)
    shape = backward_fused.dq_acc_shape(q.shape, bkd, text_copies=(copies, video))
    acc = jax.new_ref(jnp.zeros(shape, jnp.float32))
    interpreted(backward_fused.fused_backward_call, q, k, v, do, lse, delta, ops, acc,
                scale=128 ** -0.5, block_kv=bkd, config=cfg, masked=sched.has_masked_keys,
                partial=partial, gather=gather, video_rows=video if copies > 1 else 0)
    return np.asarray(acc[...])

  one, three = accumulate(1), accumulate(3)
  assert three.shape[1] == seq + 2 * (seq - video)
  text = seq - video
  for c in (1, 2):
    assert np.abs(three[:, seq + (c - 1) * text:seq + c * text]).max() > 0
  folded = np.asarray(backward_fused.fold_text_copies(jnp.asarray(three), seq, video))
  np.testing.assert_array_equal(folded[:, :video], one[:, :video])
  np.testing.assert_allclose(folded, one, rtol=1e-4, atol=1e-4 * np.abs(one).max())


def test_text_dq_copies_accumulator_and_checks():
  """The accumulator's extra rows (C - 1 copies of the rows past the video) and their fold
  back; the option's value checks."""
  from pallas_kernels.mosaic import backward_fused
  shape = (1, 320, 2, 128)                                     # 256 video rows, 64 text rows
  assert backward_fused.dq_acc_shape(shape, 128) == (1, 320, 4, 64)
  assert backward_fused.dq_acc_shape(shape, 128, text_copies=(3, 256)) == (1, 448, 4, 64)
  acc = jnp.arange(448.0)[None, :, None, None] * jnp.ones((1, 448, 4, 64))
  folded = np.asarray(backward_fused.fold_text_copies(acc, 320, 256))
  assert folded.shape == (1, 320, 4, 64)
  rows = np.arange(320.0)
  want = np.where(rows >= 256, rows + (rows + 64) + (rows + 128), rows)
  np.testing.assert_array_equal(folded[0, :, 0, 0], want)
  one_copy = acc[:, :320]
  assert backward_fused.fold_text_copies(one_copy, 320, 256) is one_copy     # nothing to fold
  with pytest.raises(ValueError, match="bwd_text_dq_copies must be in 1..64"):
    config.MosaicConfig(bwd_text_dq_copies=0)
  with pytest.raises(TypeError, match="bwd_text_dq_copies must be an int"):
    config.MosaicConfig(bwd_text_dq_copies=2.0)
  with pytest.raises(ValueError, match="not with bwd_dq_fragments"):
    config.MosaicConfig(bwd_text_dq_copies=2, bwd_dq_fragments=True)


@pytest.mark.gpu
@pytest.mark.hopper
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_text_dq_copies_on_gpu(kv_heads):
  """MosaicConfig.bwd_text_dq_copies=8 on the GPU: the gradients against the float32
  reference (text 100/128, plain and grouped k/v)."""
  spec = jsta.STASpec((12, 16, 16), (6, 8, 8), (3, 3, 3), text_len=100, text_max_len=128)
  fused = backend.MosaicBackend(backward_variant="fused")
  key = (128, 128, 128)
  impl = dataclasses.replace(fused, configs=((key, dataclasses.replace(
      fused.config(*key), bwd_text_dq_copies=8)),))
  got, want = _gqa_grads(impl, spec, 4, kv_heads)
  for g, r in zip(got, want):
    assert rel_l2(np_f32(g), np_f32(r)) < TOL


@pytest.mark.parametrize("options", [
    dict(bwd_dq_writer=True), dict(bwd_dq_fragments=True),
    dict(bwd_dq_fragments=True, bwd_dq_writer=True), dict(bwd_text_dq_copies=4),
    dict(bwd_text_dq_copies=4, bwd_dq_writer=True)],
    ids=["writer", "fragments", "both", "text_copies", "text_copies_writer"])
@pytest.mark.slow
def test_dq_options_lower_with_and_without_grouped_kv(options, no_device_check):
  """The fused backward's dQ options lower for CUDA with plain and grouped k/v, as another
  fused backward module than the default's: MosaicConfig.bwd_dq_writer (GPU only: named
  barriers; with grouped k/v the epilogue reuses the staging buffer after the writer's last
  read) and bwd_dq_fragments (inline Mosaic GPU stores; grouped k/v's dK/dV accumulators
  take the same order), alone and together."""
  # Not persistent: the test spec's items are short, and "auto" keeps the persistent forward
  # away from a tuned config (the option's), which would make the forwards differ too.
  fused = backend.MosaicBackend(backward_variant="fused", persistent=False)
  key = (128, 128, 128)
  option = dataclasses.replace(fused, configs=((key, dataclasses.replace(
      fused.config(*key), **options)),))
  for kv_heads in (2, 1):
    default = _grad_modules(fused, GQA_SPEC, 2, kv_heads)
    got = _grad_modules(option, GQA_SPEC, 2, kv_heads)
    assert len(got) == len(default) == 2
    assert got[0] == default[0] and got[1] != default[1], kv_heads


def _wgmma_fragment_elements(n: int) -> np.ndarray:
  """int[128 threads, n // 4 registers, 2 values]: the row-major index in a [64, n] array of
  each value of Mosaic GPU's ``WGMMA_LAYOUT``, computed from the layout's tiling as its
  ``thread_idxs`` does (register order: ``np.ndindex`` of ``registers_shape``)."""
  from jax.experimental.mosaic.gpu import fragmented_array as fa
  layout = fa.WGMMA_LAYOUT
  shape = (64, n)
  strides = layout.tiling.tile_strides((n, 1))
  tiled = layout.tiled_tiling_shape
  rank = layout.tiled_tiling_rank
  tile_strides = strides[-rank:]

  def delinearize(idx, dims):
    sizes = [tiled[d] for d in dims]
    out = [0] * rank
    for d, size, stride in zip(dims, sizes, np.cumprod([1, *sizes[::-1]])[-2::-1]):
      out[d] = (idx // stride) % size
    return out

  reg_shape = layout.registers_shape(shape)
  out = np.zeros((128, int(np.prod(reg_shape)), 2), np.int64)
  for t in range(128):
    warp = delinearize(t // 32, layout.warp_dims)
    lane = delinearize(t % 32, layout.lane_dims)
    base = sum((w + l) * s for w, l, s in zip(warp, lane, tile_strides))
    for r, idx in enumerate(np.ndindex(reg_shape)):
      start = base + sum(i * s for i, s in zip(idx, strides))
      out[t, r] = start, start + tile_strides[layout.vector_dim]
  return out


@pytest.mark.parametrize("n", [64, 128])
def test_dq_fragments_order_is_mosaic_wgmma_layout(n):
  """dq_fragments' order (what each thread's 16-byte stores write: registers 2j and 2j + 1
  at (j * 128 + thread) * 4) is the one Mosaic GPU's WGMMA_LAYOUT gives, and from_fragments
  inverts it: checked on an index array through the accumulator layout of a [B, S, H, D]
  gradient with two warpgroups' column halves."""
  from pallas_kernels.mosaic import dq_fragments
  elements = _wgmma_fragment_elements(n)                 # [thread, register, value]
  regs = elements.shape[1]
  assert regs == n // 4
  # The staging buffer as store_fragments writes it: [j, thread, (register pair), value].
  staged = elements.reshape(128, regs // 2, 4).transpose(1, 0, 2).reshape(-1)
  x = np.arange(64 * n).reshape(1, 64, 1, n)
  part = np.asarray(dq_fragments.to_fragments(jnp.asarray(x), 1)).reshape(-1)
  np.testing.assert_array_equal(part, staged)
  # What GPU interpret mode stages instead of the threads' stores.
  np.testing.assert_array_equal(
      np.asarray(dq_fragments.fragments_of_part(jnp.asarray(x[0, :, 0]))).reshape(-1), staged)
  # Several pieces, heads and warpgroups: a round trip, and each part is its own rows.
  wgs, heads, d = 2, 3, 2 * n
  grad = np.arange(2 * 192 * heads * d, dtype=np.float32).reshape(2, 192, heads, d)
  acc = dq_fragments.to_fragments(jnp.asarray(grad), wgs)
  assert acc.shape == dq_fragments.acc_shape(grad.shape, 64 * wgs)
  np.testing.assert_array_equal(np.asarray(dq_fragments.from_fragments(acc, grad.shape)), grad)
  b, p, h, w = 1, 2, 1, 1
  rows = grad[b, 64 * p:64 * p + 64, h, w * n:(w + 1) * n].reshape(-1)
  np.testing.assert_array_equal(np.asarray(acc[b, p, h * wgs + w]).reshape(-1),
                                rows[staged])


# ---- The persistent forward (MosaicConfig.persistent) ------------------------------------------
def test_persistent_work_items_hold_every_item_once_in_launch_order():
  """Every (block, head, batch entry) is one row, with its group and steps, in launch order:
  within a batch entry the order of launch_order, batch entries in turn."""
  from pallas_kernels.mosaic.common import launch_order, persistent_work
  spec = jsta.STASpec((4, 16, 16), (2, 8, 8), ((1, 1, 1), (1, 3, 3)) * 2, text_len=100,
                      text_max_len=128)
  sched = jsta.block_schedule(spec, 4, 128, 128)
  order = launch_order(sched.kv_count, sched.head_to_group)
  nq, batch = sched.num_q_blocks, 3
  work = persistent_work(sched.kv_count, sched.head_to_group, order, batch)
  assert work.dtype == np.int32 and work.shape == (4 * nq * batch, 5)
  blk, hi, bi, grp, steps = work.T
  np.testing.assert_array_equal(bi, np.repeat(np.arange(batch), 4 * nq))
  for b in range(batch):
    np.testing.assert_array_equal((hi * nq + blk)[bi == b], order.ravel())
  np.testing.assert_array_equal(grp, sched.head_to_group[hi])
  np.testing.assert_array_equal(steps, sched.kv_count[grp, blk])


def test_persistent_config_checks():
  with pytest.raises(TypeError, match="persistent must be a bool"):
    config.MosaicConfig(persistent=1)
  with pytest.raises(TypeError, match="persistent_ctas must be an int"):
    config.MosaicConfig(persistent=True, persistent_ctas=2.0)
  with pytest.raises(ValueError, match="persistent_ctas must be >= 0"):
    config.MosaicConfig(persistent=True, persistent_ctas=-1)
  with pytest.raises(ValueError, match="persistent_ctas must be >= 0"):
    backend.MosaicBackend(persistent=True, persistent_ctas=-3)
  # A second query block must fit beside the K/V pipeline.
  assert config.default_stages(128, 128, 128, q_buffers=2) == 2
  assert config.default_stages(128, 128, 64, q_buffers=2) == 4
  cfg = config.MosaicConfig(persistent=True, max_concurrent_steps=3)
  spec = PLAIN
  sched = jsta.block_schedule(spec, 1, 128, 128)
  q = jnp.zeros((1, sched.seq_len, 1, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="do not fit shared memory"):
    jax.eval_shape(lambda q: backend.forward(q, q, q, sched, 0.1, cfg), q)


def test_persistent_auto_picks_short_work_items():
  """persistent="auto" runs the persistent forward where the forward's work items average at
  most PERSISTENT_MAX_MEAN_STEPS steps (windows of few tiles), not at long ones, not with other
  blocks or a tuned config, never in interpret mode; a bool is taken as it is."""
  with pytest.raises(ValueError, match="persistent must be True, False or 'auto'"):
    backend.MosaicBackend(persistent="always")
  with pytest.raises(TypeError, match="persistent must be True, False or 'auto'"):
    backend.MosaicBackend(persistent=1)
  auto = backend.MosaicBackend(persistent="auto")
  latent, tile = (30, 48, 80), (6, 8, 8)
  short = jsta.block_schedule(jsta.STASpec(latent, tile, (1, 1, 1)), 2, 128, 128)
  long = jsta.block_schedule(jsta.STASpec(latent, tile, (3, 3, 3)), 2, 128, 128)
  assert short.kv_count.mean() <= config.PERSISTENT_MAX_MEAN_STEPS < long.kv_count.mean()
  assert auto.use_persistent(short, 128) and not auto.use_persistent(long, 128)
  # Per-head windows: the mean over the heads' items decides.
  mixed = jsta.block_schedule(jsta.STASpec(latent, tile, ((1, 1, 1), (3, 3, 3))), 2, 128, 128)
  assert not auto.use_persistent(mixed, 128)
  assert not dataclasses.replace(auto, interpret=True).use_persistent(short, 128)
  tuned = dataclasses.replace(auto, configs=(((128, 128, 128), config.MosaicConfig()),))
  assert not tuned.use_persistent(short, 128) and tuned.use_persistent(short, 64)
  small = jsta.block_schedule(jsta.STASpec(latent, tile, (1, 1, 1)), 2, 64, 64)
  assert not auto.use_persistent(small, 128)
  assert backend.MosaicBackend(persistent=True).use_persistent(long, 128)
  assert not backend.MosaicBackend(persistent=False).use_persistent(short, 128)
  assert backend.MosaicBackend().persistent == "auto"                    # the default
  # The configs the backend makes hold a bool (the kernels' switch).
  assert auto.config(128, 128, 128).persistent is False


def test_persistent_auto_lowers_the_persistent_forward_where_items_are_short(no_device_check):
  """Through the op: with persistent="auto" a spec of short key lists lowers the forward that
  takes its items from a counter (its inline atomic add), a spec of long ones the default."""
  auto = backend.MosaicBackend(persistent="auto")

  def lowered(spec):
    x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, 128), jnp.bfloat16)
    op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=auto)
    return jax.jit(op).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()

  assert "atom.add.u32" in lowered(jsta.STASpec((6, 16, 32), (2, 8, 8), (1, 1, 1)))
  assert "atom.add.u32" not in lowered(jsta.STASpec((6, 24, 32), (2, 8, 8), (3, 3, 3)))


def test_persistent_forward_counter_per_vmapped_entry(no_device_check):
  """Under jax.vmap each mapped entry's CTAs take items from a counter of their own: the
  kernel's counter operand is batched with the entries (one int32 per entry), updated in
  place."""
  spec = TEXT
  be = backend.MosaicBackend(persistent=True, persistent_ctas=3)
  x = jax.ShapeDtypeStruct((3, 1, spec.seq_len, 2, 128), jnp.bfloat16)
  op = lambda q: jsta.sliding_tile_attention(q, q, q, spec, implementation=be)
  text = jax.jit(jax.vmap(op)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
  call = next(line for line in text.splitlines() if "custom_call @mosaic_gpu" in line)
  assert "output_operand_aliases" in call and "tensor<3x1xi32>" in call


@pytest.mark.parametrize("spec", [TEXT, SPANNING_RAGGED], ids=["padded", "spanning_ragged"])
def test_persistent_forward_lowers_for_cuda(spec, no_device_check):
  """Forward and gradient with the persistent forward lower for CUDA (one launch of
  ``persistent_ctas`` CTAs; the backward kernels unchanged)."""
  x = jax.ShapeDtypeStruct((2, spec.seq_len, 2, 128), jnp.bfloat16)
  be = backend.MosaicBackend(persistent=True, persistent_ctas=5)
  op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=be)
  text = jax.jit(op).trace(x, x, x).lower(lowering_platforms=("cuda",)).as_text()
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1
  loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32))
  assert _mosaic_calls(jax.grad(loss, argnums=(0, 1, 2)), x, x, x) == 2


@pytest.mark.parametrize("spec,persistent", [(TEXT, False), (SPANNING_RAGGED, False),
                                             (TEXT, True)],
                         ids=["padded", "spanning_ragged", "padded_persistent"])
@pytest.mark.slow
def test_exp2_fma_forward_lowers_for_cuda(spec, persistent, no_device_check):
  """The forward with 32 of a step's exponentials on the FMA pipe
  (MosaicConfig.exp2_fma_columns) passes the whole Mosaic GPU lowering, in the single-item
  and the persistent kernel, and its module differs from the default's."""
  from benchmarks.tools.mosaic_fingerprint import module_fingerprints
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, 128), jnp.bfloat16)

  def modules(**fields):
    be = backend.MosaicBackend(persistent=persistent, persistent_ctas=3, **fields)
    op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=be)
    return module_fingerprints(op, x, x, x)

  fma = modules(exp2_fma_columns=32)
  assert len(fma) == 1 and fma != modules() and modules() == modules(exp2_fma_columns=0)


@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,heads,head_dim,lean", [
    (SPANNING_RAGGED, 1, 64, False),                   # partial pairs, padding, text
    pytest.param(TEXT, 1, 128, True, marks=pytest.mark.slow),   # padded keys; other options
    # (Gathered items: the GPU case pallas_mosaic_apart in tests/test_attention.py.)
], ids=["spanning_ragged_d64", "padded_lean"])
def test_masked_steps_apart_matches_the_reference_in_interpret_mode(spec, heads, head_dim,
                                                                    lean):
  """The forward with each item's masked steps first, in a loop of their own, and the rest
  in a loop without the mask code (MosaicConfig.masked_steps_apart) computes what the
  float32 reference does and what the single loop computes (up to the order of the steps'
  sums), with o's rounding error; every schedule holds items with both kinds of steps, and
  one of them items with masked steps only or unmasked steps only."""
  opts = dict(overlap_exp=lean, auto_barriers=not lean)
  plain = backend.MosaicBackend(interpret=True, masked_steps_apart=False, **opts)
  apart = backend.MosaicBackend(interpret=True, masked_steps_apart=True, **opts)
  sched = jsta.block_schedule(spec, heads, 128, 128)
  cfg = apart.config(128, 128, head_dim)
  ops, _, _ = backend.forward_operands(sched, cfg, masks_apart=True)
  nmask, cnt = np.asarray(ops.masked_steps), np.asarray(ops.kv_count)
  kinds = {"both": ((nmask > 0) & (nmask < cnt)).any(), "masked only": (nmask == cnt).any(),
           "unmasked only": ((nmask == 0) & (cnt > 0)).any()}
  assert kinds["both"], kinds
  if spec is SPANNING_RAGGED:
    assert kinds["masked only"] or kinds["unmasked only"], kinds
  q, k, v = random_qkv(2, spec, 1, heads, head_dim, jnp.bfloat16)
  scale = head_dim ** -0.5
  fit = lambda x: jnp.pad(x, ((0, 0), (0, sched.seq_len - x.shape[1]), (0, 0), (0, 0)))
  o, lse, o_low = apart.forward(*map(fit, (q, k, v)), sched, scale, with_o_low=True)
  o1, lse1, o_low1 = plain.forward(*map(fit, (q, k, v)), sched, scale, with_o_low=True)
  valid = np.asarray(jsta.token_valid(spec))
  cut = lambda x: np_f32(x)[:, :spec.seq_len][:, valid]
  o_ref = np.asarray(jsta.reference_attention(*(np_f32(x) for x in (q, k, v)), spec,
                                              scale=scale))[:, valid]
  assert rel_l2(cut(o), o_ref) < TOL
  # Another step order rounds P to bf16 against other running maxima (1e-4 to 1e-3 on these
  # short key lists), where a step lost or counted twice would be 1e-2 and more.
  assert rel_l2(cut(o) + cut(o_low), cut(o1) + cut(o_low1)) < 3e-3
  np.testing.assert_allclose(np_f32(lse)[..., :spec.seq_len][..., valid],
                             np_f32(lse1)[..., :spec.seq_len][..., valid], rtol=1e-5, atol=1e-5)


def test_bf16_calls_do_not_import_the_8bit_kernels():
  """The Hopper backend imports the 8-bit kernels, their quantization passes and Pallas Triton
  only when an 8-bit precision is asked for: in a fresh process a bf16 call's first trace
  (lowered for CUDA) leaves them out, which shortens its first call; an 8-bit call brings
  them in."""
  import textwrap
  code = textwrap.dedent("""
      import sys
      import jax, jax.numpy as jnp, jsta
      from pallas_kernels.mosaic.backend import MosaicBackend
      spec = jsta.STASpec((2, 8, 8), (1, 8, 8), (1, 1, 1))
      x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, 128), jnp.bfloat16)
      be = MosaicBackend(device_check=False)
      names = ("pallas_kernels.mosaic.fp8", "pallas_kernels.mosaic.forward_fp8",
               "pallas_kernels.mosaic.fp8_quantize", "jax.experimental.pallas.triton")
      for precision in (None, "qk_int8"):
        op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=be,
                                                         precision=precision)
        jax.jit(op).trace(x, x, x).lower(lowering_platforms=("cuda",))
        print([name in sys.modules for name in names])
      """)
  out = run_on_cpu_devices(["-c", code], devices=1, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split("\n")[:2] == [str([False] * 4), str([True] * 4)], out.stdout


def test_exp2_on_fma_matches_exp2():
  """The exponentials on the FMA pipe (MosaicConfig.exp2_fma_columns): relative error under
  7.5e-5 where 2 ** x is a normal float32, at most 2.4e-38 for the masked scores (-inf) and
  below, NaN stays NaN; with the opaque rounding XLA cannot fold the rounding away (without
  it, XLA's simplifier does: errors of up to sqrt(2) - 1 near half-integers)."""
  x = np.concatenate([np.linspace(-130.0, 8.0, 100_001), np.arange(-124.5, 8.0, 1.0),
                      [-np.inf, np.nan]]).astype(np.float32)
  got = np.asarray(jax.jit(lambda x: common.exp2_on_fma(x, opaque_rounding=True))(x))
  want = np.exp2(x.astype(np.float64))
  normal = x >= -124.0
  assert np.nanmax(np.abs(got[normal] / want[normal] - 1)) < 7.5e-5
  assert ((got[x < -125.5] >= 0) & (got[x < -125.5] <= 2.4e-38)).all()
  assert np.isnan(got[-1])
  split = np.asarray(common.softmax_exp2(jnp.asarray(x[:64 * 128].reshape(64, 128)), 32,
                                         interpret=True))
  np.testing.assert_allclose(split, want[:64 * 128].reshape(64, 128), rtol=7.5e-5, atol=3e-38)
  np.testing.assert_array_equal(split[:, :96],
                                np.asarray(jnp.exp2(x[:64 * 128].reshape(64, 128)[:, :96])))
  for bad, err in ((12, ValueError), (136, ValueError), (-8, ValueError), (8.0, TypeError),
                   (True, TypeError)):
    with pytest.raises(err, match="exp2_fma_columns must be"):
      config.MosaicConfig(exp2_fma_columns=bad)
  assert backend.MosaicBackend(exp2_fma_columns=32).config(128, 128, 128).exp2_fma_columns == 32


def test_masked_steps_apart_checks_and_order(no_device_check):
  """The masked steps come first in each item, each part in its schedule order, and the count
  is theirs; the option takes a bool and not the persistent forward; where no step needs a
  mask the operands stay as they are."""
  sched = jsta.block_schedule(SPANNING_RAGGED, 1, 128, 128)
  cfg = config.MosaicConfig(masked_steps_apart=True, key_steps="blocks")
  plain, _, _ = backend.forward_operands(sched, cfg)
  ops, _, _ = backend.forward_operands(sched, cfg, masks_apart=True)
  info0, idx0, idx = (np.asarray(a) for a in (plain.step_info, plain.kv_index, ops.kv_index))
  for g, i in np.ndindex(*np.asarray(ops.kv_count).shape):
    n, m = int(ops.kv_count[g, i]), int(ops.masked_steps[g, i])
    full = [(b & 1) == 0 and (b >> 1) & 3 == 3 and (b >> 3) & 3 == 3 for b in info0[g, i, :n]]
    want = ([x for x, f in zip(idx0[g, i, :n], full) if not f]
            + [x for x, f in zip(idx0[g, i, :n], full) if f])
    assert list(idx[g, i, :n]) == want and m == n - sum(full)
  with pytest.raises(TypeError, match="masked_steps_apart must be a bool"):
    config.MosaicConfig(masked_steps_apart=1)
  with pytest.raises(ValueError, match="not with persistent"):
    config.MosaicConfig(masked_steps_apart=True, persistent=True)
  with pytest.raises(ValueError, match="serialize every wgmma"):
    backend.MosaicBackend(masked_steps_apart=True, rescale_under_qk=True)
  # The backend's default, "auto": on, except where it does not combine.
  key = (128, 128, 128)
  assert backend.MosaicBackend().config(*key).masked_steps_apart
  assert not backend.MosaicBackend(masked_steps_apart=False).config(*key).masked_steps_apart
  for other in (dict(persistent=True), dict(rescale_under_qk=True)):
    assert not backend.MosaicBackend(**other).config(*key).masked_steps_apart
  assert backend.MosaicBackend(persistent="auto").config(*key).masked_steps_apart
  with pytest.raises(ValueError, match="masked_steps_apart must be True, False or 'auto'"):
    backend.MosaicBackend(masked_steps_apart="yes")
  with pytest.raises(TypeError, match="masked_steps_apart must be True, False or 'auto'"):
    backend.MosaicBackend(masked_steps_apart=1)
  unpadded = jsta.block_schedule(PLAIN, 1, 128, 128)
  ops, _, _ = backend.forward_operands(unpadded, cfg, masks_apart=True)
  assert ops.masked_steps is None


# Only the forward kernel, called outside any larger jitted program: there GPU interpret mode
# can stall (its warpgroup threads wait on each other's callbacks) once a CTA walks several
# items. The backward kernels are unchanged and take o, lse and o_low, compared here bit for bit.
@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,heads,kv_heads,head_dim,batch,lean", [
    pytest.param(SPANNING_RAGGED, 2, 1, 64, 1, True,   # partial pairs, GQA, every option
                 marks=pytest.mark.slow),
    (jsta.STASpec((3, 8, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                  text_max_len=64), 2, 2, 128, 2, False),   # gathered items, per-head windows,
], ids=["spanning_gqa_lean", "gathered_per_head_b2"])          # key padding, text, batch 2
def test_persistent_forward_equals_the_default_in_interpret_mode(spec, heads, kv_heads,
                                                                 head_dim, batch, lean):
  """The persistent forward on 3 CTAs (each walking several items: slots wrap across items,
  the second query buffer, stores left in flight) computes what the one-CTA-per-item kernel
  computes, bit for bit (o, lse and o's rounding error, as the gradient's forward stores
  them), and o matches the float32 reference on the valid rows."""
  opts = dict(overlap_exp=lean, rescale_under_qk=lean, auto_barriers=not lean)
  # The single-item kernel with its steps in schedule order, as the persistent one walks them.
  plain = backend.MosaicBackend(interpret=True, masked_steps_apart=False, **opts)
  pers = backend.MosaicBackend(interpret=True, persistent=True, persistent_ctas=3, **opts)
  sched = jsta.block_schedule(spec, heads, 128, 128)
  q, k, v = random_qkv(1, spec, batch, heads, head_dim, jnp.bfloat16)
  k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
  assert sched.num_q_blocks * heads * batch >= 2 * 3
  scale = head_dim ** -0.5
  fit = lambda x: jnp.pad(x, ((0, 0), (0, sched.seq_len - x.shape[1]), (0, 0), (0, 0)))
  want = plain.forward(*map(fit, (q, k, v)), sched, scale, with_o_low=True)
  got = pers.forward(*map(fit, (q, k, v)), sched, scale, with_o_low=True)
  for name, a, b in zip(("o", "lse", "o_low"), got, want):
    np.testing.assert_array_equal(np_f32(a), np_f32(b), err_msg=name)
  o = np_f32(got[0])[:, :spec.seq_len]
  o_ref = jsta.reference_attention(*(np_f32(x) for x in (q, k, v)), spec, scale=scale)
  valid = np.asarray(jsta.token_valid(spec))
  assert rel_l2(o[:, valid], np.asarray(o_ref)[:, valid]) < TOL


# Tiles of 384 tokens (the paper's 6x8x8), each three 128-row query blocks and two 192-key
# steps; a window that skips half the tiles.
TILE384 = jsta.STASpec((6, 16, 16), (6, 8, 8), (1, 1, 3))


def test_192_key_blocks_are_refused_where_they_do_not_fit(no_device_check):
  """192-key steps run only the plain forward: padded keys (key-bias rows), the backward,
  the op's own blocks and the 8-bit forward refuse them, naming block_kv."""
  cfg = config.MosaicConfig(block_kv=192, key_steps="blocks")
  text = jsta.STASpec((6, 16, 16), (6, 8, 8), (1, 3, 3), text_len=10, text_max_len=64)
  sched = jsta.block_schedule(text, 1, 128, 192, mask_unit=64)
  x = jax.ShapeDtypeStruct((1, sched.seq_len, 1, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="block_kv=192 runs only the plain forward"):
    jax.eval_shape(lambda q: backend.forward(q, q, q, sched, 0.1, cfg), x)
  plain = jsta.block_schedule(TILE384, 1, 128, 192, mask_unit=64)
  y = jax.ShapeDtypeStruct((1, plain.seq_len, 1, 128), jnp.bfloat16)
  with pytest.raises(ValueError, match="backward kernels need block_kv 64 or 128"):
    jax.eval_shape(lambda q: backend.backward(q, q, q, q, jnp.zeros((1, 1, plain.seq_len)), q,
                                              plain, 0.1, cfg), y)
  with pytest.raises(ValueError, match="block_kv must be 64 or 128 for pallas_mosaic"):
    backend.MosaicBackend(device_check=False).check(TILE384, 128, jnp.bfloat16, 128, 192)
  with pytest.raises(ValueError, match="block_kv must be 64, 128 or 192"):
    config.MosaicConfig(block_kv=256)


def test_forward_192_keys_picks_the_schedules_it_runs(no_device_check):
  """MosaicBackend(forward_192_keys=True), the default, runs the forward on the 128 x 192
  schedule of the same spec only where that schedule has no padded key and no partial pair,
  head_dim is 128, and the call needs no run-time key validity; forward_192_keys=False never
  does; the flag must be a bool. Where the forward runs persistent (the default's "auto" at
  short work items, as TILE384's) it keeps 128-key steps."""
  default = backend.MosaicBackend(device_check=False)
  wide = backend.MosaicBackend(device_check=False, persistent=False)
  assert default.forward_192_keys
  sched = jsta.block_schedule(TILE384, 2, 128, 128, mask_unit=64)
  assert default.use_persistent(sched, 128) and default.schedule_192_keys(sched, 128) is None
  got = wide.schedule_192_keys(sched, 128)
  assert (got.block_q, got.block_kv, got.seq_len) == (128, 192, sched.seq_len)
  narrow = backend.MosaicBackend(device_check=False, forward_192_keys=False)
  assert narrow.schedule_192_keys(sched, 128) is None
  assert wide.schedule_192_keys(sched, 64) is None
  assert wide.schedule_192_keys(sched, 128, key_valid=jnp.ones((1, sched.seq_len), bool)) is None
  assert dataclasses.replace(wide, key_steps="gathered").schedule_192_keys(sched, 128) is None
  assert dataclasses.replace(wide, persistent=True).schedule_192_keys(sched, 128) is None
  # Padded keys (text slots, tiles of 128 tokens) or other block sizes: the 128-key forward.
  for spec, blocks in ((TEXT, (128, 128)), (PLAIN, (128, 128)), (TILE384, (64, 64))):
    other = jsta.block_schedule(spec, 1, *blocks, mask_unit=64)
    assert wide.schedule_192_keys(other, 128) is None, spec
  with pytest.raises(TypeError, match="forward_192_keys must be a bool"):
    backend.MosaicBackend(forward_192_keys="auto")


@pytest.mark.cpu_only
def test_op_forward_with_192_keys_matches_the_reference_in_interpret_mode():
  """The op's forward with forward_192_keys=True (MosaicConfig(block_kv=192) on the 128 x 192
  schedule: wgmma N = 192 for Q K^T, K = 192 for P V, three 64-key units a step) computes what
  the float32 reference does, its lse is the 128-key forward's, and with o's rounding error (the forward under a VJP) o_low is that error: under half an
  ulp of o, and o + o_low nearer the 128-key forward's float32 o than o alone."""
  spec, heads = TILE384, 1
  be = backend.MosaicBackend(interpret=True, forward_192_keys=True)
  q, k, v = random_qkv(1, spec, 1, heads, 128, jnp.bfloat16)
  o = jsta.sliding_tile_attention(q, k, v, spec, implementation=be)
  want = np.asarray(jsta.reference_attention(*(np_f32(x) for x in (q, k, v)), spec,
                                             scale=128 ** -0.5))
  assert rel_l2(np_f32(o), want) < TOL
  sched = jsta.block_schedule(spec, heads, 128, 128, mask_unit=64)
  o2, lse, o_low = be.forward(q, k, v, sched, 128 ** -0.5, with_o_low=True)
  np.testing.assert_array_equal(np_f32(o2), np_f32(o))
  # o_low is o's bf16 rounding error: at most half an ulp of o (8 bits), not all zero, and
  # o + o_low is nearer the 128-key forward's o + o_low than o is.
  fine = np_f32(o2) + np_f32(o_low)
  assert np.all(np.abs(np_f32(o_low)) <= np.abs(np_f32(o2)) * 2.0 ** -8 + 1e-30)
  assert np.abs(np_f32(o_low)).max() > 0
  o128, lse128, o_low128 = backend.MosaicBackend(
      interpret=True, forward_192_keys=False).forward(q, k, v, sched, 128 ** -0.5,
                                                      with_o_low=True)
  np.testing.assert_allclose(np_f32(lse), np_f32(lse128), rtol=1e-5, atol=1e-5)
  fine128 = np_f32(o128) + np_f32(o_low128)
  assert rel_l2(fine, fine128) < rel_l2(np_f32(o2), fine128) / 2


@pytest.mark.cpu_only
@pytest.mark.slow
def test_op_forward_with_192_keys_fp16_large_logits_per_head_windows():
  """The op's default forward on 384-token tiles (192-key steps) with float16 input, scores of
  standard deviation 12 (every row's maximum over 20) and two heads of different windows: o against the float32
  reference and lse against a float64 log-sum-exp of the same masked scores, in GPU interpret
  mode; the same within rounding as the 128-key forward (forward_192_keys=False)."""
  spec = jsta.STASpec((6, 16, 24), (6, 8, 8), ((1, 1, 3), (1, 3, 1)))
  heads, d = 2, 128
  wide = backend.MosaicBackend(interpret=True)
  assert wide.schedule_192_keys(jsta.block_schedule(spec, heads, 128, 128, mask_unit=64),
                                d) is not None
  q, k, v = random_qkv(3, spec, 1, heads, d)
  q, k, v = (q * 12.0).astype(jnp.float16), k.astype(jnp.float16), v.astype(jnp.float16)
  o, lse = jsta.sliding_tile_attention(q, k, v, spec, implementation=wide, return_lse=True)
  assert o.dtype == jnp.float16 and lse.shape == (1, spec.seq_len, heads)
  want = np.asarray(jsta.reference_attention(*(np_f32(x) for x in (q, k, v)), spec,
                                             scale=d ** -0.5))
  assert rel_l2(np_f32(o), want) < TOL
  scores = np.einsum("shd,thd->hst", np_f32(q[0]).astype(np.float64),
                     np_f32(k[0]).astype(np.float64)) * d ** -0.5
  scores = np.where(jsta.reference.reference_mask(spec, heads), scores, -np.inf)
  top = scores.max(axis=-1, keepdims=True)
  want_lse = (top[..., 0] + np.log(np.exp(scores - top).sum(axis=-1))).T      # [seq, heads]
  assert top.min() > 20 and top.max() > 40                                      # large logits
  np.testing.assert_allclose(np_f32(lse[0]), want_lse, rtol=1e-5, atol=2e-3)
  narrow = backend.MosaicBackend(interpret=True, forward_192_keys=False)
  o128 = jsta.sliding_tile_attention(q, k, v, spec, implementation=narrow)
  assert rel_l2(np_f32(o), np_f32(o128)) < 2e-3


def test_op_forward_with_192_keys_lowers_for_cuda(no_device_check):
  """Lowered for CUDA, the op's forward with forward_192_keys=True (the default) is one Mosaic
  GPU module that differs from the 128-key forward's (forward_192_keys=False); its gradient
  holds the same backward and a forward of its own (192-key steps with o's rounding
  error). Not persistent (the spec's items are short: "auto" would run them persistent, on
  128-key steps)."""
  from benchmarks.tools.mosaic_fingerprint import module_fingerprints
  spec = jsta.STASpec((6, 16, 16), (6, 8, 8), (3, 3, 3))
  x = jax.ShapeDtypeStruct((1, spec.seq_len, 2, 128), jnp.bfloat16)

  def modules(be, grad=False):
    op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=be)
    fn = jax.grad(lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32))) if grad else op
    return module_fingerprints(fn, x, x, x)

  wide = backend.MosaicBackend(device_check=False, persistent=False)
  plain = backend.MosaicBackend(device_check=False, forward_192_keys=False, persistent=False)
  got = modules(wide)
  assert len(got) == 1 and got != modules(plain)
  wide_grad, plain_grad = modules(wide, grad=True), modules(plain, grad=True)
  assert len(wide_grad) == 2 and wide_grad[0] not in (plain_grad[0], got[0])
  assert wide_grad[1] == plain_grad[1]


# ---- Padded keys streamed from zeroed copies ------------------------------------------------
def test_padded_key_pieces_are_renamed_past_the_sequence():
  """with_padded_key_pieces: the pieces that may hold padded keys (partial tiles, text slots;
  every text slot with run-time text lengths) are copied with those keys zeroed, the key lists
  name them seq // piece + p, and the key bias has their rows appended in that order."""
  spec = jsta.STASpec((2, 10, 16), (1, 8, 8), (1, 1, 1), text_len=10, text_max_len=64)
  for dynamic, piece in ((False, 64), (True, 64), (False, 128)):
    sched = jsta.block_schedule(spec, 1, 128, 128, dynamic_text=dynamic)
    seq = sched.seq_len
    pieces = common.maybe_padded_key_pieces(sched, piece)
    maybe = ~sched.key_valid
    if dynamic:
      maybe[spec.padded_video_len:spec.padded_video_len + spec.text_max_len] = True
    np.testing.assert_array_equal(pieces, np.flatnonzero(maybe.reshape(-1, piece).any(1)))
    assert 0 < pieces.size < seq // piece
    ops = common.schedule_operands(sched)
    k = jnp.arange(seq, dtype=jnp.float32)[None, :, None, None] + 1.0
    valid = jnp.asarray(sched.key_valid)[None]
    new, padded = common.with_padded_key_pieces(ops, sched, k, -k, piece,
                                                valid if dynamic else None)
    rows = (pieces[:, None] * piece + np.arange(piece)).ravel()
    np.testing.assert_array_equal(np.asarray(padded.k)[0, :, 0, 0],
                                  np.where(sched.key_valid[rows], rows + 1.0, 0.0))
    np.testing.assert_array_equal(np.asarray(padded.v), -np.asarray(padded.k))
    lookup = np.arange(seq // piece)
    lookup[pieces] = seq // piece + np.arange(pieces.size)
    np.testing.assert_array_equal(np.asarray(new.kv_index), lookup[np.asarray(ops.kv_index)])
    bias = np.asarray(new.key_bias).reshape(-1)
    np.testing.assert_array_equal(bias[:seq], np.asarray(ops.key_bias).reshape(-1))
    np.testing.assert_array_equal(bias[seq:], np.asarray(ops.key_bias).reshape(-1)[rows])
  unpadded = jsta.block_schedule(jsta.STASpec((2, 8, 16), (1, 8, 8), (1, 1, 1)), 1, 128, 128)
  ops = common.schedule_operands(unpadded)
  assert common.with_padded_key_pieces(ops, unpadded, k, k, 64) == (ops, None)


@pytest.mark.cpu_only
@pytest.mark.parametrize("spec,heads,kv_heads,blocks,dynamic,opts", [
    # gathered 64-key units, grouped k/v, per-head windows, text with run-time lengths
    (jsta.STASpec((3, 10, 24), (3, 8, 8), ((1, 1, 1), (1, 1, 3)), text_len=5,
                  text_max_len=64), 2, 1, (128, 128), True, {}),
    # 64-key blocks (no gathering), partial tiles and static text
    pytest.param(jsta.STASpec((4, 40), (4, 32), (1, 1), text_len=10, text_max_len=40), 2, 2,
                 (64, 64), False, {}, marks=pytest.mark.slow),
    # the persistent forward on 3 CTAs (slots wrap across items)
    (SPANNING_RAGGED, 2, 2, (128, 128), False, dict(persistent=True, persistent_ctas=3)),
], ids=["gathered_gqa_runtime_text", "blocks64_static", "persistent"])
def test_forward_streams_padded_keys_from_zeroed_copies_in_interpret_mode(
    spec, heads, kv_heads, blocks, dynamic, opts):
  """With raw_padded_kv the forward reads the pieces holding padded keys from zeroed copies:
  NaN in k and v at every padded key (of the schedule, and of the run-time text lengths)
  gives, bit for bit, what the forward computes on k and v zeroed there."""
  be = backend.MosaicBackend(interpret=True, **opts)
  sched = jsta.block_schedule(spec, heads, *blocks, dynamic_text=dynamic)
  batch = 2
  q, k, v = random_qkv(2, spec, batch, heads, 128 if blocks[0] == 128 else 64, jnp.bfloat16)
  k, v = k[:, :, :kv_heads], v[:, :, :kv_heads]
  fit = lambda x: jnp.pad(x, ((0, 0), (0, sched.seq_len - x.shape[1]), (0, 0), (0, 0)))
  q, k, v = map(fit, (q, k, v))
  key_valid = None
  valid = np.broadcast_to(sched.key_valid, (batch, sched.seq_len))
  if dynamic:
    slot = np.arange(sched.seq_len) - spec.padded_video_len
    valid = valid & ((slot < 0) | (slot < np.array([[3], [0]])))
    key_valid = jnp.asarray(valid)
  m = jnp.asarray(valid)[:, :, None, None]
  clean = [jnp.where(m, x, 0) for x in (k, v)]
  dirty = [jnp.where(m, x, jnp.nan) for x in (k, v)]
  scale = q.shape[-1] ** -0.5
  want = be.forward(q, *clean, sched, scale, key_valid)
  got = be.forward(q, *dirty, sched, scale, key_valid, raw_padded_kv=True)
  for name, a, b in zip(("o", "lse"), got, want):
    np.testing.assert_array_equal(np_f32(a), np_f32(b), err_msg=name)
  assert np.isfinite(np_f32(got[0])).all()


def test_op_leaves_padded_kv_to_the_forward_and_zeroes_them_under_a_vjp(monkeypatch):
  """An inference call passes k and v as they are to a backend whose forward takes padded
  keys (raw_padded_kv=True); under a VJP the forward gets them zeroed (the backward needs
  them clean), and the gradients are zero at padded keys."""
  spec = jsta.STASpec((4, 40), (4, 32), (1, 1), text_len=10, text_max_len=40)
  be = backend.MosaicBackend(interpret=True)
  calls = []
  real = backend.forward

  def spy(q, k, v, sched, scale, config=None, key_valid=None, with_o_low=False,
          raw_padded_kv=False):
    calls.append((raw_padded_kv, bool(jnp.isnan(k).any()) if not isinstance(
        k, jax.core.Tracer) else None))
    return real(q, k, v, sched, scale, config, key_valid, with_o_low, raw_padded_kv)

  monkeypatch.setattr(backend, "forward", spy)
  q, k, v = random_qkv(3, spec, 1, 1, 64, jnp.float16)
  valid = jnp.asarray(jsta.token_valid(spec))[None, :, None, None]
  k, v = (jnp.where(valid, x, jnp.nan) for x in (k, v))
  attend = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=be)
  o = interpreted(attend, q, k, v)
  assert [c[0] for c in calls] == [True] and np.isfinite(np_f32(o)).all()
  calls.clear()
  grads = interpreted(jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32)),
                               argnums=(0, 1, 2)), q, k, v)
  assert [c[0] for c in calls] == [False]
  for g in grads:
    assert np.isfinite(np_f32(g)).all()
    assert (np_f32(g)[:, ~np.asarray(jsta.token_valid(spec))] == 0).all()


def test_op_zeroes_padded_kv_option_restores_the_ops_selects(monkeypatch):
  """MosaicBackend(op_zeroes_padded_kv=True): the op zeroes k and v itself and the forward
  gets raw_padded_kv=False, with the same result."""
  spec = jsta.STASpec((4, 40), (4, 32), (1, 1), text_len=10, text_max_len=40)
  calls = []
  real = backend.forward
  monkeypatch.setattr(backend, "forward", lambda *a, **kw: calls.append(a[8:] or kw) or real(
      *a, **kw))
  q, k, v = random_qkv(4, spec, 1, 1, 64, jnp.float16)
  valid = jnp.asarray(jsta.token_valid(spec))[None, :, None, None]
  k, v = (jnp.where(valid, x, jnp.nan) for x in (k, v))
  outs = []
  for zeroes in (True, False):
    be = backend.MosaicBackend(interpret=True, op_zeroes_padded_kv=zeroes)
    assert be.forward_takes_raw_padded_kv is not zeroes
    outs.append(interpreted(lambda q, k, v: jsta.sliding_tile_attention(
        q, k, v, spec, implementation=be), q, k, v))
  assert [c[-1] for c in calls] == [False, True]
  np.testing.assert_array_equal(np_f32(outs[0]), np_f32(outs[1]))


def test_interpret_mode_warns_once_under_async_cpu_dispatch():
  """GPU interpret mode can hang under JAX's asynchronous CPU dispatch (the suite turns it off,
  tests/conftest.py): interpret_params warns, once, where it is on, and not where it is off or
  outside interpret mode."""
  import warnings
  interp = config.MosaicConfig(interpret=True)
  assert not jax.config.read("jax_cpu_enable_async_dispatch")  # conftest.py's setting
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert common.interpret_params(interp) is not None
    assert common.interpret_params(config.MosaicConfig()) is None
  common._warn_async_dispatch.cache_clear()
  # The flag alone (the CPU backend, started, keeps dispatching inline).
  jax.config.update("jax_cpu_enable_async_dispatch", True)
  try:
    with pytest.warns(RuntimeWarning, match="jax_cpu_enable_async_dispatch', False"):
      common.interpret_params(interp)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      common.interpret_params(interp)                            # once per process
      assert common.interpret_params(config.MosaicConfig()) is None
  finally:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    common._warn_async_dispatch.cache_clear()
