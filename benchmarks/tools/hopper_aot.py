"""Compiles the op's programs for a Hopper GPU on a machine without one, and reports what the
GPU compile of each Mosaic GPU kernel produced: ptxas's registers, spill stores and loads, its
own compile time and its warnings (e.g. wgmma serialization), and XLA's compile seconds per
program (MLIR -> LLVM -> PTX -> ptxas for every kernel included, as on a GPU).

XLA compiles "deviceless" for a GPU described by a target configuration
(``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)``); the
Mosaic GPU kernels go through the same compile as on the GPU (jaxlib's CUDA plugin runs it while
XLA compiles). What it skips: XLA's autotuning (the op's programs hold no GEMM to tune), and
anything of the first execution. Needs jaxlib's CUDA plugin (``pip install "jax[cuda13]"``, no
GPU or driver needed); ``--keep DIR`` also keeps Mosaic GPU's dumps: PTX, ptxas output, and SASS
with control codes where ``nvdisasm`` is on PATH (pip ``nvidia-cuda-nvdisasm``).

    python -m benchmarks.tools.hopper_aot [--shape paper] [--programs fwd,grad] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# The GPU the kernels are compiled for: an H100 SXM / H200 (compute capability 9.0a, 132 SMs,
# 227 KiB of shared memory per block). The kernels' code does not depend on the rest.
HOPPER_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 4800000000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 150000000000
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 minor: 0 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 10 patch: 0 }
device_description_str: "NVIDIA H200"
"""

_DUMP_VARS = ("MOSAIC_GPU_DUMP_TO", "MOSAIC_GPU_DUMP_PTX", "MOSAIC_GPU_DUMP_PTXAS",
              "MOSAIC_GPU_DUMP_SASS")


def cuda_plugin_available() -> bool:
  """Whether jaxlib's CUDA plugin is installed (deviceless compilation needs it, not a GPU)."""
  import importlib.util
  try:
    return any(importlib.util.find_spec(f"jax_plugins.{n}") is not None
               for n in ("xla_cuda13", "xla_cuda12"))
  except ModuleNotFoundError:          # no jax_plugins namespace at all
    return False


def hopper_device():
  """A Hopper GPU device to compile for (an abstract device: nothing runs on it)."""
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(topology_name="", platform="cuda",
                                      target_config=HOPPER_TARGET, topology="1x1x1")
  return topo.devices[0]


def hopper_mesh():
  """A one-device abstract mesh on the target GPU: Pallas' Triton lowering (the 8-bit
  forward's quantization kernels) reads the GPU it compiles for from it where no GPU is
  present (trace and lower under ``jax.sharding.use_abstract_mesh``)."""
  import jax
  kind = re.search(r'device_description_str: "([^"]+)"', HOPPER_TARGET).group(1)
  device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="cuda")
  return jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)


def parse_ptxas(text: str) -> dict:
  """registers, spill_stores, spill_loads (bytes), stack (bytes), ptxas_ms and warnings (the
  lines ptxas marks as warnings, or as info with a message code such as C7519: wgmma
  serialization and injected warpgroup.arrive) from ptxas -v output of one kernel."""
  def number(pattern, default=None, cast=int):
    m = re.search(pattern, text)
    return cast(m.group(1)) if m else default
  return dict(
      registers=number(r"Used (\d+) registers"),
      spill_stores=number(r"(\d+) bytes spill stores", 0),
      spill_loads=number(r"(\d+) bytes spill loads", 0),
      stack=number(r"(\d+) bytes stack frame", 0),
      ptxas_ms=number(r"Compile time = ([\d.]+) ms", cast=float),
      warnings=[ln.strip() for ln in text.splitlines()
                if "warning" in ln or re.search(r"\(C\d+\)", ln)])


