"""Choosing a tile for a latent shape: ``suggest_tile``.

A tile fixes both the mask's granularity and the cost of the latent's edges. The Hopper
kernels run tiles of a multiple of 64 tokens at full speed (blocks of 128 rows; tiles of a
multiple of 128 tokens never make a block span two tiles), and a partial edge tile costs its
real tokens rounded up to 64 (:mod:`jsta.positions`). ``suggest_tile`` searches the tiles of such
sizes whose window (an odd number of tiles per axis) comes closest to a target window in tokens,
and among those keeps the least padded.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
from typing import Sequence

from jsta import checks
from jsta.spec import STASpec


@dataclasses.dataclass(frozen=True)
class TileSuggestion:
  """A tile and window for a latent: ``spec`` is the layout they give (``STASpec``);
  ``padding`` the share of sequence positions that hold no token; ``window_tokens`` the window
  in tokens per axis (``window * tile_shape``, capped by the latent)."""

  tile_shape: tuple[int, ...]
  window: tuple[int, ...]
  padding: float
  window_tokens: tuple[int, ...]

  def spec(self, latent_shape, **kwargs) -> STASpec:
    # STASpec checks latent_shape itself, a bare int for a 1D latent included.
    return STASpec(latent_shape, self.tile_shape, self.window, **kwargs)


def _odd_window(target: float, tile: int) -> int:
  """The odd number of tiles whose extent is closest to ``target`` tokens (at least 1)."""
  w = max(1, round(target / tile))
  if w % 2 == 0:
    w = w - 1 if abs((w - 1) * tile - target) <= abs((w + 1) * tile - target) else w + 1
  return max(w, 1)


def _sequence(name: str, value, rank: int | None) -> tuple:
  """``value`` as a tuple: a sequence (or array) as it is; a bare int where one axis is meant
  (always for the latent, as in :class:`STASpec`; for the window when the latent is 1D) as a
  1-tuple. TypeError naming ``name`` for anything else."""
  if isinstance(value, numbers.Integral) and not isinstance(value, bool) and rank in (None, 1):
    return (value,)
  if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
    example = ({1: "(24,)", 2: "(24, 24)"}.get(rank, "(18, 24, 24)") if name == "window_tokens"
               else "(30, 48, 80)")
    per_axis = f", one per axis of the rank-{rank} latent_shape" if rank else ""
    raise TypeError(f"{name} must be a sequence of ints{per_axis} (e.g. {example}), got "
                    f"{type(value).__name__} {value!r}")
  return tuple(value)


def suggest_tile(latent_shape: Sequence[int], window_tokens: Sequence[int], *,
                 multiple: int = 64, max_tile_tokens: int = 512) -> TileSuggestion:
  """The tile for ``latent_shape`` whose window best fits ``window_tokens``, least padded.

  Each tile of a multiple of ``multiple`` tokens (at most ``max_tile_tokens``) gets the odd
  window closest to the target on every axis, and the lowest score wins:
  ``deviation + padding + 0.02 * (tokens not a multiple of 128) + 0.05 * mean(1 / window)``,
  where deviation is the worst axis's relative distance of the window (in tokens) from the
  target and padding the share of positions holding no token. The last term prefers finer
  tiles (a window of several tiles slides more smoothly than one tile).

  Args:
    latent_shape: (T, H, W), (H, W) or (L,) tokens after patchify.
    window_tokens: the wanted window in tokens per axis (e.g. (18, 24, 24)).
    multiple: tiles have a multiple of this many tokens (64: the Hopper kernels' unit).
    max_tile_tokens: the largest tile considered.
  Returns:
    a :class:`TileSuggestion`. Raises ValueError if no tile of that multiple fits the latent.
  """
  latent = tuple(checks.check_int(f"latent_shape[{i}]", s, minimum=1)
                 for i, s in enumerate(_sequence("latent_shape", latent_shape, None)))
  target = tuple(checks.check_int(f"window_tokens[{i}]", s, minimum=1)
                 for i, s in enumerate(_sequence("window_tokens", window_tokens, len(latent))))
  if len(target) != len(latent) or not 1 <= len(latent) <= 3:
    raise ValueError(f"window_tokens {target} must have the rank of latent_shape {latent} "
                     "(1, 2 or 3)")
  checks.check_int("multiple", multiple, minimum=1)
  checks.check_int("max_tile_tokens", max_tile_tokens, minimum=multiple)
  candidates = []
  for tile in itertools.product(*[range(1, min(s, 64) + 1) for s in latent]):
    size = math.prod(tile)
    if size % multiple or size > max_tile_tokens:
      continue
    window = tuple(_odd_window(t_, x) for t_, x in zip(target, tile))
    covered = tuple(min(w * x, s) for w, x, s in zip(window, tile, latent))
    dev = max(abs(c - min(t_, s)) / min(t_, s) for c, t_, s in zip(covered, target, latent))
    spec = STASpec(latent, tile, window)
    padding = 1.0 - spec.video_len / spec.padded_video_len
    score = (dev + padding + 0.02 * (size % 128 != 0)
             + 0.05 * sum(1 / w for w in window) / len(window))
    candidates.append((score, tile, window, padding, covered))
  if not candidates:
    raise ValueError(f"no tile of a multiple of {multiple} tokens (at most {max_tile_tokens}) "
                     f"fits latent_shape {latent}")
  _, tile, window, padding, covered = min(candidates)
  return TileSuggestion(tile_shape=tile, window=window, padding=padding, window_tokens=covered)
