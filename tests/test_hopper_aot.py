"""benchmarks.tools.hopper_aot: the Hopper kernels compiled for the GPU on a machine without one.
The ptxas report parser always runs; the compile needs jaxlib's CUDA plugin (no GPU)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from benchmarks.tools import hopper_aot

PTXAS_OUTPUT = """\
ptxas info    : (C7519) warpgroup.arrive is injected in around line 658 by compiler to allow use of registers in GMMA in function 'kernel_mosaic_gpu_kernel'
ptxas warning : Registers are spilled to local memory in function 'kernel_mosaic_gpu_kernel', 160 bytes spill stores, 192 bytes spill loads
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'kernel_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for kernel_mosaic_gpu_kernel
    152 bytes stack frame, 160 bytes spill stores, 192 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 152 bytes cumulative stack size, 1 bytes smem
ptxas info    : Compile time = 186.751 ms
"""


def test_parse_ptxas_reads_registers_spills_time_and_warnings():
  r = hopper_aot.parse_ptxas(PTXAS_OUTPUT)
  assert (r["registers"], r["spill_stores"], r["spill_loads"], r["stack"]) == (168, 160, 192, 152)
  assert r["ptxas_ms"] == pytest.approx(186.751)
  assert len(r["warnings"]) == 2
  assert "C7519" in r["warnings"][0] and "spilled" in r["warnings"][1]


def test_parse_ptxas_of_a_clean_kernel():
  text = PTXAS_OUTPUT.splitlines()
  clean = "\n".join(ln for ln in text if "C7519" not in ln and "warning" not in ln)
  clean = clean.replace("152 bytes stack frame, 160 bytes spill stores, 192 bytes spill loads",
                        "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads")
  r = hopper_aot.parse_ptxas(clean)
  assert (r["spill_stores"], r["spill_loads"], r["warnings"]) == (0, 0, [])


def test_strip_values_drops_options_and_their_values():
  argv = ["--shape", "paper", "--out", "d", "--keep=k", "--programs", "fwd"]
  assert hopper_aot._strip_values(argv, ("--out", "--keep")) == ["--shape", "paper",
                                                                "--programs", "fwd"]


def test_config_fields_are_checked_mosaic_config_fields():
  assert hopper_aot.parse_config_fields(["bwd_step_descriptors=True", "key_steps=blocks"]) == (
      dict(bwd_step_descriptors=True, key_steps="blocks"))
  # The backend's own choices too.
  assert hopper_aot.parse_config_fields(["forward_192_keys=True", "overlap_exp=True"]) == (
      dict(forward_192_keys=True, overlap_exp=True))
  for bad in ("no_such_field=1", "bwd_step_descriptors"):
    with pytest.raises(SystemExit, match="MosaicConfig field"):
      hopper_aot.parse_config_fields([bad])


@pytest.mark.skipif(not hopper_aot.cuda_plugin_available(), reason="needs jaxlib's CUDA plugin")
def test_hopper_kernels_compile_for_the_gpu_without_one(tmp_path):
  rows = hopper_aot.main(["--shape", "quick_bf16", "--out", str(tmp_path)])
  by_program = {r["program"]: r for r in rows}
  assert set(by_program) == {"fwd", "grad"}
  # The forward is one kernel; the gradient a forward and a fused (or two split) backward.
  assert len(by_program["fwd"]["kernels"]) == 1
  assert len(by_program["grad"]["kernels"]) in (2, 3)
  for r in rows:
    assert r["compile_s"] > 0
    for k in r["kernels"]:
      # Three warpgroups of 128 threads share 64K registers: ptxas caps the launch at 168.
      assert 0 < k["registers"] <= 168 and k["ptx_bytes"] > 10_000
  fwd = by_program["fwd"]["kernels"][0]
  assert (fwd["spill_stores"], fwd["spill_loads"]) == (0, 0), fwd["warnings"]
  saved = json.load(open(os.path.join(tmp_path, "hopper_aot_quick_bf16.json")))
  assert saved["results"] == rows and saved["meta"]["target"].startswith("compute capability")


@pytest.mark.skipif(not hopper_aot.cuda_plugin_available(), reason="needs jaxlib's CUDA plugin")
def test_fused_backward_with_step_descriptors_spills_nothing():
  """MosaicConfig.bwd_step_descriptors: the fused backward's descriptors stay in uniform
  registers (hoisted before the loop, ptxas spills them: docs/PERFORMANCE.md)."""
  rows = hopper_aot.main(["--shape", "quick_bf16", "--programs", "grad",
                          "--set", "bwd_step_descriptors=True", "--set", "auto_barriers=False"])
  fwd, bwd = rows[0]["kernels"]
  assert (bwd["spill_stores"], bwd["spill_loads"]) == (0, 0), bwd["warnings"]
  assert not bwd["warnings"]


SASS = """\
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   WARPGROUP.ARRIVE ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   MUFU.EX2 R2, R3 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   MUFU.EX2 R4, R5 ;
        /*0070*/              @!P0 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
