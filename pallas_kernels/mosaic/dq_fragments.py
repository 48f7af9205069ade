"""Float32 gradient parts in the wgmma fragments' order (the fused backward's
``MosaicConfig.bwd_dq_fragments``).

A warpgroup's [64, n] float32 wgmma accumulator (n a multiple of 8) is held as n / 4 pairs
of values per thread. Stored to shared memory in row-major order under a swizzle, each thread
writes its pairs to 16 rows. Here each thread writes two pairs at a time to 16 contiguous
bytes of its own, the 128 threads side by side (each warp's store is 512 contiguous bytes: no
bank conflict, no swizzle), and the part goes to GMEM with one TMA reduce-add into an
accumulator laid out in the same order: its [64 * n] floats as a [64 * n / 256, 256] box
(TMA boxes are at most 256 elements a side). :func:`from_fragments` turns such an accumulator
back into rows. (A one-dimensional bulk reduce-add, ``cp.reduce.async.bulk`` without a
tensor map, takes its addresses in ordinary registers: in the fused backward ptxas then ran
out of registers and serialized every wgmma, C7512; the TMA's coordinates stay uniform.)

The order within a part, outermost first: column group j (n / 8), warp w (4), row in the
8-row group r (8), column pair c (4), row half h (2), value v (2). Element (j, w, r, c, h, v)
is row ``16 w + 8 h + r``, column ``8 j + 2 c + v`` (Mosaic GPU's ``WGMMA_LAYOUT``: thread
``32 w + 4 r + c`` holds it in register ``2 j + h``, value v; tests/test_mosaic.py derives
this from Mosaic GPU's layout). GPU interpret mode runs no inline Mosaic GPU code: there the
part is rearranged as a value (:func:`fragments_of_part`) and staged as such.
"""

from __future__ import annotations

import einops
import jax
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.mosaic.config import WG_ROWS

# The staging buffer's order as an einops pattern over (rows, columns) of one part.
FRAGMENT_ORDER = "(j w r c h v)"
_ROWS, _COLS = "w h r", "j c v"
_SIZES = dict(w=4, r=8, c=4, h=2, v=2)
# The TMA box's minor side: at most 256 elements.
BOX = 256


def part_shape(n: int) -> tuple[int, int]:
  """A [64, n] part's [64 * n / 256, 256] shape in shared memory and in the accumulator."""
  if (WG_ROWS * n) % BOX:
    raise ValueError(f"a part of 64 x {n} floats is not a whole number of {BOX}-float rows")
  return WG_ROWS * n // BOX, BOX


def store_fragments(x, buf) -> None:
  """Stores ``x`` ([64, n] float32 in ``plgpu.Layout.WGMMA``) into the shared-memory ref
  ``buf`` (float32 :func:`part_shape` ``(n)``, untransformed, 16-byte aligned) in the
  fragments' order: per thread, 16-byte vector stores of two register pairs. No fence or
  barrier: the caller commits the stores before anything else reads them."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.mlir.dialects import arith, llvm
  from jax.experimental.mosaic.gpu import utils as mgpu_utils

  rows, n = x.shape
  if rows != WG_ROWS or n % 8 or tuple(buf.shape) != part_shape(n):
    raise ValueError(f"store_fragments takes x [64, n] (n a multiple of 8) and buf "
                     f"[64 * n / {BOX}, {BOX}], got {x.shape} and {buf.shape}")

  @plgpu.inline_mgpu(arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))
  def store(ctx, x, ref):
    del ctx
    i32 = ir.IntegerType.get_signless(32)
    f32 = ir.F32Type.get()
    regs = x.registers.reshape(-1)          # register 2 j + h: columns 8 j.., row half h
    assert len(regs) == n // 4, regs.shape
    thread = arith.remui(mgpu_utils.thread_idx(), arith.constant(i32, 128))
    base = mgpu_utils.getelementptr(mgpu_utils.memref_ptr(ref),
                                    [arith.muli(thread, arith.constant(i32, 4))], f32)
    for j in range(n // 8):
      pair = mgpu_utils.vector_concat([regs[2 * j], regs[2 * j + 1]])
      llvm.store(pair, mgpu_utils.getelementptr(base, [j * 128 * 4], f32), alignment=16)

  store(x, buf)


def fragments_of_part(x: jax.Array) -> jax.Array:
  """x [64, n] as :func:`store_fragments` leaves it in shared memory (:func:`part_shape`),
  by rearranging the values: what GPU interpret mode stages instead."""
  n = x.shape[1]
  flat = einops.rearrange(x, f"({_ROWS}) ({_COLS}) -> {FRAGMENT_ORDER}", j=n // 8, **_SIZES)
  return flat.reshape(part_shape(n))


def acc_shape(shape, block_kv: int) -> tuple[int, ...]:
  """The float32 accumulator of gradient ``shape`` [B, S, H, D] in the fragments' order:
  [B, S // 64, H * wgs, *part_shape(D // wgs)], one contiguous part per 64-row piece, head
  and compute warpgroup (each of a ``block_kv``-row key block's ``wgs`` warpgroups owns
  D // wgs columns)."""
  batch, seq, heads, head_dim = shape
  wgs = block_kv // WG_ROWS
  return batch, seq // WG_ROWS, heads * wgs, *part_shape(head_dim // wgs)


def from_fragments(acc: jax.Array, shape) -> jax.Array:
  """[B, S, H, D] rows of an accumulator of :func:`acc_shape` ``(shape, block_kv)``."""
  batch, seq, heads, head_dim = shape
  wgs = acc.shape[2] // heads
  acc = acc.reshape(*acc.shape[:3], -1)
  return einops.rearrange(
      acc, f"b p (hd g) {FRAGMENT_ORDER} -> b (p {_ROWS}) hd (g {_COLS})",
      hd=heads, g=wgs, j=head_dim // wgs // 8, **_SIZES)


def to_fragments(x: jax.Array, wgs: int) -> jax.Array:
  """The inverse of :func:`from_fragments`: x [B, S, H, D] as the accumulator's layout."""
  heads, head_dim = x.shape[2:]
  flat = einops.rearrange(
      x, f"b (p {_ROWS}) hd (g {_COLS}) -> b p (hd g) {FRAGMENT_ORDER}",
      g=wgs, j=head_dim // wgs // 8, **_SIZES)
  return flat.reshape(*flat.shape[:3], *part_shape(head_dim // wgs))
