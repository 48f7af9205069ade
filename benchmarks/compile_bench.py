"""First-call compile time of the op's forward and gradient, each in a fresh process, without
and with the persistent compilation cache (jsta.enable_compilation_cache).

    python -m benchmarks.compile_bench --out out                     # paper shape, pallas_mosaic
    python -m benchmarks.compile_bench --shape quick --impl xla      # CPU, seconds
    python -m benchmarks.compile_bench --programs fwd --set overlap_exp=True \
        --tag compile_ox                                             # a kernel option

Programs (``--programs``): ``fwd`` = jit(op), ``grad`` = jit(grad of sum(op) in float32 w.r.t.
q, k, v). Runs (``--runs``), each program in its own fresh ``python -m benchmarks.compile_bench
--worker`` process, in this order:

  nocache  no persistent cache: a user's first call
  cold     an empty cache directory: compiles and writes the entries
  warm     the same directory in a new process: what a later process of the user pays

Phases of a first call (JAX's AOT API), in seconds: ``trace`` (jit(f).trace: Python tracing of
the op and of the kernel bodies), ``lower`` (.lower(): StableHLO, with each Mosaic GPU kernel
lowered to its MLIR module), ``compile`` (.compile(): XLA, and for pallas_mosaic every Mosaic
GPU kernel's MLIR -> LLVM -> PTX -> ptxas cubin, which JAX 0.11 runs when XLA compiles the
program), ``execute`` (the first call until its outputs are ready: loading the kernels onto
the GPU included) and ``execute2`` (a second call, for comparison). ``first_call`` is the sum
of the first four; ``process`` is the worker's wall time from start to exit (imports, backend start).
Cache counts over the program's compilation (jax.monitoring events): ``requests`` (compilations
that asked the cache), ``hits``, ``misses`` (requests - hits) and ``writes``. The warm run of a
program should show misses 0.

Writes ``--out``/``TAG.json`` (meta: device, jax version, date, commit, shape) and prints a
table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_START = time.perf_counter()

PROGRAMS = ("fwd", "grad")
RUNS = ("nocache", "cold", "warm")
IMPLS = ("pallas_mosaic", "pallas_triton", "xla", "auto")
PHASES = ("trace", "lower", "compile", "execute", "execute2")
CACHE_EVENTS = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
                "/jax/compilation_cache/cache_hits": "hits",
                # JAX records this event when it writes an entry (after a miss).
                "/jax/compilation_cache/cache_misses": "writes"}


class CacheEvents:
  """Counts JAX's compilation cache events (jax.monitoring) from its creation on."""

  def __init__(self):
    import jax
    self.counts = dict.fromkeys(CACHE_EVENTS.values(), 0)
    jax.monitoring.register_event_listener(self._on_event)

  def _on_event(self, event, **_):
    if event in CACHE_EVENTS:
      self.counts[CACHE_EVENTS[event]] += 1

  def snapshot(self) -> dict:
    return dict(self.counts)

  @staticmethod
  def since(before: dict, after: dict) -> dict:
    """{requests, hits, misses, writes} between two snapshots."""
    d = {k: after[k] - before[k] for k in after}
    d["misses"] = d["requests"] - d["hits"]
    return d


def mosaic_kernel_count(stablehlo_text: str) -> int:
  """How many Mosaic GPU kernel calls a lowered program's StableHLO text holds."""
  return stablehlo_text.count("custom_call @mosaic_gpu_v2(")


def _implementation(name: str, backward_variant: str | None, fields=None):
  """What ``implementation=`` gets: the name, or for pallas_mosaic with a backward variant
  or other MosaicBackend ``fields`` ({field: value}) the backend object that carries them."""
  if name == "pallas_mosaic" and (backward_variant or fields):
    from pallas_kernels.mosaic.backend import MosaicBackend
    variant = dict(backward_variant=backward_variant) if backward_variant else {}
    return MosaicBackend(**variant, **(fields or {}))
  return name


