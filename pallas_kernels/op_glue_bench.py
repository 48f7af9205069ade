"""Where the op's fwd+bwd time goes besides the two kernels (H100 paper shape, (3,3,3)).

Times, in one run: the op's fwd+bwd (jax.grad of sum(o * w)), the forward and fused backward
kernels alone, and the XLA ops around them, each as its own jitted function: the delta
reduction (einsum form as in the backward, and a sum-over-head_dim form), the dQ
accumulator's zero fill, its scale-and-cast, and the cotangent's cast. Writes the optimized
HLO of the fwd+bwd to $OUT/op_grad_hlo.txt. Table last; JSON to $OUT/op_glue_bench.json.
"""

from __future__ import annotations

import os
import traceback

import jax
import jax.numpy as jnp

import jsta
from pallas_kernels import mosaic_sta as ms
from pallas_kernels import mosaic_sta_backward as fb
from pallas_kernels.mosaic_bench import BenchLog, bench, paper_inputs

B, H, D = 1, 24, 128
LATENT, TILE = (30, 48, 80), (6, 8, 8)


def main():
  blog = BenchLog()
  spec = jsta.STASpec(LATENT, TILE, (3, 3, 3))
  flops = spec.flops(D, H)
  q, k, v, w = paper_inputs()
  scale = D ** -0.5
  sched = jsta.block_schedule(spec, H, 128, 128)
  f32 = jnp.float32

  def loss(q, k, v):
    o = jsta.sliding_tile_attention(q, k, v, spec, backend="pallas_mosaic")
    return jnp.sum(o.astype(f32) * w.astype(f32))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  out_dir = os.environ.get("OUT")
  if out_dir:
    with open(os.path.join(out_dir, "op_grad_hlo.txt"), "w") as f:
      f.write(grad.lower(q, k, v).compile().as_text())
  fwd = jax.jit(lambda q, k, v: ms.BACKEND.forward(q, k, v, sched, scale))
  o, lse = fwd(q, k, v)
  bkd, t_ops = ms.transposed_operands(sched)
  cfg = ms.BACKEND.config(128, 128, D)
  acc_shape = fb.dq_acc_shape(q.shape, bkd)

  def kernel_only(q, k, v, o, lse, do, delta):
    acc = jax.new_ref(jnp.zeros(acc_shape, f32))
    dk, dv = fb.fused_backward_call(q, k, v, do, lse, delta, *t_ops, acc, scale=scale,
                                    block_q=128, block_kv=bkd, config=cfg, masked=False)
    return dk, dv, acc[...]

  delta = jnp.einsum("bshd,bshd->bhs", o.astype(f32), w.astype(f32))
  acc = jnp.zeros(acc_shape, f32)
  pieces = {
      "op_fwdbwd": (grad, (q, k, v), 3.5 * flops),
      "fwd_kernel": (fwd, (q, k, v), flops),
      "bwd_full (ms.backward)": (jax.jit(lambda *a: ms.backward(*a, sched, scale, cfg)),
                                 (q, k, v, o, lse, w), 2.5 * flops),
      "bwd_kernel+zero_fill": (jax.jit(kernel_only), (q, k, v, o, lse, w, delta), 2.5 * flops),
      "delta_einsum": (jax.jit(lambda o, do: jnp.einsum("bshd,bshd->bhs", o.astype(f32),
                                                        do.astype(f32))), (o, w), 0),
      "delta_sum": (jax.jit(lambda o, do: jnp.swapaxes(
          jnp.sum(o.astype(f32) * do.astype(f32), axis=-1), 1, 2)), (o, w), 0),
      "zero_fill": (jax.jit(lambda: jnp.zeros(acc_shape, f32)), (), 0),
      "dq_scale_cast": (jax.jit(lambda a: (a.reshape(q.shape) * scale).astype(q.dtype)),
                        (acc,), 0),
      "cotangent_cast": (jax.jit(lambda x: (x.astype(f32) * 1.0).astype(q.dtype) + 0),
                         (w,), 0),
  }
  for rnd in range(2):
    for name, (fn, args, fl) in pieces.items():
      try:
        t, _ = bench(fn, *args, iters=5)
        blog.log(f"{name}_r{rnd}", t, fl)
      except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        blog.log(f"{name}_r{rnd}", 0.0, 0, f"ERROR {e!r}"[:300])
  blog.finish("op_glue_bench.json")


if __name__ == "__main__":
  main()
