"""jsta: Sliding Tile Attention for JAX.

Public API:
  STASpec, full_window                 layout of tokens, tiles and windows
  suggest_tile                         a tile and window for a latent shape
  tile_order, untile_order             row-major <-> tile order (with padding)
  split_video_text, join_video_text    the sequence's video and text parts, in the spec's order
  block_schedule, BlockSchedule        static block-sparse schedules (numpy, cached)
  sliding_tile_attention               the op (custom_vjp; backends "xla", "pallas_triton", "pallas_mosaic")
  sliding_tile_attention_row_major     the op for tokens in row-major order (reorders inside)
  make_plan, AttentionPlan             the backend, blocks and schedule one call runs with
  register_backend, get_backend,       the backend registry (jsta.backends; the kernels of
  resolve_backend                      pallas_kernels plug in through entry points)
  reference_attention, token_mask      dense float32 reference and the token mask
  jsta.nnx                             Flax NNX module and attention_fn
  jsta.calibration                     per-(layer, head) window strategies and their calibration
  jsta.strategy, jsta.calibrate        the same modules' strategy and search, by their short names
  jsta.sharding                        head-parallel STA over a device mesh
  enable_compilation_cache             a persistent compilation cache (later processes load)
  __version__                          the installed distribution's version
The submodules jsta.nnx, jsta.calibration (jsta.strategy, jsta.calibrate) and jsta.sharding load
on first access (``jsta.nnx`` imports flax).
"""

import importlib.metadata as _metadata

try:
  __version__ = _metadata.version("jsta")
except _metadata.PackageNotFoundError:
  # Imported from a source tree that is not installed (e.g. with PYTHONPATH): no metadata.
  __version__ = "0+unknown"

from jsta.spec import STASpec, full_window
from jsta.tile_choice import TileSuggestion, suggest_tile
from jsta.token_order import join_video_text, split_video_text, tile_order, untile_order
from jsta.schedule import BlockSchedule, block_schedule
from jsta.mask import token_mask, tile_mask, token_valid
from jsta.reference import reference_attention
from jsta.compilation_cache import enable_compilation_cache
from jsta.ops import (sliding_tile_attention, sliding_tile_attention_row_major, make_plan,
                      resolve_backend, register_backend,
                      get_backend, AttentionPlan)


# Submodules loaded on first access, so that `import jsta` stays light (jsta.nnx imports flax,
# about a second) while `jsta.strategy.WindowStrategy`, as the README writes it, just works.
_LAZY_SUBMODULES = ("nnx", "calibration", "strategy", "calibrate", "sharding")


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    import importlib
    return importlib.import_module(f"jsta.{name}")
  raise AttributeError(f"module 'jsta' has no attribute {name!r}")


def __dir__():
  return sorted(set(globals()) | set(_LAZY_SUBMODULES))


__all__ = [
    "STASpec", "full_window", "suggest_tile", "TileSuggestion", "tile_order", "untile_order",
    "split_video_text", "join_video_text", "BlockSchedule", "block_schedule", "token_mask",
    "tile_mask", "token_valid", "reference_attention", "sliding_tile_attention",
    "sliding_tile_attention_row_major", "make_plan", "resolve_backend", "register_backend",
    "get_backend", "AttentionPlan", "enable_compilation_cache",
]
