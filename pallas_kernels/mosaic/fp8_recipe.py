"""The 8-bit forward's quantization recipes (:class:`QuantRecipe`, the kernel's default
:data:`KERNEL_RECIPE`, :data:`ALL_E4M3` and :data:`ALL_INT8`), apart from
:mod:`pallas_kernels.mosaic.fp8` so that naming them (the backend's precisions) does not
import the 8-bit kernels, their quantization passes and Pallas Triton: a bf16 call does not
need them."""

from __future__ import annotations

import dataclasses

from pallas_kernels.mosaic.config import WG_ROWS


@dataclasses.dataclass(frozen=True)
class QuantRecipe:
  """A quantization variant. The kernel implements q_block 1, 64 or 128 with k_block 128 and
  every choice of the others; :func:`pallas_kernels.mosaic.fp8.emulated_forward` implements
  all.

  qk_dtype: "int8" or "e4m3" for Q and K (Q K^T).
  q_block: query rows per Q scale (64, 128; 1 = one scale per token).
  k_block: key rows per K scale (64, 128; 1 = one scale per token).
  smooth_k: subtract the mean of the valid keys per (batch, kv head) before quantizing K.
  balance_channels: move each channel's magnitude between Q and K (q_c t_c, k_c / t_c, which
    leaves Q K^T unchanged) so that both have the same absmax per channel.
  v_scale: "channel" (one scale per (batch, kv head, channel)) or "head".
  p_dtype: "e4m3" (P V in FP8), "int8" (P V on s8 x s8 -> s32: P per row and key step, as
    round(127 exp2(s - the step's row max)), V per channel to 127 levels) or "bfloat16" (P
    and V in bf16 for P V; Q K^T still 8-bit).
  """

  q_block: int = 1
  k_block: int = 128
  smooth_k: bool = True
  v_scale: str = "channel"
  p_dtype: str = "bfloat16"
  qk_dtype: str = "int8"
  balance_channels: bool = True

  def __post_init__(self):
    if self.qk_dtype not in ("e4m3", "int8"):
      raise ValueError(f"qk_dtype must be 'e4m3' or 'int8', got {self.qk_dtype!r}")
    if self.v_scale not in ("channel", "head"):
      raise ValueError(f"v_scale must be 'channel' or 'head', got {self.v_scale!r}")
    if self.p_dtype not in ("e4m3", "int8", "bfloat16"):
      raise ValueError(f"p_dtype must be 'e4m3', 'int8' or 'bfloat16', got {self.p_dtype!r}")


KERNEL_RECIPE = QuantRecipe()
# e4m3's error is set by its 3 mantissa bits, not by the range: balancing does not help it.
ALL_E4M3 = QuantRecipe(q_block=WG_ROWS, p_dtype="e4m3", qk_dtype="e4m3", balance_channels=False)
# Every product on int8: the default's Q K^T, and P V with P quantized per row and key step and
# V per channel (the op's precision "int8": docs/PERFORMANCE.md).
ALL_INT8 = QuantRecipe(p_dtype="int8")