def compile_programs(programs) -> list[dict]:
  """Compiles each (name, fn, args) for :func:`hopper_device` (args: ShapeDtypeStructs without
  sharding), timed: one dict per program with name, lower_s and compile_s (in this process:
  the first program also pays one-time initialization). Mosaic GPU writes its dumps where the
  environment says (``MOSAIC_GPU_DUMP_TO``, read once per process)."""
  import jax
  sharding = jax.sharding.SingleDeviceSharding(hopper_device())
  rows = []
  for name, fn, args in programs:
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding) for a in args]
    t0 = time.perf_counter()
    with jax.sharding.use_abstract_mesh(hopper_mesh()):
      lowered = jax.jit(fn).trace(*args).lower()
    t1 = time.perf_counter()
    lowered.compile()
    t2 = time.perf_counter()
    rows.append(dict(program=name, lower_s=round(t1 - t0, 3), compile_s=round(t2 - t1, 3)))
  return rows


def kernel_reports(dump_dir: str) -> list[dict]:
  """One :func:`parse_ptxas` dict per kernel dumped in ``dump_dir`` (with its name and PTX
  size), in compile order; where SASS was dumped (nvdisasm on PATH) also the step's
  instruction count, opcodes and :func:`exponentials_before_full_wait`."""
  rows = []
  for path in sorted(glob.glob(os.path.join(dump_dir, "*.ptxas")), key=_kernel_number):
    with open(path) as f:
      row = dict(kernel=os.path.basename(path)[:-len(".ptxas")], **parse_ptxas(f.read()))
    ptx = path[:-len(".ptxas")] + ".ptx"
    row["ptx_bytes"] = os.path.getsize(ptx) if os.path.exists(ptx) else None
    sass = path[:-len(".ptxas")] + ".sass_ctrl"
    if os.path.exists(sass):
      with open(sass) as f:
        body = main_loop(f.read())
      # The step (the innermost loop with a wgmma): its size, opcodes and the wait for P V.
      row["step_instructions"] = len(body)
      row["step_opcodes"] = opcode_counts(body)
      row["exp_before_full_wait"] = list(exponentials_before_full_wait(body))
    rows.append(row)
  return rows


