"""One correctness suite for every backend: forward and gradients against the dense float32
reference, padded positions that never matter, NaN in valid tokens that propagates.

Backends: "xla" (any device), "pallas_triton" (interpret mode on the CPU, compiled on a GPU),
the Hopper kernels in GPU interpret mode on the CPU (small cases, ``cpu_only``) and compiled
on a compute capability 9.x GPU ("pallas_mosaic" with its default fused backward, and a copy
with the split backward). CPU cases are small; GPU cases (marked ``gpu``) are medium.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import pytest

from jsta import STASpec
from helpers import (MOSAIC_APART, MOSAIC_BLOCKS, MOSAIC_FRAGMENTS, MOSAIC_INTERPRET,
                     MOSAIC_INTERPRET_FRAGMENTS, MOSAIC_INTERPRET_LEAN, MOSAIC_LEAN,
                     MOSAIC_PERSISTENT,
                     MOSAIC_SPLIT, backend_id,
                     check_matches_reference, check_padding_never_leaks,
                     check_valid_nan_propagates, interpreted)

XLA, TRITON, MOSAIC = "xla", "pallas_triton", "pallas_mosaic"
# Marks of each backend: the compiled Hopper kernels need such a GPU; interpret mode is for the
# CPU only (far too slow for the GPU's medium cases, and the GPU runs the real kernels).
BACKEND_MARKS = {
    XLA: (), TRITON: (), MOSAIC_INTERPRET: (pytest.mark.cpu_only,),
    MOSAIC: (pytest.mark.gpu, pytest.mark.hopper),
    MOSAIC_SPLIT: (pytest.mark.gpu, pytest.mark.hopper),
    MOSAIC_BLOCKS: (pytest.mark.gpu, pytest.mark.hopper),
    MOSAIC_LEAN: (pytest.mark.gpu, pytest.mark.hopper),
    MOSAIC_PERSISTENT: (pytest.mark.gpu, pytest.mark.hopper),
    MOSAIC_APART: (pytest.mark.gpu, pytest.mark.hopper),
    MOSAIC_FRAGMENTS: (pytest.mark.gpu, pytest.mark.hopper),
    # The options off by default, in interpret mode: slow (their GPU cases: MOSAIC_LEAN,
    # MOSAIC_FRAGMENTS).
    MOSAIC_INTERPRET_LEAN: (pytest.mark.cpu_only, pytest.mark.slow),
    MOSAIC_INTERPRET_FRAGMENTS: (pytest.mark.cpu_only, pytest.mark.slow),
}


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  spec: STASpec
  heads: int
  head_dim: int
  dtype: object
  backends: tuple[str, ...]
  block_q: int | None = None
  block_kv: int | None = None
  batch: int = 2
  gpu: bool = False          # a medium case: GPU runs only
  tol: float | None = None   # relative L2; default 1e-4 for float32, 2e-2 for bf16/fp16


CASES = [
    # Small: any tile and block (xla), power-of-two head_dim and blocks (triton), 64-multiple
    # tiles and head_dim 64/128 (Hopper kernels in interpret mode).
    Case("3d_f32", STASpec((4, 4, 8), (2, 2, 4), (1, 3, 1)), 2, 16, jnp.float32, (XLA, TRITON)),
    Case("3d_padded_text_f32", STASpec((3, 5, 6), (2, 2, 4), (3, 1, 3), text_len=5,
                                       text_max_len=8), 2, 16, jnp.float32, (XLA,), 8, 4),
    Case("3d_padded_text_bf16", STASpec((3, 5, 6), (2, 2, 4), (3, 1, 3), text_len=5,
                                        text_max_len=8), 2, 16, jnp.bfloat16, (XLA,), 8, 4),
    Case("2d_per_head_text", STASpec((6, 8), (2, 4), ((3, 1), (1, 1), (5, 3)), text_len=3,
                                     text_max_len=3), 3, 8, jnp.float32, (XLA,), 4, 8),
    Case("2d_padded_odd_blocks", STASpec((7, 5), (3, 2), (3, 3)), 1, 8, jnp.float32, (XLA,),
         3, 6),
    Case("1d_padded_text", STASpec((13,), (4,), (3,), text_len=1, text_max_len=5), 2, 8,
         jnp.float32, (XLA,), 2, 4),
    Case("3d_d64_f32", STASpec((4, 8, 12), (2, 4, 4), (1, 1, 1)), 2, 64, jnp.float32,
         (XLA, TRITON), 16, 32),
    Case("3d_text_bf16", STASpec((4, 8, 8), (2, 4, 4), (1, 1, 1), text_len=5, text_max_len=12),
         2, 64, jnp.bfloat16, (TRITON,), 32, 16),
    Case("2d_text", STASpec((8, 12), (4, 8), (1, 1), text_len=7, text_max_len=20), 2, 64,
         jnp.float32, (TRITON,), 32, 32),
    Case("1d_padded", STASpec((70,), (16,), (3,)), 2, 64, jnp.float32, (XLA, TRITON), 16, 16),
    Case("padded_latent_text", STASpec((3, 6, 8), (2, 4, 4), (1, 1, 1), text_len=9,
                                       text_max_len=40), 2, 64, jnp.float32, (TRITON,), 16, 32),
    Case("per_head_text", STASpec((4, 8, 12), (2, 4, 4), ((1, 1, 1), (3, 3, 3), (1, 1, 1),
                                                          (1, 1, 3)), text_len=6,
                                  text_max_len=16), 4, 64, jnp.float32, (TRITON,), 32, 32),
    Case("per_head_bf16_d128", STASpec((3, 8, 8), (2, 4, 4), ((1, 1, 1), (3, 1, 3)), text_len=4,
                                       text_max_len=8), 2, 128, jnp.bfloat16, (TRITON,), 16, 32),
    Case("tile128_text_d64", STASpec((6, 8, 8), (2, 8, 8), (1, 1, 1), text_len=20,
                                     text_max_len=64), 2, 64, jnp.bfloat16,
         (XLA, MOSAIC_INTERPRET), 128, 64, batch=1),
    Case("tile128_per_head_d128", STASpec((4, 8, 8), (2, 8, 8), ((1, 1, 1), (3, 1, 1)),
                                          text_len=128, text_max_len=128), 2, 128,
         jnp.bfloat16, (MOSAIC_INTERPRET,), 128, 128, batch=1),
    # Blocks of 128 spanning tiles of 64 and 192 tokens, partial edge tiles (unit masks).
    Case("tile64_ragged_spanning_d64", STASpec((2, 10, 12), (1, 8, 8), (1, 3, 3), text_len=10,
                                                text_max_len=40), 2, 64, jnp.bfloat16,
         (XLA, MOSAIC_INTERPRET), 128, 128, batch=1),
    # 192-token tiles, per-head windows, text: the dK/dV kernels skip 64-row query pieces
    # that attend none of a key block's keys.
    Case("tile192_spanning_d128", STASpec((3, 8, 16), (3, 8, 8), ((1, 1, 1), (1, 1, 3)),
                                          text_len=5, text_max_len=64), 2, 128,
         jnp.bfloat16, (XLA, MOSAIC_INTERPRET), 128, 128, batch=1),
    # 192-token tiles whose odd 64-row pieces and 64-key units pair with their neighbour in
    # time: gathered work items in the forward and the dK/dV kernels (fused backward at
    # head_dim 128; split at 64, where the dQ kernel gathers too), per-head windows, text,
    # partial tiles.
    Case("tile192_gathered_d128", STASpec((6, 8, 16), (3, 8, 8), ((3, 1, 1), (1, 1, 3)),
                                          text_len=20, text_max_len=64), 2, 128,
         jnp.bfloat16, (MOSAIC_INTERPRET,), 128, 128, batch=1),
    # The same items with the options off until timed (the fused backward's at head_dim 128),
    # one head: the per-head schedule is the default's concern, above.
    Case("tile192_gathered_d128_one_head", STASpec((6, 8, 16), (3, 8, 8), (3, 1, 1),
                                                   text_len=20, text_max_len=64), 1, 128,
         jnp.bfloat16, (MOSAIC_INTERPRET_LEAN,), 128, 128, batch=1),
    # One head at head_dim 64 (several heads: tile192_gathered_d128 and the GPU cases), with
    # the options off until timed (the split backward's; the default head_dim-64 path:
    # tile64_ragged_spanning_d64).
    Case("tile192_gathered_d64", STASpec((8, 7, 12), (3, 8, 8), (3, 1, 1), text_len=20,
                                         text_max_len=64), 1, 64,
         jnp.bfloat16, (MOSAIC_INTERPRET_LEAN,), 128, 128, batch=1),
    # head_dims the kernels do not run: the op zero-pads q, k, v to the next they do (Triton
    # 24 -> 32; Hopper 96 -> 128, fused backward) and slices o and the gradients back.
    Case("3d_d24_padded_channels", STASpec((4, 4, 8), (2, 2, 4), (1, 3, 1)), 2, 24,
         jnp.float32, (XLA, TRITON)),
    Case("tile64_text_d96", STASpec((3, 8, 8), (1, 8, 8), (3, 1, 1), text_len=5,
                                    text_max_len=64), 2, 96, jnp.bfloat16, (MOSAIC_INTERPRET,),
         batch=1),
    # Medium (GPU): both GPU backends, the Hopper kernels with either backward.
    Case("gpu_tile192_ragged_text", STASpec((7, 13, 20), (3, 8, 8), (3, 3, 3), text_len=40,
                                            text_max_len=64), 2, 128, jnp.bfloat16,
         (MOSAIC, MOSAIC_SPLIT, MOSAIC_APART, TRITON), batch=1, gpu=True),
    Case("gpu_tile64_image_d64", STASpec((40, 56), (8, 8), (5, 3)), 2, 64, jnp.float16,
         (MOSAIC, MOSAIC_SPLIT, MOSAIC_BLOCKS, MOSAIC_PERSISTENT, TRITON), batch=1, gpu=True),
    # Gathered work items in the forward and the dK/dV kernels ("auto" here), beside 128 x 128
    # blocks: 192-token tiles, partial tiles, text; per-head windows at head_dim 64.
    Case("gpu_tile192_gathered_text", STASpec((11, 21, 32), (3, 8, 8), (3, 3, 3), text_len=40,
                                              text_max_len=64), 2, 128, jnp.bfloat16,
         (MOSAIC, MOSAIC_SPLIT, MOSAIC_BLOCKS, MOSAIC_LEAN, MOSAIC_PERSISTENT, MOSAIC_FRAGMENTS),
         batch=1, gpu=True),
    Case("gpu_tile192_gathered_per_head_d64", STASpec((9, 16, 40), (3, 8, 8),
                                                      ((3, 1, 1), (1, 3, 3)), text_len=40,
                                                      text_max_len=64), 2, 64, jnp.float16,
         (MOSAIC, MOSAIC_BLOCKS, MOSAIC_LEAN), batch=1, gpu=True),
    Case("gpu_tile192_per_head_d64", STASpec((6, 16, 24), (3, 8, 8), ((5, 3, 3), (1, 1, 1))),
         2, 64, jnp.bfloat16, (MOSAIC, TRITON), batch=1, gpu=True),
    # Tiles of 384 tokens without padded keys: the forward's 192-key steps (the default,
    # MosaicBackend.forward_192_keys, where the forward is not persistent: MOSAIC_SPLIT; the
    # default backend runs these short items persistent), per-head windows, either backward;
    # fp16 at batch 2.
    Case("gpu_tile384_per_head_d128", STASpec((6, 16, 24), (6, 8, 8), ((1, 1, 3), (1, 3, 1))),
         2, 128, jnp.bfloat16, (MOSAIC, MOSAIC_SPLIT), batch=1, gpu=True),
    Case("gpu_tile384_fp16_b2", STASpec((12, 16, 16), (6, 8, 8), (1, 3, 3)), 2, 128,
         jnp.float16, (MOSAIC, MOSAIC_SPLIT), gpu=True),
    Case("gpu_bf16_d64_b2", STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3)), 2, 64, jnp.bfloat16,
         (MOSAIC, MOSAIC_PERSISTENT, TRITON), gpu=True),
    Case("gpu_fp16_d128", STASpec((6, 16, 16), (2, 8, 8), (3, 1, 3)), 3, 128, jnp.float16,
         (MOSAIC, MOSAIC_FRAGMENTS, TRITON), batch=1, gpu=True),
    Case("gpu_bf16_d128_text", STASpec((6, 16, 16), (2, 8, 8), (3, 3, 3), text_len=32,
                                       text_max_len=64), 2, 128, jnp.bfloat16,
         (MOSAIC, MOSAIC_SPLIT, MOSAIC_LEAN, MOSAIC_PERSISTENT, TRITON), batch=1, gpu=True),
    Case("gpu_bf16_d64_padded", STASpec((5, 14, 16), (2, 8, 8), (3, 1, 3), text_len=20,
                                        text_max_len=64), 2, 64, jnp.bfloat16, (MOSAIC, TRITON),
         batch=1, gpu=True),
    Case("gpu_fp16_d64_per_head", STASpec((6, 16, 16), (2, 8, 8),
                                          ((1, 1, 1), (3, 3, 3), (1, 3, 1), (3, 1, 1)),
                                          text_len=16, text_max_len=64), 4, 64, jnp.float16,
         (MOSAIC, TRITON), batch=1, gpu=True),
    Case("gpu_bf16_d128_bkv64", STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3)), 2, 128,
         jnp.bfloat16, (MOSAIC, MOSAIC_FRAGMENTS), 128, 64, batch=1, gpu=True),
    Case("gpu_bf16_d64_tile192_b64", STASpec((6, 16, 16), (3, 8, 8), (1, 1, 1), text_len=32,
                                             text_max_len=64), 2, 64, jnp.bfloat16,
         (MOSAIC, MOSAIC_SPLIT, TRITON), 64, 64, gpu=True),
    # head_dims padded to the kernels' (96 and 80 -> 128, 40 -> 64).
    Case("gpu_bf16_d96_text", STASpec((6, 16, 16), (2, 8, 8), (3, 3, 3), text_len=32,
                                      text_max_len=64), 2, 96, jnp.bfloat16,
         (MOSAIC, MOSAIC_SPLIT, TRITON), batch=1, gpu=True),
    Case("gpu_fp16_d40_per_head", STASpec((6, 16, 16), (2, 8, 8), ((1, 1, 1), (3, 3, 3))),
         2, 40, jnp.float16, (MOSAIC, TRITON), batch=1, gpu=True),
    # Triton's float32 dots run in tf32 on the GPU (~3e-4).
    Case("gpu_f32_d64_triton", STASpec((6, 16, 16), (2, 8, 8), (1, 3, 3), text_len=32,
                                       text_max_len=64), 4, 64, jnp.float32, (TRITON,), 64, 128,
         gpu=True, tol=2e-3),
]

# Padded latent + padded text + 64-row blocks + large logits, random values or NaN in the
# padded positions. The first is a case whose dK/dV had NaN: the Hopper dK/dV kernels did not
# mask padded keys before the exponent, so exp2 of a padded key's score overflowed (fp16:
# > 65504) and the final zeroing multiplied inf by 0.
PADDING_CASES = [
    Case("2d_tile128_d64_fp16", STASpec((40, 336), (4, 32), (1, 5), text_len=70,
                                        text_max_len=104), 2, 64, jnp.float16, (MOSAIC, TRITON),
         64, 64, batch=1, gpu=True),
    Case("2d_tile128_d64_bf16", STASpec((40, 336), (4, 32), (1, 5), text_len=70,
                                        text_max_len=104), 2, 64, jnp.bfloat16,
         (MOSAIC, TRITON), 64, 64, batch=1, gpu=True),
    Case("3d_tile128_d128_fp16", STASpec((5, 10, 72), (1, 4, 32), (3, 1, 3), text_len=30,
                                         text_max_len=64), 2, 128, jnp.float16,
         (MOSAIC, MOSAIC_SPLIT, MOSAIC_FRAGMENTS, TRITON), 64, 64, batch=1, gpu=True),
    Case("2d_tile64_d64_fp16", STASpec((20, 100), (2, 32), (3, 3), text_len=20,
                                       text_max_len=40), 2, 64, jnp.float16, (MOSAIC, TRITON),
         64, 64, batch=1, gpu=True),
    # 128-row blocks over 128-token tiles with 64-aligned partial tiles: the Hopper kernels
    # only (the portable kernels' blocks must divide the tile lengths' gcd, 64 here).
    Case("3d_tile128_d128_bf16_b128", STASpec((5, 10, 72), (1, 4, 32), (3, 3, 3), text_len=10,
                                              text_max_len=64), 2, 128, jnp.bfloat16,
         (MOSAIC, MOSAIC_PERSISTENT, MOSAIC_FRAGMENTS), 128, 128, batch=1, gpu=True),
    Case("3d_tile128_d80_fp16", STASpec((5, 10, 72), (1, 4, 32), (3, 1, 3), text_len=30,
                                        text_max_len=64), 2, 80, jnp.float16,
         (MOSAIC, TRITON), 64, 64, batch=1, gpu=True),
    # CPU: the same class, small.
    Case("small_tile128_fp16_split", STASpec((4, 40), (4, 32), (1, 1), text_len=10,
                                             text_max_len=40), 1, 64, jnp.float16,
         (XLA, MOSAIC_INTERPRET), 64, 64, batch=1),
    Case("small_tile128_fp16_fused", STASpec((4, 40), (4, 32), (1, 1), text_len=10,
                                             text_max_len=40), 1, 128, jnp.float16,
         (MOSAIC_INTERPRET, MOSAIC_INTERPRET_FRAGMENTS), 64, 64, batch=1),
    Case("small_tile128_fp16_d48", STASpec((4, 40), (4, 32), (1, 1), text_len=10,
                                           text_max_len=40), 1, 48, jnp.float16,
         (MOSAIC_INTERPRET,), 64, 64, batch=1),
    Case("small_tile32_fp16", STASpec((3, 6, 8), (2, 4, 4), (1, 1, 1), text_len=9,
                                      text_max_len=40), 2, 64, jnp.float16, (XLA, TRITON),
         16, 32, batch=1),
    Case("small_odd_f32", STASpec((3, 5, 6), (2, 2, 4), (3, 1, 3), text_len=5,
                                  text_max_len=8), 2, 16, jnp.float32, (XLA,), 8, 4),
    Case("small_1d_f32", STASpec((13,), (4,), (3,), text_len=1, text_max_len=5), 2, 8,
         jnp.float32, (XLA,), 2, 4),
]


# Further interpret-mode cases of a kernel path a faster case checks (head_dim 64's split
# backward: tile64_ragged_spanning_d64; a padded head_dim: tile64_text_d96): slow.
SLOW_PARAMS = {("tile128_text_d64", MOSAIC_INTERPRET),
               ("small_tile128_fp16_d48", MOSAIC_INTERPRET)}


def _params(cases, *extra_marks):
  out = []
  for c in cases:
    for b in c.backends:
      marks = BACKEND_MARKS[b] + ((pytest.mark.gpu,) if c.gpu else ()) + extra_marks
      if (c.name, b) in SLOW_PARAMS:
        marks += (pytest.mark.slow,)
      out.append(pytest.param(c, b, id=f"{backend_id(b)}-{c.name}", marks=marks))
  return out


@pytest.mark.parametrize("case,backend", _params(CASES))
def test_matches_reference(case, backend):
  interpreted(check_matches_reference, case.spec, case.batch, case.heads, case.head_dim,
              case.dtype, backend=backend, block_q=case.block_q, block_kv=case.block_kv,
              tol=case.tol)


@pytest.mark.parametrize("case,backend", _params(PADDING_CASES))
def test_padding_never_leaks(case, backend):
  """Any values in padded q/k/v positions (random values of standard deviation 10, then NaN,
  through the same compiled programs) change no output and no gradient of valid positions;
  padded rows output zeros and get zero gradients."""
  tol = 1e-4 if case.dtype == jnp.float32 else 2e-2
  interpreted(check_padding_never_leaks, case.spec, case.batch, case.heads, case.head_dim,
              case.dtype, backend=backend, scale=0.4 if case.head_dim <= 64 else 0.3,
              logit_std=8.0, garbage=(10.0, "nan"), block_q=case.block_q,
              block_kv=case.block_kv, tol=tol)


@pytest.mark.parametrize("backend", [XLA])
def test_inf_in_padding_never_leaks(backend):
  c = PADDING_CASES[-2]
  check_padding_never_leaks(c.spec, c.batch, c.heads, c.head_dim, c.dtype, backend=backend,
                            scale=0.4, logit_std=8.0, garbage="inf", block_q=c.block_q,
                            block_kv=c.block_kv, tol=1e-4)


NAN_CASES = [
    Case("1d_padded_text", STASpec((13,), (4,), (3,), text_len=1, text_max_len=5), 2, 8,
         jnp.float32, (XLA,), 2, 4),
    Case("2d_per_head_text", STASpec((6, 8), (2, 4), ((3, 1), (1, 1), (5, 3)), text_len=3,
                                     text_max_len=3), 3, 8, jnp.float32, (XLA,), 4, 8),
    Case("padded_latent_text", STASpec((3, 6, 8), (2, 4, 4), (1, 1, 1), text_len=9,
                                       text_max_len=40), 2, 64, jnp.float32, (TRITON,), 16, 32),
    Case("tile128_text", STASpec((4, 40), (4, 32), (1, 1), text_len=10, text_max_len=40), 1, 64,
         jnp.bfloat16, (MOSAIC_INTERPRET,), 64, 64),
    # 128-row blocks over 64-token tiles: keys of a partly attended block pair are masked by
    # a select (a NaN key reaches only its own tile's rows).
    Case("tile64_spanning", STASpec((2, 8, 32), (1, 8, 8), (1, 1, 1)), 1, 64, jnp.bfloat16,
         (MOSAIC_INTERPRET, XLA), 128, 128),
    Case("gpu_padded_text", STASpec((5, 14, 16), (2, 8, 8), (3, 1, 3), text_len=20,
                                    text_max_len=64), 2, 64, jnp.bfloat16, (MOSAIC, TRITON),
         gpu=True),
]


@pytest.mark.parametrize("case,backend", _params(NAN_CASES))
def test_nan_in_a_valid_token_propagates_as_in_dense(case, backend):
  interpreted(check_valid_nan_propagates, case.spec, case.heads, case.head_dim, case.dtype,
              backend=backend, block_q=case.block_q, block_kv=case.block_kv)
