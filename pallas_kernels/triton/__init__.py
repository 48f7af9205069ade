"""Portable block-sparse STA kernels: Pallas ``pallas_call`` lowered through Triton on NVIDIA
GPUs, interpreted on the CPU.

  config    KernelConfig (launch knobs), supported inputs, default blocks
  common    pieces shared by the kernels (launch grid, schedule operands, masks)
  forward   the forward kernel (o, lse)
  backward  the dq and dk/dv kernels
  backend   the "pallas_triton" backend (the only importer of the kernels), plugged into
            jsta.backends by an entry point in pyproject.toml
"""
