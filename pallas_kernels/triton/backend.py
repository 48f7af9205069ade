"""The ``pallas_triton`` backend of :mod:`jsta.ops` (any NVIDIA GPU; interpret mode on the CPU):
the only module that imports the portable kernels."""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton.backward import sta_backward
from pallas_kernels.triton.config import (KernelConfig, check_config, default_blocks,
                                          kernel_head_dim)
from pallas_kernels.triton.forward import sta_forward


@dataclasses.dataclass(frozen=True)
class TritonBackend:
  """The "pallas_triton" backend of :mod:`jsta.ops` (any NVIDIA GPU; interpret mode on CPU)."""

  name: str = "pallas_triton"
  config: KernelConfig = KernelConfig()
  interpret: bool | None = None   # None: interpret iff JAX's default backend is the CPU

  def default_blocks(self, spec, head_dim, dtype):
    return default_blocks(spec, head_dim, dtype)

  def kernel_head_dim(self, head_dim: int) -> int:
    """The kernels' head_dim for input of ``head_dim``: the power of two in [16, 256] that
    holds it (the op zero-pads q, k and v to it: 72 runs as 128, 8 as 16); larger ones as they
    are (``check`` rejects them)."""
    return kernel_head_dim(head_dim)

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    check_config(spec, head_dim, dtype, block_q, block_kv, self.config)

  def forward(self, q, k, v, sched, scale, key_valid=None, with_o_low=False):
    return sta_forward(q, k, v, sched, scale, config=self.config, interpret=self.interpret,
                       key_valid=key_valid, with_o_low=with_o_low)

  def backward(self, q, k, v, o, lse, do, sched, scale, key_valid=None, dlse=None):
    return sta_backward(q, k, v, o, lse, do, sched, scale, config=self.config,
                        interpret=self.interpret, key_valid=key_valid, dlse=dlse)


BACKEND = TritonBackend()
