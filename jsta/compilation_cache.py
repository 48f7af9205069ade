"""A persistent compilation cache for the op's programs: a second process loads what the first
compiled instead of compiling it again.

JAX has the cache (``jax_compilation_cache_dir``); :func:`enable_compilation_cache` sets it up
for the op's programs, where JAX's defaults would miss:

- JAX writes only programs that took at least ``jax_persistent_cache_min_compile_time_secs``
  (1 s by default) to compile; the op's forward on a GPU can compile in about that time, and
  the xla backend's programs in much less. The helper writes every program.
- JAX decides once per process, at its first compilation, whether the cache is used: setting
  the directory after anything was compiled does nothing. The helper resets that decision, so
  it works at any point (programs compiled before are not written).

What is stored is the serialized XLA executable. On GPUs that includes the Mosaic GPU
kernels' binaries (JAX 0.11: their PTX is compiled to a cubin when XLA compiles the program,
and the executable serializes the cubin with the kernel), so a cache hit compiles nothing.
The key is the lowered program, so a change of shape, spec, dtype, backend or jax version is
a new entry. See docs/PERFORMANCE.md ("Compile time").
"""

from __future__ import annotations

import math
import numbers
import os
import tempfile

import jax
import numpy as np


def enable_compilation_cache(path: str | os.PathLike, *, min_compile_time_secs: float = 0.0
                             ) -> str:
  """Makes JAX write every compiled program to the directory ``path`` (created if missing)
  and read it back in later processes. Returns the absolute path.

  ``min_compile_time_secs``: programs that compiled faster are not written (JAX's default is
  1.0; 0 writes all). Anyone who can write to ``path`` can make this process run code: keep
  the cache private (JAX treats its cache as trusted).
  """
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
  path = os.fspath(path)
  if not path:
    raise ValueError("path must name a directory, got ''")
  if (isinstance(min_compile_time_secs, (bool, np.bool_))
      or not isinstance(min_compile_time_secs, numbers.Real)):
    raise TypeError(f"min_compile_time_secs must be a number >= 0, got "
                    f"{type(min_compile_time_secs).__name__} {min_compile_time_secs!r}")
  try:
    seconds = float(min_compile_time_secs)
  except OverflowError:
    seconds = math.inf
  if not math.isfinite(seconds) or seconds < 0:
    raise ValueError(f"min_compile_time_secs must be a finite number >= 0, got "
                     f"{min_compile_time_secs!r:.60}")
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"path must name a directory, got the file {path!r}")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"path: cannot create the cache directory {path!r}: {e.strerror}") from None
  # JAX only warns, once per program, when it cannot write an entry: find out here, once, by
  # writing (permission bits do not tell, e.g. for root on a read-only file system).
  try:
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise ValueError(f"path: cannot write to the cache directory {path!r}: {e.strerror}"
                     ) from None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", seconds)
  # Every entry, however small (-1: no size threshold, and JAX does not override it).
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  _reset_jax_cache_state()
  return path


def _reset_jax_cache_state() -> None:
  """Forgets JAX's once-per-process decisions (cache used or not, which directory), so the
  settings above apply to the next compilation even after earlier ones."""
  from jax._src import compilation_cache as cc   # no public API for this in jax 0.11
  cc.reset_cache()