"""


def test_sass_step_reading():
  body = hopper_aot.main_loop(SASS)
  assert body[0] == "WARPGROUP.ARRIVE" and body[-1].startswith("BRA")
  assert hopper_aot.opcode_counts(body)["MUFU.EX2"] == 2
  # One exponential before the wait for every wgmma group (0x0), one after.
  assert hopper_aot.exponentials_before_full_wait(body) == (1, 2)
  assert hopper_aot.main_loop("        /*0000*/    EXIT ;") == []


@pytest.mark.skipif(not (hopper_aot.cuda_plugin_available() and shutil.which("nvdisasm")),
                    reason="needs jaxlib's CUDA plugin and nvdisasm")
def test_overlap_exp_keeps_the_exponentials_before_the_wait_for_p_v():
  """MosaicConfig.overlap_exp: every exponential of the forward's step comes before its wait
  for the previous P V (without the option ptxas hoists that wait above them)."""
  rows = hopper_aot.main(["--shape", "quick_bf16", "--programs", "fwd",
                          "--set", "overlap_exp=True", "--set", "auto_barriers=False"])
  before, total = rows[0]["kernels"][0]["exp_before_full_wait"]
  assert total >= 64 and before == total


# The 8-bit quantization's programs below: bf16 q, k, v [1, 8192, 8, 128] whose last 192
# positions are padding.
_QUANT_SEQ, _QUANT_HEADS = 8192, 8


def _compiled_quantization(quantize) -> str:
  """The ENTRY computation of ``quantize(q, k, v, valid)`` (valid: bool [1, seq]) compiled for
  a Hopper GPU without one, traced and lowered under hopper_aot.hopper_mesh()."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  sharding = jax.sharding.SingleDeviceSharding(hopper_aot.hopper_device())
  valid = np.ones((1, _QUANT_SEQ), bool)
  valid[0, -192:] = False
  x = jax.ShapeDtypeStruct((1, _QUANT_SEQ, _QUANT_HEADS, 128), jnp.bfloat16, sharding=sharding)
  with jax.sharding.use_abstract_mesh(hopper_aot.hopper_mesh()):
    lowered = jax.jit(lambda q, k, v: quantize(q, k, v, valid)).trace(x, x, x).lower()
  text = lowered.compile().as_text()
  return text[text.index("\nENTRY"):]


def _input_sized_f32(entry: str) -> list[str]:
  """The float32 array shapes in ``entry`` with as many elements as one input."""
  import re
  import numpy as np
  return [s for s in re.findall(r"f32\[([0-9,]+)\]", entry)
          if np.prod([int(d) for d in s.split(",")]) == _QUANT_SEQ * _QUANT_HEADS * 128]


@pytest.mark.skipif(not hopper_aot.cuda_plugin_available(), reason="needs jaxlib's CUDA plugin")
def test_8bit_quantization_reads_padded_inputs_in_place():
  """fp8.quantize on inputs with padded positions, compiled for a Hopper GPU: every pass reads
  q, k and v where they are (the validity select fused into each); no float32 copy of an
  input, which XLA laid out with the sequence minor when the select's layout was left free
  (a transposed float32 copy of each input, Wan-14B 720p's 8-bit glue 9 ms against the
  paper shape's 5 on an H100, docs/PERFORMANCE.md)."""
  from pallas_kernels.mosaic import fp8
  from pallas_kernels.mosaic.backend import QUANTIZED_RECIPES
  for precision in ("qk_int8_pv_fp8", "fp8"):
    recipe = QUANTIZED_RECIPES[precision]
    entry = _compiled_quantization(
        lambda q, k, v, valid: fp8.quantize(q, k, v, valid, valid, recipe))
    full = _input_sized_f32(entry)
    assert not full, (precision, full)


@pytest.mark.skipif(not hopper_aot.cuda_plugin_available(), reason="needs jaxlib's CUDA plugin")
def test_8bit_pallas_quantization_compiles_for_hopper():
  """The Pallas quantization passes (fp8_quantize) compile for a Hopper GPU without one (the
  abstract mesh of hopper_aot.hopper_mesh names the GPU to Triton's lowering): per recipe its
  statistics and quantizing kernels (Q's statistics only where the channels are balanced),
  and no float32 array of an input's size."""
  import re
  from pallas_kernels.mosaic import fp8
  from pallas_kernels.mosaic.backend import QUANTIZED_RECIPES
  for precision, kernels in (("qk_int8", 4), ("fp8", 3)):
    recipe = QUANTIZED_RECIPES[precision]

    def quantize(q, k, v, valid):
      assert fp8.default_quantizer() == "pallas"
      return fp8.quantize_with("pallas", q, k, v, valid, valid, recipe, 0.1)
    entry = _compiled_quantization(quantize)
    assert len(re.findall(r"custom-call\(", entry)) == kernels, precision
    full = _input_sized_f32(entry)
    assert not full, (precision, full)
