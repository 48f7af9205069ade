"""jsta.enable_compilation_cache: a second process with the same cache directory compiles
nothing (every compilation is a cache hit), also when the cache is enabled after the process
already compiled something; bad arguments are refused by name. On a Hopper GPU the same for the
pallas_mosaic programs, whose Mosaic GPU kernels are compiled inside XLA's compilation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jsta

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles an unrelated program first (JAX decides at its first compilation whether the cache
# is used), then enables the cache and compiles the op's forward and gradient under jit.
SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp
import jsta
counts = {"requests": 0, "hits": 0, "writes": 0}
names = {"/jax/compilation_cache/compile_requests_use_cache": "requests",
         "/jax/compilation_cache/cache_hits": "hits",
         "/jax/compilation_cache/cache_misses": "writes"}
jax.monitoring.register_event_listener(
    lambda event, **_: event in names and counts.__setitem__(names[event], counts[names[event]] + 1))
jax.jit(lambda x: x * 3)(jnp.ones(3)).block_until_ready()
before = dict(counts)
jsta.enable_compilation_cache(sys.argv[1])
spec = jsta.STASpec((2, 4, 4), (1, 2, 2), (1, 1, 1))
x = jnp.ones((1, spec.seq_len, 1, 8), jnp.float32)
op = lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, implementation="xla")
jax.block_until_ready(jax.jit(op)(x, x, x))
jax.block_until_ready(jax.jit(jax.grad(lambda q, k, v: op(q, k, v).sum()))(x, x, x))
print("COUNTS " + json.dumps({k: counts[k] - before[k] for k in counts}))
"""


def _run(cache_dir) -> dict:
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir)], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [ln for ln in proc.stdout.splitlines() if ln.startswith("COUNTS ")][-1]
  return json.loads(line[len("COUNTS "):])


def test_a_second_process_compiles_nothing(tmp_path):
  cache = tmp_path / "cache"
  first = _run(cache)
  assert first["requests"] >= 2 and first["hits"] == 0
  assert first["writes"] == first["requests"]        # every program written, however fast
  assert os.listdir(cache)
  second = _run(cache)
  assert second == dict(requests=first["requests"], hits=first["requests"], writes=0)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(path=3), TypeError, "path must be a str or os.PathLike, got int"),
    (dict(path=""), ValueError, "path must name a directory"),
    (dict(path="x", min_compile_time_secs=-1), ValueError, "min_compile_time_secs"),
    (dict(path="x", min_compile_time_secs="1"), TypeError, "min_compile_time_secs"),
    (dict(path="x", min_compile_time_secs=True), TypeError, "min_compile_time_secs"),
    (dict(path="x", min_compile_time_secs=float("nan")), ValueError, "finite"),
])
def test_bad_arguments_are_refused_by_name(kwargs, exc, match, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(exc, match=match):
    jsta.enable_compilation_cache(**kwargs)
  assert not os.path.exists(tmp_path / "x")        # refused before touching anything


def test_paths_that_are_no_writable_directory_are_refused_up_front(tmp_path):
  """A file as the path raised FileExistsError; a directory that cannot be written was taken,
  and JAX then warned once per compiled program."""
  (tmp_path / "f").write_text("")
  with pytest.raises(ValueError, match="path must name a directory, got the file"):
    jsta.enable_compilation_cache(tmp_path / "f")
  with pytest.raises(ValueError, match="cannot create the cache directory .*Not a directory"):
    jsta.enable_compilation_cache(tmp_path / "f" / "sub")
  locked = tmp_path / "locked"
  locked.mkdir(mode=0o500)
  try:
    with open(locked / "probe", "w"):
      pass
  except OSError:                                  # not root: the bits are enforced
    with pytest.raises(ValueError, match="cannot write to the cache directory"):
      jsta.enable_compilation_cache(locked)
  if os.path.isdir("/sys/kernel"):                 # read-only for root too
    with pytest.raises(ValueError, match="cannot write to the cache directory"):
      jsta.enable_compilation_cache("/sys/kernel")
  with pytest.raises(ValueError, match="finite number >= 0"):
    jsta.enable_compilation_cache(tmp_path / "x", min_compile_time_secs=10 ** 400)


def test_numpy_numbers_are_numbers(tmp_path, monkeypatch):
  import jax
  from jsta import compilation_cache
  settings = {}
  # Not applied: the test process keeps its own cache settings.
  monkeypatch.setattr(jax.config, "update", lambda name, value: settings.update({name: value}))
  monkeypatch.setattr(compilation_cache, "_reset_jax_cache_state", lambda: None)
  for value in (np.int64(2), np.float32(0.5)):
    assert jsta.enable_compilation_cache(tmp_path / "c", min_compile_time_secs=value) == str(
        tmp_path / "c")
    got = settings["jax_persistent_cache_min_compile_time_secs"]
    assert type(got) is float and got == float(value)


@pytest.mark.gpu
@pytest.mark.hopper
def test_mosaic_kernels_come_from_the_cache(tmp_path):
  """The Mosaic GPU kernels are compiled (PTX to cubin) while XLA compiles the program, and
  the serialized executable holds their binaries: the warm process compiles nothing, and its
  compile phase is a small part of the cold one's."""
  from benchmarks import compile_bench
  rows = compile_bench.main(["--shape", "quick_bf16", "--impl", "pallas_mosaic", "--runs",
                             "cold,warm", "--out", str(tmp_path)])
  by = {(r["run"], r["program"]): r for r in rows}
  for program in compile_bench.PROGRAMS:
    cold, warm = by["cold", program], by["warm", program]
    assert cold["mosaic_kernels"] >= 1 and cold["cache"]["writes"] == 1
    assert warm["cache"] == dict(requests=1, hits=1, misses=0, writes=0)
    assert warm["compile"] < 0.5 * cold["compile"], (program, cold, warm)