def _backend_fields(items) -> dict:
  """{MosaicBackend field: value} of ``--set FIELD=VALUE`` items."""
  if not items:
    return {}
  from benchmarks.common import parse_set_fields
  from pallas_kernels.mosaic.backend import MosaicBackend
  return parse_set_fields(items, MosaicBackend)


def measure(shape_name: str, impl: str, program: str, backward_variant: str | None = None,
            cache_dir: str | None = None, sets=()) -> dict:
  """One first call of ``program`` ("fwd" or "grad") in this process, by phase (seconds),
  with the cache counts of its compilation. ``cache_dir``: the persistent cache, or None;
  ``sets``: ``FIELD=VALUE`` items, MosaicBackend fields for pallas_mosaic (its options)."""
  if program not in PROGRAMS:
    raise ValueError(f"program must be one of {PROGRAMS}, got {program!r}")
  import jax
  import jax.numpy as jnp

  import jsta
  from benchmarks import shapes
  from benchmarks.common import random_inputs

  events = CacheEvents()
  if cache_dir is not None:
    jsta.enable_compilation_cache(cache_dir)
  shape = shapes.get(shape_name)
  spec = shape.spec()
  t = time.perf_counter()
  jax.devices()                              # backend start, kept out of the phases
  q, k, v, _ = jax.block_until_ready(random_inputs(shape))
  setup = time.perf_counter() - t

  def op(q, k, v):
    # The backend object is made here, in the trace, where a name's backend is imported too:
    # made before, it would take the kernels' modules' import out of the trace's time.
    implementation = _implementation(impl, backward_variant, _backend_fields(sets))
    return jsta.sliding_tile_attention(q, k, v, spec, implementation=implementation)

  def loss(q, k, v):
    return jnp.sum(op(q, k, v).astype(jnp.float32))

  fn = op if program == "fwd" else jax.grad(loss, argnums=(0, 1, 2))
  before = events.snapshot()
  times = {}
  t = time.perf_counter()
  traced = jax.jit(fn).trace(q, k, v)
  times["trace"] = time.perf_counter() - t
  t = time.perf_counter()
  lowered = traced.lower()
  times["lower"] = time.perf_counter() - t
  t = time.perf_counter()
  compiled = lowered.compile()
  times["compile"] = time.perf_counter() - t
  cache = CacheEvents.since(before, events.snapshot())
  t = time.perf_counter()
  jax.block_until_ready(compiled(q, k, v))
  times["execute"] = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(compiled(q, k, v))
  times["execute2"] = time.perf_counter() - t
  text = lowered.as_text()
  return dict(program=program, impl=impl, backward_variant=backward_variant,
              **{phase: round(sec, 4) for phase, sec in times.items()},
              first_call=round(sum(times[p] for p in ("trace", "lower", "compile", "execute")), 4),
              setup=round(setup, 4),
              mosaic_kernels=mosaic_kernel_count(text),
              custom_calls=text.count("stablehlo.custom_call"),
              stablehlo_bytes=len(text), cache=cache, cache_dir=cache_dir)


def _worker(a) -> None:
  import jax   # noqa: F401  (a fresh process pays its imports before the first call)
  import jsta  # noqa: F401
  imports = time.perf_counter() - _START
  row = measure(a.shape, a.impl, a.programs, a.backward_variant, a.cache_dir, a.set)
  print("ROW " + json.dumps(row | dict(imports=round(imports, 4))), flush=True)


def run_worker(shape: str, impl: str, program: str, backward_variant: str | None,
               cache_dir: str | None, timeout: float, sets=()) -> dict:
  """``measure`` in a fresh ``python -m benchmarks.compile_bench --worker`` process; adds the
  process's wall time (``process``). Raises RuntimeError with its output if it fails."""
  cmd = [sys.executable, "-m", "benchmarks.compile_bench", "--worker", "--shape", shape,
         "--impl", impl, "--programs", program]
  if backward_variant:
    cmd += ["--backward-variant", backward_variant]
  if cache_dir:
    cmd += ["--cache-dir", cache_dir]
  for item in sets:
    cmd += ["--set", item]
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ)
  env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  t = time.perf_counter()
  proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                        timeout=timeout)
  wall = time.perf_counter() - t
  rows = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
  if proc.returncode != 0 or not rows:
    raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n"
                       f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(rows[-1]) | dict(process=round(wall, 3))


