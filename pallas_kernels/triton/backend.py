"""The ``pallas_triton`` backend of :mod:`jsta.ops` (any NVIDIA GPU; interpret mode on the CPU):
the only module that imports the portable kernels."""

from __future__ import annotations

import dataclasses

from pallas_kernels.triton.backward import sta_backward
from pallas_kernels.triton.config import KernelConfig, check_config, default_blocks
from pallas_kernels.triton.forward import sta_forward


@dataclasses.dataclass(frozen=True)
class TritonBackend:
  """The "pallas_triton" backend of :mod:`jsta.ops` (any NVIDIA GPU; interpret mode on CPU)."""

  name: str = "pallas_triton"
  config: KernelConfig = KernelConfig()
  interpret: bool | None = None   # None: interpret iff JAX's default backend is the CPU

  def default_blocks(self, spec, head_dim, dtype):
    return default_blocks(spec, head_dim, dtype)

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    check_config(spec, head_dim, dtype, block_q, block_kv, self.config)

  def forward(self, q, k, v, sched, scale, key_valid=None, with_o_low=False):
    return sta_forward(q, k, v, sched, scale, config=self.config, interpret=self.interpret,
                       key_valid=key_valid, with_o_low=with_o_low)

  def backward(self, q, k, v, o, lse, do, sched, scale, key_valid=None, dlse=None):
    return sta_backward(q, k, v, o, lse, do, sched, scale, config=self.config,
                        interpret=self.interpret, key_valid=key_valid, dlse=dlse)


BACKEND = TritonBackend()
