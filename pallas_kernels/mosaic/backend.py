"""The ``pallas_mosaic`` backend: routes the op's forward and backward, and its 8-bit forward
(``precision=`` "qk_int8", "int8", "qk_int8_pv_fp8", "fp8"), to the Hopper kernels.

The op reaches the kernel modules through this module only (:mod:`.forward`,
:mod:`.backward_split`, :mod:`.backward_fused`; the 8-bit kernel through :mod:`.fp8`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jsta import backends as jsta_backends
from jsta.schedule import BlockSchedule, block_schedule
from pallas_kernels.mosaic import config as config_lib
from pallas_kernels.mosaic import fp8_recipe
from pallas_kernels.mosaic.backward_fused import fused_backward_jit, fused_supported
from pallas_kernels.mosaic.backward_split import split_backward_jit
from pallas_kernels.mosaic.common import (gather_saves_pieces, gathered_operands,
                                          gathered_steps, uses_gathered_steps,
                                          gathered_transposed_operands,
                                          backward_item_order, forward_item_order,
                                          masked_steps_first,
                                          persistent_work, runtime_key_bias,
                                          schedule_operands, transposed_operands,
                                          transposed_schedule, with_padded_key_pieces)
from pallas_kernels.mosaic.config import WG_ROWS, MosaicConfig
from pallas_kernels.mosaic.forward import forward_jit

# The 8-bit precisions whose forward runs 192-row query blocks on three compute warpgroups
# by default where no key is padded (MosaicBackend.fp8_three_warpgroups="auto"): timed faster
# at the paper shape on 2026-12-07 (docs/PERFORMANCE.md, "The 8-bit forward on three compute
# warpgroups").
THREE_WARPGROUP_PRECISIONS = ("qk_int8", "fp8")

# The op's 8-bit precisions (jsta.ops.QUANTIZED_PRECISIONS) as quantization recipes of the
# 8-bit forward (docs/PERFORMANCE.md, "FP8 forward: quantization choice").
QUANTIZED_RECIPES = {
    "qk_int8": fp8_recipe.KERNEL_RECIPE,
    "qk_int8_pv_fp8": dataclasses.replace(fp8_recipe.KERNEL_RECIPE, p_dtype="e4m3"),
    "fp8": fp8_recipe.ALL_E4M3,
    "int8": fp8_recipe.ALL_INT8,
}


def forward_operands(sched: BlockSchedule, config: MosaicConfig, key_valid=None,
                     batch: int | None = None, masks_apart: bool = False):
  """(operands, partial, gather) of the forward and dQ kernels for ``sched``: the schedule's
  key blocks, or its 64-key units gathered two per step (:func:`uses_gathered_steps`);
  ``partial``: some step is attended only in part. ``key_valid`` (bool [B, S] or None)
  replaces the schedule's key bias. With ``batch`` (the forward's batch size) and
  ``config.persistent``: the persistent forward's work items too
  (:func:`~pallas_kernels.mosaic.common.persistent_work`). ``masks_apart`` (the forward with
  ``config.masked_steps_apart``, where some step needs a mask): each item's masked steps
  first (:func:`~pallas_kernels.mosaic.common.masked_steps_first`)."""
  gather = uses_gathered_steps(sched, config)
  if gather:
    ops, partial = gathered_operands(sched)
    counts = gathered_steps(sched)
  else:
    ops, partial = schedule_operands(sched), sched.has_partial_pairs
    counts = sched.kv_count
  if masks_apart and (partial or sched.has_masked_keys):
    ops = masked_steps_first(sched, ops, gather)
  order = forward_item_order(sched, config, gather)
  ops = ops._replace(launch_order=jnp.asarray(order))
  if batch is not None and config.persistent:
    ops = ops._replace(work=jnp.asarray(persistent_work(counts, sched.head_to_group, order,
                                                         batch)))
  if key_valid is not None:
    ops = ops._replace(key_bias=runtime_key_bias(key_valid))
  return ops, partial, gather


def backward_operands(sched: BlockSchedule, config: MosaicConfig, key_valid=None):
  """(operands, dK/dV key block, partial, gather) of the dK/dV kernels (split and fused) for
  ``sched``: the 128-key blocks of :func:`transposed_schedule`, or gathered pairs of 64-key
  units where ``config.key_steps`` asks for them ("auto": where they stream fewer query
  pieces, :func:`~pallas_kernels.mosaic.common.gather_saves_pieces`)."""
  if config.key_steps == "auto":
    gather = gather_saves_pieces(sched)
  else:
    gather = (config.key_steps == "gathered"
              and (sched.block_q, sched.block_kv) == (128, 128)
              and transposed_schedule(sched).block_kv == 128)
  if gather:
    ops, partial = gathered_transposed_operands(sched)
    block_kv = 128
  else:
    sched_t = transposed_schedule(sched)
    ops, partial, block_kv = (transposed_operands(sched_t), sched_t.has_partial_pairs,
                              sched_t.block_kv)
  ops = ops._replace(launch_order=jnp.asarray(backward_item_order(sched, config, gather)))
  if key_valid is not None:
    ops = ops._replace(key_bias=runtime_key_bias(key_valid))
  return ops, block_kv, partial, gather


def forward(q, k, v, sched: BlockSchedule, scale: float, config: MosaicConfig | None = None,
            key_valid=None, with_o_low: bool = False, raw_padded_kv: bool = False):
  """Returns (o [B, S, H, D] in q.dtype, lse [B, H, S] float32) on the schedule's seq, and with
  ``with_o_low`` o_low [B, S, H, D] in q.dtype, o's rounding error (:class:`jsta.ops.Backend`).

  The schedule must have been built with ``block_q = config.block_q`` and
  ``block_kv = config.block_kv``. ``key_valid`` (bool [B, S] or None for the schedule's
  ``key_valid``): run-time key validity, applied on the key blocks the schedule flags in
  ``kv_needs_mask``. ``raw_padded_kv``: k and v may hold anything (NaN, inf) in padded
  positions (of the schedule and of ``key_valid``); the kernel then streams the key pieces
  that hold them from zeroed copies
  (:func:`~pallas_kernels.mosaic.common.with_padded_key_pieces`). Otherwise they must be zero
  there (the op zeroes them).
  """
  config = config or MosaicConfig(block_q=sched.block_q, block_kv=sched.block_kv)
  if (sched.block_q, sched.block_kv) != (config.block_q, config.block_kv):
    raise ValueError(
        f"schedule blocks ({sched.block_q}, {sched.block_kv}) differ from the config's "
        f"({config.block_q}, {config.block_kv})")
  _check_two_warpgroups(config.block_q)
  ops, partial, gather = forward_operands(sched, config, key_valid, batch=q.shape[0],
                                         masks_apart=config.masked_steps_apart)
  padded = None
  if raw_padded_kv and sched.has_masked_keys:
    piece = WG_ROWS if gather else config.block_kv
    ops, padded = with_padded_key_pieces(ops, sched, k, v, piece, key_valid)
  return forward_jit(q, k, v, ops, scale=float(scale), config=config,
                     masked=sched.has_masked_keys, partial=partial, with_o_low=with_o_low,
                     gather=gather, padded_keys=padded)


def _same_length_schedule(sched: BlockSchedule, block_q: int,
                          block_kv: int) -> BlockSchedule | None:
  """``sched``'s spec and heads in ``block_q`` x ``block_kv`` blocks (64-position mask unit),
  or None where those blocks do not fit its tiles or pad the sequence to another length than
  ``sched``'s (the op's arrays have ``sched.seq_len`` rows)."""
  try:
    other = block_schedule(sched.spec, sched.num_heads, block_q, block_kv, mask_unit=64,
                           dynamic_text=sched.dynamic_text)
  except ValueError:
    return None
  return other if other.seq_len == sched.seq_len else None


def _check_two_warpgroups(block_q: int) -> None:
  """The bf16 kernels run one or two compute warpgroups (64 or 128 query rows a CTA)."""
  if block_q not in (64, 128):
    raise ValueError(f"block_q must be 64 or 128 for the bf16 kernels (192, three compute "
                     f"warpgroups, is the 8-bit forward's alone), got {block_q}")


def use_fused_backward(head_dim: int, block_kv_dkv: int, config: MosaicConfig) -> bool:
  """Whether ``config.backward_variant`` runs the fused backward for this head_dim and dK/dV
  key block; raises ValueError if "fused" is asked for where it does not apply."""
  if config.backward_variant == "fused" and not fused_supported(head_dim, block_kv_dkv):
    raise ValueError(f"backward_variant='fused' needs head_dim // (block_kv // 64) to be a "
                     f"multiple of 64 (head_dim={head_dim}, dK/dV key block {block_kv_dkv}); "
                     "use 'auto' or 'split'")
  if config.backward_variant == "auto":
    return fused_supported(head_dim, block_kv_dkv)
  return config.backward_variant == "fused"


def backward(q, k, v, o, lse, do, sched: BlockSchedule, scale: float,
             config: MosaicConfig | None = None, key_valid=None, dlse=None):
  """(dq, dk, dv) in the input dtypes from the saved natural-log ``lse`` (+inf on rows that
  attend nothing or are invalid). dK/dV use key blocks of 128 rows where the tile allows
  (two compute warpgroups), with the transposed schedule of the same query blocks.
  ``key_valid`` as in :func:`forward`; ``dlse`` (float32 [B, H, S] or None): the cotangent of
  the lse."""
  _check_two_warpgroups(sched.block_q)
  config = config or MosaicConfig(block_q=sched.block_q, block_kv=sched.block_kv)
  _check_two_warpgroups(config.block_q)
  if config.block_kv not in (64, 128):
    raise ValueError(f"the backward kernels need block_kv 64 or 128, got {config.block_kv}")
  t_ops, bkd, partial_t, gather_t = backward_operands(sched, config, key_valid)
  do = do.astype(q.dtype)
  if use_fused_backward(q.shape[-1], bkd, config):
    # config.bwd_text_dq_copies: the text rows' dQ in copies (where the spec has text).
    video_rows = (sched.spec.padded_video_len
                  if config.bwd_text_dq_copies > 1 and sched.spec.text_max_len else 0)
    return fused_backward_jit(q, k, v, o, lse, do, t_ops, dlse, scale=float(scale),
                              config=config, block_kv=bkd, masked=sched.has_masked_keys,
                              partial=partial_t, gather=gather_t, video_rows=video_rows)
  f_ops, partial, gather = forward_operands(sched, config, key_valid)
  return split_backward_jit(q, k, v, o, lse, do, f_ops, t_ops, dlse,
                            scale=float(scale), config=config, block_kv_dkv=bkd,
                            masked=sched.has_masked_keys, partial=partial,
                            partial_t=partial_t, gather=gather, gather_t=gather_t)


def check_device() -> None:
  """Raises ValueError unless JAX's default device is an NVIDIA GPU of compute capability 9.x,
  where the compiled kernels run (they use Hopper's wgmma and TMA)."""
  cc = jsta_backends.gpu_compute_capability()
  if cc is not None and cc[0] == 9:
    return
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    dev = None
  if dev is None:
    found = "none"
  elif dev.platform == "gpu":
    known = ".".join(map(str, cc)) if cc and any(cc) else "unknown"
    found = f"a GPU of compute capability {known} ({dev.device_kind})"
  else:
    found = (dev.platform if dev.device_kind == dev.platform
             else f"{dev.platform} ({dev.device_kind})")
  raise ValueError(
      "the pallas_mosaic backend needs an NVIDIA GPU of compute capability 9.x (Hopper, e.g. "
      f"H100 or H200), but JAX's default device is {found}; use implementation='auto' (it "
      "picks a backend that runs here), 'pallas_triton' (any NVIDIA GPU) or 'xla' (any device)")


@dataclasses.dataclass(frozen=True)
class MosaicBackend:
  """The ``pallas_mosaic`` backend (Hopper, compute capability 9.x) of :mod:`jsta.ops`.

  ``configs`` maps (block_q, block_kv, head_dim) to a tuned :class:`MosaicConfig` (see
  :func:`pallas_kernels.mosaic.autotune.autotune`); otherwise the pipeline depth comes from
  :func:`pallas_kernels.mosaic.config.default_stages`, the backward from
  ``backward_variant`` ("split" makes gradients bitwise reproducible), a step of the
  forward's key loop from ``key_steps``, the fused backward's descriptors from
  ``bwd_step_descriptors``, the 8-bit forward's e4m3 P from registers with
  ``fp8_p_registers`` and its int8 scores kept biased with ``fp8_biased_scores``, Pallas's
  automatic barriers from ``auto_barriers`` (the fused backward's from
  ``fused_bwd_auto_barriers``), the fused backward's lse and dQ row loaded
  early from ``bwd_early_loads``, its float32 dQ (and grouped dK/dV) staged and added in the
  wgmma fragments' order from ``bwd_dq_fragments``, the exponentials' overlap from
  ``overlap_exp``, the place of the forward's O rescale from ``rescale_under_qk`` and the persistent forward from
  ``persistent`` and ``persistent_ctas`` (see
  :class:`MosaicConfig` for each; ``persistent="auto"``, the default, runs it where the
  schedule's forward work items are short: :meth:`use_persistent`), and where the forwards
  (bf16 and 8-bit)
  run each work item's masked steps from ``masked_steps_apart`` ("auto", the default: in a
  key loop of their own ahead of the others, except with ``persistent=True`` or
  ``rescale_under_qk``, which it does not combine with, nor for the 8-bit forward of
  precision "int8": :meth:`apart`), and how many of a
  step's exponentials they compute on the FMA pipe from ``exp2_fma_columns``; the 8-bit
  forward runs gathered work items where they save steps with ``fp8_gathered_steps`` (on by
  default; the e4m3 P V recipes too with ``fp8_gathered_e4m3_pv``, on by default since
  2026-12-07: :func:`pallas_kernels.mosaic.fp8.uses_gathered_steps`), and
  192-row query blocks on three compute warpgroups from ``fp8_three_warpgroups``
  (:meth:`schedule_192_rows`). The bf16 forward takes 192-key steps with
  ``forward_192_keys`` (on by default: :meth:`schedule_192_keys` says where they apply, e.g.
  tiles of 384 tokens without padded keys; 1-2% faster at the paper shape,
  docs/PERFORMANCE.md).
  The bf16 forward of an inference call takes k and v with whatever the caller left in padded
  positions and streams the key pieces that hold them from zeroed copies, unless
  ``op_zeroes_padded_kv`` (the op then zeroes k and v first, a read and a write of each).
  ``interpret`` runs every kernel in GPU interpret mode (CPU tests).
  Otherwise :meth:`check` (run when the op makes its plan, before tracing) raises ValueError
  unless JAX's default device is a compute capability 9.x GPU (:func:`check_device`), unless
  ``device_check`` is False: for lowering on a machine without one, e.g.
  ``jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))`` or ``jax.export``.
  """

  name: str = "pallas_mosaic"
  # The 8-bit forward reads query head h's keys and values from head h // (heads // kv_heads).
  quantized_takes_grouped_kv = True
  # Its quantization zeroes padded queries and keys before any scale, mean or product
  # (fp8.quantize; the bf16 V of "qk_int8" too: fp8.kernel_call), so the op leaves them.
  quantized_zeroes_padding = True
  interpret: bool = False
  backward_variant: str = "auto"
  key_steps: str = "auto"
  bwd_step_descriptors: bool = True
  auto_barriers: bool = True
  fused_bwd_auto_barriers: bool = False
  bwd_early_loads: bool = True
  bwd_dq_fragments: bool = False
  fp8_p_registers: bool = False
  fp8_biased_scores: bool = True
  overlap_exp: bool = False
  rescale_under_qk: bool = False
  persistent: bool | str = "auto"
  persistent_ctas: int = 0
  # True: the op zeroes padded k and v before every forward (as before 2026-12-07), instead of
  # the forward streaming the key pieces that hold them from zeroed copies (a bench option).
  op_zeroes_padded_kv: bool = False
  masked_steps_apart: bool | str = "auto"
  exp2_fma_columns: int = 0
  fp8_gathered_steps: bool = True
  fp8_gathered_e4m3_pv: bool = True
  fp8_three_warpgroups: bool | str = "auto"
  forward_192_keys: bool = True
  configs: tuple = ()
  device_check: bool = True

  def __post_init__(self):
    for name in ("persistent", "masked_steps_apart", "fp8_three_warpgroups"):
      value = getattr(self, name)
      if not isinstance(value, bool) and value != "auto":
        raise (ValueError if isinstance(value, str) else TypeError)(
            f"{name} must be True, False or 'auto', got {value!r}")
    for name in ("fp8_gathered_steps", "fp8_gathered_e4m3_pv"):
      value = getattr(self, name)
      if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    if not isinstance(self.forward_192_keys, bool):
      raise TypeError(f"forward_192_keys must be a bool, got "
                      f"{type(self.forward_192_keys).__name__} {self.forward_192_keys!r}")
    # The config's own checks, here at construction rather than at the first trace.
    MosaicConfig(**self._config_fields())

  def _config_fields(self) -> dict:
    """The MosaicConfig fields this backend sets in every config it makes."""
    return dict(backward_variant=self.backward_variant, key_steps=self.key_steps,
                bwd_step_descriptors=self.bwd_step_descriptors,
                auto_barriers=self.auto_barriers,
                fused_bwd_auto_barriers=self.fused_bwd_auto_barriers,
                bwd_early_loads=self.bwd_early_loads,
                bwd_dq_fragments=self.bwd_dq_fragments,
                fp8_p_registers=self.fp8_p_registers,
                fp8_biased_scores=self.fp8_biased_scores,
                overlap_exp=self.overlap_exp,
                rescale_under_qk=self.rescale_under_qk,
                persistent=self.persistent is True, persistent_ctas=self.persistent_ctas,
                masked_steps_apart=self.apart(), exp2_fma_columns=self.exp2_fma_columns,
                interpret=self.interpret)

  def apart(self, int8_pv: bool = False) -> bool:
    """``masked_steps_apart`` as the forwards' configs take it: "auto" is on except with
    ``persistent=True`` or ``rescale_under_qk``, which it does not combine with, and for the
    8-bit forward with int8 P V (``int8_pv``: precision "int8"), whose second key loop spills
    (692-740 bytes at the model shapes, compiled for an H200) and ran at 0.75-0.81x the bf16
    forward against 1.09-1.18x in one loop (docs/PERFORMANCE.md)."""
    if self.masked_steps_apart == "auto":
      return self.persistent is not True and not self.rescale_under_qk and not int8_pv
    return self.masked_steps_apart

  @property
  def forward_takes_raw_padded_kv(self) -> bool:
    """The bf16 forward streams the key pieces that hold padded keys from zeroed copies
    (``forward(raw_padded_kv=True)``), so an inference call leaves k and v as they are
    (:class:`jsta.ops.Backend`); not with ``op_zeroes_padded_kv``."""
    return not self.op_zeroes_padded_kv

  def config(self, block_q: int, block_kv: int, head_dim: int) -> MosaicConfig:
    for key, cfg in self.configs:
      if key == (block_q, block_kv, head_dim):
        return cfg
    return MosaicConfig(block_q=block_q, block_kv=block_kv,
                        max_concurrent_steps=config_lib.default_stages(
                            block_q, block_kv, head_dim,
                            q_buffers=2 if self.persistent is True else 1),
                        **self._config_fields())

  def default_blocks(self, spec, head_dim, dtype):
    return config_lib.default_blocks(spec, head_dim, dtype)

  def kernel_head_dim(self, head_dim: int) -> int:
    """The kernels' head_dim for input of ``head_dim``: the smallest of
    :data:`~pallas_kernels.mosaic.config.SUPPORTED_HEAD_DIMS` that holds it (the op zero-pads
    q, k and v to it: 72 or 96 run as 128, 32 as 64); larger ones as they are (``check``
    rejects them)."""
    return config_lib.kernel_head_dim(head_dim)

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    if self.device_check and not self.interpret:
      check_device()
    config_lib.check(spec, head_dim, dtype, block_q, block_kv)
    if self.key_steps == "gathered" and (block_q, block_kv) != (128, 128):
      raise ValueError(f"key_steps='gathered' needs block_q=128 and block_kv=128 (two 64-row "
                       f"query pieces, two 64-key units per step), got block_q={block_q}, "
                       f"block_kv={block_kv}")

  def use_persistent(self, sched, head_dim: int) -> bool:
    """Whether the forward of ``sched`` runs persistent: ``persistent`` if a bool, else
    ("auto") where the forward's work items average at most
    :data:`~pallas_kernels.mosaic.config.PERSISTENT_MAX_MEAN_STEPS` steps (short key lists:
    windows of few tiles), with 128 x 128 blocks and no tuned config for them; never in GPU
    interpret mode, where a persistent kernel inside a larger jitted program can stall the
    interpreter (docs/PERFORMANCE.md, "Mosaic GPU notes"; its tests call it alone)."""
    if isinstance(self.persistent, bool):
      return self.persistent
    key = (sched.block_q, sched.block_kv, head_dim)
    if (self.interpret or key[:2] != (128, 128)
        or any(k == key for k, _ in self.configs)):
      return False
    cfg = self.config(*key)
    counts = gathered_steps(sched) if uses_gathered_steps(sched, cfg) else sched.kv_count
    steps = np.asarray(counts)[np.asarray(sched.head_to_group)]
    return bool(steps.mean() <= config_lib.PERSISTENT_MAX_MEAN_STEPS)

  def schedule_192_rows(self, sched, precision: str) -> BlockSchedule | None:
    """The schedule of 192-row query blocks the 8-bit forward runs on three compute
    warpgroups instead of ``sched`` (``fp8_three_warpgroups``), or None where it keeps
    ``sched``'s 128 rows: False; "auto" (the default) as timed faster, for the recipes of
    :data:`THREE_WARPGROUP_PRECISIONS` where no key is padded (the paper shape's kind: with
    padded keys, e.g. HunyuanVideo 544p, the kernels spill and are not timed yet), not in
    GPU interpret mode (a CPU simulating four warpgroups can stall); and always where the
    192-row schedule would pad the sequence to another length than ``sched`` (the op's arrays
    have ``sched.seq_len`` rows), and for "int8" (int8 P V: the step's s32 accumulator beside
    O's does not fit three warpgroups' registers)."""
    if (self.fp8_three_warpgroups is False or (sched.block_q, sched.block_kv) != (128, 128)
        or QUANTIZED_RECIPES[precision].p_dtype == "int8"):
      return None
    auto = self.fp8_three_warpgroups == "auto"
    if auto and (self.interpret or precision not in THREE_WARPGROUP_PRECISIONS
                 or sched.has_masked_keys):
      return None
    rows192 = _same_length_schedule(sched, 192, 128)
    if rows192 is None or (auto and rows192.has_masked_keys):
      return None
    return rows192

  def schedule_192_keys(self, sched, head_dim: int, key_valid=None) -> BlockSchedule | None:
    """The 128 x 192 schedule the forward runs instead of ``sched`` with ``forward_192_keys``
    (the default), or None where 192-key steps do not apply: ``forward_192_keys`` False,
    ``sched`` not of 128 x 128 blocks, head_dim not 128, gathered steps asked for, a
    persistent forward, run-time key validity, or a 192-key schedule of another length or
    with padded keys or partial pairs (its shared memory has no room for their masks:
    :class:`MosaicConfig`, ``block_kv``)."""
    if (not self.forward_192_keys or (sched.block_q, sched.block_kv) != (128, 128)
        or self.key_steps == "gathered" or head_dim != 128 or key_valid is not None
        or self.use_persistent(sched, head_dim)):
      return None
    wide = _same_length_schedule(sched, 128, 192)
    if wide is None or wide.has_masked_keys or wide.has_partial_pairs:
      return None
    return wide

  def forward(self, q, k, v, sched, scale, key_valid=None, with_o_low=False,
              raw_padded_kv=False):
    config_lib.check_dtype(q.dtype)
    wide = self.schedule_192_keys(sched, q.shape[-1], key_valid)
    if wide is not None:
      cfg = dataclasses.replace(self.config(128, 192, q.shape[-1]), key_steps="blocks")
      # No padded key, hence no padded query: no lse to set to +inf.
      return forward(q, k, v, wide, scale, cfg, with_o_low=with_o_low)
    cfg = self.config(sched.block_q, sched.block_kv, q.shape[-1])
    if not cfg.persistent and self.use_persistent(sched, q.shape[-1]):
      cfg = dataclasses.replace(cfg, persistent=True, masked_steps_apart=False,
                                max_concurrent_steps=(
          config_lib.default_stages(cfg.block_q, cfg.block_kv, q.shape[-1], q.dtype.itemsize,
                                    q_buffers=2)))
    o, lse, *o_low = forward(q, k, v, sched, scale, cfg, key_valid, with_o_low, raw_padded_kv)
    if sched.has_invalid_queries:
      # Convention shared with the other backends: invalid (padded) query rows get lse = +inf.
      lse = jnp.where(jnp.asarray(sched.query_valid)[None, None, :], lse, jnp.inf)
    return (o, lse, *o_low)

  def backward(self, q, k, v, o, lse, do, sched, scale, key_valid=None, dlse=None):
    cfg = self.config(sched.block_q, sched.block_kv, q.shape[-1])
    return backward(q, k, v, o, lse, do, sched, scale, cfg, key_valid, dlse)

  def takes_grouped_kv(self, sched, head_dim: int) -> bool:
    """Grouped k and v go to the kernels as they are where the fused backward runs (it adds
    the group's dK and dV in float32); the split backward takes them repeated."""
    cfg = self.config(sched.block_q, sched.block_kv, head_dim)
    try:
      return use_fused_backward(head_dim, transposed_schedule(sched).block_kv, cfg)
    except ValueError:
      return False

  def check_quantized(self, spec, head_dim, dtype, block_q, block_kv, precision):
    """The 8-bit forward's limits beyond :meth:`check`'s: 128 x 128 blocks."""
    if precision not in QUANTIZED_RECIPES:
      raise ValueError(f"precision must be one of {tuple(QUANTIZED_RECIPES)} for the 8-bit "
                       f"forward, got {precision!r}")
    if (block_q, block_kv) != (128, 128):
      raise ValueError(f"precision={precision!r} runs 128 x 128 blocks, got block_q={block_q}, "
                       f"block_kv={block_kv} (leave them None for the default)")

  def forward_quantized(self, q, k, v, sched, scale, key_valid=None, *, precision):
    """(o, lse) of the 8-bit forward (:func:`pallas_kernels.mosaic.fp8.fp8_forward`) with the
    recipe of ``precision`` (:data:`QUANTIZED_RECIPES`); inference only."""
    # Imported here: the 8-bit kernels and their quantization passes (Pallas Triton) are not
    # needed by a bf16 call, whose first trace would otherwise import them.
    from pallas_kernels.mosaic import fp8 as fp8_lib
    recipe = QUANTIZED_RECIPES[precision]
    rows192 = self.schedule_192_rows(sched, precision)
    gather = self.fp8_gathered_steps and (recipe.p_dtype != "e4m3" or self.fp8_gathered_e4m3_pv)
    config = fp8_lib.default_config(q.shape[-1], recipe, interpret=self.interpret,
                                    auto_barriers=self.auto_barriers,
                                    overlap_exp=self.overlap_exp,
                                    p_registers=self.fp8_p_registers,
                                    masked_steps_apart=self.apart(recipe.p_dtype == "int8"),
                                    exp2_fma_columns=self.exp2_fma_columns,
                                    gather=gather,
                                    biased_scores=self.fp8_biased_scores,
                                    block_q=192 if rows192 is not None else 128)
    return fp8_lib.fp8_forward(q, k, v, sched if rows192 is None else rows192, scale, config,
                               key_valid, recipe)


BACKEND = MosaicBackend()
