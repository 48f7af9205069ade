"""Launch knobs and input checks of the portable (Triton-lowered Pallas) kernels."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jsta.spec import STASpec

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
BLOCK_CANDIDATES = (128, 64, 32, 16)
MIN_DIM, MAX_DIM = 16, 256


def is_pow2(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x > 0 and (
      x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Triton launch knobs. ``None`` picks a heuristic default (see the ``resolved_*`` methods).

  Attributes:
    fwd_num_warps: warps per forward program (default 4 for head_dim <= 64, else 8).
    fwd_num_stages: software-pipelining stages of the forward key loop.
    bwd_num_warps: warps per dq and dk/dv program (default 4 for blocks <= 64x64, else 8).
    bwd_num_stages: pipelining stages of the backward loops.
    bwd_block_q, bwd_block_kv: block sizes of the backward schedule (default
      ``min(64, forward block)``). Smaller than the forward's because the backward keeps
      more [block_q, block_kv] float32 tiles live (s, p, dp, ds), which at 128x128 would
      likely spill registers (not measured yet: tune on the GPU).
  """

  fwd_num_warps: int | None = None
  fwd_num_stages: int = 2
  bwd_num_warps: int | None = None
  bwd_num_stages: int = 2
  bwd_block_q: int | None = None
  bwd_block_kv: int | None = None

  def resolved_fwd_warps(self, head_dim: int) -> int:
    if self.fwd_num_warps is not None:
      return self.fwd_num_warps
    return 4 if head_dim <= 64 else 8

  def resolved_bwd_warps(self, block_q: int, block_kv: int) -> int:
    if self.bwd_num_warps is not None:
      return self.bwd_num_warps
    return 4 if block_q * block_kv <= 64 * 64 else 8

  def resolved_bwd_blocks(self, block_q: int, block_kv: int) -> tuple[int, int]:
    bq = min(64, block_q) if self.bwd_block_q is None else self.bwd_block_q
    bk = min(64, block_kv) if self.bwd_block_kv is None else self.bwd_block_kv
    return bq, bk


def check_config(spec: STASpec, head_dim: int, dtype, block_q: int, block_kv: int,
                 config: KernelConfig = KernelConfig()) -> None:
  """Raises ValueError (naming the argument) for input the Triton kernels do not support."""
  if not is_pow2(head_dim) or not MIN_DIM <= head_dim <= MAX_DIM:
    raise ValueError(
        f"head_dim must be a power of two in [{MIN_DIM}, {MAX_DIM}] for the pallas_triton "
        f"backend (Triton tensors are power-of-two shaped, dots need >= 16; the op zero-pads "
        f"smaller ones to the next), got {head_dim}")
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {jnp.dtype(dtype)}")
  blocks = (("block_q", block_q), ("block_kv", block_kv))
  if config.bwd_block_q is not None:
    blocks += (("bwd_block_q", config.bwd_block_q),)
  if config.bwd_block_kv is not None:
    blocks += (("bwd_block_kv", config.bwd_block_kv),)
  for name, blk in blocks:
    if not is_pow2(blk) or not MIN_DIM <= blk <= MAX_DIM:
      raise ValueError(
          f"{name} must be a power of two in [{MIN_DIM}, {MAX_DIM}] for the pallas_triton "
          f"backend, got {blk!r}")
    if spec.block_align % blk:
      raise ValueError(
          f"{name}={blk} must divide the tile's token count and the length of every partial "
          f"edge tile (their gcd is {spec.block_align} for tile_shape {spec.tile_shape} on "
          f"latent_shape {spec.latent_shape}): the pallas_triton kernels have no blocks that "
          f"span two tiles")


def kernel_head_dim(head_dim: int) -> int:
  """The power of two in [MIN_DIM, MAX_DIM] that holds ``head_dim`` (itself if none does)."""
  if head_dim > MAX_DIM:
    return head_dim
  return max(MIN_DIM, 1 << (head_dim - 1).bit_length())


def default_blocks(spec: STASpec, head_dim: int, dtype) -> tuple[int, int]:
  """(block_q, block_kv): 128 queries and 64 keys per step where the tiles allow (blocks
  divide every tile length, ``spec.block_align``).

  128x64 is Triton flash attention's usual H100/A100 forward tile for head_dim 128; with
  head_dim <= 64 a 128-key step fits the registers too, with head_dim 256 only 64x64 does.
  """
  ts = spec.block_align
  fits = [b for b in BLOCK_CANDIDATES if ts % b == 0]
  if not fits:
    raise ValueError(
        f"tile_shape {spec.tile_shape} on latent_shape {spec.latent_shape} gives tile lengths "
        f"whose gcd is {ts}, which none of the pallas_triton block sizes {BLOCK_CANDIDATES} "
        "divides; pick a tile whose token count is a multiple of 16")
  q_cap = 128 if head_dim <= 128 else 64
  kv_cap = 128 if head_dim <= 64 else 64
  return next(b for b in fits if b <= q_cap), next(b for b in fits if b <= kv_cap)
