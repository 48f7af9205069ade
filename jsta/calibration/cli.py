"""Model-agnostic window calibration from the command line: ``jsta-calibrate``.

Also ``python -m jsta.calibration``. Calibrates per-(layer, head) STA windows
(:func:`jsta.calibration.search.calibrate`) from q, k, v you provide (``--qkv``), or of a synthetic model
whose heads are random projections of Fourier positional features (``--synthetic``). Prints a
layers x heads table (window, sparsity, error) and writes into ``--out``:

  strategy.json       the :class:`jsta.calibration.strategy.WindowStrategy` (with metrics)
  recall_heatmap.png  per-head recall of every candidate window, and the chosen windows
                      (needs matplotlib, the ``plot`` extra; skipped with a note without it)

q/k/v files (``--qkv FILE.npz``, repeatable; each file is one calibration input): a numpy
``.npz`` (``np.savez``) with keys ``q{layer}``, ``k{layer}``, ``v{layer}`` for layers 0..L-1
(q0, ..., q10: no leading zeros), each a float array [batch, seq, heads, head_dim] with
seq = spec.seq_len: the video tokens in tile order (``jsta.tile_order``) and the
``--text-max-len`` text slots, after the video tokens
(``--text-position last``, the default) or before them (``first``). An optional scalar key
``text_len`` gives that input's number of valid text slots (default ``--text-len``). The layout
comes from ``--latent``, ``--tile``, ``--text-len``, ``--text-max-len`` and ``--text-position``;
every file must hold the same layers and heads. Valid positions must be finite (padded latent
positions and padded text slots may hold anything).

Examples::

    jsta-calibrate --qkv prompt0.npz --qkv prompt1.npz --latent 8,16,16 --tile 2,4,4 \
        --text-max-len 32 --candidates "1,1,1;3,3,3;full" --error-budget 0.05 --out /tmp/calib
    jsta-calibrate --synthetic --latent 8,16,16 --tile 2,4,4 --heads 4 --depth 2 --out /tmp/calib

The table, heatmap and candidate parsing here are shared with ``python -m models.calibrate`` (the
video DiT of the repository's models/).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
import zipfile
import zlib
from typing import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np

import jsta
from jsta.calibration import search as cal
from jsta import checks
from jsta import mask as mask_lib
from jsta.spec import TEXT_POSITIONS
from jsta.calibration.strategy import WindowStrategy

DEFAULT_CANDIDATES = "1,1,1;3,3,3;5,5,5;full"
DEFAULT_ERROR_BUDGET = 0.05
# Geometry of --synthetic when no flags are given: 4x4x4 tiles of 2x4x4 tokens (2,048 tokens).
SYNTHETIC_LATENT = (8, 16, 16)
SYNTHETIC_TILE = (2, 4, 4)
SYNTHETIC_DEFAULTS = {"heads": 4, "head_dim": 64, "depth": 2, "num_inputs": 2, "seed": 0}
# Canonical indices only (fullmatch): int() would also read q01 or a non-ASCII digit as a layer,
# so that two keys could name one layer.
_QKV_KEY = re.compile(r"([qkv])(0|[1-9][0-9]*)")
# int() also takes "1_1" (11) and non-ASCII digits: options take ASCII digits only.
_INT = re.compile(r"\s*[-+]?[0-9]+\s*")
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (.npz) with members / empty


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
  """--help with every option's default (unless it is None or False: the option's help says what
  happens then), and the description and epilog laid out as written."""

  def _get_help_string(self, action):
    if action.default is None or action.default is False:
      return action.help
    return super()._get_help_string(action)


# ---- parsing --------------------------------------------------------------------------------------

def _int(text: str) -> int:
  """An int written with ASCII digits (optional sign and surrounding spaces); ValueError else."""
  if not _INT.fullmatch(text):
    raise ValueError(f"not an int: {text!r}")
  return int(text)


def int_arg(text: str) -> int:
  """argparse ``type`` of int options: ASCII digits only (see :func:`_int`)."""
  try:
    return _int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None


def float_arg(text: str) -> float:
  """argparse ``type`` of float options: float() without its "1_0" and non-ASCII digits."""
  try:
    if not text.isascii() or "_" in text:
      raise ValueError(text)
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None


def parse_shape(text: str, name: str) -> tuple[int, ...]:
  """'8,16,16' -> (8, 16, 16); ValueError naming ``name`` unless 1 to 3 positive ints."""
  try:
    shape = tuple(_int(x) for x in text.split(","))
  except ValueError:
    raise ValueError(f"{name} must be 1 to 3 comma-separated positive ints like 8,16,16, "
                     f"got {text!r}") from None
  if not 1 <= len(shape) <= 3 or any(x <= 0 for x in shape):
    raise ValueError(f"{name} must be 1 to 3 comma-separated positive ints like 8,16,16, "
                     f"got {text!r}")
  return shape


def parse_candidates(text: str, spec: jsta.STASpec) -> list[tuple[int, ...]]:
  """'1,1,1;3,3,3;full' -> [(1, 1, 1), (3, 3, 3), whole-volume window] (validated, deduplicated).

  Windows that cover the same tiles on ``spec``'s tile grid (e.g. 5x5x5 and 3x3x3 on 2x2x2
  tiles) are one candidate: the first is kept and a note is printed. Raises ValueError naming
  --candidates for anything else than ';'-separated odd windows of the latent rank or 'full'.
  """
  if not isinstance(text, str):
    raise TypeError(f"--candidates must be a string like '1,1,1;3,3,3;full', got "
                    f"{type(text).__name__}")
  out = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    if part == "full":
      w = jsta.full_window(spec.latent_shape, spec.tile_shape)
    else:
      try:
        w = tuple(_int(x) for x in part.split(","))
      except ValueError:
        raise ValueError(f"--candidates: {part!r} is not a comma-separated window like 3,3,3 "
                         "or 'full'") from None
    try:
      spec.with_window(w)  # odd, positive, rank
    except ValueError as e:
      raise ValueError(f"--candidates: {part!r}: {e}") from None
    if spec.effective_window(w) in {spec.effective_window(o) for o in out}:
      print(f"note: candidate {'x'.join(map(str, w))} covers the same tiles as an earlier one "
            f"on {spec.num_tiles} tiles; skipped")
      continue
    out.append(w)
  if not out:
    raise ValueError("--candidates must name at least one window, e.g. '1,1,1;3,3,3;full'")
  return out


# ---- q/k/v files ----------------------------------------------------------------------------------

def _open_npz(path: str):
  try:
    with open(path, "rb") as f:
      magic = f.read(4)
  except OSError as e:
    raise ValueError(f"{path}: cannot read the q/k/v file ({e.strerror or e})") from None
  if magic not in _ZIP_MAGIC:
    raise ValueError(f"{path}: not a q/k/v .npz file (np.savez archive with keys q0, k0, v0, "
                     "...); it is not a zip archive")
  try:
    return np.load(path, allow_pickle=False)
  except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
    raise ValueError(f"{path}: not a readable q/k/v .npz file: the archive is truncated or "
                     f"corrupt ({type(e).__name__}: {e})") from None


def _member(z, path: str, key: str) -> np.ndarray:
  try:
    x = z[key]
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
    raise ValueError(f"{path}: cannot read {key}; the archive may be truncated or corrupt "
                     f"({type(e).__name__}: {e})") from None
  if not isinstance(x, np.ndarray):  # np.load gives the raw bytes of a member that is no .npy
    raise ValueError(f"{path}: {key} is not a .npy array")
  return x


def _headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """key -> (shape, dtype) of every member of an .npz, from the .npy headers (the arrays are not
  read, so that every file can be checked before any calibration work)."""
  out = {}
  with _open_npz(path) as z:
    for name in z.zip.namelist():
      key = name[:-4] if name.endswith(".npy") else name
      try:
        with z.zip.open(name) as f:
          try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            header = read(f) if read else None
          except ValueError:
            raise ValueError(f"{path}: {key} is not a .npy array") from None
      except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: cannot read {key}; the archive may be truncated or corrupt "
                         f"({type(e).__name__}: {e})") from None
      if header is None:  # a .npy format without a public header reader: read the array
        x = _member(z, path, key)
        header = (x.shape, False, x.dtype)
      out[key] = (tuple(header[0]), np.dtype(header[2]))
  return out


def _check_keys(path: str, keys: Iterable[str]) -> int:
  keys = list(keys)
  layers: dict[int, set[str]] = {}
  bad = []
  for key in keys:
    m = _QKV_KEY.fullmatch(key)
    if m:
      layers.setdefault(int(m.group(2)), set()).add(m.group(1))
    elif key != "text_len":
      bad.append(key)
  if bad:
    raise ValueError(f"{path}: unexpected keys {sorted(bad)}; a q/k/v file holds q<layer>, "
                     "k<layer>, v<layer> (layers 0, 1, ... without leading zeros) and optionally "
                     "text_len")
  if not layers:
    raise ValueError(f"{path}: no q0, k0, v0 arrays (keys: {sorted(keys)})")
  if sorted(layers) != list(range(len(layers))):
    raise ValueError(f"{path}: layer indices must be 0..{len(layers) - 1} without gaps, got "
                     f"{sorted(layers)}")
  for li in range(len(layers)):
    missing = sorted({"q", "k", "v"} - layers[li])
    if missing:
      raise ValueError(f"{path}: layer {li} lacks {', '.join(f'{m}{li}' for m in missing)}")
  return len(layers)


def qkv_file_layers(path: str | os.PathLike) -> int:
  """Checks the keys of one q/k/v file (see the module docstring); returns its number of layers.

  Raises ValueError naming the path for a file that is not an .npz, a missing q/k/v of a layer,
  a gap in the layer indices or an unexpected key.
  """
  path = os.fspath(path)
  with _open_npz(path) as z:
    return _check_keys(path, z.files)


def check_qkv_file(path: str | os.PathLike, spec: jsta.STASpec):
  """Checks one q/k/v file's keys, shapes and dtypes against ``spec`` from the .npy headers,
  without reading the arrays. Returns (layers, heads, spec_i): spec_i is ``spec`` with the file's
  ``text_len`` when it has one. Raises ValueError naming the path and the key."""
  path = os.fspath(path)
  headers = _headers(path)
  num_layers = _check_keys(path, headers)
  spec_i = spec
  if "text_len" in headers:
    shape, dtype = headers["text_len"]
    if shape != () or not np.issubdtype(dtype, np.integer):
      raise ValueError(f"{path}: text_len must be a scalar int, got {dtype} {shape}")
    with _open_npz(path) as z:
      tl = int(_member(z, path, "text_len"))
    try:
      spec_i = dataclasses.replace(spec, text_len=tl)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None  # e names text_len
  heads = None
  for li in range(num_layers):
    shapes = []
    for name in "qkv":
      key = f"{name}{li}"
      shape, dtype = headers[key]
      if not np.issubdtype(dtype, np.floating):
        raise ValueError(f"{path}: {key} must be a float array, got dtype {dtype}")
      if len(shape) != 4:
        raise ValueError(f"{path}: {key} must be [batch, seq, heads, head_dim], got shape "
                         f"{shape}")
      for axis, what in ((0, "batch"), (2, "heads"), (3, "head_dim")):
        if shape[axis] < 1:
          raise ValueError(f"{path}: {key}: {what} (axis {axis}) must be >= 1, got shape "
                           f"{shape}")
      if shape[1] != spec.seq_len:
        raise ValueError(
            f"{path}: {key} has seq {shape[1]} but the layout needs padded_video_len "
            f"({spec.padded_video_len}) + --text-max-len ({spec.text_max_len}) = "
            f"{spec.seq_len}; check --latent/--tile/--text-max-len and that the video "
            "tokens are in tile order (jsta.tile_order)")
      shapes.append(shape)
    if not shapes[0] == shapes[1] == shapes[2]:
      raise ValueError(f"{path}: q{li}, k{li}, v{li} must have one shape, got "
                       f"{', '.join(map(str, shapes))}")
    if heads is None:
      heads = shapes[0][2]
    elif shapes[0][2] != heads:
      raise ValueError(f"{path}: layer {li} has {shapes[0][2]} heads but layer 0 has {heads}")
  return num_layers, heads, spec_i


def load_qkv(path: str | os.PathLike, spec: jsta.STASpec) -> list[tuple]:
  """One q/k/v file as ``[(q, k, v, spec_i)]`` per layer, the capture format of calibration.

  Args:
    path: an .npz in the format of the module docstring.
    spec: the layout; ``spec_i`` is ``spec`` with the file's ``text_len`` when it has one.
  Returns:
    per layer (q, k, v) float32 numpy arrays [batch, spec.seq_len, heads, head_dim], and spec_i.
  Raises ValueError naming the path and the key for anything that does not fit.
  """
  path = os.fspath(path)
  num_layers, _, spec_i = check_qkv_file(path, spec)
  valid = mask_lib.token_valid(spec_i)
  out = []
  with _open_npz(path) as z:
    for li in range(num_layers):
      arrays = []
      for name in "qkv":
        key = f"{name}{li}"
        raw = _member(z, path, key)
        with np.errstate(over="ignore"):
          x = np.asarray(raw, np.float32)
        bad = ~np.isfinite(x[:, valid])
        if bad.any():
          pos = np.flatnonzero(valid)[np.argwhere(bad)[0][1]]
          # float64 values beyond float32's range become inf in the cast: not the file's NaN.
          over = bad & np.isfinite(raw[:, valid])
          if over.any():
            pos = np.flatnonzero(valid)[np.argwhere(over)[0][1]]
            raise ValueError(
                f"{path}: {key} holds {int(over.sum())} values beyond the float32 range (|x| > "
                f"{float(np.finfo(np.float32).max):.3g}) at valid positions (the first at "
                f"sequence position {pos}); calibration computes in float32")
          raise ValueError(f"{path}: {key} holds {int(bad.sum())} NaN or inf values at valid "
                           f"positions (the first at sequence position {pos}); only padded "
                           "positions may hold them")
        arrays.append(x)
      out.append((*arrays, spec_i))
  return out


def qkv_capture(paths: Sequence[str], spec: jsta.STASpec):
  """(capture_fn, inputs) that read one q/k/v file per calibration input. Every file's keys,
  shapes and dtypes are checked up front (ValueError naming the path: a file whose layers or
  heads differ from the first file's names both); values (NaN or inf) as each file is read."""
  paths = [os.fspath(p) for p in paths]
  checked = [check_qkv_file(p, spec) for p in paths]
  for p, (n, h, _) in zip(paths[1:], checked[1:]):
    if n != checked[0][0]:
      raise ValueError(f"{p}: holds {n} layers but {paths[0]} holds {checked[0][0]}; every "
                       "q/k/v file must hold the same layers")
    if h != checked[0][1]:
      raise ValueError(f"{p}: has {h} heads per layer but {paths[0]} has {checked[0][1]}; "
                       "every q/k/v file must hold the same heads")
  return (lambda i: load_qkv(paths[i], spec)), range(len(paths))


# ---- synthetic model ------------------------------------------------------------------------------

def synthetic_capture(spec: jsta.STASpec, *, heads: int, head_dim: int, depth: int,
                      num_inputs: int, seed: int = 0):
  """(capture_fn, inputs) of a synthetic model of random projections.

  Tokens are Fourier features of their coordinates (in tiles) plus noise; head h of layer l has
  q = s_lh * X W_lh, k = X W_lh with a shared random projection W_lh, so q . k peaks at nearby
  tokens with a sharpness s_lh drawn log-uniformly: heads range from local to nearly global.
  Text slots get random q, k (before the video tokens with ``spec.text_position == "first"``).
  ``capture_fn(i)`` returns ``[(q, k, v)]`` per layer, each [1, spec.seq_len, heads, head_dim]
  float32. ``seed``: an int >= 0.
  """
  for name, v in (("heads", heads), ("head_dim", head_dim), ("depth", depth),
                  ("num_inputs", num_inputs)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < 1:
      raise ValueError(f"{name} must be >= 1, got {v}")
  checks.check_int("seed", seed, minimum=0)
  rank = spec.rank
  # The real tokens, row-major: tile_order places them and pads partial edge tiles.
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in spec.latent_shape], indexing="ij"),
                  -1).reshape(1, -1, rank).astype(np.float32)
  coords = np.asarray(jsta.tile_order(jnp.asarray(grid), spec))[0] / np.asarray(spec.tile_shape)
  freqs = np.array([0.25, 0.5, 1.0], np.float32)
  ang = coords[:, :, None] * freqs[None, None, :] * np.pi                # [nv, rank, F]
  feats = np.concatenate([np.cos(ang), np.sin(ang)], -1).reshape(coords.shape[0], -1)
  rng = np.random.default_rng(seed)
  proj = rng.normal(size=(depth, heads, feats.shape[1], head_dim)) / np.sqrt(feats.shape[1])
  sharp = np.exp(rng.uniform(np.log(0.1), np.log(30.0), size=(depth, heads)))
  nv, s = spec.padded_video_len, spec.seq_len

  def capture_fn(i):
    r = np.random.default_rng(seed * 1000 + i)
    layers = []
    for l in range(depth):
      x = feats[None] + 0.1 * r.normal(size=(1,) + feats.shape)
      kk = np.einsum("bnf,hfd->bnhd", x, proj[l])
      qq = kk * sharp[l][None, None, :, None]
      q = np.zeros((1, s, heads, head_dim), np.float32)
      k = np.zeros_like(q)
      q[:, :nv], k[:, :nv] = qq, kk
      q[:, nv:] = r.normal(size=q[:, nv:].shape)
      k[:, nv:] = r.normal(size=k[:, nv:].shape)
      v = r.normal(size=q.shape).astype(np.float32)
      if spec.text_position == "first":
        q, k, v = (np.roll(x, spec.text_max_len, axis=1) for x in (q, k, v))
      layers.append((jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    return layers

  return capture_fn, range(num_inputs)


# ---- output ---------------------------------------------------------------------------------------

def format_table(strategy: WindowStrategy) -> str:
  """Layers x heads: 'window sparsity error' per cell, '*' where the budget was not met."""
  cals = cal.layer_calibrations(strategy)
  lines = []
  head = "layer | " + " | ".join(f"head {h:<17d}" for h in range(strategy.num_heads))
  lines.append(head)
  lines.append("-" * len(head))
  for li, c in enumerate(cals):
    cells = []
    for h in range(strategy.num_heads):
      i = int(c.chosen[h])
      w = "x".join(str(v) for v in c.candidates[i])
      flag = " " if c.met[h] else "*"
      cells.append(f"{w:>7s} {100 * c.sparsity[i]:5.1f}% {c.error[i, h]:.3f}{flag}")
    lines.append(f"{li:5d} | " + " | ".join(f"{x:22s}" for x in cells))
  lines.append("cell: window (tiles), sparsity, relative L2 error vs full attention; "
               "* = budget not met (lowest-error/sparsest fallback)")
  return "\n".join(lines)


def save_heatmap(strategy: WindowStrategy, path: str | os.PathLike) -> None:
  """PNG: one panel per candidate (recall, layers x heads) and one of the chosen windows.

  Drawn on a ``matplotlib.figure.Figure`` (no pyplot), so the caller's matplotlib backend and
  open figures are left as they are. Needs matplotlib, which jsta does not require (the
  ``plot`` extra): ImportError otherwise.
  """
  try:  # imported here: nothing else in jsta needs matplotlib
    import matplotlib  # noqa: F401 (the package itself: its submodules may be cached)
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError(
        f"the recall heatmap needs matplotlib, which is not installed ({e}): install the "
        f"plot extra, pip install 'jsta[plot]' (or pip install matplotlib)") from e

  cals = cal.layer_calibrations(strategy)
  cands = cals[0].candidates
  nl, nh = strategy.num_layers, strategy.num_heads
  n = len(cands) + 1
  fig = Figure(figsize=(2.2 + 0.45 * nh * n, 1.5 + 0.4 * nl), layout="constrained")
  axes = fig.subplots(1, n, squeeze=False)
  for ci, w in enumerate(cands):
    ax = axes[0, ci]
    rec = np.stack([c.recall[ci] for c in cals])                        # [L, H]
    im = ax.imshow(rec, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_title(f"recall {'x'.join(map(str, w))}\n({100 * cals[0].sparsity[ci]:.1f}% sparse)",
                 fontsize=9)
    for (l, h), r in np.ndenumerate(rec):
      ax.text(h, l, f"{r:.2f}", ha="center", va="center", fontsize=6,
              color="white" if r < 0.6 else "black")
  ax = axes[0, -1]
  sp = np.stack([c.sparsity[c.chosen] for c in cals])
  ax.imshow(sp, vmin=0, vmax=1, cmap="magma", aspect="auto")
  ax.set_title("chosen window\n(colour: sparsity)", fontsize=9)
  for l, c in enumerate(cals):
    for h in range(nh):
      ax.text(h, l, "x".join(map(str, c.candidates[c.chosen[h]])), ha="center", va="center",
              fontsize=6, color="white" if sp[l, h] < 0.6 else "black")
  for ax in axes[0]:
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(nh))
    ax.set_yticks(range(nl))
  fig.colorbar(im, ax=axes[0, len(cands) - 1], label="recall")
  fig.savefig(path, dpi=130, bbox_inches="tight")


# ---- the shared command-line part -----------------------------------------------------------------

def add_calibration_args(p: argparse.ArgumentParser) -> None:
  """Options every calibration command has: candidates, budget, memory, backend and --out."""
  p.add_argument("--candidates", default=DEFAULT_CANDIDATES,
                 help="';'-separated windows in tiles, 'full' = whole volume")
  budget = p.add_mutually_exclusive_group()
  budget.add_argument("--error-budget", type=float_arg, default=None,
                      help=f"max relative L2 error per head ({DEFAULT_ERROR_BUDGET} when "
                           "neither budget is given)")
  budget.add_argument("--sparsity-budget", type=float_arg, default=None,
                      help="min sparsity per head in [0, 1] (instead of an error budget)")
  p.add_argument("--block-q", type=int_arg, default=None,
                 help="query rows per block (memory); default: automatic")
  p.add_argument("--sta-backend", default=None,
                 help="compute STA outputs with jsta.sliding_tile_attention on this backend "
                      "(xla, pallas_triton, ...) instead of the shared blockwise softmax")
  p.add_argument("--out", required=True, help="output directory (created if missing)")


def check_calibration_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """``p.error`` (exit status 2) for bad values of the options of :func:`add_calibration_args`;
  sets the default error budget."""
  if args.error_budget is None and args.sparsity_budget is None:
    args.error_budget = DEFAULT_ERROR_BUDGET
  if args.error_budget is not None and not args.error_budget >= 0:
    p.error(f"--error-budget must be >= 0, got {args.error_budget}")
  if args.sparsity_budget is not None and not 0 <= args.sparsity_budget <= 1:
    p.error(f"--sparsity-budget must be in [0, 1], got {args.sparsity_budget}")
  if args.block_q is not None and args.block_q < 1:
    p.error(f"--block-q must be >= 1, got {args.block_q}")
  if args.sta_backend is not None:
    try:
      jsta.resolve_backend(args.sta_backend)
    except ValueError as e:
      p.error(f"--sta-backend: {e}")
  _check_out(p, args.out)


def _check_out(p: argparse.ArgumentParser, out: str) -> None:
  # The results are written after the whole calibration: an --out that cannot take them must
  # fail now. Nothing is created here, so that a later usage error leaves no empty directory.
  if not out:
    p.error("--out must name a directory, got ''")
  if os.path.lexists(out):
    if not os.path.isdir(out):
      p.error(f"--out {out}: exists and is not a directory")
    for name in ("strategy.json", "recall_heatmap.png"):
      if os.path.isdir(os.path.join(out, name)):
        p.error(f"--out {out}: {os.path.join(out, name)} is a directory; the results are "
                f"written as {name}")
    where = out
  else:
    where = os.path.dirname(os.path.normpath(out))
    while where and not os.path.lexists(where):
      where = os.path.dirname(where)
    where = where or os.curdir
    if not os.path.isdir(where):
      p.error(f"--out {out}: cannot be created: {where} is not a directory")
  if not os.access(where, os.W_OK | os.X_OK):
    p.error(f"--out {out}: cannot write there: {where} is not writable")


def run_calibration(p: argparse.ArgumentParser, args: argparse.Namespace,
                    capture_fn: Callable, inputs: Iterable, spec: jsta.STASpec, what: str, *,
                    scale: float | None = None) -> int:
  """Calibrates, prints the table and writes strategy.json and recall_heatmap.png to args.out.

  Args:
    p, args: the parser and its parsed options (after :func:`check_calibration_args`); a
      ValueError of the inputs (a bad q/k/v file, a layout mismatch) becomes ``p.error``.
    capture_fn, inputs, spec, scale: as in :func:`jsta.calibration.search.calibrate`.
    what: one line naming the model, printed and stored as the strategy's metrics["source"].
  Returns:
    0.
  """
  try:
    candidates = parse_candidates(args.candidates, spec)
  except ValueError as e:
    p.error(str(e))
  t0 = time.time()
  print(f"calibrating: {what}")
  print(f"layout: latent {spec.latent_shape}, tile {spec.tile_shape}, tiles {spec.num_tiles}, "
        f"text slots {spec.text_max_len} ({spec.text_position}); candidates "
        f"{', '.join('x'.join(map(str, w)) for w in candidates)}; "
        + (f"error budget {args.error_budget}" if args.error_budget is not None
           else f"sparsity budget {args.sparsity_budget}"), flush=True)
  block_q = None if args.block_q is None else cal.capped_block_q(args.block_q, spec)
  try:
    strategy = cal.calibrate(capture_fn, inputs, spec, candidates,
                             error_budget=args.error_budget,
                             sparsity_budget=args.sparsity_budget, scale=scale,
                             block_q=block_q, sta_backend=args.sta_backend,
                             progress=lambda msg: print("  " + msg, flush=True))
  except ValueError as e:
    p.error(str(e))
  strategy = dataclasses.replace(strategy, metrics=strategy.metrics | {"source": what})
  print(format_table(strategy))
  met = np.concatenate([c.met for c in cal.layer_calibrations(strategy)])
  print(f"mean sparsity {100 * strategy.sparsity():.1f}%; {int((~met).sum())} of {met.size} "
        f"heads outside the budget; {time.time() - t0:.1f} s")
  spath = os.path.join(args.out, "strategy.json")
  hpath = os.path.join(args.out, "recall_heatmap.png")
  try:
    os.makedirs(args.out, exist_ok=True)
    strategy.save(spath)
  except OSError as e:
    p.error(f"--out {args.out}: cannot write the results ({e.strerror or e})")
  try:
    save_heatmap(strategy, hpath)
  except ImportError as e:
    # The strategy is the result; the picture is optional (matplotlib is an extra).
    print(f"{p.prog}: note: {hpath} not written: {e}", file=sys.stderr)
    hpath = None
  except OSError as e:
    p.error(f"--out {args.out}: wrote {spath} but cannot write {hpath} ({e.strerror or e})")
  print(f"wrote {spath}" + (f" and {hpath}" if hpath else ""))
  return 0


# ---- jsta-calibrate -------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  fmt = __doc__[__doc__.index("q/k/v files"):__doc__.index("Examples::")].strip()
  p = argparse.ArgumentParser(prog="jsta-calibrate", description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter, epilog=fmt)
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--qkv", action="append", metavar="FILE.npz",
                   help="q/k/v of one calibration input (repeat for more inputs; format below)")
  src.add_argument("--synthetic", action="store_true",
                   help="a synthetic model of random-projection heads (local to global)")
  g = p.add_argument_group("layout")
  g.add_argument("--latent", default=None,
                 help="video token grid, e.g. 8,16,16 (required with --qkv; --synthetic: "
                      f"{','.join(map(str, SYNTHETIC_LATENT))})")
  g.add_argument("--tile", default=None,
                 help="tile shape in tokens, e.g. 2,4,4 (required with --qkv; --synthetic: "
                      f"{','.join(map(str, SYNTHETIC_TILE))})")
  g.add_argument("--text-max-len", type=int_arg, default=0,
                 help="text slots (after the video tokens, or before them with "
                      "--text-position first)")
  g.add_argument("--text-len", type=int_arg, default=None,
                 help="valid text slots (a prefix); default: --text-max-len")
  g.add_argument("--text-position", default="last", choices=TEXT_POSITIONS,
                 help="where the text slots are in the sequence: after the video tokens (last, "
                      "as HunyuanVideo) or before them (first, as SD3/FLUX and CogVideoX); "
                      "recorded in strategy.json")
  g.add_argument("--scale", type=float_arg, default=None,
                 help="softmax scale of the attention; default: head_dim ** -0.5")
  s = p.add_argument_group("synthetic model (--synthetic only)")
  # Defaults None (the real ones in SYNTHETIC_DEFAULTS, shown in the help): an option given
  # with --qkv is an error, not silently ignored.
  for flag, help_ in (("--heads", "attention heads per layer"),
                      ("--head-dim", "q/k/v width per head"), ("--depth", "layers"),
                      ("--num-inputs", "calibration inputs (noise draws)"),
                      ("--seed", "random seed of projections and noise")):
    dest = flag[2:].replace("-", "_")
    s.add_argument(flag, type=int_arg, default=None,
                   help=f"{help_} (default: {SYNTHETIC_DEFAULTS[dest]})")
  add_calibration_args(p)
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``jsta-calibrate`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status.

  Bad options and inputs end in ``SystemExit(2)`` with one ``error:`` line on stderr.
  """
  p = build_parser()
  args = p.parse_args(argv)
  check_calibration_args(p, args)
  if args.qkv and (args.latent is None or args.tile is None):
    p.error("--qkv needs the layout: --latent and --tile (and --text-max-len if there are text "
            "slots)")
  given = [name for name in SYNTHETIC_DEFAULTS if getattr(args, name) is not None]
  if args.qkv and given:
    p.error(f"{', '.join('--' + n.replace('_', '-') for n in given)} "
            f"need{'s' if len(given) == 1 else ''} --synthetic (with --qkv the files give the "
            "heads, head_dim, layers and inputs)")
  for name, default in SYNTHETIC_DEFAULTS.items():
    if getattr(args, name) is None:
      setattr(args, name, default)
  try:
    latent = parse_shape(args.latent, "--latent") if args.latent else SYNTHETIC_LATENT
    tile = parse_shape(args.tile, "--tile") if args.tile else SYNTHETIC_TILE
  except ValueError as e:
    p.error(str(e))
  if args.text_max_len < 0:
    p.error(f"--text-max-len must be >= 0, got {args.text_max_len}")
  text_len = args.text_max_len if args.text_len is None else args.text_len
  if not 0 <= text_len <= args.text_max_len:
    p.error(f"--text-len must be in [0, --text-max-len = {args.text_max_len}], got {text_len}")
  if args.scale is not None:
    try:
      checks.check_scale(args.scale)
    except ValueError as e:
      p.error(f"--{e}")
    if not args.scale > 0:
      p.error(f"--scale must be > 0, got {args.scale}")
  if args.seed < 0:
    p.error(f"--seed must be >= 0, got {args.seed}")
  try:
    spec = jsta.STASpec(latent, tile, jsta.full_window(latent, tile), text_len,
                        args.text_max_len, args.text_position)
  except ValueError as e:
    p.error(f"--latent/--tile: {e}")
  if args.qkv:
    try:
      read_file, inputs = qkv_capture(args.qkv, spec)
    except ValueError as e:
      p.error(f"--qkv {e}")

    def capture_fn(i):
      # Values are checked as each file is read: the same "--qkv PATH: ..." form as up front.
      try:
        return read_file(i)
      except ValueError as e:
        raise ValueError(f"--qkv {e}") from None

    what = f"q/k/v files {', '.join(args.qkv)}"
  else:
    for name in ("heads", "head_dim", "depth", "num_inputs"):
      if getattr(args, name) < 1:
        p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    capture_fn, inputs = synthetic_capture(spec, heads=args.heads, head_dim=args.head_dim,
                                           depth=args.depth, num_inputs=args.num_inputs,
                                           seed=args.seed)
    what = (f"synthetic random-projection heads ({args.depth} layers x {args.heads} heads, "
            f"head_dim {args.head_dim})")
  return run_calibration(p, args, capture_fn, inputs, spec, what, scale=args.scale)


if __name__ == "__main__":
  sys.exit(main())
