"""What every benchmark in benchmarks/ shares: the window syntax of the command lines, the one
relative error, random inputs at a :class:`benchmarks.shapes.BenchShape`, the checks against
the float32 reference on sampled query rows, timed rows (``jsta.timing``) and the JSON record
(written again after every row, so a run cut short keeps what it measured)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta.reference import reference_attention_rows
from jsta.timing import median_ms, timed_samples_ms

WINDOWS_HELP = "windows in tiles, ';'-separated, 'dense' for the full window: '3,3,3;5,5,5;dense'"


def parse_set_fields(items, cls) -> dict:
  """{field: value} from ``--set FIELD=VALUE`` items (values as Python literals, else
  strings), each FIELD a field of the dataclass ``cls``; SystemExit naming them otherwise."""
  import ast
  known = {f.name for f in dataclasses.fields(cls)}
  out = {}
  for item in items or ():
    name, sep, value = item.partition("=")
    if not sep or name not in known:
      raise SystemExit(f"error: --set takes FIELD=VALUE with a {cls.__name__} field "
                       f"({', '.join(sorted(known))}), got {item!r}")
    try:
      out[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[name] = value
  return out


def parse_windows(text: str) -> list:
  """'3,3,3;5,5,5;dense' -> [(3, 3, 3), (5, 5, 5), 'dense'] (windows in tiles; 'dense': the
  window that covers the whole latent). Raises ValueError on anything else."""
  out = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    if part == "dense":
      out.append("dense")
      continue
    try:
      out.append(tuple(int(v) for v in part.split(",")))
    except ValueError:
      raise ValueError(f"windows must look like '3,3,3;5,5,5;dense', got {text!r}") from None
  if not out:
    raise ValueError(f"no window in {text!r} (e.g. '3,3,3;5,5,5;dense')")
  return out


def window_name(window) -> str:
  """(3, 3, 3) -> '3x3x3'; 'dense' stays."""
  return window if isinstance(window, str) else "x".join(map(str, window))


def rel_l2(got, want) -> float:
  """||got - want|| / ||want|| in float64 (0 when both are zero)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def device_name() -> str:
  d = jax.devices()[0]
  return getattr(d, "device_kind", d.platform)


# The checkout this file is in (the repository root).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(root: str, *cmd: str, timeout: float = 10, env=None) -> subprocess.CompletedProcess:
  """``git -C root CMD...`` with its output captured as text."""
  return subprocess.run(["git", "-C", root, *cmd], capture_output=True, text=True,
                        timeout=timeout, env=env)


