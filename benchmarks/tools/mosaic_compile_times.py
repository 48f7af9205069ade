"""Where the first call's compile time goes, per Mosaic GPU kernel. Lowers jit(fwd) and
jit(grad) of the op for CUDA (as benchmarks.compile_bench does), then on a Hopper GPU compiles
each distinct kernel module alone, as XLA's compilation of the program does (jaxlib's
``MosaicGpuCompile``: Mosaic GPU's MLIR passes, LLVM NVPTX to PTX, ptxas to a cubin, and the
host launch code with LLVM -O3), timed; then ptxas alone on the kernel's PTX (dumped with
``MOSAIC_GPU_DUMP_TO``), timed, with its register and spill report. Compile minus ptxas is
MLIR and LLVM.

    python -m benchmarks.tools.mosaic_compile_times [--shape paper] [--out DIR]

Without a GPU (or without jaxlib's CUDA plugin) only the lowering is reported: per program the
trace and lower seconds, per kernel its MLIR bytecode size and line count (the kernels are
shape-generic: their size barely depends on the shape).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import core as mgpu_core

import jsta
from benchmarks import shapes as shapes_lib
from pallas_kernels.mosaic.backend import MosaicBackend

_BASENAME = re.compile(r'mosaic_gpu\.dump_basename = "[^"]*"')


def lowered_kernels(fn, *args) -> tuple[list[dict], dict]:
  """(kernels, times) of jit(fn)'s CUDA lowering. kernels: one dict per Mosaic GPU module in
  lowering order: ``module`` (the bytes the custom call carries, what the GPU compile reads),
  ``bytes``, ``lines`` (MLIR text lines), ``fingerprint`` (sha256 prefix without source
  locations and dump name, as benchmarks.tools.mosaic_fingerprint). times: trace, lower (s)."""
  found = []
  original = mgpu_core._run_serde_pass

  def record(module, *a, **k):
    out = original(module, *a, **k)
    if k.get("serialize"):
      buf = io.BytesIO()
      # As jax.experimental.mosaic.gpu.core's lowering rule writes it into the custom call.
      out.operation.write_bytecode(buf, desired_version=0)
      text = _BASENAME.sub("", out.operation.get_asm(enable_debug_info=False))
      found.append(dict(module=buf.getvalue(), bytes=len(buf.getvalue()),
                        lines=text.count("\n"),
                        fingerprint=hashlib.sha256(text.encode()).hexdigest()[:12]))
    return out

  mgpu_core._run_serde_pass = record
  try:
    t = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    t1 = time.perf_counter()
    traced.lower(lowering_platforms=("cuda",))
    t2 = time.perf_counter()
  finally:
    mgpu_core._run_serde_pass = original
  return found, dict(trace=round(t1 - t, 4), lower=round(t2 - t1, 4))


def _plugin_library():
  """jaxlib's CUDA plugin (it exports MosaicGpuCompile), or None."""
  for name in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      plugin = __import__(name, fromlist=["_get_library_path"])
      lib = ctypes.CDLL(plugin._get_library_path())
    except (ImportError, OSError, AttributeError):
      continue
    if hasattr(lib, "MosaicGpuCompile") and hasattr(lib, "MosaicGpuUnload"):
      return lib
  return None


def _make_context_current() -> None:
  """The kernel compile ends by loading the cubin into the calling thread's CUDA context:
  make device 0's primary context (the one JAX uses) current on this thread."""
  cuda = ctypes.CDLL("libcuda.so.1")
  ctx = ctypes.c_void_p()
  cuda.cuInit(0)
  if cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), 0) != 0 or cuda.cuCtxSetCurrent(ctx) != 0:
    raise RuntimeError("could not make the primary CUDA context current")


def compile_seconds(lib, module: bytes) -> tuple[float, bool]:
  """(seconds, ok) of one MosaicGpuCompile of ``module``; ok False if it returned no kernel."""
  compile_fn = lib.MosaicGpuCompile
  compile_fn.argtypes = [ctypes.c_char_p, ctypes.c_int]
  compile_fn.restype = ctypes.POINTER(ctypes.c_void_p)
  unload = lib.MosaicGpuUnload
  unload.argtypes = [compile_fn.restype]
  unload.restype = None
  t = time.perf_counter()
  compiled = compile_fn(module, len(module))
  seconds = time.perf_counter() - t
  if compiled:
    unload(compiled)
  return seconds, bool(compiled)