def sass_instructions(text: str) -> tuple[list[tuple[int, str]], dict[str, int]]:
  """(instructions, labels) of nvdisasm output (with or without control codes): instructions
  as (address, text without predicate guard), labels as name -> index into instructions."""
  instrs, labels = [], {}
  for ln in text.splitlines():
    m = re.match(r"^\s*(\.L_x_\d+):", ln)
    if m:
      labels[m.group(1)] = len(instrs)
      continue
    m = re.search(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$", ln)
    if m:
      instrs.append((int(m.group(1), 16), re.sub(r"^@!?U?P\w+\s+", "", m.group(2))))
  return instrs, labels


def main_loop(text: str) -> list[str]:
  """The instructions of a kernel's step: the smallest loop (a backward branch's span) that
  issues a wgmma (HGMMA, QGMMA or IGMMA) in nvdisasm output ``text``; [] if there is none.
  Branches after the kernel's last EXIT are not loops: ptxas places the retry of a barrier
  wait out of line there, branching back into the code it came from."""
  instrs, labels = sass_instructions(text)
  exits = [i for i, (_, ins) in enumerate(instrs) if ins.startswith("EXIT")]
  end = exits[-1] if exits else len(instrs)
  best = None
  for i, (_, ins) in enumerate(instrs):
    m = re.match(r"BRA\s+`?\(?(\.L_x_\d+)", ins)
    start = labels.get(m.group(1)) if m else None
    if start is None or start > i or i > end:
      continue
    body = [x for _, x in instrs[start:i + 1]]
    if any(re.match(r"[HQI]GMMA", x) for x in body) and (best is None or len(body) < len(best)):
      best = body
  return best or []


def opcode_counts(body: list[str]) -> dict[str, int]:
  """How many of each opcode (with its modifiers) ``body`` holds, most frequent first."""
  return dict(collections.Counter(ins.split()[0] for ins in body).most_common())


def exponentials_before_full_wait(body: list[str]) -> tuple[int, int]:
  """(exponentials before the step's first wait for all of its wgmma groups, exponentials in
  the step): where ptxas put ``wgmma.wait_group 0`` relative to the MUFU.EX2s."""
  total = sum(ins.startswith("MUFU.EX2") for ins in body)
  before = 0
  for ins in body:
    if ins.startswith("WARPGROUP.DEPBAR.LE") and re.search(r",\s*0x0\b", ins):
      break
    before += ins.startswith("MUFU.EX2")
  return before, total


def _kernel_number(path: str) -> int:
  m = re.search(r"_(\d+)\.ptxas$", path)
  return int(m.group(1)) if m else 0


def _worker(argv: list[str], dump_dir: str | None) -> list[dict]:
  """Runs this tool's ``--worker`` in a fresh process (with Mosaic GPU's dumps into
  ``dump_dir``, or none: writing them takes longer than the compile) and returns its rows."""
  env = {k: v for k, v in os.environ.items() if k not in _DUMP_VARS}
  if dump_dir:
    env.update(MOSAIC_GPU_DUMP_TO=dump_dir, MOSAIC_GPU_DUMP_PTX="1", MOSAIC_GPU_DUMP_PTXAS="1",
               MOSAIC_GPU_DUMP_SASS="1" if shutil.which("nvdisasm") else "0")
  proc = subprocess.run([sys.executable, "-m", "benchmarks.tools.hopper_aot", *argv, "--worker"],
                        env=env, capture_output=True, text=True)
  lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"hopper_aot worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1])["rows"]


def op_programs(spec, x_shape, dtype, backward_variant: str = "auto", programs=("fwd", "grad"),
                config_fields=None, precision=None):
  """(name, fn, args): the op's forward and its gradient (of sum(op) in float32 w.r.t. q, k, v)
  with the Hopper backend, as benchmarks.compile_bench times them on a GPU. ``config_fields``
  ({MosaicConfig field: value}) replace the defaults of the config the op's blocks get;
  ``precision`` is the op's (an 8-bit forward: "fwd" only)."""
  import jax
  import jax.numpy as jnp
  import jsta
  from pallas_kernels.mosaic.backend import MosaicBackend
  from pallas_kernels.mosaic.config import MosaicConfig
  impl = MosaicBackend(device_check=False, backward_variant=backward_variant)
  fields = config_fields or {}
  backend_names = {f.name for f in dataclasses.fields(MosaicBackend)}
  config_names = {f.name for f in dataclasses.fields(MosaicConfig)}
  # Fields the backend also has reach every config it makes (the 8-bit forward's too).
  impl = dataclasses.replace(impl, **{k: v for k, v in fields.items() if k in backend_names})
  # The backend's own choices (e.g. forward_192_keys) are not config fields.
  config_only = {k: v for k, v in fields.items() if k in config_names}
  if config_only:
    head_dim = x_shape[-1]
    bq, bk = impl.default_blocks(spec, head_dim, jnp.dtype(dtype))
    cfg = dataclasses.replace(impl.config(bq, bk, head_dim), **config_only)
    impl = dataclasses.replace(impl, configs=(((bq, bk, head_dim), cfg),))
  x = jax.ShapeDtypeStruct(x_shape, jnp.dtype(dtype))
  op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation=impl,
                                                   precision=precision)
  loss = lambda q, k, v: jnp.sum(op(q, k, v).astype(jnp.float32))
  fns = dict(fwd=op, grad=jax.grad(loss, argnums=(0, 1, 2)))
  return [(p, fns[p], (x, x, x)) for p in programs]


def parse_config_fields(items) -> dict:
  """{field: value} from ``--set FIELD=VALUE`` items, checked against the fields of
  MosaicConfig and of MosaicBackend (its own choices, e.g. forward_192_keys)."""
  from benchmarks.common import parse_set_fields
  from pallas_kernels.mosaic.backend import MosaicBackend
  from pallas_kernels.mosaic.config import MosaicConfig
  backend_only = ({f.name for f in dataclasses.fields(MosaicBackend)} - {"configs", "name"}
                  - {f.name for f in dataclasses.fields(MosaicConfig)})
  items = list(items or ())
  ours = [i for i in items if i.partition("=")[0] in backend_only]
  return {**parse_set_fields([i for i in items if i not in ours], MosaicConfig),
          **parse_set_fields(ours, MosaicBackend)}


def _strip_values(argv: list[str], names) -> list[str]:
  """argv without the options ``names`` and their values (``--x v`` or ``--x=v``)."""
  out, skip = [], False
  for x in argv:
    if skip:
      skip = False
    elif x in names:
      skip = True
    elif not x.startswith(tuple(n + "=" for n in names)):
      out.append(x)
  return out


