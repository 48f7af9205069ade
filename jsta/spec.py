"""STA layout specification: latent shape, tile shape, window (in tiles), text tokens.

The semantics are those of docs/SEMANTICS.md: tokens are cut into tiles, tiles are ordered
t-major, and a query tile attends the key tiles inside a window whose center is clamped into the
volume.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import math
from typing import Sequence

import numpy as np

from jsta import checks, grid

Window = tuple[int, ...]


def _check_ordered(value, name: str, what: str) -> None:
  # A set's (or a mapping's keys') order is not the caller's: {3, 16, 8} would become some
  # permutation of the axes without a word.
  if isinstance(value, (collections.abc.Set, collections.abc.Mapping)):
    raise TypeError(f"{name} must be {what} (an ordered sequence), got the unordered "
                    f"{type(value).__name__} {value!r}")


def _as_int_tuple(value, name: str) -> tuple[int, ...]:
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a tuple of ints, got the bool {value!r}")
  if isinstance(value, (int, np.integer)):
    value = (int(value),)
  if isinstance(value, (str, bytes)):
    raise TypeError(f"{name} must be a tuple of ints, got {value!r}")
  _check_ordered(value, name, "a tuple of ints")
  try:
    out = tuple(value)
  except TypeError:
    raise TypeError(f"{name} must be a tuple of ints, got {value!r}") from None
  for v in out:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise TypeError(f"{name} must be a tuple of ints, got {value!r}")
  return tuple(int(v) for v in out)


def _check_window(window: tuple[int, ...], rank: int, name: str,
                  causal_axes: tuple[int, ...] = ()) -> None:
  if len(window) != rank:
    raise ValueError(
        f"{name} {window} has rank {len(window)} but the latent/tile rank is {rank}")
  for d, w in enumerate(window):
    if w <= 0:
      raise ValueError(f"{name} {window}: window sizes must be positive (in tiles)")
    if w % 2 == 0 and d not in causal_axes:
      raise ValueError(
          f"{name} {window}: window sizes must be odd (a centered window of tiles) on axes "
          f"that are not causal, got {w} on axis {d}")


TEXT_POSITIONS = ("last", "first")


@dataclasses.dataclass(frozen=True)
class STASpec:
  """A sliding-tile-attention layout. Frozen and hashable, so it can be a static jit argument.

  Attributes:
    latent_shape: (T, H, W) for video, (H, W) for images or (L,) for 1D, after patchify.
    tile_shape: tile size per axis, same rank as ``latent_shape``. Axes that are not a multiple
      of their tile are padded (padded keys are masked, padded queries give zeros).
    window: window in tiles, odd per axis, e.g. (3, 3, 3); or one such window per head,
      e.g. ((3, 3, 3), (5, 5, 5), ...). A window >= the number of tiles on an axis covers it.
    text_len: number of valid text tokens (the first ``text_len`` text slots).
    text_max_len: number of text token slots (text_len valid, the rest padding); 0 for none.
    text_position: "last" (default: the text slots follow the video positions, as in
      HunyuanVideo) or "first" (they precede them, as in SD3/FLUX and CogVideoX); the
      attention rules are the same.
    causal_axes: axes (e.g. ``(0,)`` for time) on which attention is causal: a query tile at
      coordinate q attends key tiles k with ``q - (w - 1) <= k <= q`` (``w`` counts the
      query's own tile, any positive size, no clamping); the other axes keep the centered,
      clamped window. Windows on causal axes may be even.
  """

  latent_shape: tuple[int, ...]
  tile_shape: tuple[int, ...]
  window: tuple[int, ...] | tuple[tuple[int, ...], ...]
  text_len: int = 0
  text_max_len: int = 0
  text_position: str = "last"
  causal_axes: tuple[int, ...] = ()

  def __post_init__(self):
    latent = _as_int_tuple(self.latent_shape, "latent_shape")
    tile = _as_int_tuple(self.tile_shape, "tile_shape")
    if not 1 <= len(latent) <= 3:
      raise ValueError(f"latent_shape must have rank 1, 2 or 3, got {latent}")
    if any(s <= 0 for s in latent):
      raise ValueError(f"latent_shape sizes must be positive, got {latent}")
    if len(tile) != len(latent):
      raise ValueError(
          f"tile_shape {tile} has rank {len(tile)} but latent_shape {latent} has rank {len(latent)}")
    if any(s <= 0 for s in tile):
      raise ValueError(f"tile_shape sizes must be positive, got {tile}")
    causal = _as_int_tuple(self.causal_axes, "causal_axes")
    if any(not 0 <= a < len(latent) for a in causal) or len(set(causal)) != len(causal):
      raise ValueError(f"causal_axes must be distinct axes in [0, {len(latent)}) of the "
                       f"rank-{len(latent)} latent, got {causal}")
    causal = tuple(sorted(causal))
    if not isinstance(self.text_position, str):
      raise TypeError(f"text_position must be one of {TEXT_POSITIONS}, got "
                      f"{self.text_position!r}")
    if self.text_position not in TEXT_POSITIONS:
      raise ValueError(f"text_position must be one of {TEXT_POSITIONS}, got "
                       f"{self.text_position!r}")
    window = self.window
    if isinstance(window, (bool, np.bool_)):
      raise TypeError(f"window must be a tuple of odd ints (in tiles) or a tuple of per-head "
                      f"tuples, got the bool {window!r}")
    if isinstance(window, (int, np.integer)):
      window = (window,)
    _check_ordered(window, "window", "a tuple of odd ints (in tiles) or a tuple of per-head "
                   "tuples")
    try:
      if isinstance(window, (str, bytes)):
        raise TypeError
      window = tuple(window)
    except TypeError:
      raise TypeError(
          f"window must be a tuple of odd ints (in tiles) or a tuple of per-head tuples, "
          f"got {window!r}") from None
    if window and all(not isinstance(w, (int, np.integer)) for w in window):
      per_head = tuple(_as_int_tuple(w, f"window[{i}]") for i, w in enumerate(window))
      if not per_head:
        raise ValueError("window: a per-head window list must not be empty")
      for i, w in enumerate(per_head):
        _check_window(w, len(latent), f"window[{i}]", causal)
      window = per_head
    else:
      window = _as_int_tuple(window, "window")
      _check_window(window, len(latent), "window", causal)
    for name in ("text_len", "text_max_len"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be a non-negative int, got {v!r}")
      if v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    if self.text_len > self.text_max_len:
      raise ValueError(
          f"text_len ({self.text_len}) must be <= text_max_len ({self.text_max_len})")
    object.__setattr__(self, "latent_shape", latent)
    object.__setattr__(self, "tile_shape", tile)
    object.__setattr__(self, "window", window)
    object.__setattr__(self, "causal_axes", causal)
    object.__setattr__(self, "text_len", int(self.text_len))
    object.__setattr__(self, "text_max_len", int(self.text_max_len))

  # ---- geometry -------------------------------------------------------------------------------
  @property
  def rank(self) -> int:
    return len(self.latent_shape)

  @property
  def num_tiles(self) -> tuple[int, ...]:
    """Tiles per axis (padded axes rounded up)."""
    return grid.num_tiles(self.latent_shape, self.tile_shape)

  @property
  def padded_latent_shape(self) -> tuple[int, ...]:
    """The tile grid's extent: num_tiles * tile_shape per axis."""
    return tuple(n * t for n, t in zip(self.num_tiles, self.tile_shape))

  @property
  def tile_size(self) -> int:
    """Tokens per tile."""
    return math.prod(self.tile_shape)

  @property
  def video_len(self) -> int:
    """Valid video tokens, T*H*W."""
    return math.prod(self.latent_shape)

  @property
  def tile_align(self) -> int:
    """Partial edge tiles are padded to a multiple of this many tokens: 64 for tiles of a
    multiple of 64 tokens, else the tile size (see :mod:`jsta.positions`)."""
    return grid.tile_align(self.tile_size)

  @property
  def tile_lengths(self) -> tuple[int, ...]:
    """Positions each tile occupies in the sequence (tile order): ``tile_size`` for whole
    tiles, a partial edge tile's real tokens rounded up to ``tile_align``."""
    return tuple(int(x) for x in grid.tile_lengths(self.latent_shape, self.tile_shape))

  @property
  def block_align(self) -> int:
    """The gcd of the tile lengths: blocks of a divisor of it never span two tiles."""
    return int(np.gcd.reduce(grid.tile_lengths(self.latent_shape, self.tile_shape)))

  @property
  def padded_video_len(self) -> int:
    """Video positions in tile order, padding of partial edge tiles included."""
    return int(grid.tile_offsets(self.latent_shape, self.tile_shape)[-1])

  @property
  def seq_len(self) -> int:
    """Length of the sequence the op takes: padded video tokens and text_max_len text slots."""
    return self.padded_video_len + self.text_max_len

  @property
  def video_offset(self) -> int:
    """Sequence position of the first video position (text_max_len when the text is first)."""
    return self.text_max_len if self.text_position == "first" else 0

  @property
  def text_offset(self) -> int:
    """Sequence position of the first text slot."""
    return 0 if self.text_position == "first" else self.padded_video_len

  def text_last(self) -> "STASpec":
    """The same layout with the text slots last (the order the kernels work in)."""
    return dataclasses.replace(self, text_position="last")

  @property
  def is_padded(self) -> bool:
    return self.padded_latent_shape != self.latent_shape

  # ---- windows --------------------------------------------------------------------------------
  @property
  def is_per_head(self) -> bool:
    return bool(self.window) and isinstance(self.window[0], tuple)

  def head_windows(self, num_heads: int) -> tuple[Window, ...]:
    """The window of each head: [num_heads] tuples. Raises if a per-head list does not fit."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
      raise TypeError(f"num_heads must be an int, got {num_heads!r}")
    if num_heads < 1:
      raise ValueError(f"num_heads (heads) must be >= 1, got {num_heads}")
    if self.is_per_head:
      if len(self.window) != num_heads:
        raise ValueError(
            f"window gives {len(self.window)} per-head windows but there are {num_heads} heads")
      return self.window  # type: ignore[return-value]
    return (self.window,) * num_heads  # type: ignore[return-value]

  def distinct_windows(self) -> tuple[Window, ...]:
    ws = self.window if self.is_per_head else (self.window,)
    return tuple(dict.fromkeys(ws))  # type: ignore[arg-type]

  def check_window(self, window, name: str = "window") -> Window:
    """``window`` as a tuple of ints, checked as the constructor checks one window: the
    latent's rank, positive sizes, odd on axes that are not causal. Raises TypeError or
    ValueError naming ``name``."""
    window = _as_int_tuple(window, name)
    _check_window(window, self.rank, name, self.causal_axes)
    return window

  def effective_window(self, window: Window) -> Window:
    """Window clipped to the tile grid (at most what a tile attends per axis)."""
    window = self.check_window(window)
    return tuple(min(w, n) for w, n in zip(window, self.num_tiles))

  # ---- counts ---------------------------------------------------------------------------------
  def sparsity(self, window: Window | None = None) -> float:
    """Share of (query tile, key tile) pairs of the video part that are skipped.

    ``1 - prod(min(k_d, n_d)) / prod(n_d)`` without causal axes (every tile attends the same
    number); with them, counted exactly from the tile rule. For per-head specs, the mean over
    heads.
    """
    if window is None:
      ws = self.window if self.is_per_head else (self.window,)
      return float(np.mean([self.sparsity(w) for w in ws]))
    window = self.check_window(window)
    if self.causal_axes:
      kept = np.prod([grid.axis_attend(n, w, d in self.causal_axes).mean()
                      for d, (n, w) in enumerate(zip(self.num_tiles, window))])
      return float(1.0 - kept)
    kept = math.prod(self.effective_window(window))
    return 1.0 - kept / math.prod(self.num_tiles)

  def attended_pairs(self, num_heads: int = 1) -> int:
    """Attended (query, key) token pairs summed over heads, valid tokens only (text included).

    Counted at tile granularity in O(tiles) per window: each query tile's real tokens times the
    real tokens of the key tiles in its box (:func:`jsta.grid.box_sums`), plus the text rows
    and columns, which attend and are attended by every valid token."""
    real = grid.tile_extents(self.latent_shape, self.tile_shape).prod(axis=1)   # [tiles]
    t = self.text_len
    total = 0
    for w in self.head_windows(num_heads):
      video = int(real @ grid.box_sums(self.num_tiles, w, self.causal_axes, real))
      total += video + 2 * self.video_len * t + t * t      # video->text, text->video, text->text
    return total

  def flops(self, head_dim: int, num_heads: int = 1) -> int:
    """Forward FLOPs of the attended blocks: 4 * attended pairs * head_dim (summed over heads)."""
    head_dim = checks.check_int("head_dim", head_dim, minimum=1)
    return 4 * self.attended_pairs(num_heads) * head_dim

  def with_window(self, window) -> "STASpec":
    return dataclasses.replace(self, window=window)


def full_window(latent_shape: Sequence[int], tile_shape: Sequence[int]) -> Window:
  """The smallest odd window (in tiles) that covers the whole volume from every tile.

  ``latent_shape`` and ``tile_shape`` as in :class:`STASpec`: ints > 0 of one rank, 1 to 3.
  """
  latent_shape = _as_int_tuple(latent_shape, "latent_shape")
  tile_shape = _as_int_tuple(tile_shape, "tile_shape")
  if not 1 <= len(latent_shape) <= 3:
    raise ValueError(f"latent_shape must have rank 1, 2 or 3, got {latent_shape}")
  if len(tile_shape) != len(latent_shape):
    raise ValueError(f"tile_shape {tile_shape} has rank {len(tile_shape)} but latent_shape "
                     f"{latent_shape} has rank {len(latent_shape)}")
  for name, shape in (("latent_shape", latent_shape), ("tile_shape", tile_shape)):
    if any(x <= 0 for x in shape):
      raise ValueError(f"{name} sizes must be positive, got {shape}")
  out = []
  for s, t in zip(latent_shape, tile_shape):
    n = -(-s // t)
    out.append(n if n % 2 else n + 1)
  return tuple(out)
