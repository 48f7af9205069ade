"""The video DiT's sample with 8-bit attention, beside the bf16 and the float32 samples.

    python -m benchmarks.fp8_sample --preset small --steps 20 --out ./out      # on an H200
    python -m benchmarks.fp8_sample --preset hunyuan-shape --depth 2 --steps 20 --batch 1

Samples the same noise and text with the preset's STA windows: float32 compute (the
reference), bf16 compute, and bf16 compute with each 8-bit forward of ``--precisions``
(``euler_sample(..., attention_precision=...)`` on every STA step; default: all of
``jsta.ops.QUANTIZED_PRECISIONS``). Reports the relative L2 distance of the final latents
(bf16 and each 8-bit one against float32, each 8-bit one against bf16) and the median latency
of one denoising step (one model forward) in bf16 and with each 8-bit attention.
Weights: a ``models.train`` checkpoint (``--checkpoint``), or the preset's random init with
every parameter perturbed by ``--perturb`` times a standard normal (the zero-initialised
modulation and output layers would otherwise make every block the identity and the output 0).
Writes fp8_sample.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import dit_step_ms, rel_l2, run_meta
from jsta.ops import QUANTIZED_PRECISIONS, check_precision
from models import data as data_lib
from models import sampling
from models import train as train_lib
from models.video_dit import VideoDiT, video_dit_config


def _weights(cfg, checkpoint: str | None, perturb: float, seed: int):
  """float32 parameters (nnx.State) of the model to sample with."""
  cfg = dataclasses.replace(cfg, dtype="float32", param_dtype="float32")
  model = VideoDiT(cfg, rngs=nnx.Rngs(seed))
  if checkpoint:
    train_lib.restore_checkpoint(checkpoint, model)
  else:
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [x + perturb * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return nnx.state(model, nnx.Param)


def _model(cfg, weights, dtype: str, backend) -> VideoDiT:
  """The model computing in ``dtype`` with float32 ``weights`` (the same for every run)."""
  cfg = dataclasses.replace(cfg, dtype=dtype, param_dtype="float32", backend=backend,
                            attention="sta")
  model = VideoDiT(cfg, rngs=nnx.Rngs(0))
  nnx.update(model, weights)
  return model


def run(preset: str = "small", *, steps: int = 20, full_steps: int = 0, batch: int = 1,
        depth: int | None = None, checkpoint: str | None = None, perturb: float = 0.05,
        backend="auto", reference_backend="auto", precisions=QUANTIZED_PRECISIONS,
        seed: int = 123, iters: int = 10) -> dict:
  """The comparison as a dict (see the module docstring). ``backend``: the jsta
  implementation of the bf16 and 8-bit runs (a name or a backend object with an 8-bit
  forward); ``reference_backend``: the float32 run's."""
  precisions = tuple(check_precision(p) for p in precisions)
  overrides = {} if depth is None else dict(depth=depth)
  cfg = (train_lib.load_config(checkpoint) if checkpoint
         else video_dit_config(preset, **overrides))
  weights = _weights(cfg, checkpoint, perturb, seed)
  kd, kn = jax.random.split(jax.random.key(seed))
  data = data_lib.make_batch(kd, data_lib.BlobDataConfig.for_model(cfg), batch)
  noise = jax.random.normal(kn, data["latent"].shape, jnp.float32)
  text, mask = data["text"], data["text_mask"]

  ref = _model(cfg, weights, "float32", reference_backend)
  model = _model(cfg, weights, "bfloat16", backend)
  sample = lambda m, p=None: sampling.euler_sample(m, noise, text, mask, steps=steps,
                                                   full_attention_steps=full_steps,
                                                   attention_precision=p)
  # A backend without the 8-bit forward is the op's ValueError while tracing one STA step:
  # raise it before the float32 and bf16 samples, not after them.
  for p in precisions:
    jax.eval_shape(lambda p=p: sampling.euler_sample(model, noise, text, mask, steps=1,
                                                     attention_precision=p))
  reference, bf16 = sample(ref), sample(model)
  rel = dict(bf16_vs_float32=rel_l2(bf16, reference))
  step_ms = dict(bf16=dit_step_ms(model, noise, text, mask, iters=iters))
  for p in precisions:
    out = sample(model, p)
    rel[f"{p}_vs_float32"] = rel_l2(out, reference)
    rel[f"{p}_vs_bf16"] = rel_l2(out, bf16)
    step_ms[p] = dit_step_ms(model, noise, text, mask, iters=iters, attention_precision=p)
  return dict(
      preset=preset, checkpoint=checkpoint, steps=steps, full_steps=full_steps, batch=batch,
      depth=cfg.depth, tokens=cfg.base_spec().video_len, perturb=None if checkpoint else perturb,
      rel_l2=rel, step_ms=step_ms,
      step_speedup={p: step_ms["bf16"] / step_ms[p] for p in precisions})


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="small", help="models.video_dit preset")
  p.add_argument("--depth", type=int, default=None, help="blocks (default: the preset's)")
  p.add_argument("--checkpoint", default=None, help="a models.train checkpoint directory")
  p.add_argument("--perturb", type=float, default=0.05,
                 help="without --checkpoint: std of the noise added to the random init")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--full-steps", type=int, default=0,
                 help="first steps on full attention, as the STA paper does")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--backend", default="auto", help="jsta implementation of the bf16/8-bit runs")
  p.add_argument("--precisions", default=",".join(QUANTIZED_PRECISIONS),
                 help="comma list of 8-bit precisions (jsta.ops.QUANTIZED_PRECISIONS)")
  p.add_argument("--seed", type=int, default=123)
  p.add_argument("--iters", type=int, default=10, help="timed denoising steps per run")
  p.add_argument("--out", default="out")
  a = p.parse_args(argv)
  res = run(a.preset, steps=a.steps, full_steps=a.full_steps, batch=a.batch, depth=a.depth,
            checkpoint=a.checkpoint, perturb=a.perturb, backend=a.backend,
            precisions=tuple(x for x in a.precisions.split(",") if x), seed=a.seed,
            iters=a.iters)
  res = dict(meta=run_meta(), **res)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "fp8_sample.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps(res, indent=1))
  return res


if __name__ == "__main__":
  main()
