"""Device timing of the pallas_triton kernels in both launch orders (``KernelConfig``'s
``blocks_fastest``) at the STA paper shape, windows (3,3,3) and (5,5,5).

batch 1, latent (30, 48, 80), tile (6, 8, 8), 24 heads, head_dim 128, bf16. Per window and
order: the forward, and the backward from the forward's o and lse. The two orders run the same
programs on the same data, so their outputs must agree bitwise; the first order's forward is
also checked against a float32 reference on sampled query rows. Prints a table last; JSON to
$OUT/triton_order_bench.json when OUT is set.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from pallas_kernels import triton_sta as ts
from pallas_kernels.mosaic_bench import BenchLog, bench, check_rows, paper_inputs

B, H, D = 1, 24, 128
LATENT, TILE = (30, 48, 80), (6, 8, 8)


def main():
  blog = BenchLog()
  S = int(np.prod(LATENT))
  q, k, v, do = paper_inputs(H, S)
  scale = D ** -0.5
  rows = np.random.default_rng(0).choice(S, 256, replace=False)
  for window in ((3, 3, 3), (5, 5, 5)):
    spec = jsta.STASpec(LATENT, TILE, window)
    flops = spec.flops(D, H)
    wname = "x".join(map(str, window))
    sched = jsta.block_schedule(spec, H, *ts.default_blocks(spec, D, jnp.bfloat16))
    outs = {}
    for blocks_fastest in (True, False):
      cfg = ts.KernelConfig(blocks_fastest=blocks_fastest)
      order = "blocks_first" if blocks_fastest else "heads_first"
      fwd = jax.jit(lambda q, k, v, cfg=cfg: ts.sta_forward(q, k, v, sched, scale, config=cfg))
      bwd = jax.jit(lambda q, k, v, o, lse, do, cfg=cfg:
                    ts.sta_backward(q, k, v, o, lse, do, sched, scale, config=cfg))
      t, _ = bench(fwd, q, k, v, iters=5)
      o, lse = fwd(q, k, v)
      note = ""
      if not outs:
        note = f"relL2 vs f32 ref (256 rows) {check_rows(spec, q, k, v, o, rows, scale):.1e}"
      blog.log(f"triton_fwd_{wname}_{order}", t, flops, note)
      t, _ = bench(bwd, q, k, v, o, lse, do, iters=5)
      grads = bwd(q, k, v, o, lse, do)
      note = ""
      if outs:
        same = all(bool(jnp.array_equal(a, b)) for a, b in zip((o, lse, *grads), outs["first"]))
        note = "outputs equal to the other order's" if same else "OUTPUTS DIFFER from the other order's"
      outs.setdefault("first", (o, lse, *grads))
      blog.log(f"triton_bwd_{wname}_{order}", t, 2.5 * flops, note)
  blog.finish("triton_order_bench.json")


if __name__ == "__main__":
  main()
