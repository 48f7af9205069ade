"""Configuration and input checks of the Hopper (Mosaic GPU) kernels: ``MosaicConfig``, the
supported dtypes and head dims, default block sizes and pipeline depths."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jsta.spec import STASpec

WG_ROWS = 64          # rows per compute warpgroup (wgmma M)
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
SUPPORTED_HEAD_DIMS = (64, 128)
# Registers a CTA of 384 threads launches with (168 each): what setmaxnreg redistributes.
LAUNCH_REGISTERS = 168 * 384
SMEM_BUDGET = 200 * 1024    # of Hopper's 227 KiB: leave room for barriers and the lse buffers
# (compute, producer) registers per thread with three compute warpgroups (512 threads launch
# with 128 each): 3 * 128 * 160 + 128 * 32 = 65,536, the register file.
THREE_WG_REGISTERS = (160, 32)


@dataclasses.dataclass(frozen=True)
class MosaicConfig:
  """Tuning knobs of the Mosaic GPU kernels.

  block_q: query rows per CTA = 64 * compute warpgroups (128: two compute warpgroups; 192:
    three, the 8-bit forward alone, with :data:`THREE_WG_REGISTERS`: each K/V block then feeds
    three 64-row pieces, and three warps a scheduler interleave their softmax.
    ``fp8.default_config(..., block_q=192)`` on a schedule of 192-row blocks; the op's 8-bit
    forward picks it itself (``MosaicBackend.fp8_three_warpgroups``), its ``block_q=`` and
    the other kernels refuse it).
  block_kv: key rows per pipeline step (64 or 128; 192 in the bf16 forward alone, on
    schedules without padded keys or partial pairs, e.g. the paper shape: two stages of
    192-key K and V beside the query block take 224 KiB of shared memory, which leaves no
    room for key-bias or unit-mask rows. The op runs it with
    ``MosaicBackend(forward_192_keys=True)``; the backward kernels and the 8-bit forward
    refuse it).
  max_concurrent_steps: TMA pipeline depth of the forward (2..4); bounded by shared memory.
  use_schedule_barrier: ping-pong the two compute warpgroups (FA3 style) so one does softmax
    while the other's wgmma runs. Off by default: each warpgroup already overlaps its softmax
    with its own P V of the step before, and the ping-pong then serializes the two softmaxes,
    the step's longest latency (the forward measured faster without it: docs/PERFORMANCE.md).
  bwd_max_concurrent_steps: pipeline depth of the backward kernels.
  forward_registers: (compute, producer) registers per thread of the forward's warpgroups
    with two compute warpgroups (``setmaxnreg``; multiples of 8). Their sum over the 384
    threads must fit what the launch holds, 168 registers per thread (64,512): the compute
    warpgroups' increase waits for registers the producer gave back, for ever if they are
    not there.
  backward_variant: "auto", "fused" or "split". "fused" is the one-kernel backward
    (:mod:`pallas_kernels.mosaic.backward_fused`: dQ added from the dK/dV kernel with TMA
    reduce-adds, 5 matmuls per block pair); "split" runs a dQ kernel and a dK/dV kernel
    (:mod:`pallas_kernels.mosaic.backward_split`, 7 matmuls). "auto" is "fused" where it
    applies (``fused_supported``: head_dim 128 with 128-row key blocks, or 64-row key blocks),
    else "split". The fused dQ is not bitwise deterministic (float32 reduce-adds land in any
    order); "split" is, at a few percent more time (docs/PERFORMANCE.md).
  key_steps: "auto", "blocks" or "gathered": the work items of the forward and dQ kernels
    with 128 x 128 blocks. "blocks": 128 consecutive query rows, a step per 128-key block;
    "gathered": two 64-row query pieces from anywhere (a tile's pieces together, a tile's
    odd piece with a neighbouring tile's) and steps of two 64-key units from anywhere, so an
    item visits only the units its pieces attend, two per step (two TMA copies per buffer
    instead of one). "auto" gathers where that takes fewer steps (blocks spanning tiles:
    tiles of 64 or 192 tokens; :func:`pallas_kernels.mosaic.common.gather_saves_steps`),
    else keeps blocks.
  bwd_step_descriptors: the fused backward derives the shared-memory addresses of its
    warpgroup's K and V and of the dQ product's key columns in every step, from an offset that
    is zero at run time but that the compiler cannot see through, instead of once before the
    loop. Hoisted, their 24 wgmma descriptors do not fit the uniform registers: ptxas keeps
    them in ordinary registers, spills part of them (156-176 bytes) and reloads and moves them
    into uniform registers at every step; recomputed, they stay in uniform registers (no spill,
    602 -> 524 instructions per step at head_dim 128). On by default since 2026-12-05: the
    fused backward 6.2-6.6% faster alone, 6.6-12.8% with ``fused_bwd_auto_barriers=False``
    (docs/PERFORMANCE.md, "The fused backward's options").
  auto_barriers: keep Pallas's conservative warpgroup barriers around every shared-memory
    store and TMA issue (``CompilerParams.unsafe_no_auto_barriers`` when False) in the
    forwards (bf16 and 8-bit) and the split backward's kernels. The kernels do not need them:
    every shared-memory buffer is written by threads and read only by TMA or
    wgmma (behind ``commit_smem``'s fence and barrier), or written by TMA and read by threads
    (behind mbarrier waits, released by every thread's arrival); no thread reads what another
    thread of its warpgroup wrote. On until timed in those kernels; interpret mode always
    keeps them.
  fused_bwd_auto_barriers: the same for the fused backward, where False takes the step from 7
    warpgroup barriers to 3. Off by default since 2026-12-05 (timed with
    ``bwd_step_descriptors``, see there).
  bwd_early_loads: the fused backward loads each query piece's lse from shared memory before
    it waits for S^T (by default after: the exponent's first multiply then waits for that
    load, 4.7% of the backward's stall samples at the paper shape on an H100), and reads the
    piece's query row, its dQ reduce-add's target, from GMEM at the top of the step instead
    of right before the reduce-add (2.2%). On by default since 2026-12-06 (-2.8% for the
    fused backward kernel at the paper shape on an H100, docs/PERFORMANCE.md).
  bwd_dq_writer: the fused backward's producer warpgroup issues the dQ reduce-adds (the dQ
    writer of FlashAttention-3 and -4): each compute warpgroup waits on a named barrier
    until its staging buffer has been read, stores its dQ part, fences and arrives on a
    second one without waiting (``bar.arrive``), and goes on; the producer, once a piece's
    slot is released, waits on that barrier, issues the TMA reduce-add, waits for its read
    and hands the buffer back (:func:`~pallas_kernels.mosaic.common.named_barrier`). By
    default the compute warpgroup waits for the previous reduce-add's read, stores, commits
    (a fence and a warpgroup barrier) and issues it itself: two warpgroup barriers a piece;
    the store, the fence, the barrier and the issue held 6.6% of the backward's stall
    samples at the paper shape (Nsight Compute, docs/PERFORMANCE.md). GPU only (interpret
    mode keeps the default). Off until timed.
  bwd_dq_fragments: the fused backward stages each dQ part in the wgmma fragments' order
    (each thread's registers to 16 contiguous bytes of its own, no swizzle) and adds it
    into a float32 accumulator laid out in that order with one TMA reduce-add of a
    [16, 256] box, as FlashAttention-3's and -4's backward keep theirs; the accumulator is
    put back into rows with the final scale and cast (:mod:`~pallas_kernels.mosaic.
    dq_fragments`). Grouped k/v: their float32 dK/dV accumulators too. In GPU interpret
    mode the part is rearranged as a value instead of stored by each thread. Off until
    timed.
  bwd_text_dq_copies: the fused backward's dQ accumulator holds this many copies of the rows
    past the video (the text slots, which every video key block's CTA adds into: 902
    reduce-adds a row and head at the paper shape with 256 text slots, where a video row
    takes at most 88); key block j adds its text pieces into copy j % copies, and the copies
    are summed into the text rows with the final scale and cast. 1 (the default): one copy.
    For shapes with text and the rows' accumulator layout (not with ``bwd_dq_fragments``);
    off until timed beside the ablation that measures the contention
    (``benchmarks.kernels.mosaic --variants fused+spread_text``).
  fp8_p_registers: the 8-bit forward with e4m3 P V reads P from registers instead of staging
    it in shared memory each step: the float32 scores' registers, converted to e4m3, are read
    as Mosaic GPU's 8-bit register layout (same thread, same rows; within each 16-key group the
    keys come in another order, :data:`~pallas_kernels.mosaic.forward_fp8.REGISTER_KEY_ORDER`,
    so V^T's keys are put in that order outside the kernel). Drops P's 32 shared-memory stores,
    its fence and barriers per step. Off until timed.
  fp8_biased_scores: the 8-bit forward with int8 Q K^T keeps each step's int32 scores as the
    float 1.5 * 2 ** 23 + s (one integer add) instead of subtracting the bias per score; the
    softmax takes it out of each row's maximum and folds it into the row's constant of the
    exponent's FMA (error about one unit of the int32 score, in the log2 domain: far below
    int8's own rounding). One instruction fewer per score; on by default (timed: 6-12% off
    the ``qk_int8`` kernel at the paper shape, docs/PERFORMANCE.md).
  overlap_exp: run each step's exponentials under a matmul of the same warpgroup. The
    forwards (bf16 and 8-bit) store each step's running row sums to shared memory before they
    wait for the previous step's P V: without that store ptxas hoists the wait above the
    exponentials (the PTX has it after them), so they do not run under the warpgroup's own
    P V. The split backward's dQ kernel issues dP = dO V^T right after S instead of after the
    exponentials. (docs/PERFORMANCE.md, "Where the time goes".) Off until timed; meant with
    ``auto_barriers=False`` (else Pallas adds two warpgroup barriers around the forward's
    store).
  rescale_under_qk: the bf16 forward rescales O by the previous step's correction after it
    issues the step's S = Q K^T and before it issues P V (FA3's order), so the rescale runs
    under S's product, instead of after the wait for P V, where nothing of the warpgroup's own
    runs under it. Off until timed.
  persistent: the bf16 forward runs one CTA per SM (``persistent_ctas``), each taking work
    items (:func:`pallas_kernels.mosaic.common.persistent_work`, in launch order) from a
    counter in GMEM as it gets free (:func:`pallas_kernels.mosaic.common.claim_work_item`, an
    atomic add per item, so the items in flight stay neighbours in launch order and faster
    SMs take more): the producer streams the next item's keys while the compute warpgroups
    finish the current one, each warpgroup loads its next query rows into a second buffer
    during the current item, and o's stores are not waited for between items; no CTA
    launch, first-load latency or pipeline ramp per item. A second query buffer in shared
    memory. Off until timed.
  masked_steps_apart: the forwards (bf16 and 8-bit) run each work item's steps that need a
    mask (keys with padding, or a compute warpgroup attending only some of the step's 64-key
    units) first, in a key loop with the mask code, and the others after them in a loop
    without it (:func:`~pallas_kernels.mosaic.common.masked_steps_first` orders the steps).
    Between the two loops the first one's last P V is waited for and the second starts with
    Q K^T alone (as an item's first step): no P registers cross from one loop into the
    other. A first two-loop forward carried them across and ptxas serialized every wgmma of
    the kernel (its C7513 warning), 32-42% slower (docs/PERFORMANCE_ARCHIVE.md); this one
    compiles without it, and its second loop is the unmasked forward's step. Not with
    ``persistent``, nor with ``rescale_under_qk`` (O rescaled under Q K^T in two loops:
    C7513 again). Off in a bare config; ``MosaicBackend`` turns it on where it applies
    (its ``masked_steps_apart="auto"``, the default since 2026-12-06: 1-2% faster at the
    model shapes on an H100, level at image 2048; docs/PERFORMANCE.md).
  exp2_fma_columns: the forwards (bf16 and 8-bit) compute the exponentials of this many of a
    step's key columns (the last ones; a multiple of 8, at most block_kv) on the FMA and
    integer pipes (:func:`~pallas_kernels.mosaic.common.exp2_on_fma`: a cubic and the
    exponent's bits, 9 instructions, relative error under 7.5e-5) instead of MUFU.EX2, which
    issues a warp's exponential in 8 cycles against one for an FMA: the softmax of a step is
    otherwise 64 MUFU instructions a thread in a row, at least 512 cycles, about as long as a
    warpgroup's products in the 8-bit forward (FlashAttention-4 does this on Blackwell). 0:
    all on MUFU, the default: the bf16 forward measured 5-13% slower with 32 or 64 columns
    (its extra instructions cost more than MUFU's time they save), the 8-bit forward 4%
    faster at the paper shape and level at Wan-14B (docs/PERFORMANCE.md).
  persistent_ctas: CTAs of the persistent forward; 0: the GPU's SM count (132 where JAX sees
    no GPU, e.g. lowering for CUDA on a CPU).
  launch_order: the order in which every kernel launches its work items after the long ones
    (:func:`pallas_kernels.mosaic.common.launch_order`). "sequence": the blocks' order in the
    sequence (each frame's tiles row by row); "window": row-major over the tiles with the axes
    that keep the items reading the same keys or query pieces closest together
    (:func:`pallas_kernels.mosaic.common.window_axes`; for a 3x1x1 window the frames of one
    spatial position side by side). Results do not depend on it; what the CTAs running
    together share through L2 does.
  long_items_first: work items whose lists are longer than this multiple of the median launch
    first, longest first (the text rows and keys, which attend everything; 0: none).
  interpret: run in GPU interpret mode on the CPU (tests only; slow).
  """

  block_q: int = 128
  block_kv: int = 128
  max_concurrent_steps: int = 2
  use_schedule_barrier: bool = False
  bwd_max_concurrent_steps: int = 2
  forward_registers: tuple[int, int] = (240, 24)
  backward_variant: str = "auto"
  key_steps: str = "auto"
  bwd_step_descriptors: bool = True
  auto_barriers: bool = True
  fused_bwd_auto_barriers: bool = False
  bwd_early_loads: bool = True
  bwd_dq_writer: bool = False
  bwd_dq_fragments: bool = False
  bwd_text_dq_copies: int = 1
  fp8_p_registers: bool = False
  fp8_biased_scores: bool = True
  overlap_exp: bool = False
  rescale_under_qk: bool = False
  persistent: bool = False
  persistent_ctas: int = 0
  launch_order: str = "sequence"
  long_items_first: float = 2.0
  masked_steps_apart: bool = False
  exp2_fma_columns: int = 0
  interpret: bool = False

  def __post_init__(self):
    if self.block_q not in (64, 128, 192):
      raise ValueError(f"block_q must be 64, 128 or 192 (64 rows per compute warpgroup; 192: the "
                       f"8-bit forward alone), got {self.block_q}")
    if self.block_kv not in (64, 128, 192):
      raise ValueError(f"block_kv must be 64, 128 or 192 (192: the bf16 forward alone), got "
                       f"{self.block_kv}")
    if self.backward_variant not in ("auto", "fused", "split"):
      raise ValueError(f"backward_variant must be 'auto', 'fused' or 'split', got "
                       f"{self.backward_variant!r}")
    for name in ("use_schedule_barrier", "bwd_step_descriptors", "auto_barriers",
                 "fused_bwd_auto_barriers", "bwd_early_loads", "bwd_dq_writer",
                 "bwd_dq_fragments", "fp8_p_registers", "fp8_biased_scores",
                 "overlap_exp", "rescale_under_qk", "persistent",
                 "masked_steps_apart", "interpret"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__} "
                        f"{getattr(self, name)!r}")
    for name in ("exp2_fma_columns", "persistent_ctas", "bwd_text_dq_copies"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if (self.exp2_fma_columns % 8 or not 0 <= self.exp2_fma_columns <= self.block_kv):
      raise ValueError(f"exp2_fma_columns must be a multiple of 8 from 0 to block_kv="
                       f"{self.block_kv}, got {self.exp2_fma_columns}")
    if self.masked_steps_apart and self.persistent:
      raise ValueError("masked_steps_apart runs the single-item forward: not with persistent")
    if self.masked_steps_apart and self.rescale_under_qk:
      raise ValueError("masked_steps_apart with rescale_under_qk makes ptxas serialize every "
                       "wgmma of the forward: set at most one of them")
    if self.key_steps not in ("auto", "blocks", "gathered"):
      raise ValueError(f"key_steps must be 'auto', 'blocks' or 'gathered', got "
                       f"{self.key_steps!r}")
    if self.key_steps == "gathered" and (self.block_q, self.block_kv) != (128, 128):
      raise ValueError(f"key_steps='gathered' runs two 64-row query pieces and steps of two "
                       f"64-key units: block_q and block_kv must be 128, got "
                       f"{self.block_q} x {self.block_kv}")
    compute, producer = self.forward_registers
    if (compute % 8 or producer % 8 or not 24 <= producer <= compute <= 256
        or 2 * 128 * compute + 128 * producer > LAUNCH_REGISTERS):
      raise ValueError(f"forward_registers must be (compute, producer), multiples of 8 in "
                       f"[24, 256] with 2 * 128 * compute + 128 * producer <= "
                       f"{LAUNCH_REGISTERS}, got "
                       f"{self.forward_registers}")
    if not 1 <= self.bwd_text_dq_copies <= 64:
      raise ValueError(f"bwd_text_dq_copies must be in 1..64 (1: one copy of the text rows' "
                       f"dQ), got {self.bwd_text_dq_copies}")
    if self.bwd_text_dq_copies > 1 and self.bwd_dq_fragments:
      raise ValueError("bwd_text_dq_copies > 1 needs the rows' dQ accumulator: not with "
                       "bwd_dq_fragments")
    if self.launch_order not in ("sequence", "window"):
      raise ValueError(f"launch_order must be 'sequence' or 'window', got {self.launch_order!r}")
    if (isinstance(self.long_items_first, bool)
        or not isinstance(self.long_items_first, (int, float))):
      raise TypeError(f"long_items_first must be a number, got "
                      f"{type(self.long_items_first).__name__} {self.long_items_first!r}")
    if not (self.long_items_first == 0 or self.long_items_first >= 1):
      raise ValueError(f"long_items_first must be 0 (no item first) or at least 1 (a multiple "
                       f"of the median list), got {self.long_items_first}")
    if self.persistent_ctas < 0:
      raise ValueError(f"persistent_ctas must be >= 0 (0: the GPU's SM count), got "
                       f"{self.persistent_ctas}")
    for name in ("max_concurrent_steps", "bwd_max_concurrent_steps"):
      v = getattr(self, name)
      if not 2 <= v <= 4:
        raise ValueError(f"{name} must be in 2..4, got {v}")

  @property
  def compute_wgs(self) -> int:
    return self.block_q // WG_ROWS


# The backend's persistent="auto" runs the persistent forward where its work items average at
# most this many steps: there the fixed cost of a CTA per item (about 6 us) is a large share
# and the persistent forward cut the kernel by a fifth or more; at 26-375 steps per item it
# measured within a few percent of the default, either way (docs/PERFORMANCE.md).
PERSISTENT_MAX_MEAN_STEPS = 16


def default_stages(block_q: int, block_kv: int, head_dim: int, itemsize: int = 2,
                   q_buffers: int = 1) -> int:
  """Deepest K/V pipeline (2..4) whose shared memory fits the budget, beside ``q_buffers``
  query blocks (2 in the persistent forward)."""
  for stages in (4, 3, 2):
    if forward_smem_bytes(block_q, block_kv, head_dim, stages, itemsize,
                          q_buffers) <= SMEM_BUDGET:
      return stages
  return 2


def forward_smem_bytes(block_q: int, block_kv: int, head_dim: int, stages: int,
                       itemsize: int = 2, q_buffers: int = 1) -> int:
  """Shared memory of the forward's query buffers and K/V pipeline (the rest, under 2 KiB,
  is what SMEM_BUDGET leaves)."""
  return (q_buffers * block_q + stages * 2 * block_kv) * head_dim * itemsize


def check_dtype(dtype) -> None:
  if jnp.dtype(dtype) not in map(jnp.dtype, SUPPORTED_DTYPES):
    raise ValueError(
        f"dtype must be bfloat16 or float16 for the pallas_mosaic backend (its wgmma path keeps "
        f"bf16/fp16 in shared memory; float32 is not supported), got {jnp.dtype(dtype)}; use "
        "backend='pallas_triton' or 'xla' for float32")


def check(spec: STASpec, head_dim: int, dtype, block_q: int, block_kv: int) -> None:
  """Raises ValueError (naming the argument) for input the Hopper kernels do not support."""
  check_dtype(dtype)
  if head_dim not in SUPPORTED_HEAD_DIMS:
    raise ValueError(f"head_dim must be one of {SUPPORTED_HEAD_DIMS} for pallas_mosaic (the op "
                     f"zero-pads smaller ones to the next), got {head_dim}")
  if block_q not in (64, 128):
    raise ValueError(f"block_q must be 64 or 128 for pallas_mosaic, got {block_q}")
  if block_kv not in (64, 128):
    raise ValueError(f"block_kv must be 64 or 128 for pallas_mosaic, got {block_kv}")
  if spec.tile_size % WG_ROWS:
    raise ValueError(
        f"tile_shape {spec.tile_shape} has {spec.tile_size} tokens; pallas_mosaic needs tiles "
        f"of a multiple of {WG_ROWS} tokens (its blocks are masked in units of {WG_ROWS})")


def kernel_head_dim(head_dim: int) -> int:
  """The smallest supported head_dim >= ``head_dim`` (itself if none is)."""
  return next((d for d in SUPPORTED_HEAD_DIMS if d >= head_dim), head_dim)


def default_blocks(spec: STASpec, head_dim: int, dtype) -> tuple[int, int]:
  """(block_q, block_kv) = (128, 128): two compute warpgroups; blocks that span tiles are
  masked per warpgroup in 64-position units."""
  del spec, head_dim, dtype
  return 128, 128