def table(rows: list[dict]) -> str:
  """The rows as a fixed-width table: program, run, phases, first call, process, cache."""
  head = (f"{'program':8s} {'run':8s} " + " ".join(f"{p:>8s}" for p in PHASES)
          + f" {'first':>8s} {'process':>8s}  cache req/hit/miss/write")
  lines = [head]
  for r in rows:
    c = r["cache"]
    lines.append(f"{r['program']:8s} {r['run']:8s} "
                 + " ".join(f"{r[p]:8.3f}" for p in PHASES)
                 + f" {r['first_call']:8.3f} {r['process']:8.2f}  "
                 f"{c['requests']}/{c['hits']}/{c['misses']}/{c['writes']}")
  return "\n".join(lines)


def _split(text: str, known: tuple, what: str) -> list[str]:
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items or set(items) - set(known):
    raise SystemExit(f"error: --{what} takes a comma list of {', '.join(known)}, got {text!r}")
  return items


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  from benchmarks import shapes as shapes_lib
  p.add_argument("--shape", default="paper", choices=sorted(shapes_lib.SHAPES))
  p.add_argument("--impl", default="pallas_mosaic", choices=IMPLS)
  p.add_argument("--backward-variant", default=None, choices=("auto", "fused", "split"),
                 help="pallas_mosaic's backward (default: the backend's, auto)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a MosaicBackend field for pallas_mosaic, e.g. overlap_exp=True "
                      "(repeatable)")
  p.add_argument("--programs", default=",".join(PROGRAMS), help="comma list of fwd, grad")
  p.add_argument("--runs", default=",".join(RUNS), help="comma list of " + ", ".join(RUNS))
  p.add_argument("--cache-dir", default=None,
                 help="the persistent cache for cold/warm (default: a new temporary "
                      "directory, removed at the end); must be empty for a cold run")
  p.add_argument("--timeout", type=float, default=300, help="seconds per worker process")
  p.add_argument("--out", default="out")
  p.add_argument("--tag", default="compile_bench", help="file name: TAG.json")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.worker:
    _worker(a)
    return []
  programs = _split(a.programs, PROGRAMS, "programs")
  if a.set and a.impl != "pallas_mosaic":
    raise SystemExit(f"error: --set takes MosaicBackend fields: only with --impl "
                     f"pallas_mosaic, got --impl {a.impl}")
  fields = _backend_fields(a.set)
  runs = _split(a.runs, RUNS, "runs")
  if a.cache_dir and "cold" in runs and os.path.isdir(a.cache_dir) and os.listdir(a.cache_dir):
    raise SystemExit(f"error: --cache-dir {a.cache_dir} is not empty: a cold run needs an "
                     "empty one")

  # The record's meta describes this process's device: the workers see the same one.
  from benchmarks.common import Record, run_meta
  record = Record(os.path.join(a.out, f"{a.tag}.json"),
                  run_meta(shapes_lib.get(a.shape), impl=a.impl,
                           backward_variant=a.backward_variant, runs=runs,
                           programs=programs, backend_fields=fields))
  with tempfile.TemporaryDirectory(prefix="jsta_compile_cache_") as tmp:
    cache_dir = a.cache_dir or tmp
    for run in runs:
      for program in programs:
        # One cache directory per program: the warm run of grad must not find fwd's entries
        # (or the reverse) and report hits that the program alone would not get.
        pdir = os.path.join(cache_dir, program) if run != "nocache" else None
        row = run_worker(a.shape, a.impl, program, a.backward_variant, pdir, a.timeout,
                         a.set)
        record.add(dict(run=run) | row)
  print(table(record.rows))
  return record.rows


if __name__ == "__main__":
  main()
