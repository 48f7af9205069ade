"""The attention shapes every benchmark in benchmarks/ runs at (``--shape NAME``).

Latents are in tokens per axis (after the VAE and patchify: 4x in time, 16x in space);
tiles and windows as in :class:`jsta.STASpec` (windows in tiles). Latent axes that are not a
multiple of their tile are padded by the spec. All but "quick" and "paper_d64": head_dim 128,
bf16, batch 1.

  paper          HunyuanVideo 720p as in the STA paper's kernel table: 30x48x80 = 115,200
                 tokens, tile 6x8x8, window 3x3x3 (91% sparse), 24 heads
  paper_text     the paper shape with 200 valid text tokens in 256 slots (joint attention)
  wan14b_720p    Wan 2.1 14B, 1280x720, 81 frames: 21x45x80, tile 3x8x8, window 5x3x3, 40 heads
  wan1_3b_480p   Wan 2.1 1.3B, 832x480, 81 frames: 21x30x52, tile 3x8x8, window 5x3x3, 12 heads
  hunyuan_544p   HunyuanVideo 960x544, 129 frames: 33x34x60, tile 3x8x8, window 5x3x3, 24 heads,
                 200 valid text tokens in 256 slots
  image_2048     a 2048x2048 image: 128x128, tile 8x8, window 7x7, 24 heads
Beyond the shapes bench's table (``benchmarks.shapes_bench.BEYOND_TABLE``): the same
efficiency is asked for at shapes no model row has:
  paper_d64      the paper shape at head_dim 64 (48 heads: the paper's FLOPs; the split backward)
  wan14b_720p_w311  Wan-14B 720p with a window of 3x1x1 tiles: short key lists
  tile128_720p   tiles of 128 tokens (2x8x8) on a 32x48x80 latent, window 3x3x3, 24 heads
  quick          a tiny float32 shape for CPU runs (seconds)
  quick_bf16     a tiny bf16 shape the Hopper kernels take (128-token tiles, head_dim 128):
                 compile checks (benchmarks.compile_bench) in seconds
"""

from __future__ import annotations

import dataclasses

import jsta


@dataclasses.dataclass(frozen=True)
class BenchShape:
  """One benchmark shape: the STA layout (``spec()``) and the q/k/v it is timed with."""

  name: str
  latent: tuple[int, ...]
  tile: tuple[int, ...]
  window: tuple[int, ...]
  heads: int
  head_dim: int = 128
  text_len: int = 0
  text_max_len: int = 0
  batch: int = 1
  dtype: str = "bfloat16"

  def spec(self, window=None) -> jsta.STASpec:
    """The layout with the shape's window, or ``window`` (tiles, or "dense": the full window)."""
    if window is None:
      window = self.window
    elif isinstance(window, str):
      if window != "dense":
        raise ValueError(f"window must be a tuple of tiles or 'dense', got {window!r}")
      window = jsta.full_window(self.latent, self.tile)
    return jsta.STASpec(self.latent, self.tile, tuple(window), text_len=self.text_len,
                        text_max_len=self.text_max_len)

  def qkv_shape(self, seq_len: int | None = None) -> tuple[int, int, int, int]:
    """[batch, seq, heads, head_dim] (seq: the spec's unless given)."""
    return (self.batch, self.spec().seq_len if seq_len is None else seq_len, self.heads,
            self.head_dim)

  def describe(self) -> str:
    spec = self.spec()
    text = f", text {self.text_len}/{self.text_max_len}" if self.text_max_len else ""
    x = "x".join
    return (f"{self.name}: batch {self.batch}, latent {x(map(str, self.latent))} "
            f"({spec.video_len:,} tokens, sequence {spec.seq_len:,}), "
            f"tile {x(map(str, self.tile))}, window {x(map(str, self.window))}, "
            f"{self.heads} heads, head_dim {self.head_dim}{text}, {self.dtype}")


SHAPES: dict[str, BenchShape] = {s.name: s for s in (
    BenchShape("paper", (30, 48, 80), (6, 8, 8), (3, 3, 3), heads=24),
    BenchShape("paper_text", (30, 48, 80), (6, 8, 8), (3, 3, 3), heads=24, text_len=200,
               text_max_len=256),
    BenchShape("wan14b_720p", (21, 45, 80), (3, 8, 8), (5, 3, 3), heads=40),
    BenchShape("wan1_3b_480p", (21, 30, 52), (3, 8, 8), (5, 3, 3), heads=12),
    BenchShape("hunyuan_544p", (33, 34, 60), (3, 8, 8), (5, 3, 3), heads=24, text_len=200,
               text_max_len=256),
    BenchShape("image_2048", (128, 128), (8, 8), (7, 7), heads=24),
    BenchShape("paper_d64", (30, 48, 80), (6, 8, 8), (3, 3, 3), heads=48, head_dim=64),
    BenchShape("wan14b_720p_w311", (21, 45, 80), (3, 8, 8), (3, 1, 1), heads=40),
    BenchShape("tile128_720p", (32, 48, 80), (2, 8, 8), (3, 3, 3), heads=24),
    BenchShape("quick", (6, 16, 16), (2, 4, 4), (1, 1, 1), heads=2, head_dim=64,
               dtype="float32"),
    BenchShape("quick_bf16", (4, 8, 16), (2, 8, 8), (1, 1, 1), heads=2),
)}


def get(name: str) -> BenchShape:
  """The shape called ``name``; ValueError naming the known ones otherwise."""
  try:
    return SHAPES[name]
  except KeyError:
    raise ValueError(f"unknown shape {name!r}; known: {', '.join(SHAPES)}") from None
