"""Final-sample error and per-step speedup of a calibrated per-head STA strategy vs full attention.

    python -m benchmarks.calibrated_sample --checkpoint runs/small_full/ckpt \
        --strategy runs/calib/strategy.json --steps 20 --full-steps 2 --out ./out

Samples the same noise and text with (a) full attention, (b) the calibrated strategy (per-head
windows), (c) the preset's uniform window, each with ``--full-steps`` first steps kept on full
attention; reports the relative L2 distance of (b) and (c) to (a), the mean sparsity, and the
median latency of one denoising step (one model forward) for each. Writes calibrated_sample.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.common import dit_step_ms, rel_l2
from jsta.strategy import WindowStrategy
from models import data as data_lib
from models import sampling
from models import train as train_lib
from models.video_dit import VideoDiT


def _load(ckpt: str, **overrides) -> VideoDiT:
  cfg = dataclasses.replace(train_lib.load_config(ckpt), **overrides)
  model = VideoDiT(cfg, rngs=nnx.Rngs(0))
  train_lib.restore_checkpoint(ckpt, model)
  return model


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--strategy", required=True)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--full-steps", type=int, default=0)
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--backend", default="auto")
  p.add_argument("--seed", type=int, default=123)
  p.add_argument("--out", default="out")
  a = p.parse_args(argv)

  strategy = WindowStrategy.load(a.strategy)
  full = _load(a.checkpoint, attention="full")
  cfg = full.config
  calibrated = _load(a.checkpoint, attention="sta", backend=a.backend,
                     window=cfg.with_strategy(strategy).window)
  uniform = _load(a.checkpoint, attention="sta", backend=a.backend)

  kd, kn = jax.random.split(jax.random.key(a.seed))
  batch = data_lib.make_batch(kd, data_lib.BlobDataConfig.for_model(cfg), a.batch)
  noise = jax.random.normal(kn, batch["latent"].shape, jnp.float32)
  text, mask = batch["text"], batch["text_mask"]
  text_len = cfg.text_max_len  # one static length for every run: all slots count as keys
  mask = jnp.ones_like(mask)

  samples, step_ms = {}, {}
  for name, model in (("full", full), ("calibrated", calibrated), ("uniform", uniform)):
    fs = a.steps if name == "full" else a.full_steps
    samples[name] = sampling.euler_sample(model, noise, text, mask, steps=a.steps,
                                          full_attention_steps=fs, text_len=text_len)
    step_ms[name] = dit_step_ms(model, noise, text, mask,
                                text_len=None if name == "full" else text_len)

  base = cfg.base_spec()
  uni_sparsity = cfg.spec(cfg.layer_windows()[0]).sparsity()
  res = dict(
      device=jax.devices()[0].device_kind, jax=jax.__version__,
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      checkpoint=a.checkpoint, strategy=a.strategy, steps=a.steps, full_steps=a.full_steps,
      tokens=base.video_len, config=cfg.to_json(),
      calibrated_sparsity=strategy.sparsity(), uniform_sparsity=uni_sparsity,
      calibrated_rel_l2=rel_l2(samples["calibrated"], samples["full"]),
      uniform_rel_l2=rel_l2(samples["uniform"], samples["full"]),
      step_ms=step_ms,
      calibrated_speedup=step_ms["full"] / step_ms["calibrated"],
      uniform_speedup=step_ms["full"] / step_ms["uniform"])
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "calibrated_sample.json"), "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps({k: v for k, v in res.items() if k != "config"}, indent=1))
  return res


if __name__ == "__main__":
  main()