def git_commit() -> str | None:
  """The short commit of the checkout this file is in (with "+dirty" if it has uncommitted
  changes to tracked files), or None outside a git checkout."""
  try:
    head = _git(_CHECKOUT, "rev-parse", "--short", "HEAD")
    if head.returncode != 0:
      return None
    dirty = _git(_CHECKOUT, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")
  except (OSError, subprocess.SubprocessError):
    return None


def git_tree(root: str | None = None) -> str | None:
  """The git tree id of the checkout's files as they are (tracked and untracked ones that git
  does not ignore, uncommitted changes included), or None outside a git checkout: the id
  ``git rev-parse COMMIT^{tree}`` gives for the commit that holds exactly these files, so a
  result names the code it measured even where the checkout's own history is not that code's
  (``git log --format='%h %T' | grep TREE`` finds the commit). Computed in a scratch index
  and object directory: the checkout's index and objects are left as they were. ``root``: a
  folder of the checkout (default: the one this file is in)."""
  root = root or _CHECKOUT
  try:
    git_dir = _git(root, "rev-parse", "--absolute-git-dir")
    if git_dir.returncode != 0:
      return None
    git_dir = git_dir.stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
      index = os.path.join(git_dir, "index")
      if os.path.exists(index):
        shutil.copyfile(index, os.path.join(tmp, "index"))
      os.mkdir(os.path.join(tmp, "objects"))
      env = dict(os.environ, GIT_INDEX_FILE=os.path.join(tmp, "index"),
                 GIT_OBJECT_DIRECTORY=os.path.join(tmp, "objects"),
                 GIT_ALTERNATE_OBJECT_DIRECTORIES=os.path.join(git_dir, "objects"))
      run = lambda *cmd: _git(root, *cmd, timeout=60, env=env)
      if run("add", "-A").returncode != 0:
        return None
      tree = run("write-tree")
      return tree.stdout.strip() if tree.returncode == 0 else None
  except (OSError, subprocess.SubprocessError):
    return None


def run_meta(shape=None, **extra) -> dict:
  """The head of every result file: GPU (device kind), JAX version, UTC date, the commit
  (:func:`git_commit`) and the tree of the files measured (:func:`git_tree`), the shape."""
  meta = dict(gpu=device_name(), jax=jax.__version__,
              date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              commit=git_commit(), tree=git_tree())
  if shape is not None:
    meta["shape"] = dataclasses.asdict(shape)
  return meta | extra


def random_inputs(shape, seq_len: int | None = None, seed: int = 0):
  """(q, k, v, do): [batch, seq, heads, head_dim] standard normals (drawn in float32, then cast
  to the shape's dtype); seq is the spec's unless given (a kernel's schedule may pad it)."""
  keys = jax.random.split(jax.random.key(seed), 4)
  dims = shape.qkv_shape(seq_len)
  return tuple(jax.random.normal(kk, dims, jnp.float32).astype(shape.dtype) for kk in keys)


def sample_rows(spec: jsta.STASpec, n: int, seed: int = 0) -> np.ndarray:
  """Up to ``n`` sorted valid query positions (padding never), drawn without replacement."""
  valid = np.flatnonzero(jsta.token_valid(spec))
  rng = np.random.default_rng(seed)
  return np.sort(rng.choice(valid, size=min(n, valid.size), replace=False))


def row_errors(o, ref, rows) -> dict:
  """{rel_l2_err, worst_row_err} of o's query ``rows`` against ``ref`` [B, len(rows), H, D]
  (the worst row: the largest relative L2 error of one (batch, row, head) vector)."""
  got = np.asarray(jnp.asarray(o, jnp.float32)[:, np.asarray(rows)], np.float64)
  want = np.asarray(ref, np.float64)
  per = (np.linalg.norm(got - want, axis=-1)
         / np.maximum(np.linalg.norm(want, axis=-1), 1e-30))
  return dict(rel_l2_err=float(np.linalg.norm(got - want) / np.linalg.norm(want)),
              worst_row_err=float(per.max()))


def forward_row_errors(o, q, k, v, spec: jsta.STASpec, rows, scale: float) -> dict:
  """:func:`row_errors` of ``o`` against the float32 reference of the query ``rows``."""
  s = spec.seq_len
  ref = reference_attention_rows(q[:, :s], k[:, :s], v[:, :s], spec, rows, scale=scale)
  return row_errors(o, ref, rows)


def forward_error(o, q, k, v, spec: jsta.STASpec, rows, scale: float) -> float:
  """Relative L2 error of ``o`` on the query ``rows`` against the float32 reference. Inputs
  may be longer than ``spec.seq_len`` (a schedule's padding): the reference sees the spec's."""
  s = spec.seq_len
  ref = reference_attention_rows(q[:, :s], k[:, :s], v[:, :s], spec, rows, scale=scale)
  return rel_l2(o[:, np.asarray(rows)], ref)


# The float32 reference gradient takes the sampled query rows this many at a time: its
# [batch, heads, rows, seq] scores and their vjp's intermediates, at 256 rows, 48 heads and
# 115,200 keys (paper_d64), were 5.3 GiB each and ran an 80 GB GPU out of memory (2026-12-07).
GRAD_ROW_CHUNK = 64


def grad_errors(grad_fn, q, k, v, do, spec: jsta.STASpec, rows, scale: float,
                chunk: int = GRAD_ROW_CHUNK):
  """Relative L2 errors of (dq, dk, dv) against the float32 reference, from the query ``rows``.

  ``grad_fn(do)`` -> (dq, dk, dv) is called with ``do`` zeroed outside ``rows``: its gradients
  are then those of sum(o[rows] * do[rows]) alone, which the reference gives exactly (the vjp of
  :func:`jsta.reference.reference_attention_rows`) at the cost of len(rows) query rows, taken
  ``chunk`` rows at a time (the gradients of the chunks' sums add up).
  """
  s = spec.seq_len
  rows = np.asarray(rows)
  keep = np.zeros(do.shape[1], bool)
  keep[rows] = True
  got = grad_fn(jnp.where(jnp.asarray(keep)[None, :, None, None], do, 0).astype(do.dtype))
  f32 = [x[:, :s].astype(jnp.float32) for x in (q, k, v)]
  ref = None
  for start in range(0, len(rows), chunk):
    part = rows[start:start + chunk]
    _, vjp = jax.vjp(
        lambda q, k, v, part=part: reference_attention_rows(q, k, v, spec, part, scale=scale),
        *f32)
    grads = vjp(do[:, part].astype(jnp.float32))
    ref = grads if ref is None else tuple(a + b for a, b in zip(ref, grads))
  return tuple(rel_l2(g[:, :s], r) for g, r in zip(got, ref))


# Short calls are timed until their times add up to this (see jsta.timing.timed_samples_ms).
MIN_TIMED_MS = 200.0
# Calls shorter than this are timed in samples of several calls issued back to back (one
# synchronisation a sample), as long as this at the warm-up's speed: a call of 1-4 ms
# synchronised alone also times the host's dispatch and wait and the GPU's idle gap, which
# moved the image 2048 forward's calls over 1.2-2.4 ms on 2026-12-07 (docs/PERFORMANCE.md,
# "How it is measured"). Calls of this length or longer are timed one at a time, as before.
MIN_SAMPLE_MS = 20.0
# On a GPU, warm-up calls go on until they add up to this, so that every timed call runs as
# under sustained load (on an H200 the first ~0.1-0.3 s of load ran 9-14% faster:
# docs/PERFORMANCE.md, "How it is measured"), and then until the median call of a quarter
# second is within GPU_SETTLE of the quarter second's before, for at most GPU_MAX_WARMUP_MS
# (on an H100 the calls after a compile still got 10% faster over the 1.2 s after a 1 s
# warm-up, 2026-12-05).
GPU_WARMUP_MS = 1000.0
GPU_SETTLE = 0.01
GPU_MAX_WARMUP_MS = 5000.0


def warmup_ms() -> float:
  """GPU_WARMUP_MS on a GPU, else 0 (a CPU's clock does not settle that way)."""
  return GPU_WARMUP_MS if jax.default_backend() == "gpu" else 0.0


def settle_kwargs() -> dict:
  """The warm-up of :func:`jsta.timing.timed_samples_ms` on this backend: at least
  :func:`warmup_ms`, then on a GPU until the call time settles (GPU_SETTLE,
  GPU_MAX_WARMUP_MS)."""
  if jax.default_backend() != "gpu":
    return dict(warmup_ms=0.0)
  return dict(warmup_ms=GPU_WARMUP_MS, settle=GPU_SETTLE, max_warmup_ms=GPU_MAX_WARMUP_MS)


def dit_step_ms(model, x, text, mask, *, iters: int = 10, **call_kwargs) -> float:
  """Median ms of one denoising step (one jit-compiled forward of the video DiT ``model`` at
  t = 0.5, after a warm-up); ``call_kwargs`` go to the model call (text_len,
  attention_precision, ...)."""
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def step(state, x):
    return nnx.merge(graphdef, state)(x, jnp.full((x.shape[0],), 0.5), text, mask,
                                      **call_kwargs)

  return median_ms(step, state, x, warmup=1, iters=iters, warmup_ms=warmup_ms())


def timed(fn, *args, flops: float = 0.0, warmup: int = 2, iters: int = 5) -> dict:
  """{ms (median), ms_all (every timed sample's ms per call, in order), calls_per_sample,
  tflops} of ``fn(*args)`` (``jsta.timing.timed_samples_ms``: samples after warm-up, at least
  ``iters`` and at least MIN_TIMED_MS of calls in all, each of calls issued back to back for
  at least MIN_SAMPLE_MS; on a GPU after a warm-up of at least :func:`warmup_ms` that goes on
  until the call time settles, :func:`settle_kwargs`)."""
  times, per_sample = timed_samples_ms(fn, *args, warmup=warmup, iters=iters,
                                       min_total_ms=MIN_TIMED_MS, min_sample_ms=MIN_SAMPLE_MS,
                                       **settle_kwargs())
  ms = statistics.median(times)
  return dict(ms=ms, ms_all=times, calls_per_sample=per_sample,
              tflops=flops / ms / 1e9 if flops else float("nan"))


class Record:
  """A bench's result file: ``{"meta": ..., "results": [rows]}`` at ``path``. ``add`` stamps a
  row with the wall clock (``wall``: lines it up with benchmarks.tools.clock_log), prints it as
  one JSON line and rewrites the file."""

  def __init__(self, path: str | None, meta: dict):
    self.path, self.meta, self.rows = path, meta, []
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def add(self, row: dict) -> dict:
    row.setdefault("wall", time.time())
    self.rows.append(row)
    print(json.dumps({k: v for k, v in row.items() if k not in ("ms_all", "wall")}), flush=True)
    self.save()
    return row

  def save(self) -> None:
    if self.path:
      with open(self.path, "w") as f:
        json.dump(dict(meta=self.meta, results=self.rows), f, indent=1)