def ptxas_path() -> str | None:
  """The ptxas of JAX's CUDA (the pip wheels' or /usr/local/cuda), else one on PATH."""
  from jax._src import lib as jax_lib
  cands = [os.path.join(p, "bin", "ptxas") for p in (getattr(jax_lib, "cuda_path", None),
                                                     "/usr/local/cuda") if p]
  cands.append(shutil.which("ptxas"))
  return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def ptxas_seconds(lib, module: bytes, ptxas: str, arch: str) -> dict:
  """Compiles ``module`` again with its PTX dumped, then times ptxas alone on that PTX (line
  info on, as Mosaic GPU compiles). {ptxas_s, ptx_bytes, report (ptxas -v lines)}."""
  with tempfile.TemporaryDirectory(prefix="mosaic_ptx_") as tmp:
    os.environ["MOSAIC_GPU_DUMP_TO"] = tmp
    try:
      compile_seconds(lib, module)
    finally:
      del os.environ["MOSAIC_GPU_DUMP_TO"]
    ptx = sorted(glob.glob(os.path.join(tmp, "*.ptx")))
    if not ptx:
      return dict(error="no PTX dumped")
    cmd = [ptxas, f"-arch={arch}", "-lineinfo", "-v", "-o", os.path.join(tmp, "k.cubin"), ptx[-1]]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    report = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines()
              if "registers" in ln or "spill" in ln]
    return dict(ptxas_s=round(seconds, 3), ptx_bytes=os.path.getsize(ptx[-1]),
                report=report, ptxas_rc=proc.returncode)


def programs(shape, backward_variant: str):
  """(name, fn, args): the op's forward and its gradient at ``shape``, as compile_bench."""
  spec = shape.spec()
  impl = MosaicBackend(device_check=False, backward_variant=backward_variant)
  x = jax.ShapeDtypeStruct(shape.qkv_shape(), jnp.dtype(shape.dtype))
  op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=impl)
  loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32))
  yield "fwd", op, (x, x, x)
  yield "grad", jax.grad(loss, argnums=(0, 1, 2)), (x, x, x)


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  p.add_argument("--backward-variant", default="auto", choices=("auto", "fused", "split"))
  p.add_argument("--no-ptxas", action="store_true", help="skip the ptxas-alone timing")
  p.add_argument("--out", default=None, help="write DIR/mosaic_compile_times.json")
  a = p.parse_args(argv)
  shape = shapes_lib.get(a.shape)
  dev = jax.devices()[0]
  cc = str(getattr(dev, "compute_capability", "") or "")
  lib = _plugin_library() if dev.platform == "gpu" and cc.startswith("9.") else None
  if lib is not None:
    _make_context_current()
  ptxas = None if a.no_ptxas or lib is None else ptxas_path()
  rows, seen = [], set()
  for name, fn, args in programs(shape, a.backward_variant):
    kernels, times = lowered_kernels(fn, *args)
    print(f"{name}: trace {times['trace']:.3f} s, lower {times['lower']:.3f} s, "
          f"{len(kernels)} Mosaic GPU kernels", flush=True)
    for i, k in enumerate(kernels):
      row = dict(program=name, kernel=i, bytes=k["bytes"], lines=k["lines"],
                 fingerprint=k["fingerprint"], **times)
      # The same kernel in both programs (the forward) is compiled once here.
      if lib is not None and k["fingerprint"] not in seen:
        seen.add(k["fingerprint"])
        seconds, ok = compile_seconds(lib, k["module"])
        row |= dict(compile_s=round(seconds, 3), compile_ok=ok)
        if ptxas:
          row |= ptxas_seconds(lib, k["module"], ptxas, f"sm_{cc.replace('.', '')}a")
      rows.append(row)
      print("  " + json.dumps(row), flush=True)
  if lib is None:
    print("no compute capability 9.x GPU with jaxlib's CUDA plugin: compile times skipped")
  if a.out:
    from benchmarks.common import run_meta
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "mosaic_compile_times.json"), "w") as f:
      json.dump(dict(meta=run_meta(shape, backward_variant=a.backward_variant), results=rows),
                f, indent=1)
  return rows


if __name__ == "__main__":
  main()