def print_table(rows: list[dict]) -> None:
  print(f"{'program':<10} {'lower s':>8} {'compile s':>9}  kernel: registers, spill st/ld B, "
        f"ptxas ms, warnings[, step instructions, exponentials before the full wait]")
  for r in rows:
    ks = "; ".join(f"{k['kernel']}: {k['registers']}, {k['spill_stores']}/{k['spill_loads']}, "
                   f"{k['ptxas_ms']:.0f}, {len(k['warnings'])}"
                   + (f", {k['step_instructions']}, {k['exp_before_full_wait'][0]}/"
                      f"{k['exp_before_full_wait'][1]}" if "step_instructions" in k else "")
                   for k in r["kernels"])
    print(f"{r['program']:<10} {r['lower_s']:>8.2f} {r['compile_s']:>9.2f}  {ks}")


def main(argv=None) -> list[dict]:
  # The host's CPU runs everything; the CUDA plugin is only asked to compile (it would fail to
  # start as a backend without a GPU).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from benchmarks import shapes as shapes_lib
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  p.add_argument("--programs", default="fwd,grad", help="comma list of fwd, grad")
  p.add_argument("--backward-variant", default="auto", choices=("auto", "fused", "split"))
  p.add_argument("--head-dim", type=int, default=None, help="instead of the shape's")
  p.add_argument("--precision", default=None,
                 help="the op's precision= (an 8-bit forward, e.g. fp8: --programs fwd)")
  p.add_argument("--set", action="append", metavar="FIELD=VALUE",
                 help="a MosaicConfig field for the op's blocks, e.g. bwd_step_descriptors=True, "
                      "or a MosaicBackend one, e.g. forward_192_keys=True")
  p.add_argument("--keep", default=None, help="keep Mosaic GPU's dumps (PTX, ptxas, SASS) here")
  p.add_argument("--out", default=None, help="write DIR/TAG.json")
  p.add_argument("--tag", default=None, help="the file name (default: hopper_aot_<shape>)")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if not cuda_plugin_available():
    raise SystemExit('error: needs jaxlib\'s CUDA plugin (pip install "jax[cuda13]")')
  programs = tuple(a.programs.split(","))
  if unknown := set(programs) - {"fwd", "grad"}:
    raise SystemExit(f"error: unknown programs {sorted(unknown)}; known: fwd, grad")
  fields = parse_config_fields(a.set)
  shape = shapes_lib.get(a.shape)
  if a.head_dim:
    shape = dataclasses.replace(shape, head_dim=a.head_dim)
  if a.worker:
    rows = compile_programs(op_programs(shape.spec(), shape.qkv_shape(), shape.dtype,
                                        a.backward_variant, programs, fields, a.precision))
    print(json.dumps(dict(rows=rows)))
    return rows
  args = _strip_values(argv if argv is not None else sys.argv[1:], ("--out", "--keep", "--tag"))
  # Timed in one process, as a user's first calls; each program's kernels compiled again in a
  # process of their own with the dumps, read for the reports.
  rows = _worker(args, None)
  keep = a.keep or tempfile.mkdtemp(prefix="hopper_aot_")
  try:
    for row in rows:
      out = os.path.join(keep, row["program"])
      os.makedirs(out, exist_ok=True)
      _worker(_strip_values(args, ("--programs",)) + ["--programs", row["program"]], out)
      row["kernels"] = kernel_reports(out)
  finally:
    if not a.keep:
      shutil.rmtree(keep, ignore_errors=True)
  print_table(rows)
  if a.out:
    from benchmarks.common import run_meta
    os.makedirs(a.out, exist_ok=True)
    meta = run_meta(shape, backward_variant=a.backward_variant, config_fields=fields,
                    precision=a.precision,
                    target="compute capability 9.0a, deviceless", host_cpus=os.cpu_count())
    with open(os.path.join(a.out, f"{a.tag or 'hopper_aot_' + shape.name}.json"), "w") as f:
      json.dump(dict(meta=meta, results=rows), f, indent=1)
  return rows


if __name__ == "__main__":
  main()
