"""Pieces shared by the Hopper (Mosaic GPU) kernels: launch grid and CTA position, schedule
operands, shared-memory layouts, the wgmma accumulate, the producer warpgroups' TMA streams, the
dK/dV step, and the forward epilogue.

Layouts: q, k, v, o, do: [batch, seq, heads, head_dim] (TMA reads the strided
[rows, head_dim] slices directly, no transpose); lse, delta: [batch, heads, seq] float32
(natural-log lse; rows that attend nothing: o = 0, lse = +inf). seq is the schedule's padded
``seq_len``.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from jsta import grid, positions
from jsta.schedule import BlockSchedule, block_schedule
from pallas_kernels.mosaic.config import WG_ROWS, MosaicConfig

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


# 2 ** f on [-1/2, 1/2] by a cubic: relative error under 7.5e-5 in float32 (fitted for
# relative error), far below P's rounding to bf16 (3.9e-3) or e4m3.
EXP2_CUBIC = (0.9999281167984009, 0.6932609677314758, 0.24261054396629333, 0.05517132207751274)
_ROUND_MAGIC = 12582912.0            # 1.5 * 2 ** 23


def exp2_on_fma(x, opaque_rounding: bool = False):
  """2 ** x of float32 ``x`` (finite and below 2 ** 22, or -inf) on the FMA and integer pipes:
  no MUFU instruction, the exponent's bottleneck in the softmax (8 cycles a warp, against
  one for an FMA). ``x + 1.5 * 2 ** 23`` rounds x to the nearest integer j in its low
  mantissa bits (so j needs no conversion instruction, which runs at MUFU's rate either),
  2 ** (x - j) comes from :data:`EXP2_CUBIC`, and j is added into the result's exponent
  bits: the float's bits shifted left by 23 are j's (the constant's bits shift out). Nine
  instructions. x is first raised to -125, so the result stays a normal float: a masked
  score (-inf) gives about 2.4e-38 instead of 0, below anything P's sums or its bf16 or e4m3
  rounding keep. ``opaque_rounding``: the rounded sum behind an optimization barrier, for
  XLA (GPU interpret mode, CPU), whose simplifier folds ``(x + c) - c`` into x; Mosaic GPU
  emits the arithmetic without reassociation, which keeps it (its PTX subtracts the
  constant)."""
  x = jnp.maximum(x, -125.0)
  t = x + _ROUND_MAGIC
  if opaque_rounding:
    t = lax.optimization_barrier(t)
  f = x - (t - _ROUND_MAGIC)
  c0, c1, c2, c3 = EXP2_CUBIC
  p = (f * c3 + c2) * f
  p = (p + c1) * f + c0
  j_bits = lax.shift_left(lax.bitcast_convert_type(t, jnp.int32), 23)
  return lax.bitcast_convert_type(lax.bitcast_convert_type(p, jnp.int32) + j_bits, jnp.float32)


def softmax_exp2(x, fma_columns: int, interpret: bool = False):
  """2 ** x of the scores [rows, keys] float32 (WGMMA layout), the last ``fma_columns`` key
  columns by :func:`exp2_on_fma`, the others by exp2 (MUFU): ``MosaicConfig.exp2_fma_columns``.
  Column slices of a multiple of 8 keys are whole register tiles of the layout, so the split
  and the concatenation move no data. ``interpret``: GPU interpret mode (see
  :func:`exp2_on_fma`'s ``opaque_rounding``)."""
  if not fma_columns:
    return jnp.exp2(x)
  cut = x.shape[1] - fma_columns
  if not cut:
    return exp2_on_fma(x, interpret)
  return jnp.concatenate([jnp.exp2(x[:, :cut]), exp2_on_fma(x[:, cut:], interpret)], axis=1)


def compiler_params(config: MosaicConfig, auto_barriers: bool | None = None):
  # No SMEM reserved for cross-warp reductions: the kernels' row max/sum over the WGMMA layout
  # stay within a warp, and the 2 KiB default is what keeps a third K/V stage from fitting.
  # Pallas's automatic barriers only where the config keeps them (``auto_barriers``, else
  # MosaicConfig.auto_barriers); interpret mode always keeps them.
  keep = config.auto_barriers if auto_barriers is None else auto_barriers
  return plgpu.CompilerParams(approx_math=True, reduction_scratch_bytes=0,
                              unsafe_no_auto_barriers=not (keep or config.interpret))


def launch_grid(blocks: int, heads: int, batch: int, block_axis: str):
  """``grid`` and ``grid_names`` for ``plgpu.kernel`` over (block, head, batch); the kernels
  read their indices by name. Pallas Mosaic GPU maps the *last* grid axis to CUDA's x, which
  the hardware dispatches first: with the block axis last, the CTAs running together are
  neighbouring blocks of one head and share their K/V (q, dO, dQ rows) through L2."""
  return dict(grid=(batch, heads, blocks), grid_names=("b", "h", block_axis))


def cta_position(block_axis: str, h2g_ref, cnt_ref, order_ref):
  """Inside a kernel launched with :func:`launch_grid`: (block, head, batch, warpgroup, head group,
  the block's scheduled count ``cnt_ref[group, block]``) of the running thread. The CTA at
  launch position (head, position) runs the work item ``order_ref[head, position]``
  (``head * blocks + block``, :func:`launch_order`)."""
  item = order_ref[lax.axis_index("h"), lax.axis_index(block_axis)]
  blocks = order_ref.shape[1]
  blk, hi = lax.rem(item, blocks), lax.div(item, blocks)
  bi = lax.axis_index("b")
  wg = lax.axis_index("wg")
  grp = h2g_ref[hi]
  return blk, hi, bi, wg, grp, cnt_ref[grp, blk]


def launch_order(counts: np.ndarray, head_to_group: np.ndarray, follow: np.ndarray | None = None,
                 long_first: float = 2.0) -> np.ndarray:
  """int32[heads, blocks]: the work item (``head * blocks + block``) of each launch position.

  ``counts`` int[G, blocks] are the blocks' list lengths (the work of a CTA). The hardware
  starts CTAs in launch order (heads in turn, blocks fastest), so a few long lists (the text
  rows and text keys, which attend everything) would otherwise start with their head and
  finish long after the short ones: the last head's run the kernel's tail alone. Lists longer
  than ``long_first`` times the median go first, longest first, on every head (0: none); the
  rest follow ``follow`` (int[G, blocks], each group's blocks in the order to launch them:
  :func:`window_item_order`; default the natural order, in which neighbouring blocks of a
  head share their K/V through L2)."""
  per = counts[head_to_group].astype(np.int64)                    # [heads, blocks]
  heads, blocks = per.shape
  flat = per.reshape(-1)
  live = flat[flat > 0]
  if follow is None:
    items = np.arange(flat.size)
  else:
    follow = np.asarray(follow, np.int64)
    if follow.shape != counts.shape or not (np.sort(follow, axis=1) == np.arange(blocks)).all():
      raise ValueError(f"follow must hold a permutation of the {blocks} blocks per group, shape "
                       f"{counts.shape}, got shape {follow.shape}")
    items = (np.arange(heads)[:, None] * blocks + follow[head_to_group]).reshape(-1)
  if live.size == 0 or not long_first:
    return items.reshape(per.shape).astype(np.int32)
  long = flat[items] > long_first * np.median(live)
  first = items[long][np.argsort(-flat[items[long]], kind="stable")]
  return np.concatenate([first, items[~long]]).reshape(per.shape).astype(np.int32)


def window_axes(tiles: tuple[int, ...], window: tuple[int, ...]) -> tuple[int, ...]:
  """The tile grid's axes, slowest first, of the launch order that keeps the work items
  reading the same data closest together (:func:`window_item_order`).

  Items of tiles that differ by less than the window along every axis read some of the same
  keys (the forward) or query pieces (the backward). In a row-major order of the tiles with
  these axes the readers of a tile's data span sum_a (span_a - 1) * stride_a launch positions
  (span_a: the window along axis a, clipped to the grid; stride_a: the tiles of the faster
  axes); the axes that minimize it, the natural order (axis 0 slowest) on ties. E.g. a window
  of 3x1x1 tiles puts the frames of one spatial position side by side."""
  rank = len(tiles)
  span = [min(w, n) for w, n in zip(window, tiles)]

  def spread(axes):
    stride, total = 1, 0
    for a in reversed(axes):
      total += (span[a] - 1) * stride
      stride *= tiles[a]
    return total
  best = tuple(range(rank))
  for axes in itertools.permutations(range(rank)):
    if spread(axes) < spread(best):
      best = axes
  return best


def window_item_order(sched: BlockSchedule, item_rows: np.ndarray) -> np.ndarray:
  """int[G, blocks]: each head group's work items in an order that follows its window, for
  :func:`launch_order`'s ``follow``. ``item_rows`` int[G, blocks]: the first sequence row of
  each item (its rows, or for a dK/dV item its keys). Video items go row-major over their
  tiles with :func:`window_axes`' axes (items of one tile in their order), then the others
  (text, padding) in their order. Which axes launch fastest does not change results, only
  which data the CTAs running together share through L2."""
  spec = sched.spec
  tiles = spec.num_tiles
  offsets = grid.tile_offsets(spec.latent_shape, spec.tile_shape)
  item_rows = np.asarray(item_rows, np.int64)
  out = np.empty(item_rows.shape, np.int64)
  for g, window in enumerate(sched.group_windows):
    rows = item_rows[g]
    video = rows < spec.padded_video_len
    tile = np.clip(np.searchsorted(offsets, rows, side="right") - 1, 0, len(offsets) - 2)
    coords = np.unravel_index(tile, tiles)
    axes = window_axes(tiles, window)
    keys = [np.arange(rows.size)] + [coords[a] for a in reversed(axes)] + [~video]
    out[g] = np.lexsort(keys)
  return out


def item_launch_order(sched: BlockSchedule, counts: np.ndarray, item_rows: np.ndarray,
                      config: MosaicConfig) -> np.ndarray:
  """int32[heads, blocks]: :func:`launch_order` of the work items with ``counts`` (int[G,
  blocks]) as ``config.launch_order`` and ``config.long_items_first`` ask; ``item_rows``
  int[G, blocks] as in :func:`window_item_order`."""
  follow = (window_item_order(sched, item_rows) if config.launch_order == "window" else None)
  return launch_order(counts, sched.head_to_group, follow, config.long_items_first)


def sm_count() -> int:
  """Streaming multiprocessors of JAX's default device if it is a GPU, else an H100's or
  H200's 132 (lowering for CUDA without a GPU)."""
  dev = jax.devices()[0]
  return int(getattr(dev, "core_count", 0) or 132) if dev.platform == "gpu" else 132


def persistent_work(counts: np.ndarray, head_to_group: np.ndarray, order: np.ndarray,
                    batch: int) -> np.ndarray:
  """The persistent forward's work items, int32[items, 5]: row i = (block, head, batch entry,
  head group, steps) of the i-th item in launch order (:func:`launch_order` within each batch
  entry, batch entries in turn), the order in which the CTAs take them
  (:func:`claim_work_item`). ``counts`` int[G, blocks]: the blocks' steps; ``order``
  int[heads, blocks]."""
  heads, blocks = order.shape
  item = order.reshape(-1).astype(np.int64)
  blk, hi = item % blocks, item // blocks
  grp = head_to_group[hi].astype(np.int64)
  steps = counts[grp, blk].astype(np.int64)
  rows = np.stack([blk, hi, np.zeros_like(blk), grp, steps], axis=1)
  return np.concatenate([rows + np.array([0, 0, b, 0, 0]) for b in range(batch)]).astype(np.int32)


def claim_work_item(counter_ref, slot_ref, offset: int) -> None:
  """Takes the next work item for the calling warpgroup's CTA: one thread adds 1 to the GMEM
  counter ``counter_ref`` (int32[1], zero at launch) and writes the value it found plus
  ``offset`` to the SMEM scalar ``slot_ref`` (int32[1]). Every CTA starts with the item of
  its own index, so ``offset`` is the CTA count: the items then go out in launch order, each to
  the CTA that asks first, as the hardware hands out a grid's CTAs. Pallas's atomics only
  store; the fetch-and-add is one PTX ``atom``. The caller publishes ``slot_ref`` to other
  threads with an mbarrier arrival (release) after this."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, memref
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  @plgpu.inline_mgpu(arg_types=(plgpu.RefType(), plgpu.RefType()))
  def claim(ctx, counter, slot):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    with mgpu_utils.single_thread(mgpu_utils.ThreadSubset.WARPGROUP):
      old = mgpu_utils.inline_ptx("atom.add.u32 $0, [$1], 1;", mgpu_utils.memref_ptr(counter),
                                  result_types=i32, has_side_effects=True)
      memref.store(arith.addi(old, arith.constant(i32, offset)), slot,
                   [arith.constant(ir.IndexType.get(), 0)])

  claim(counter_ref, slot_ref)


# Hardware barriers of the kernels' own (``bar.sync`` / ``bar.arrive`` with an id): Mosaic GPU
# takes barrier 0 for the whole CTA and 1 + i for warpgroup i's own barriers.
FIRST_NAMED_BARRIER = 8


def named_barrier(barrier_id: int, threads: int, *, wait: bool, fence_smem: bool = False,
                  plus_warpgroup: bool = False) -> None:
  """One hardware barrier of ``threads`` threads (several warpgroups'): ``wait=True`` is
  ``bar.sync`` (wait until ``threads`` threads have arrived, counting the caller), False is
  ``bar.arrive`` (count the caller and go on: the side that hands a buffer over does not wait
  for the side that takes it, as FlashAttention-3's and -4's producer/consumer barriers).
  ``fence_smem``: each thread first fences its shared-memory stores for the async proxy, so
  that a TMA issued after the barrier by another warpgroup reads them (``commit_smem``'s
  fence). ``plus_warpgroup``: the barrier is ``barrier_id`` plus the calling thread's
  warpgroup index (a register operand, no branch). GPU only: interpret mode has no inline
  Mosaic GPU code."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, nvvm
  from jax.experimental.mosaic.gpu import utils as mgpu_utils
  if barrier_id < FIRST_NAMED_BARRIER or barrier_id > 15 or threads % 32:
    raise ValueError(f"named barriers take ids {FIRST_NAMED_BARRIER}..15 and whole warps, got "
                     f"id {barrier_id} for {threads} threads")
  op_name = "sync" if wait else "arrive"

  @plgpu.inline_mgpu()
  def op(ctx):
    del ctx
    if fence_smem:
      nvvm.fence_proxy(nvvm.ProxyKind.async_shared, space=nvvm.SharedSpace.shared_cta)
    if plus_warpgroup:
      i32 = ir.IntegerType.get_signless(32)
      bar_id = arith.addi(mgpu_utils.warpgroup_idx(sync=True),
                          arith.constant(i32, barrier_id))
      mgpu_utils.inline_ptx(f"bar.{op_name} $0, {threads};", bar_id, has_side_effects=True,
                            convergent=True)
    else:
      mgpu_utils.inline_ptx(f"bar.{op_name} {barrier_id}, {threads};", has_side_effects=True,
                            convergent=True)

  op()


def work_counter(like: jax.Array):
  """A fresh int32[1] zero for :func:`claim_work_item`, as a mutable ref that the kernel
  updates in place. Computed from ``like`` (the kernel's q) so that under ``jax.vmap`` each
  mapped entry gets its own counter (a constant would be one counter shared by every entry's
  CTAs); any bits of ``like`` give zero."""
  first = like.reshape(-1)[:1]
  bits = lax.bitcast_convert_type(first, jnp.dtype(f"int{8 * first.dtype.itemsize}"))
  bits = bits.astype(jnp.int32)
  return jax.new_ref(bits & 0)


ASYNC_DISPATCH_WARNING = (
    "GPU interpret mode with JAX's asynchronous CPU dispatch on can hang: the interpreter "
    "dispatches computations of its own while the kernel runs, and they queue behind any "
    "operation the caller dispatches meanwhile. Call "
    "jax.config.update('jax_cpu_enable_async_dispatch', False) before JAX's first "
    "computation (it is read when JAX starts its CPU backend).")


def interpret_params(config: MosaicConfig):
  """The pallas_call's interpret parameters: GPU interpret mode where ``config.interpret``,
  with a warning (once) where JAX dispatches CPU computations asynchronously."""
  if not config.interpret:
    return None
  if jax.config.read("jax_cpu_enable_async_dispatch"):
    _warn_async_dispatch()
  return plgpu.InterpretGPUParams()


@functools.cache
def _warn_async_dispatch():
  warnings.warn(ASYNC_DISPATCH_WARNING, RuntimeWarning, stacklevel=3)


def may_see_empty_steps(ops, partial: bool) -> bool:
  """Whether a forward's row may see whole key steps without a valid key, so that its running
  max stays -inf there (and exp2 must not see -inf - -inf): with partial pairs, and with
  run-time key validity (``ops.key_bias`` [B, seq]: a sample's text slots may all be invalid,
  and the masked steps come first)."""
  return partial or ops.key_bias.ndim == 2


def present(fields: NamedTuple) -> tuple:
  """The fields of a NamedTuple that are not None, in field order: a kernel's arguments from
  its operand bundle (:class:`ForwardOperands`, :class:`TransposedOperands`; optional fields
  None where a variant has none), or its scratch types (:func:`allocated`)."""
  return tuple(x for x in fields if x is not None)


def allocated(scratch: NamedTuple) -> tuple:
  """The ``scratch_types`` of a kernel from its named scratch (a NamedTuple of SMEM/Barrier
  types, None where a variant has none), in field order: the order fixes the shared-memory
  layout."""
  return present(scratch)


def slot_barrier(stages: int, gather: bool):
  """The barriers that say a pipeline slot's K, V or key bias landed: one TMA copy per slot,
  or two (one arrival each) where gathered steps fill its halves from two 64-key units."""
  return plgpu.Barrier(num_arrivals=2 if gather else 1, num_barriers=stages)


def piece_stream_scratch(dtype, head_dim: int, stages: int, wgs: int) -> dict:
  """The scratch fields of the dK/dV kernels' query-piece stream (:func:`stream_q_pieces`):
  q and dO pieces ``stages`` deep and their barriers; the kernels' scratch NamedTuples take
  them by name (their field order, not this one, fixes the layout)."""
  tr = smem_transforms(dtype)
  return dict(
      q=plgpu.SMEM((stages, WG_ROWS, head_dim), dtype, transforms=tr),
      do=plgpu.SMEM((stages, WG_ROWS, head_dim), dtype, transforms=tr),
      q_bar=plgpu.Barrier(num_barriers=stages),
      do_bar=plgpu.Barrier(num_barriers=stages),
      lse_bar=plgpu.Barrier(num_barriers=stages),
      delta_bar=plgpu.Barrier(num_barriers=stages),
      free_bar=plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
  )


def two_warpgroup_blocks(sched: BlockSchedule) -> bool:
  """Whether ``sched`` has 128 x 128 blocks (two compute warpgroups of 64 rows, two 64-key
  units): the blocks gathered work items replace."""
  return (sched.block_q, sched.block_kv) == (2 * WG_ROWS, 2 * WG_ROWS)


def bind_scratch(scratch: NamedTuple, refs) -> NamedTuple:
  """Inside the kernel: the refs of :func:`allocated` ``(scratch)`` under ``scratch``'s field
  names (None where ``scratch`` has None)."""
  refs = iter(refs)
  bound = type(scratch)(*(None if x is None else next(refs) for x in scratch))
  if next(refs, None) is not None:
    raise ValueError("more scratch refs than named scratch buffers")
  return bound


def smem_transforms(dtype):
  # 128-byte swizzle over 64-element rows: valid for both 2-byte dtypes (bf16, fp16).
  del dtype
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def unit_codes(sched: BlockSchedule, bits: np.ndarray) -> np.ndarray:
  """The schedule's unit masks (``kv_bits`` or ``q_bits``, units of ``sched.mask_unit``) over
  64-position units: bit ``r * (block_kv // 64) + c`` for query rows [64 r, 64 r + 64) (one
  compute warpgroup's rows, or one dK/dV query piece) and keys [64 c, 64 c + 64)."""
  f = sched.mask_unit // WG_ROWS
  if f * WG_ROWS != sched.mask_unit:
    raise ValueError(f"the Hopper kernels need a schedule whose mask unit is a multiple of 64, "
                     f"got {sched.mask_unit}")
  ru, rk = sched.q_units * f, sched.kv_units * f
  out = np.zeros(bits.shape, np.int64)
  for r in range(ru):
    for c in range(rk):
      bit = (bits.astype(np.int64) >> ((r // f) * sched.kv_units + c // f)) & 1
      out |= bit << (r * rk + c)
  return out.astype(np.int32)


def unit_bias_rows(block_kv: int) -> np.ndarray:
  """float32[2 ** (block_kv // 64), block_kv]: row ``code`` is 0 on the 64-key units whose bit
  is set in ``code`` and -inf on the others (a warpgroup's mask of a partly attended step)."""
  rk = block_kv // WG_ROWS
  codes = np.arange(2 ** rk)[:, None]
  unit = np.arange(block_kv)[None, :] // WG_ROWS
  return np.where((codes >> unit) & 1, 0.0, -np.inf).astype(np.float32)


class ForwardOperands(NamedTuple):
  """GMEM operands of the forward and dQ kernels (:func:`schedule_operands`), in the kernels'
  argument order. G head groups (distinct windows), nq query blocks, a step per key block
  (or, gathered, per two 64-key units: :func:`gathered_operands`)."""

  head_to_group: jax.Array   # int32[heads]
  kv_index: jax.Array        # int32[G, nq, max_kv] key blocks, or [G, nq, 2 * max_kv] units
  kv_count: jax.Array        # int32[G, nq]: steps
  step_info: jax.Array       # int32[G, nq, max_kv]: bit 0 key padding, bits 1..: unit mask
  key_bias: jax.Array        # float32[seq] or [batch, seq]: 0 or -inf per key
  unit_rows: jax.Array       # float32[2 ** (block_kv // 64), block_kv] (unit_bias_rows)
  launch_order: jax.Array    # int32[heads, nq] (launch_order)
  # Gathered work items only: int32[G, nq, 2], each compute warpgroup's query piece (row // 64).
  query_pieces: jax.Array | None = None
  # The forward with its masked steps apart only (masked_steps_first): int32[G, nq], the
  # leading steps of each item that need a mask.
  masked_steps: jax.Array | None = None
  # The persistent forward only: int32[items, 5], the work items in launch order
  # (persistent_work).
  work: jax.Array | None = None


class TransposedOperands(NamedTuple):
  """GMEM operands of the dK/dV kernels (:func:`transposed_operands`), in the kernels' argument
  order. nkv key blocks; their query lists are of 64-row pieces (one compute warpgroup's rows,
  the unit the dK/dV kernels stream), not of query blocks."""

  head_to_group: jax.Array   # int32[heads]
  piece_index: jax.Array     # int32[G, nkv, max_pieces]: query row // 64 of each piece
  piece_count: jax.Array     # int32[G, nkv]
  key_bias: jax.Array        # float32[seq] or [batch, seq]
  piece_codes: jax.Array     # int32[G, nkv, max_pieces]: bit w: the piece attends wg w's keys
  launch_order: jax.Array    # int32[heads, nkv]
  # Gathered work items only: int32[G, nkv, 2], each compute warpgroup's key unit (row // 64).
  key_units: jax.Array | None = None


def step_info_array(sched: BlockSchedule) -> np.ndarray:
  """int32[G, nq, max_kv]: per step of ``sched``'s key lists, bit 0 if its key block holds
  padding, bits 1.. its 64-unit mask (:func:`unit_codes`)."""
  return (sched.kv_needs_mask[sched.kv_index].astype(np.int32)
          | (unit_codes(sched, sched.kv_bits) << 1))


def schedule_operands(sched: BlockSchedule) -> ForwardOperands:
  """The forward and dQ kernels' operands of ``sched``: the per-step info holds bit 0 (the
  step's key block holds padding) and bits 1.. (its 64-unit mask, :func:`unit_codes`) in one
  independent scalar load per step; the key bias is the schedule's (replace it with
  :func:`runtime_key_bias` for run-time key validity)."""
  return ForwardOperands(
      jnp.asarray(sched.head_to_group, jnp.int32), jnp.asarray(sched.kv_index, jnp.int32),
      jnp.asarray(sched.kv_count, jnp.int32), jnp.asarray(step_info_array(sched)),
      jnp.asarray(key_bias_array(sched)), jnp.asarray(unit_bias_rows(sched.block_kv)),
      jnp.asarray(launch_order(sched.kv_count, sched.head_to_group)))


def masked_steps_first(sched: BlockSchedule, ops: ForwardOperands,
                       gather: bool) -> ForwardOperands:
  """``ops`` (the forward's operands of ``sched``, gathered or not) with each work item's
  steps reordered so that those needing a mask come first, each part in its order (entries
  past an item's steps stay where they are), and ``masked_steps`` set to their count: the
  forward's ``MosaicConfig.masked_steps_apart``. A step needs a mask where its keys hold
  padding (bit 0 of ``step_info``) or a compute warpgroup attends only some of its 64-key
  units (its bits of the unit mask not all set)."""
  if gather:
    gat = _gathered(sched)
    index, info, steps, kv_units = gat.index, gat.info, gat.steps, 2
  else:
    index, info, steps = sched.kv_index, step_info_array(sched), sched.kv_count
    kv_units = sched.block_kv // WG_ROWS
  full = (1 << kv_units) - 1
  needs = (info & 1) != 0
  for w in range(2):
    needs |= ((info >> (1 + w * kv_units)) & full) != full
  width = info.shape[-1]
  per = index.shape[-1] // width
  live = np.arange(width) < np.asarray(steps)[..., None]
  needs &= live
  order = np.argsort(np.where(live, np.where(needs, 0, 1), 2), axis=-1, kind="stable")
  info = np.take_along_axis(info, order, axis=-1)
  index = np.take_along_axis(index.reshape(*info.shape, per), order[..., None], axis=-2)
  return ops._replace(kv_index=jnp.asarray(index.reshape(*info.shape[:-1], width * per),
                                           jnp.int32),
                      step_info=jnp.asarray(info, jnp.int32),
                      masked_steps=jnp.asarray(needs.sum(axis=-1), jnp.int32))


def unit_schedule(sched: BlockSchedule) -> BlockSchedule:
  """The schedule of ``sched``'s spec over 64-position units on both sides (block_q = block_kv
  = 64): each query unit's attended key units, from which gathered work items are built
  (:func:`gathered_operands`)."""
  return block_schedule(sched.spec, sched.num_heads, WG_ROWS, WG_ROWS,
                        dynamic_text=sched.dynamic_text)


def gather_saves_steps(sched: BlockSchedule) -> bool:
  """Whether gathered work items (:func:`gathered_operands`) take fewer steps than ``sched``'s
  128 x 128 blocks: where blocks span tiles (tiles of 64 or 192 tokens), a run of whole tiles
  covers a fractional number of key blocks, and a query block visits half-masked ones and
  the union of two tiles' lists. Never where the blocks lie inside tiles (no step to save)."""
  if not two_warpgroup_blocks(sched) or not sched.has_partial_pairs:
    return False
  return int(_gathered(sched).steps.sum()) < int(sched.kv_count.sum())


class _Gathered(NamedTuple):
  pieces: np.ndarray     # int32[G, nq, 2]: the query unit (row // 64) of each compute warpgroup
  index: np.ndarray      # int32[G, nq, 2 * max_steps]: the two key units of each step
  info: np.ndarray       # int32[G, nq, max_steps]
  steps: np.ndarray      # int32[G, nq]
  partial: bool


def _unit_lists(units: BlockSchedule, g: int, n: int, transposed: bool) -> list[np.ndarray]:
  """The ``n`` units' lists in group ``g`` of the 64 x 64 unit schedule: each query unit's
  attended key units, or (``transposed``) each key unit's attending query units; units past
  the unit schedule's length (trailing padding of a longer schedule) have none."""
  index, count = (units.q_index, units.q_count) if transposed else (units.kv_index,
                                                                     units.kv_count)
  empty = np.zeros(0, np.int64)
  return [index[g, i, :count[g, i]].astype(np.int64) if i < count.shape[1] else empty
          for i in range(n)]


def _paired_items(spec, lists: list[np.ndarray], cost) -> tuple[np.ndarray, list, np.ndarray]:
  """(pairs int64[n / 2, 2], per pair (union, in first, in second), cost per pair) of the
  units with ``lists``: :func:`pair_query_units`, or in-order pairs (128-row blocks) where
  ``cost(union size)`` summed is not larger."""
  n = len(lists)
  best = None
  for pairs in (np.arange(n).reshape(-1, 2), pair_query_units(spec, lists)):
    items = []
    for a, b in pairs:
      union = np.union1d(lists[a], lists[b])
      items.append((union, np.isin(union, lists[a]), np.isin(union, lists[b])))
    costs = np.array([cost(u.size) for u, _, _ in items], np.int64)
    if best is None or costs.sum() < best[2].sum():
      best = (pairs, items, costs)
  return best


def pair_query_units(spec, lists: list[np.ndarray]) -> np.ndarray:
  """int64[n / 2, 2]: the ``n`` query units (64 rows each; ``lists[i]``: the key units unit i
  attends) paired into work items of two compute warpgroups, ascending by first unit.

  The units of one tile attend the same keys: they pair inside their tile. A tile of an odd
  number of units leaves one over, paired with the leftover of a neighbouring tile (one step
  along a tile axis) whose key list adds the fewest units to its own, greedily from the
  smallest union: along the axis with the largest window the union grows least (192-token
  tiles under a 5x3x3 window: 6x3x3 key tiles instead of 5x3x4 for the next tile in tile
  order). The text slots, the schedule's padding and what is left over pair in order."""
  n = len(lists)
  nv = spec.padded_video_len // WG_ROWS
  tile = positions.position_tile(spec)[::WG_ROWS][:nv]
  pairs, left = [], []
  starts = np.flatnonzero(np.diff(tile, prepend=-1))
  for s0, s1 in zip(starts.tolist(), starts[1:].tolist() + [nv]):
    for a in range(s0, s1 - 1, 2):
      pairs.append((a, a + 1))
    if (s1 - s0) % 2:
      left.append(s1 - 1)
  tiles = grid.num_tiles(spec.latent_shape, spec.tile_shape)
  strides = [int(np.prod(tiles[d + 1:])) for d in range(len(tiles))]
  left_of = {int(tile[a]): a for a in left}
  edges = []
  for a in left:
    ta = int(tile[a])
    for d, st in enumerate(strides):
      if (ta // st) % tiles[d] + 1 < tiles[d] and ta + st in left_of:
        b = left_of[ta + st]
        edges.append((np.union1d(lists[a], lists[b]).size, a, b))
  used = set()
  for _, a, b in sorted(edges):
    if a not in used and b not in used:
      used.update((a, b))
      pairs.append((a, b))
  rest = sorted([a for a in left if a not in used] + list(range(nv, n)))
  pairs += list(zip(rest[0::2], rest[1::2]))
  out = np.array(sorted(pairs), np.int64).reshape(-1, 2)
  if out.shape[0] * 2 != n:
    raise AssertionError("every query unit must be in exactly one work item")
  return out


@functools.lru_cache(maxsize=32)
def _gathered(sched: BlockSchedule) -> _Gathered:
  """The forward's gathered work items of ``sched`` (cached per schedule object: the op asks
  for them at every trace), from :func:`_paired_items` at ceil(units / 2) steps each."""
  units = unit_schedule(sched)
  n = sched.seq_len // WG_ROWS
  unit_pad = np.asarray(units.kv_needs_mask)
  per_group = [_paired_items(sched.spec, _unit_lists(units, g, n, False), lambda u: (u + 1) // 2)
               for g in range(units.num_groups)]
  width = 2 * max(max(int(b[2].max(initial=0)) for b in per_group), 1)
  groups, nq = len(per_group), n // 2
  index = np.zeros((groups, nq, width), np.int64)
  info = np.zeros((groups, nq, width // 2), np.int64)
  partial = False
  for g, (pieces, items, steps) in enumerate(per_group):
    for i, (keys, in_a, in_b) in enumerate(items):
      if keys.size == 0:
        continue
      # Past the list: the last unit again, attended by nobody (a real unit, so that no stale
      # shared memory reaches the P V product).
      idx = np.concatenate([keys, np.full(width - keys.size, keys[-1])])
      bits = np.zeros((2, width), np.int64)
      bits[0, :keys.size], bits[1, :keys.size] = in_a, in_b
      pair = idx.reshape(-1, 2)
      code = (bits[0, 0::2] | bits[0, 1::2] << 1 | bits[1, 0::2] << 2 | bits[1, 1::2] << 3)
      index[g, i] = idx
      info[g, i] = (unit_pad[pair[:, 0]] | unit_pad[pair[:, 1]]) | (code << 1)
      partial |= bool((code[:steps[i]] != 15).any())
  return _Gathered(np.stack([b[0] for b in per_group]).astype(np.int32),
                   index.astype(np.int32), info.astype(np.int32),
                   np.stack([b[2] for b in per_group]).astype(np.int32), partial)


@functools.lru_cache(maxsize=32)
def _gathered_t(sched: BlockSchedule) -> _Gathered:
  """The dK/dV kernels' gathered work items of ``sched``: two 64-key units per CTA (one per
  compute warpgroup, paired as :func:`pair_query_units` pairs query units, on the lists of
  query pieces that attend each key unit), each streaming the union of those pieces.
  ``index`` holds the pieces, ``info`` their codes (bit w: the piece attends warpgroup w's
  unit), ``steps`` their count; ``pieces`` the key units."""
  units = unit_schedule(sched)
  n = sched.seq_len // WG_ROWS
  live = np.asarray(sched.query_valid).reshape(-1, WG_ROWS).any(axis=1)
  per_group = []
  for g in range(units.num_groups):
    lists = [x[live[x]] for x in _unit_lists(units, g, n, True)]
    per_group.append(_paired_items(sched.spec, lists, lambda u: u))
  width = max(max(int(b[2].max(initial=0)) for b in per_group), 1)
  groups, nkv = len(per_group), n // 2
  index = np.zeros((groups, nkv, width), np.int64)
  codes = np.zeros((groups, nkv, width), np.int64)
  partial = False
  for g, (key_units, items, count) in enumerate(per_group):
    for j, (qs, in_a, in_b) in enumerate(items):
      if qs.size == 0:
        continue
      index[g, j] = np.concatenate([qs, np.full(width - qs.size, qs[-1])])
      codes[g, j, :qs.size] = in_a | (in_b.astype(np.int64) << 1)
      partial |= bool((codes[g, j, :qs.size] != 3).any())
  return _Gathered(np.stack([b[0] for b in per_group]).astype(np.int32),
                   index.astype(np.int32), codes.astype(np.int32),
                   np.stack([b[2] for b in per_group]).astype(np.int32), partial)


def gathered_transposed_operands(sched: BlockSchedule) -> tuple[TransposedOperands, bool]:
  """The dK/dV kernels' operands of ``sched`` (128 x 128 blocks) as gathered work items, and
  whether some piece attends only one warpgroup's unit (the kernels' ``partial``).

  A work item is two 64-key units from anywhere, ``key_units[g, j, w]`` (row // 64) compute
  warpgroup w's, paired as :func:`pair_query_units` pairs query pieces (a tile's units
  together, a tile's odd unit with a neighbouring tile's, by the smallest union of attending
  pieces); the item streams the ascending union of the 64-row query pieces that attend
  either unit (``piece_index``, ``piece_count``; ``piece_codes`` bit w: the piece attends
  warpgroup w's unit), as :func:`query_pieces` does for a 128-key block. Pieces of padded
  query rows only and keys of padded slots only are left out as there."""
  if not two_warpgroup_blocks(sched):
    raise ValueError(f"gathered work items pair 64-key units: blocks must be 128 x 128, got "
                     f"{sched.block_q} x {sched.block_kv}")
  gat = _gathered_t(sched)
  ops = TransposedOperands(
      jnp.asarray(sched.head_to_group, jnp.int32), jnp.asarray(gat.index),
      jnp.asarray(gat.steps), jnp.asarray(key_bias_array(sched)), jnp.asarray(gat.info),
      jnp.asarray(launch_order(gat.steps, sched.head_to_group)), jnp.asarray(gat.pieces))
  return ops, gat.partial


def gather_saves_pieces(sched: BlockSchedule) -> bool:
  """Whether gathered dK/dV work items (:func:`gathered_transposed_operands`) stream fewer
  query pieces than the 128-key blocks of :func:`transposed_schedule` (:func:`query_pieces`)."""
  if not two_warpgroup_blocks(sched) or not sched.has_partial_pairs:
    return False
  sched_t = transposed_schedule(sched)
  if sched_t.block_kv != 2 * WG_ROWS:
    return False
  return int(_gathered_t(sched).steps.sum()) < int(query_pieces(sched_t)[1].sum())


def gathered_operands(sched: BlockSchedule) -> tuple[ForwardOperands, bool]:
  """The forward and dQ kernels' operands of ``sched`` (128 x 128 blocks) as gathered work
  items, and whether some step is attended only in part (the kernels' ``partial``).

  A work item is two 64-row query pieces from anywhere: ``query_pieces[g, i, w]`` (row // 64)
  is compute warpgroup w's (:func:`pair_query_units`: the pieces of a tile together, a tile's
  odd piece with a neighbouring tile's). Its key list is the ascending union of the 64-key
  units either piece attends, two per step: step s holds units ``kv_index[g, i, 2 s]`` and
  ``kv_index[g, i, 2 s + 1]`` (the first and second 64 keys of the step's K/V buffers), so an
  item visits ceil(units / 2) steps instead of every 128-key block that holds one of its
  units. An odd count's last step repeats its unit in the second half, masked out.
  ``step_info`` as in :func:`schedule_operands`: bit 0 if either unit holds padding, then the
  64-unit mask of the two halves (bit ``w * 2 + c``: warpgroup w attends half c)."""
  if not two_warpgroup_blocks(sched):
    raise ValueError(f"gathered work items are two 64-row query pieces and steps of two 64-key "
                     f"units: blocks must be 128 x 128, got {sched.block_q} x {sched.block_kv}")
  gat = _gathered(sched)
  ops = ForwardOperands(
      jnp.asarray(sched.head_to_group, jnp.int32), jnp.asarray(gat.index),
      jnp.asarray(gat.steps), jnp.asarray(gat.info),
      jnp.asarray(key_bias_array(sched)), jnp.asarray(unit_bias_rows(sched.block_kv)),
      jnp.asarray(launch_order(gat.steps, sched.head_to_group)), jnp.asarray(gat.pieces))
  return ops, gat.partial


def uses_gathered_steps(sched: BlockSchedule, config: MosaicConfig) -> bool:
  """Whether the forward and dQ kernels run ``sched`` with gathered 64-key units
  (``config.key_steps``; "auto": where that takes fewer steps, :func:`gather_saves_steps`)."""
  if config.key_steps == "auto":
    return gather_saves_steps(sched)
  return config.key_steps == "gathered"


def gathered_partial(sched: BlockSchedule) -> bool:
  """Whether some step of :func:`gathered_operands` is attended only in part."""
  return bool(_gathered(sched).partial)


def gathered_steps(sched: BlockSchedule) -> np.ndarray:
  """int32[G, nq]: the steps of :func:`gathered_operands`' work items."""
  return _gathered(sched).steps


def forward_item_order(sched: BlockSchedule, config: MosaicConfig, gather: bool) -> np.ndarray:
  """int32[heads, nq]: the launch order (:func:`item_launch_order`) of the forward and dQ
  kernels' work items: ``sched``'s query blocks, or with ``gather`` the gathered items of
  :func:`gathered_operands`."""
  if gather:
    gat = _gathered(sched)
    counts, rows = gat.steps, gat.pieces[..., 0].astype(np.int64) * WG_ROWS
  else:
    counts = sched.kv_count
    rows = np.arange(counts.shape[1], dtype=np.int64) * sched.block_q
  return item_launch_order(sched, counts, np.broadcast_to(rows, counts.shape), config)


def backward_item_order(sched: BlockSchedule, config: MosaicConfig, gather: bool) -> np.ndarray:
  """int32[heads, nkv]: the launch order (:func:`item_launch_order`) of the dK/dV kernels'
  work items: the key blocks of :func:`transposed_schedule`, or with ``gather`` the gathered
  items of :func:`gathered_transposed_operands`."""
  if gather:
    gat = _gathered_t(sched)
    counts, rows = gat.steps, gat.pieces[..., 0].astype(np.int64) * WG_ROWS
  else:
    sched_t = transposed_schedule(sched)
    counts = query_pieces(sched_t)[1]
    rows = np.arange(counts.shape[1], dtype=np.int64) * sched_t.block_kv
  return item_launch_order(sched, counts, np.broadcast_to(rows, counts.shape), config)


def key_bias_array(sched: BlockSchedule) -> np.ndarray:
  """float32[seq]: 0 on valid keys, -inf on padded ones (added to scores before the exponent)."""
  return np.where(sched.key_valid, 0.0, -np.inf).astype(np.float32)


def runtime_key_bias(key_valid) -> jnp.ndarray:
  """float32[batch, seq] key bias from a run-time key validity bool[batch, seq] (per-sample
  text lengths); the kernels take it in place of the schedule's float32[seq]."""
  return jnp.where(key_valid, 0.0, -jnp.inf).astype(jnp.float32)


def maybe_padded_key_pieces(sched: BlockSchedule, piece: int) -> np.ndarray:
  """int32[P], ascending: the pieces of ``piece`` keys (key position // piece) that hold a key
  that may be padded (:meth:`~jsta.schedule.BlockSchedule.maybe_padded`)."""
  return np.flatnonzero(sched.maybe_padded().reshape(-1, piece).any(axis=1)).astype(np.int32)


class PaddedKeys(NamedTuple):
  """The forward's copies of the key pieces that may hold padded keys, with those keys zeroed
  (:func:`with_padded_key_pieces`), so that k and v themselves may hold anything there."""

  k: jax.Array   # [B, P * piece, kv_heads, D]
  v: jax.Array   # [B, P * piece, kv_heads, D]


def with_padded_key_pieces(ops: ForwardOperands, sched: BlockSchedule, k, v, piece: int,
                           key_valid=None) -> tuple[ForwardOperands, PaddedKeys | None]:
  """(ops, padded) for a forward that streams k and v as the caller left them in padded
  positions: each piece of ``piece`` keys (a step's 64-key unit where steps are gathered,
  else its key block) that may hold a padded key (:func:`maybe_padded_key_pieces`) is copied,
  its padded keys set to zero, into ``padded`` (P pieces), and ``ops.kv_index`` names it
  ``seq // piece + p`` instead of its position; ``ops.key_bias`` gets the P pieces' bias rows
  appended, so that the producer finds a piece's bias rows at ``index * piece`` either way.
  ``key_valid``: None (the schedule's validity) or bool [B, seq] (run-time). The copies are a
  few percent of k and v where padding is (partial edge tiles, text slots), where zeroing k
  and v themselves reads and writes both whole (a copy where they are program arguments).
  ``padded`` is None where no piece may be padded (ops unchanged)."""
  pieces = maybe_padded_key_pieces(sched, piece)
  if pieces.size == 0:
    return ops, None
  seq = sched.seq_len
  rows = (pieces[:, None] * piece + np.arange(piece)[None, :]).ravel()
  valid = (jnp.asarray(sched.key_valid[rows])[None, :] if key_valid is None
           else key_valid[:, rows])                                       # [1 or B, P * piece]
  keep = valid[:, :, None, None]
  padded = PaddedKeys(*(jnp.where(keep, jnp.take(x, rows, axis=1), jnp.zeros((), x.dtype))
                        for x in (k, v)))
  lookup = np.arange(seq // piece, dtype=np.int32)
  lookup[pieces] = seq // piece + np.arange(pieces.size, dtype=np.int32)
  bias = ops.key_bias
  ops = ops._replace(kv_index=jnp.asarray(lookup)[ops.kv_index],
                     key_bias=jnp.concatenate([bias, bias[..., rows]], axis=-1))
  return ops, padded


def key_bias_rows(bias_ref, bi, rows):
  """The key-bias rows ``rows`` of batch entry ``bi``: the bias is float32[seq] (from the
  schedule, the same for every sample) or float32[batch, seq] (:func:`runtime_key_bias`)."""
  return bias_ref.at[bi, rows] if len(bias_ref.shape) == 2 else bias_ref.at[rows]


def transposed_schedule(sched: BlockSchedule) -> BlockSchedule:
  """The schedule of the dK/dV kernels: key blocks of 128 rows (two compute warpgroups) over
  the same query blocks, where its sequence length matches; else ``sched`` itself."""
  sched_t = block_schedule(sched.spec, sched.num_heads, sched.block_q, 128,
                           dynamic_text=sched.dynamic_text)
  return sched_t if sched_t.seq_len == sched.seq_len else sched


@functools.lru_cache(maxsize=32)
def query_pieces(sched_t: BlockSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The 64-row query pieces each key block of ``sched_t`` serves: (index int32[G, nkv,
  max_pieces] of row // 64, ascending; count int32[G, nkv]; codes int32[G, nkv, max_pieces],
  bit w set where the piece attends the 64 keys of compute warpgroup w).

  A scheduled query block whose piece attends none of the key block's keys (blocks that span
  tiles: 7-11% of the pieces at the real-model shapes of benchmarks/shapes.py) is left out,
  so the dK/dV kernels never stream it, and so is a piece of padded query rows only (their
  probabilities are 0 and their dQ stays the zero fill); keys of padded slots only are not
  attended (the key bias would zero them anyway). With run-time text lengths every text slot
  counts as valid. A row's tail repeats its last piece. Cached per schedule object (arrays
  read-only)."""
  pieces = sched_t.block_q // WG_ROWS
  rk = sched_t.block_kv // WG_ROWS
  codes = unit_codes(sched_t, sched_t.q_bits).astype(np.int64)          # [G, nkv, max_q]
  g, nkv, max_q = codes.shape
  shifts = np.arange(pieces) * rk
  piece_codes = (codes[..., None] >> shifts) & ((1 << rk) - 1)            # [.., max_q, pieces]
  # Keys of padded slots only (text slots past text_len) count as not attended either.
  key_live = np.asarray(sched_t.key_valid).reshape(nkv, rk, WG_ROWS).any(axis=2)
  piece_codes &= (key_live.astype(np.int64) << np.arange(rk)).sum(axis=1)[None, :, None, None]
  scheduled = np.arange(max_q)[:, None] < sched_t.q_count[..., None, None]
  index = sched_t.q_index[..., None].astype(np.int64) * pieces + np.arange(pieces)
  # Pieces of padded query rows only (text slots past text_len) add nothing either.
  live = np.asarray(sched_t.query_valid).reshape(-1, WG_ROWS).any(axis=1)[index]
  keep = (scheduled & live & (piece_codes != 0)).reshape(g, nkv, max_q * pieces)
  index = index.reshape(keep.shape)
  piece_codes = piece_codes.reshape(keep.shape)
  count = keep.sum(axis=-1)
  width = max(int(count.max(initial=0)), 1)
  # Kept pieces first, in their (ascending) order: a stable sort on "not kept".
  order = np.argsort(~keep, axis=-1, kind="stable")[..., :width]
  index = np.take_along_axis(index, order, axis=-1)
  piece_codes = np.take_along_axis(piece_codes, order, axis=-1)
  last = np.maximum(count - 1, 0)[..., None]
  tail = np.arange(width) > last
  index = np.where(tail, np.take_along_axis(index, last, axis=-1), index)
  piece_codes = np.where(tail, 0, piece_codes)
  out = index.astype(np.int32), count.astype(np.int32), piece_codes.astype(np.int32)
  for a in out:
    a.setflags(write=False)       # cached per schedule: shared by every caller
  return out


def transposed_operands(sched_t: BlockSchedule) -> TransposedOperands:
  """The dK/dV kernels' operands of ``sched_t`` (:func:`transposed_schedule`): its query
  lists as 64-row pieces (:func:`query_pieces`); the launch order follows their lengths."""
  index, count, codes = query_pieces(sched_t)
  return TransposedOperands(
      jnp.asarray(sched_t.head_to_group, jnp.int32), jnp.asarray(index), jnp.asarray(count),
      jnp.asarray(key_bias_array(sched_t)), jnp.asarray(codes),
      jnp.asarray(launch_order(count, sched_t.head_to_group)))


def mma_accumulate(acc, a, b_smem, config: MosaicConfig, after_issue=None, a_smem=None):
  """acc + a @ b with wgmma, ``a`` in registers.

  On the GPU the accumulator is updated in place (``pl.run_state`` over ``ACC.init``) and ``a``
  stays in registers. GPU interpret mode has no rule for either, so there ``a`` goes through the
  SMEM scratch ``a_smem`` and the product into a fresh ``run_scoped`` accumulator that is added
  (same math).
  """
  if not config.interpret:
    def body(acc_ref):
      plgpu.wgmma(acc_ref, a, b_smem)
      if after_issue is not None:
        after_issue()
    return pl.run_state(body)(plgpu.ACC.init(acc))

  a_smem[...] = a
  plgpu.commit_smem()

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a_smem, b_smem)
    if after_issue is not None:
      after_issue()
    return acc_ref[...]
  return acc + pl.run_scoped(body, plgpu.ACC(acc.shape, jnp.float32))


def step_keys(idx_ref, grp, blk, gather: bool):
  """``index(step)`` for :func:`stream_kv` from the kv_index operand: the step's key block, or
  (gathered) its two 64-key units."""
  if gather:
    return lambda step: (idx_ref[grp, blk, 2 * step], idx_ref[grp, blk, 2 * step + 1])
  return lambda step: idx_ref[grp, blk, step]


def stream_kv(k_ref, v_ref, bias_ref, k_smem, v_smem, bias_smem, k_bar, v_bar, b_bar, k_free,
               v_free, index, cnt, stages, bk, bi, hi, v_block=None, gather=False, padded=None,
               base=None, padded_keys=None):
  """Producer warpgroup: TMA the scheduled K/V blocks ``index(step)`` (and, where
  ``padded(step)`` is non-zero, their key-bias rows, 512 bytes, for the mask), ``stages``
  deep, from head ``hi`` of k and v. ``padded(step)`` must be the flag the consumers test
  before they wait for the bias (bit 0 of the step's info, :func:`step_scores`): a bias row
  arrives exactly on the steps that wait for it. A slot's K is
  refilled once both compute warpgroups released it after QK^T; V and the bias once they
  finished the step. ``v_block(rows)``: the GMEM ref of a step's V where it is not
  ``v_ref.at[bi, rows, hi]`` (the 8-bit forward's V^T slices, [head_dim, keys]; gathered, the
  slot is [2, head_dim, 64], unit i's V^T in ``v_smem.at[slot, i]``). ``gather``: ``index(step)`` is
  a pair of 64-key units (:func:`gathered_operands`), copied into the two halves of the slot,
  each buffer by two copies on one barrier (the kernel allocates K, V and bias barriers of two
  arrivals). ``base``: the steps this producer streamed before (the persistent forward's
  earlier work items; step j goes to slot ``(base + j) % stages``); the caller then observes
  the last consumer arrivals once after its last item (:func:`drain_kv`). ``padded_keys``:
  (k_ref, v_ref) of :class:`PaddedKeys`, the zeroed copies of the pieces (a step's units where
  gathered, else its blocks) that may hold padded keys; an index of ``seq // piece`` or more
  names one of them (:func:`with_padded_key_pieces`), and its K and V come from there."""
  if padded_keys is not None and v_block is not None:
    raise ValueError("padded_keys streams V as [keys, head_dim] rows")
  R = WG_ROWS
  piece = R if gather else bk
  n_main = k_ref.shape[1] // piece if padded_keys is not None else None

  # The key-block index is read from GMEM once per step, before the waits, so the scalar
  # load's latency overlaps them (re-reading it after the v_free wait delays every V copy).
  def step_rows(step):
    """((piece index, its GMEM rows, the slot's rows or None for all of them), ...) of a
    step's keys: a key block, or two 64-key units (an index of ``seq // piece`` or more names
    a piece of ``padded_keys``; the key bias has its rows there too)."""
    if not gather:
      blk = index(step)
      return ((blk, pl.ds(blk * bk, bk), None),)
    a, b = index(step)
    return ((a, pl.ds(a * R, R), pl.ds(0, R)), (b, pl.ds(b * R, R), pl.ds(R, R)))

  def into(ref, slot, half):
    return ref.at[slot] if half is None else ref.at[slot, half]

  def copy_keys(ref, extra_ref, piece_index, rows, dst, barrier):
    """One piece's keys (or values) into ``dst``: from the array, or from its zeroed copy."""
    if padded_keys is None:
      plgpu.copy_gmem_to_smem(ref.at[bi, rows, hi], dst, barrier)
      return
    inside = piece_index < n_main

    @pl.when(inside)
    def _():
      plgpu.copy_gmem_to_smem(ref.at[bi, rows, hi], dst, barrier)

    @pl.when(jnp.logical_not(inside))
    def _():
      extra_rows = pl.ds((piece_index - n_main) * piece, piece)
      plgpu.copy_gmem_to_smem(extra_ref.at[bi, extra_rows, hi], dst, barrier)

  k_extra, v_extra = padded_keys if padded_keys is not None else (None, None)

  def fetch_k(parts, slot):
    for piece_index, rows, half in parts:
      copy_keys(k_ref, k_extra, piece_index, rows, into(k_smem, slot, half), k_bar.at[slot])

  def fetch_v(parts, slot, flag):
    # The bias row (512 bytes) first: the consumers wait for it right after the step's QK^T,
    # a step before they need V; issued after V it would land only after V's 16-32 KiB.
    if bias_ref is not None:
      @pl.when(flag != 0)
      def _():
        for _, rows, half in parts:
          plgpu.copy_gmem_to_smem(key_bias_rows(bias_ref, bi, rows),
                                  into(bias_smem, slot, half), b_bar.at[slot])
    for i, (piece_index, rows, half) in enumerate(parts):
      if v_block is not None:
        # V^T [head_dim, keys]: a gathered unit's keys are a [head_dim, 64] buffer of their own
        # (as columns of one [head_dim, 128] slot they would not be contiguous in shared memory).
        dst = v_smem.at[slot] if half is None else v_smem.at[slot, i]
        plgpu.copy_gmem_to_smem(v_block(rows), dst, v_bar.at[slot])
      else:
        copy_keys(v_ref, v_extra, piece_index, rows, into(v_smem, slot, half), v_bar.at[slot])

  if bias_ref is not None and padded is None:
    raise ValueError("stream_kv needs padded(step) to fetch key-bias rows")

  def flag_of(step):
    # Read with the key indices, before the waits: its scalar load overlaps them too.
    return padded(step) if bias_ref is not None else None

  if base is not None:
    @pl.loop(0, cnt)
    def _(step):
      g = base + step
      slot = lax.rem(g, stages)
      parts = step_rows(step)
      flag = flag_of(step)
      reuse = g >= stages
      pl.when(reuse)(lambda: plgpu.barrier_wait(k_free.at[slot]))
      fetch_k(parts, slot)
      pl.when(reuse)(lambda: plgpu.barrier_wait(v_free.at[slot]))
      fetch_v(parts, slot, flag)
    return

  for i in range(stages):
    @pl.when(i < cnt)
    def _():
      parts = step_rows(i)
      fetch_k(parts, i)
      fetch_v(parts, i, flag_of(i))

  @pl.loop(0, jnp.maximum(cnt - stages, 0))
  def _(step):
    slot = lax.rem(step, stages)
    parts = step_rows(step + stages)
    flag = flag_of(step + stages)
    plgpu.barrier_wait(k_free.at[slot])
    fetch_k(parts, slot)
    plgpu.barrier_wait(v_free.at[slot])
    fetch_v(parts, slot, flag)

  # Observe the last consumer arrivals too, so every barrier phase is waited for once
  # (the interpreter checks this; on the GPU it only keeps the producer until the end).
  @pl.loop(jnp.maximum(cnt - stages, 0), cnt)
  def _(step):
    slot = lax.rem(step, stages)
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.barrier_wait(v_free.at[slot])


def drain_kv(k_free, v_free, total, stages):
  """After a producer's last :func:`stream_kv` with ``base``: observes the consumers' last
  arrivals on the slots of its last ``stages`` of ``total`` steps, so every barrier phase is
  waited for once (the interpreter checks this)."""
  @pl.loop(jnp.maximum(total - stages, 0), total)
  def _(g):
    slot = lax.rem(g, stages)
    plgpu.barrier_wait(k_free.at[slot])
    plgpu.barrier_wait(v_free.at[slot])


def stream_q_pieces(q_ref, do_ref, lse_ref, delta_ref, q_smem, do_smem, lse_smem, delta_smem,
                     q_bar, do_bar, lse_bar, delta_bar, free_bar, q_row, steps, stages, bi, hi,
                     on_freed=None):
  """Producer warpgroup of the dK/dV kernels: TMA the 64-row query pieces starting at
  ``q_row(step)`` (q, lse, dO, delta), ``stages`` deep; a slot is refilled once both compute
  warpgroups released it (``free_bar``). ``on_freed(step)``: called once per step, after the
  wait for that step's release (and the refill of its slot)."""
  R = WG_ROWS

  def fetch(step, slot):
    rows = pl.ds(q_row(step), R)
    plgpu.copy_gmem_to_smem(q_ref.at[bi, rows, hi], q_smem.at[slot], q_bar.at[slot])
    plgpu.copy_gmem_to_smem(lse_ref.at[bi, hi, rows], lse_smem.at[slot], lse_bar.at[slot])
    plgpu.copy_gmem_to_smem(do_ref.at[bi, rows, hi], do_smem.at[slot], do_bar.at[slot])
    plgpu.copy_gmem_to_smem(delta_ref.at[bi, hi, rows], delta_smem.at[slot], delta_bar.at[slot])

  for i in range(stages):
    pl.when(i < steps)(functools.partial(fetch, i, i))

  @pl.loop(0, jnp.maximum(steps - stages, 0))
  def _(step):
    slot = lax.rem(step, stages)
    plgpu.barrier_wait(free_bar.at[slot])
    fetch(step + stages, slot)
    if on_freed is not None:
      on_freed(step)

  # Observe the last releases too: every barrier phase is waited for once.
  @pl.loop(jnp.maximum(steps - stages, 0), steps)
  def _(step):
    plgpu.barrier_wait(free_bar.at[lax.rem(step, stages)])
    if on_freed is not None:
      on_freed(step)


def dkdv_piece(k_wg, v_wg, slot, dv, *, q_smem, do_smem, lse_smem, delta_smem, q_bar, do_bar,
               lse_bar, delta_bar, c2, dtype, config, a_smem, key_bias=None, attends=None):
  """One 64-row query piece (pipeline ``slot``) against a warpgroup's 64 keys ``k_wg``, ``v_wg``
  (SMEM [64, head_dim]), waiting for each input as it is needed. Returns
  (dv + P^T dO, dS^T float32 [64, 64]) with P^T = exp2((S^T + bias) c2 - lse), S^T = K Q^T,
  and dS^T = P^T (V dO^T - delta). Shared by the split dK/dV and the fused backward kernels.

  ``key_bias`` ([64] float32 in the WGMMA row layout, 0 or -inf per key; None when no key of
  the kernel's schedule is padded) masks padded keys before the exponent, as the forward does.
  Without it a padded key's score is not bounded by the query's lse: exp2 overflows (fp16
  holds at most 65504), and the inf reaches dK, dV and dQ. ``attends`` (an int32 scalar, 0 or
  1; None when every scheduled pair is whole, :func:`piece_attends`) drops a piece whose rows
  do not attend this warpgroup's keys: S^T becomes -inf (selected, so a NaN in such a query
  does not reach these keys' gradients)."""
  R = WG_ROWS
  plgpu.barrier_wait(q_bar.at[slot])

  def compute_st(acc_ref):
    plgpu.wgmma(acc_ref, k_wg, q_smem.at[slot].T)
    return acc_ref[...]

  st = pl.run_scoped(compute_st, plgpu.ACC((R, R), jnp.float32))
  pt = piece_probabilities(st, slot, lse_smem=lse_smem, lse_bar=lse_bar, c2=c2,
                           key_bias=key_bias, attends=attends)
  plgpu.barrier_wait(do_bar.at[slot])
  dv = mma_accumulate(dv, pt.astype(dtype), do_smem.at[slot], config, a_smem=a_smem)

  def compute_dpt(acc_ref):
    plgpu.wgmma(acc_ref, v_wg, do_smem.at[slot].T)
    return acc_ref[...]

  dpt = pl.run_scoped(compute_dpt, plgpu.ACC((R, R), jnp.float32))
  plgpu.barrier_wait(delta_bar.at[slot])
  dlt = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
  return dv, pt * (dpt - lax.broadcast_in_dim(dlt, dpt.shape, [1]))


def piece_lse2(slot, *, lse_smem, lse_bar):
  """The lse of query piece ``slot`` times log2(e) ([64] float32 in the WGMMA column
  layout of S^T), after waiting for it."""
  plgpu.barrier_wait(lse_bar.at[slot])
  return plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0)) * LOG2E


def piece_probabilities(st, slot, *, lse_smem, lse_bar, c2: float, key_bias=None,
                        attends=None, lse2=None):
  """P^T = exp2(S^T c2 - lse) [64 keys, 64 queries] float32 of one query piece (pipeline
  ``slot``) from its scores S^T = K Q^T, after the key bias of padded keys and, where the
  piece does not attend these keys (``attends`` 0), -inf selected over every score (a select,
  so a NaN in such a query does not reach these keys' gradients). ``key_bias`` and
  ``attends`` as in :func:`dkdv_piece`; waits for the piece's lse (natural log), unless the
  caller loaded it already (``lse2``, :func:`piece_lse2`)."""
  if key_bias is not None:
    st = st + lax.broadcast_in_dim(key_bias, st.shape, [0])
  if attends is not None:
    masked_out = lambda x: plgpu.layout_cast(jnp.full(x.shape, -jnp.inf, jnp.float32),
                                             plgpu.Layout.WGMMA)
    st = lax.cond(attends != 0, lambda x: x, masked_out, st)
  if lse2 is None:
    lse2 = piece_lse2(slot, lse_smem=lse_smem, lse_bar=lse_bar)
  return jnp.exp2(st * c2 - lax.broadcast_in_dim(lse2, st.shape, [1]))


def padded_steps(info_ref, grp, blk):
  """``padded(step)`` of :func:`stream_kv` for the kernels whose per-step info is
  ``info_ref[grp, blk, step]``: its bit 0 (the step's keys hold padding), the flag on which
  :func:`step_scores` waits for the bias row."""
  return lambda step: info_ref[grp, blk, step] & 1


def step_scores(s, info, wg, *, masked: bool, partial: bool, kv_units: int, bias_smem,
                bias_bar, unit_smem):
  """Masks one step's scores s [64, block_kv] of compute warpgroup ``wg``, from the step's
  ``info`` (:func:`schedule_operands`): the key bias of a key block holding padding (``masked``
  kernels) and the unit bias of a partly attended block pair (``partial`` kernels; the rows of
  :func:`unit_bias_rows` in ``unit_smem``).

  The bias row arrives only on the steps whose bit 0 is set (the producer tests the same bit,
  :func:`stream_kv`), and only those steps wait for it: barrier parities live in memory, so
  waits skipped on both sides keep every barrier in phase. Whole unpadded steps pay a scalar
  test. ``info`` is best read before the step's products, so its GMEM load is not waited for
  after them."""
  if not (masked or partial):
    return s
  full = (1 << kv_units) - 1
  code = lax.shift_right_logical(info, 1 + wg * kv_units) & full
  padded = info & 1
  need = padded | (code != full).astype(jnp.int32) if partial else padded

  def add(s):
    if masked:
      def with_bias(s):
        plgpu.barrier_wait(bias_bar)
        bias = plgpu.load(bias_smem, layout=plgpu.Layout.WGMMA.reduce(0))
        return s + lax.broadcast_in_dim(bias, s.shape, [1])
      s = lax.cond(padded != 0, with_bias, lambda s: s, s) if partial else with_bias(s)
    if partial:
      # A select, not an add: a NaN score (a NaN in a valid key) in a unit this warpgroup does
      # not attend must not reach its rows.
      bias = plgpu.load(unit_smem.at[code], layout=plgpu.Layout.WGMMA.reduce(0))
      bias = lax.broadcast_in_dim(bias, s.shape, [1])
      s = jnp.where(bias == 0.0, s, bias)
    return s

  return lax.cond(need != 0, add, lambda s: s, s)


def forward_key_loops(body, drain, restart, carry, cnt, nmask=None):
  """The forwards' key loop after step 0 (bf16 and 8-bit): (m, l, o_val) after steps
  [1, cnt) and the last P V. ``carry`` = (m, l, P, o_val) of step 0; ``body(step, carry,
  masks=True)`` one step (its Q K^T issued with the previous step's P V); ``drain(P, o_val,
  step)`` the P V of ``step`` issued alone and waited for; ``restart(step, m, l, o_val)`` ->
  (m, l, P, o_val): ``step``'s Q K^T alone and its softmax update, with nothing in flight.

  ``nmask`` (``MosaicConfig.masked_steps_apart``: the item's leading steps that need a mask,
  None otherwise): steps [1, nmask) run with the mask code (step 0 has it too), then the
  first loop is drained and [nmask, cnt) run without it, starting with ``restart``, so no P
  registers cross from one loop into the other (which made ptxas serialize every wgmma,
  C7513)."""
  if nmask is None:
    m, l, p, o_val = lax.fori_loop(1, cnt, body, carry)
    return m, l, drain(p, o_val, cnt - 1)
  nmask = jnp.clip(nmask, 1, cnt)
  m, l, p, o_val = lax.fori_loop(1, nmask, body, carry)
  o_val = drain(p, o_val, nmask - 1)

  def unmasked_steps(carry):
    m, l, p, o_val = lax.fori_loop(nmask + 1, cnt, functools.partial(body, masks=False),
                                   restart(nmask, *carry))
    return m, l, drain(p, o_val, cnt - 1)

  return lax.cond(nmask < cnt, unmasked_steps, lambda carry: carry, (m, l, o_val))


def piece_attends(code, wg):
  """dK/dV kernels: 1 if a query piece attends the 64 keys of compute warpgroup ``wg`` by its
  code (:func:`query_pieces`), else 0."""
  return lax.shift_right_logical(code, wg) & 1


def normalized_rows(acc, m_i, l_i):
  """Forward epilogue of one warpgroup's rows: (o = acc / l, natural-log lse), with o = 0 and
  lse = +inf on rows that attended nothing (l = 0). m_i is the running max in the log2
  domain. acc: [64, D] float32; m_i, l_i: [64]. A NaN l (a NaN in an attended key or value)
  counts as live, so the NaN reaches the output as in dense attention."""
  live = l_i != 0.0
  inv = jnp.where(live, 1.0 / jnp.where(live, l_i, 1.0), 0.0)
  lse = (m_i + jnp.log2(jnp.where(live, l_i, 1.0))) * LN2
  return acc * lax.broadcast_in_dim(inv, acc.shape, [0]), jnp.where(live, lse, jnp.inf)


def store_rows(o, lse, o_smem, lse_smem, o_gmem, lse_gmem, o_low_gmem=None, wait=True):
  """Writes a warpgroup's o [64, D] (cast to o_smem's dtype) and lse [64] to GMEM through
  their SMEM staging buffers, and waits for the copies (``wait=False``: the caller waits
  before it writes the buffers again). With ``o_low_gmem``, o's rounding
  error (o - the stored o, in the same dtype) follows through the same staging buffer once
  the first copy has read it (no extra shared memory: the pipeline depth depends on it)."""
  o_high = o.astype(o_smem.dtype)
  o_smem[...] = o_high
  lse_smem[...] = lse
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(o_smem, o_gmem)
  plgpu.copy_smem_to_gmem(lse_smem, lse_gmem)
  if o_low_gmem is not None:
    o_low = (o - o_high.astype(jnp.float32)).astype(o_smem.dtype)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    o_smem[...] = o_low
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_low_gmem)
  if wait:
    plgpu.wait_smem_to_gmem(0)


def store_kv_grads(dk, dv, k_smem, v_smem, dk_gmem, dv_gmem):
  """Writes dk, dv [rows, D] (cast to the staging buffers' dtype) to GMEM through the SMEM that
  held the block's K and V, and waits for the copies."""
  k_smem[...] = dk.astype(k_smem.dtype)
  v_smem[...] = dv.astype(v_smem.dtype)
  plgpu.commit_smem()
  plgpu.copy_smem_to_gmem(k_smem, dk_gmem)
  plgpu.copy_smem_to_gmem(v_smem, dv_gmem)
  plgpu.wait_smem_to_gmem(0)
