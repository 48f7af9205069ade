"""Training-free per-(layer, head) window calibration for STA.

Attention heads differ in locality but are consistent across inputs (STA paper, Sec. 3.3): run
full attention on a few inputs, measure for every head how far each candidate window's output is
from full attention, and keep the cheapest window within a budget.

Everything here is computed blockwise over query blocks (``jax.lax.map``), so memory is
O(batch * heads * block_q * seq) and a 100K-token layer fits. For one query block the full
softmax probabilities ``p`` (masked only by key validity) are computed once; STA's output for a
window is the same probabilities restricted to the window's keys and renormalized (STA is
softmax over the window's keys, which is exactly this), so all candidates share one pass.

Metrics are taken over the valid *video* queries: text queries attend every key under any window
(docs/SEMANTICS.md), so they would only dilute the numbers; padded queries have no output.

  recall    share of a query's full-attention probability mass that falls in the window,
            averaged over queries (and batch, and inputs): 1.0 means the window misses nothing.
  error     relative L2 distance of the window's output to full attention, per head:
            sqrt(sum ||o_sta - o_full||^2 / sum ||o_full||^2) over queries, batch and inputs.
  sparsity  share of video (query tile, key tile) pairs skipped, ``STASpec.sparsity(window)``.

This module is the library (also reachable as ``jsta.calibrate``) and has no command line of
its own. The model-agnostic command line is ``jsta-calibrate`` (:mod:`jsta.calibration.cli`: q,
k, v from .npz files, or a synthetic model); the small video DiT of the repository's ``models/``
has ``python -m models.calibrate``.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jsta import backends, checks, inputs, positions
from jsta import mask as mask_lib
from jsta.ops import check_implementation
from jsta.spec import STASpec, Window
from jsta.calibration.strategy import WindowStrategy

# Elements of one query block's [batch, heads, block_q, seq] float32 logits when block_q is
# chosen automatically: 2**27 floats = 512 MiB (p and one masked copy are live beside it).
_AUTO_BLOCK_ELEMENTS = 2 ** 27


# ---- inputs -------------------------------------------------------------------------------------

def _check_spec(spec, name: str = "spec") -> None:
  if not isinstance(spec, STASpec):
    raise TypeError(f"{name} must be a jsta.STASpec, got {type(spec).__name__}")


def _check_qkv(spec: STASpec, **arrays) -> tuple[int, int, int, int]:
  _check_spec(spec)
  shape = None
  for name, x in arrays.items():
    checks.check_array(name, x)
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    for axis, what in ((0, "batch"), (2, "heads"), (3, "head_dim")):
      if x.shape[axis] < 1:
        raise ValueError(f"{name}: {what} (axis {axis}) must be >= 1, got shape {x.shape}")
    if shape is None:
      shape = x.shape
    elif x.shape != shape:
      raise ValueError(
          "q, k (and v) must have the same shape, got "
          + ", ".join(f"{n} {a.shape}" for n, a in arrays.items()))
  # The dtypes of jsta.sliding_tile_attention, float64 computed as float32 as there: anything
  # else (complex, bool, int) would give numbers that mean nothing.
  dtypes = [inputs.computed_dtype(x.dtype) for x in arrays.values()]
  if len(set(dtypes)) != 1:
    raise TypeError(f"{', '.join(arrays)} must share a dtype, got "
                    f"{', '.join(f'{n} {x.dtype}' for n, x in arrays.items())}")
  if dtypes[0] not in inputs.SUPPORTED_DTYPES:
    raise TypeError(f"{', '.join(arrays)}: dtype must be float32, bfloat16 or float16 (float64 "
                    f"is computed as float32), got {dtypes[0]}")
  if shape[1] != spec.seq_len:
    raise ValueError(
        f"q has seq {shape[1]} but the spec needs seq_len = padded_video_len "
        f"({spec.padded_video_len}) + text_max_len ({spec.text_max_len}) = {spec.seq_len}; "
        "put video tokens in tile order with jsta.tile_order first")
  return shape


def _text_last(spec: STASpec, *arrays):
  """(spec.text_last(), arrays in that order): the text slots moved behind the video tokens
  when ``spec.text_position == "first"`` (the passes below read video first, then text)."""
  if spec.text_position == "last":
    return (spec, *arrays)
  return (spec.text_last(), *(jnp.roll(jnp.asarray(x), -spec.text_max_len, axis=1)
                              for x in arrays))


def _check_finite(stats: "LayerStats") -> None:
  for name in ("err_sq", "ref_sq", "recall"):
    if not np.isfinite(getattr(stats, name)).all():
      raise ValueError(
          f"the calibration's {name.split('_')[0]} is not finite: q, k or v hold NaN or inf at "
          "valid positions (padded latent positions and padded text slots may hold anything), "
          "or the scale times q . k overflows float32")


def _check_candidates(candidates, spec: STASpec) -> tuple[Window, ...]:
  if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Iterable):
    raise TypeError(f"candidates must be a list of windows (tuples of ints, in tiles), got "
                    f"{type(candidates).__name__} {candidates!r}")
  out = []
  for i, c in enumerate(candidates):
    try:
      per_head = spec.with_window(c).is_per_head
    except (TypeError, ValueError) as e:
      raise type(e)(f"candidates[{i}]: {e}") from None
    if per_head:
      raise ValueError(f"candidates[{i}] must be one window (a tuple of ints), got {c!r}")
    # spec.check_window: the rules of the spec (odd, except on its causal axes), which the
    # strategy made from the chosen windows keeps.
    out.append(spec.check_window(c, f"candidates[{i}]"))
  if not out:
    raise ValueError("candidates must hold at least one window")
  if len(set(out)) != len(out):
    raise ValueError(f"candidates must be distinct, got {out}")
  return tuple(out)


def _auto_block_q(batch: int, heads: int, seq: int, video_len: int) -> int:
  b = 512
  while b > 8 and batch * heads * b * seq > _AUTO_BLOCK_ELEMENTS:
    b //= 2
  return max(1, min(b, video_len))


def capped_block_q(block_q: int, spec: STASpec) -> int:
  """``block_q`` at most the video's rows: rows are padded up to a multiple of block_q, so a
  block beyond the video only costs memory (block_q=10**9 ran out of it)."""
  return min(block_q, max(spec.padded_video_len, 1))


def _check_block_q(block_q, batch, heads, spec) -> int:
  if block_q is None:
    return _auto_block_q(batch, heads, spec.seq_len, spec.padded_video_len)
  return capped_block_q(checks.check_int("block_q", block_q, minimum=1), spec)


def _check_options(scale, block_q, sta_backend=None) -> None:
  """The options every entry point takes, checked before any q/k/v is read or computed on."""
  checks.check_scale(scale)
  if block_q is not None:
    checks.check_int("block_q", block_q, minimum=1)
  if isinstance(sta_backend, str):
    backends.check_backend(sta_backend, "sta_backend")
  elif sta_backend is not None:
    try:
      check_implementation(backend=sta_backend)
    except TypeError:
      raise TypeError(f"sta_backend must be None, a backend name (a str), a backend object or "
                      f"a sequence of them, got {type(sta_backend).__name__} "
                      f"{sta_backend!r}") from None
    except ValueError as e:
      raise ValueError(f"sta_backend: {e}") from None


def _tile_masks(spec: STASpec, windows: Sequence[Sequence[Window]]) -> np.ndarray:
  """[C, Hm, num_tiles, num_tiles] float32: tile masks of C window sets over Hm heads."""
  cache: dict[Window, np.ndarray] = {}
  out = []
  for per_head in windows:
    row = []
    for w in per_head:
      if w not in cache:
        cache[w] = mask_lib.tile_mask(spec, w).astype(np.float32)
      row.append(cache[w])
    out.append(np.stack(row))
  return np.stack(out)


def _query_tables(spec: STASpec, block_q: int):
  """Video query rows padded to a block multiple: tile index int32[nqp], weight float32[nqp]."""
  nv = spec.padded_video_len
  nqp = -(-nv // block_q) * block_q
  tiles = np.zeros(nqp, np.int32)
  tiles[:nv] = positions.position_tile(spec)
  weight = np.zeros(nqp, np.float32)
  weight[:nv] = mask_lib.video_token_valid(spec)
  return tiles, weight


# ---- the blockwise pass ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("block_q", "with_outputs", "return_full"))
def _blockwise(q, k, v, q_tiles, q_weight, key_tiles, key_valid, tmask, scale, *,
               block_q: int, with_outputs: bool, return_full: bool):
  """One pass over video query blocks.

  Args:
    q, k, v: [B, S, H, D] (v unused unless with_outputs); the first nv positions are video
      tokens in tile order, the rest text slots.
    q_tiles, q_weight: [nqp] tile index and weight (1 valid, 0 padding) of video query rows,
      nqp a multiple of block_q.
    key_tiles: [nv] int32, the tile of each video position (ascending: tiles are contiguous).
    key_valid: [S] bool.  tmask: [C, Hm, nt, nt] float32 tile masks (Hm = 1 or H).
  Returns dict of sums over batch and valid queries:
    recall [C, H]; count (); and with outputs err_sq [C, H], ref_sq [H];
    with return_full also full [B, nqp, H, D] float32 full-attention outputs.
  """
  b, s, h, d = q.shape
  c, _, nt, _ = tmask.shape
  nv = key_tiles.shape[0]
  nqp = q_tiles.shape[0]
  nb = nqp // block_q
  tmask = jnp.broadcast_to(tmask, (c, h, nt, nt))
  precision = jax.lax.Precision.HIGHEST
  f32 = jnp.float32
  qv = q[:, :nv]
  if nqp > nv:
    qv = jnp.pad(qv, ((0, 0), (0, nqp - nv), (0, 0), (0, 0)))
  q_blocks = qv.reshape(b, nb, block_q, h, d).swapaxes(0, 1)        # [nb, B, bq, H, D]
  # Padded positions hold whatever the caller left there; NaN or inf there must change
  # nothing (as in the op): invalid keys are dropped by a select on the logits, invalid
  # values by this one (0 * NaN in P @ V would reach every row), invalid query rows below.
  vf = jnp.where(key_valid[None, :, None, None], v.astype(f32), 0.0)
  v_vid, v_txt = vf[:, :nv], vf[:, nv:]

  def one_block(args):
    qb, tb, wb = args                                                # [B,bq,H,D], [bq], [bq]
    qb = jnp.where(wb[None, :, None, None] > 0, qb, jnp.zeros((), qb.dtype))
    logits = jnp.einsum("bqhd,bkhd->bhqk", qb, k, precision=precision,
                        preferred_element_type=f32) * scale          # [B,H,bq,S]
    logits = jnp.where(key_valid, logits, -jnp.inf)
    m = logits.max(axis=-1, keepdims=True)
    p = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0))
    p_vid, p_txt = p[..., :nv], p[..., nv:]
    l_txt = p_txt.sum(-1)                                            # [B,H,bq]
    l_full = p.sum(-1)
    rows = tmask[:, :, tb]                                           # [C,H,bq,nt]
    # The mask is tile-granular, so the in-window mass only needs per-tile sums of p.
    p_tile = jnp.moveaxis(jax.ops.segment_sum(                      # [B,H,bq,nt]
        jnp.moveaxis(p_vid, -1, 0), key_tiles, num_segments=nt, indices_are_sorted=True), 0, -1)
    l_win = jnp.einsum("bhqt,chqt->cbhq", p_tile, rows, precision=precision) + l_txt
    safe = lambda x: jnp.where(x > 0, x, 1.0)  # padded query rows: avoid 0/0 (weight 0 anyway)
    recall = l_win / safe(l_full)
    out = {"recall": jnp.einsum("cbhq,q->ch", recall, wb, precision=precision),
           "count": wb.sum() * b}
    if with_outputs:
      o_txt = jnp.einsum("bhqk,bkhd->bhqd", p_txt, v_txt, precision=precision)
      o_full = (jnp.einsum("bhqk,bkhd->bhqd", p_vid, v_vid, precision=precision)
                + o_txt) / safe(l_full)[..., None]
      out["ref_sq"] = jnp.einsum("bhqd,q->h", o_full ** 2, wb, precision=precision)
      errs = []
      for ci in range(c):  # one [B,H,bq,nv] masked copy at a time
        win = jnp.take(rows[ci], key_tiles, axis=-1)                  # [H,bq,nv]
        o_c = (jnp.einsum("bhqk,bkhd->bhqd", p_vid * win, v_vid, precision=precision)
               + o_txt) / safe(l_win[ci])[..., None]
        errs.append(jnp.einsum("bhqd,q->h", (o_c - o_full) ** 2, wb, precision=precision))
      out["err_sq"] = jnp.stack(errs)
      if return_full:
        out["full"] = o_full
    return out

  per_block = jax.lax.map(one_block, (q_blocks, q_tiles.reshape(nb, block_q),
                                      q_weight.reshape(nb, block_q)))
  sums = {name: x.sum(0) for name, x in per_block.items() if name != "full"}
  if return_full:
    full = per_block["full"]                                         # [nb,B,H,bq,D]
    sums["full"] = jnp.transpose(full, (1, 0, 3, 2, 4)).reshape(b, nqp, h, d)
  return sums


def _run(q, k, v, spec: STASpec, window_sets, *, scale, block_q, with_outputs, return_full=False):
  """The blockwise pass for text-last inputs (see :func:`_text_last`)."""
  b, _, h, d = q.shape
  block_q = _check_block_q(block_q, b, h, spec)
  tiles, weight = _query_tables(spec, block_q)
  scale = checks.check_scale(scale)
  scale = float(d ** -0.5 if scale is None else scale)
  out = _blockwise(q, k, v, jnp.asarray(tiles), jnp.asarray(weight),
                   jnp.asarray(positions.position_tile(spec), jnp.int32),
                   jnp.asarray(mask_lib.token_valid(spec)),
                   jnp.asarray(_tile_masks(spec, window_sets)), scale,
                   block_q=block_q, with_outputs=with_outputs, return_full=return_full)
  return out, weight


# ---- public: recall -------------------------------------------------------------------------------

def attention_recall(q, k, spec: STASpec, window=None, *, scale: float | None = None,
                     block_q: int | None = None) -> jnp.ndarray:
  """Per head, the share of full-attention probability mass that falls inside the STA window.

  Args:
    q, k: [batch, seq, heads, head_dim], seq = spec.seq_len (video tokens in tile order and
      the text slots, in ``spec.text_position`` order). Full attention is masked only by key
      validity.
    spec: the layout.
    window: one window for every head, or a tuple of per-head windows; default ``spec.window``.
    scale: softmax scale; default head_dim ** -0.5.
    block_q: query rows per block (memory O(batch * heads * block_q * seq)); default: as large
      as fits 2**27 logits, at most 512.
  Returns:
    [heads] float32: mean over valid video queries and batch; 1.0 for a whole-volume window.
  """
  b, _, h, _ = _check_qkv(spec, q=q, k=k)
  _check_options(scale, block_q)
  window = spec.window if window is None else window
  windows = spec.with_window(window).head_windows(h)
  spec, q, k = _text_last(spec, inputs.as_input("q", q), inputs.as_input("k", k))
  out, _ = _run(q, k, k, spec, [windows], scale=scale, block_q=block_q, with_outputs=False)
  return (out["recall"][0] / out["count"]).astype(jnp.float32)


# ---- public: per-layer calibration ----------------------------------------------------------------

@dataclasses.dataclass
class LayerStats:
  """Sums for one layer over inputs, for C candidates and H heads (float64 numpy)."""

  err_sq: np.ndarray   # [C, H]
  ref_sq: np.ndarray   # [H]
  recall: np.ndarray   # [C, H] summed over queries
  count: float         # valid queries summed over batch and inputs

  def __add__(self, other: "LayerStats") -> "LayerStats":
    return LayerStats(self.err_sq + other.err_sq, self.ref_sq + other.ref_sq,
                      self.recall + other.recall, self.count + other.count)

  @property
  def error(self) -> np.ndarray:
    """[C, H] relative L2 distance to full attention."""
    return np.sqrt(self.err_sq / np.where(self.ref_sq > 0, self.ref_sq, 1.0))

  @property
  def mean_recall(self) -> np.ndarray:
    return self.recall / max(self.count, 1.0)


def layer_stats(q, k, v, spec: STASpec, candidates: Sequence[Window], *,
                scale: float | None = None, block_q: int | None = None,
                sta_backend: str | None = None) -> LayerStats:
  """Error/recall sums of every candidate window for one layer's q, k, v.

  Args:
    q, k, v: [batch, seq, heads, head_dim], seq = spec.seq_len, in the spec's order (the text
      slots after the video tokens, or before them with ``text_position="first"``).
    spec: the layout (its window is ignored).
    candidates: windows (in tiles) to try, each applied to every head.
    sta_backend: None computes each candidate's STA output from the shared blockwise softmax
      (exact STA semantics, cheapest); a backend name ("xla", "pallas_triton", ...) runs
      :func:`jsta.sliding_tile_attention` per candidate instead, which also exercises the kernel.
  """
  b, _, h, d = _check_qkv(spec, q=q, k=k, v=v)
  _check_options(scale, block_q, sta_backend)
  candidates = _check_candidates(candidates, spec)
  spec, q, k, v = _text_last(
      spec, *(inputs.as_input(n, x) for n, x in zip("qkv", (q, k, v))))
  sets = [(w,) * h for w in candidates]
  use_op = sta_backend is not None
  out, weight = _run(q, k, v, spec, sets, scale=scale, block_q=block_q, with_outputs=True,
                     return_full=use_op)
  err_sq = np.asarray(out["err_sq"], np.float64)
  if use_op:
    from jsta.ops import sliding_tile_attention
    nv = spec.padded_video_len
    full = out["full"][:, :nv]
    w = jnp.asarray(weight[:nv])
    errs = []
    for cand in candidates:
      o = sliding_tile_attention(q, k, v, spec.with_window(cand), scale=scale,
                                 backend=sta_backend)
      diff = o[:, :nv].astype(jnp.float32) - full
      errs.append(jnp.einsum("bqhd,q->h", diff ** 2, w, precision=jax.lax.Precision.HIGHEST))
    err_sq = np.asarray(jnp.stack(errs), np.float64)
  stats = LayerStats(err_sq=err_sq, ref_sq=np.asarray(out["ref_sq"], np.float64),
                     recall=np.asarray(out["recall"], np.float64), count=float(out["count"]))
  _check_finite(stats)
  return stats


def _budget(name: str, value, maximum: float | None):
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
    raise TypeError(f"{name} must be a real number (int or float), got "
                    f"{type(value).__name__} {value!r}")
  value = float(value)
  if not (0 <= value <= (np.inf if maximum is None else maximum)):
    allowed = "a non-negative number" if maximum is None else f"a number in [0, {maximum:g}]"
    raise ValueError(f"{name} must be {allowed}, got {value!r}")
  return value


def _check_budgets(error_budget, sparsity_budget) -> tuple[float | None, float | None]:
  """The budgets as Python floats (so that NumPy scalars store as JSON), one of them None."""
  if (error_budget is None) == (sparsity_budget is None):
    raise ValueError("pass exactly one of error_budget (max relative L2 error, e.g. 0.05) or "
                     "sparsity_budget (min sparsity in [0, 1], e.g. 0.9)")
  if error_budget is not None:
    return _budget("error_budget", error_budget, None), None
  return None, _budget("sparsity_budget", sparsity_budget, 1.0)


def select_windows(sparsity: np.ndarray, error: np.ndarray, *, error_budget=None,
                   sparsity_budget=None) -> tuple[np.ndarray, np.ndarray]:
  """Per head, the index of the chosen candidate and whether it met the budget.

  Args:
    sparsity: [C]; error: [C, H].
    error_budget: pick the highest-sparsity candidate with error <= budget (ties: lower
      error); if none qualifies, the lowest-error candidate (met = False).
    sparsity_budget: pick the lowest-error candidate with sparsity >= budget (ties: higher
      sparsity); if none qualifies, the sparsest candidate (met = False).
  Returns:
    (chosen int[H], met bool[H]).
  """
  error_budget, sparsity_budget = _check_budgets(error_budget, sparsity_budget)
  arrays = {}
  for name, x in (("sparsity", sparsity), ("error", error)):
    try:
      arrays[name] = np.asarray(x, np.float64)
    except (TypeError, ValueError):
      raise TypeError(f"{name} must be an array of real numbers, got "
                      f"{type(x).__name__}") from None
  sparsity, error = arrays["sparsity"], arrays["error"]
  if sparsity.ndim != 1 or not sparsity.size:
    raise ValueError(f"sparsity must be [candidates] with at least one candidate, got shape "
                     f"{sparsity.shape}")
  if error.shape[:1] != sparsity.shape or error.ndim != 2:
    raise ValueError(f"error must be [candidates, heads] = [{sparsity.size}, heads] (one row "
                     f"per entry of sparsity), got shape {error.shape}")
  # A NaN compares false with any budget: the choice would silently depend on where it is.
  for name, x in arrays.items():
    if not np.isfinite(x).all():
      raise ValueError(f"{name} must be finite, got {x.tolist()}")
  c, h = error.shape
  chosen = np.zeros(h, np.int64)
  met = np.zeros(h, bool)
  for hi in range(h):
    e = error[:, hi]
    if error_budget is not None:
      ok = e <= error_budget
      # lexsort: last key is primary. Primary -sparsity, then error.
      order = np.lexsort((e, -sparsity)) if ok.any() else np.lexsort((-sparsity, e))
    else:
      ok = sparsity >= sparsity_budget - 1e-12
      order = np.lexsort((-sparsity, e)) if ok.any() else np.lexsort((e, -sparsity))
    if ok.any():
      order = [i for i in order if ok[i]]
    chosen[hi] = order[0]
    met[hi] = bool(ok.any())
  return chosen, met


@dataclasses.dataclass(frozen=True, eq=False)
class LayerCalibration:
  """Calibration of one layer: C candidates x H heads.

  Attributes:
    candidates: C windows; sparsity float[C]; error, recall float[C, H];
    chosen int[H] (index into candidates); met bool[H] (the budget was met); windows: [H].
  """

  candidates: tuple[Window, ...]
  sparsity: np.ndarray
  error: np.ndarray
  recall: np.ndarray
  chosen: np.ndarray
  met: np.ndarray

  @property
  def windows(self) -> tuple[Window, ...]:
    return tuple(self.candidates[i] for i in self.chosen)

  def to_json(self) -> dict:
    return {"error": self.error.tolist(), "recall": self.recall.tolist(),
            "chosen": self.chosen.tolist(), "met_budget": self.met.tolist()}


def _layer_calibration(stats: LayerStats, spec, candidates, error_budget, sparsity_budget):
  sparsity = np.array([spec.sparsity(w) for w in candidates])
  error = stats.error
  chosen, met = select_windows(sparsity, error, error_budget=error_budget,
                               sparsity_budget=sparsity_budget)
  return LayerCalibration(candidates=tuple(candidates), sparsity=sparsity, error=error,
                          recall=stats.mean_recall, chosen=chosen, met=met)


def calibrate_layer(q, k, v, spec_base: STASpec, candidates: Sequence[Window], *,
                    error_budget: float | None = None, sparsity_budget: float | None = None,
                    scale: float | None = None, block_q: int | None = None,
                    sta_backend: str | None = None) -> LayerCalibration:
  """Per-head windows for one layer from its q, k, v (pass exactly one budget).

  Args:
    q, k, v: [batch, seq, heads, head_dim], seq = spec_base.seq_len (video tokens in tile
      order and the text slots, in ``spec_base.text_position`` order).
    spec_base: the layout; its window is ignored.
    candidates: windows in tiles; include the whole volume (:func:`jsta.full_window`) so that
      global heads have an exact fallback.
    error_budget / sparsity_budget: see :func:`select_windows`.
    scale, block_q, sta_backend: see :func:`layer_stats`.
  """
  error_budget, sparsity_budget = _check_budgets(error_budget, sparsity_budget)
  _check_spec(spec_base, "spec_base")
  _check_options(scale, block_q, sta_backend)
  candidates = _check_candidates(candidates, spec_base)
  stats = layer_stats(q, k, v, spec_base, candidates, scale=scale, block_q=block_q,
                      sta_backend=sta_backend)
  return _layer_calibration(stats, spec_base, candidates, error_budget, sparsity_budget)


# ---- public: whole-model calibration --------------------------------------------------------------

CaptureFn = Callable[[object], Sequence[tuple]]


def calibrate(capture_fn: CaptureFn, inputs: Iterable, spec_base: STASpec,
              candidates: Sequence[Window], *, error_budget: float | None = None,
              sparsity_budget: float | None = None, scale: float | None = None,
              block_q: int | None = None, sta_backend: str | None = None,
              progress: Callable[[str], None] | None = None) -> WindowStrategy:
  """Calibrates every layer over several inputs and returns the strategy.

  Args:
    capture_fn: ``capture_fn(input)`` returns a list over layers of (q, k, v), each
      [batch, seq, heads, head_dim] with seq = spec_base.seq_len, as the model's attention
      sees them under full attention (video tokens in tile order and the text slots, in
      ``spec_base.text_position`` order: text last or first); or of
      (q, k, v, spec) where spec gives this call's text lengths (e.g. prompts with different
      numbers of valid text tokens): spec_base but for text_len, text_max_len and the
      (ignored) window, else ValueError. q, k, v: float32, bfloat16 or float16 (float64 is
      computed as float32), one dtype.
    inputs: the calibration inputs (e.g. a few prompts/noise seeds/timesteps).
    spec_base, candidates, error_budget, sparsity_budget, scale, block_q, sta_backend:
      as in :func:`calibrate_layer`. Errors are aggregated over inputs as sums of squares
      (relative L2 over all inputs together), recall as a mean over all queries.
  Returns:
    A :class:`WindowStrategy` whose ``metrics`` hold the per-layer error/recall tables.
  """
  if not callable(capture_fn):
    raise TypeError(f"capture_fn must be callable (input -> [(q, k, v)] per layer), got "
                    f"{type(capture_fn).__name__}")
  if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
    raise TypeError(f"inputs must be an iterable of calibration inputs (e.g. a list), got "
                    f"{type(inputs).__name__} {inputs!r}")
  _check_spec(spec_base, "spec_base")
  error_budget, sparsity_budget = _check_budgets(error_budget, sparsity_budget)
  _check_options(scale, block_q, sta_backend)
  if progress is not None and not callable(progress):
    raise TypeError(f"progress must be None or callable (str -> None), got "
                    f"{type(progress).__name__} {progress!r}")
  candidates = _check_candidates(candidates, spec_base)
  totals: list[LayerStats] | None = None
  heads = None
  n_inputs = 0
  for x in inputs:
    layers = capture_fn(x)
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
      raise TypeError(f"capture_fn must return a list of (q, k, v) or (q, k, v, spec) per "
                      f"layer, got {type(layers).__name__} for input {n_inputs}")
    layers = list(layers)
    if not layers:
      raise ValueError("capture_fn returned no layers")
    if totals is not None and len(layers) != len(totals):
      raise ValueError(
          f"capture_fn returned {len(layers)} layers for input {n_inputs} but {len(totals)} "
          "for the first input")
    stats = []
    for li, entry in enumerate(layers):
      if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence):
        raise TypeError(f"capture_fn must return (q, k, v) or (q, k, v, spec) per layer; "
                        f"input {n_inputs}, layer {li} is a {type(entry).__name__}")
      if len(entry) not in (3, 4):
        raise ValueError(f"capture_fn must return (q, k, v) or (q, k, v, spec) per layer; "
                         f"layer {li} has {len(entry)} entries")
      q, k, v = entry[:3]
      spec = spec_base if len(entry) == 3 else entry[3]
      if not isinstance(spec, STASpec):
        raise TypeError(f"input {n_inputs}, layer {li}: the per-call spec (4th entry) must be a "
                        f"jsta.STASpec, got {type(spec).__name__}")
      # Everything but the text lengths (and the window, which calibration ignores) is the
      # base's: the strategy, its sparsity and its causal axes come from spec_base.
      differ = [f.name for f in dataclasses.fields(STASpec)
                if f.name not in ("window", "text_len", "text_max_len")
                and getattr(spec, f.name) != getattr(spec_base, f.name)]
      if differ:
        raise ValueError(
            f"input {n_inputs}, layer {li}: a per-call spec may change the text lengths only "
            f"(text_len, text_max_len), but it has "
            + ", ".join(f"{n}={getattr(spec, n)!r}" for n in differ) + " where spec_base has "
            + ", ".join(f"{n}={getattr(spec_base, n)!r}" for n in differ))
      try:
        h = _check_qkv(spec, q=q, k=k, v=v)[2]
      except (TypeError, ValueError) as e:
        raise type(e)(f"input {n_inputs}, layer {li}: {e}") from None
      if heads is None:
        heads = h
      elif h != heads:
        raise ValueError(f"input {n_inputs}, layer {li} has {h} heads but input 0, layer 0 "
                         f"has {heads}")
      try:
        stats.append(layer_stats(q, k, v, spec, candidates, scale=scale, block_q=block_q,
                                 sta_backend=sta_backend))
      except ValueError as e:
        raise ValueError(f"input {n_inputs}, layer {li}: {e}") from None
    totals = stats if totals is None else [a + b for a, b in zip(totals, stats)]
    n_inputs += 1
    if progress is not None:
      progress(f"input {n_inputs}: {len(layers)} layers")
  if totals is None:
    raise ValueError("inputs must hold at least one calibration input")
  layer_cals = [_layer_calibration(s, spec_base, candidates, error_budget, sparsity_budget)
                for s in totals]
  metrics = {
      "method": "relative_l2_vs_full_attention",
      "error_budget": error_budget, "sparsity_budget": sparsity_budget,
      "num_inputs": n_inputs,
      "candidates": [list(w) for w in candidates],
      "candidate_sparsity": layer_cals[0].sparsity.tolist(),
      "layers": {str(i): c.to_json() for i, c in enumerate(layer_cals)},
  }
  return WindowStrategy(spec_base.latent_shape, spec_base.tile_shape,
                        tuple(c.windows for c in layer_cals), spec_base.text_len,
                        spec_base.text_max_len, metrics=metrics,
                        text_position=spec_base.text_position,
                        causal_axes=spec_base.causal_axes)


def layer_calibrations(strategy: WindowStrategy) -> list[LayerCalibration]:
  """The per-layer tables stored in a calibrated strategy's metrics."""
  if not isinstance(strategy, WindowStrategy):
    raise TypeError(f"strategy must be a jsta.strategy.WindowStrategy, got "
                    f"{type(strategy).__name__}")
  m = strategy.metrics
  if not m or "layers" not in m:
    raise ValueError("strategy has no calibration metrics (was it made by "
                     "jsta.calibrate.calibrate?)")
  cands = tuple(tuple(w) for w in m["candidates"])
  out = []
  for i in range(strategy.num_layers):
    layer = m["layers"][str(i)]
    out.append(LayerCalibration(
        candidates=cands, sparsity=np.asarray(m["candidate_sparsity"]),
        error=np.asarray(layer["error"]), recall=np.asarray(layer["recall"]),
        chosen=np.asarray(layer["chosen"]), met=np.asarray(layer["met_budget"])))
  return out

