"""Hopper (sm_90) block-sparse STA kernels in Pallas Mosaic GPU: the product's fast path.

  config          MosaicConfig, supported inputs, default blocks and pipeline depths
  common          pieces shared by the kernels (launch grid, TMA streams, epilogues)
  forward         the forward kernel (FA3-style intra-warpgroup overlap)
  forward_fp8     the 8-bit forward kernel (int8/e4m3 Q K^T, bf16/e4m3 P V; inference)
  fp8             its quantization, float32 emulation and entry fp8_forward
  fp8_recipe      the quantization recipes (QuantRecipe), without the kernels
  backward_split  the dQ and dK/dV kernels (bitwise deterministic)
  backward_fused  the one-kernel backward (dQ by TMA reduce-add)
  backend         the "pallas_mosaic" backend (the op's way to the kernels), plugged into
                  jsta.backends by an entry point in pyproject.toml
  autotune        timing candidate configs on the GPU
"""
