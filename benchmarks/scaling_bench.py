"""Per-step latency of the DiT on 1 vs N devices (sequence/head parallel), and scaling efficiency.

    python -m benchmarks.scaling_bench --preset hunyuan-shape --out ./out   # N GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.scaling_bench --preset tiny

For each device count n in --devices (default: 1 and all), the model runs on a (1, n) mesh
(sequence over n devices, Ulysses attention); one denoising step = one jitted forward, timed after
warm-up (median). Writes scaling_bench.json (device name, JAX version, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jsta.timing import median_ms
from models import data as data_lib
from models.parallel import make_mesh
from models.video_dit import VideoDiT, video_dit_config


def step_ms(model, batch, par, warmup: int, iters: int) -> float:
  graphdef, state = nnx.split(model)
  cfg = model.config
  tl = cfg.text_max_len

  @jax.jit
  def fwd(state, x, text, mask):
    return nnx.merge(graphdef, state)(x, jnp.full((x.shape[0],), 0.5), text, mask, text_len=tl,
                                      parallel=par)

  if par is not None:
    batch = par.shard_batch(batch)
    state = jax.device_put(state, jax.sharding.NamedSharding(par.mesh, jax.sharding.PartitionSpec()))
  return median_ms(fwd, state, batch["latent"], batch["text"], batch["text_mask"],
                   warmup=warmup, iters=iters)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", default="hunyuan-shape")
  p.add_argument("--attention", default="sta", choices=("sta", "full"))
  p.add_argument("--depth", type=int, default=None)
  p.add_argument("--devices", default=None, help="comma list of device counts (default 1,all)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--iters", type=int, default=5)
  p.add_argument("--out", default="out")
  a = p.parse_args(argv)
  over = dict(attention=a.attention) | ({"depth": a.depth} if a.depth else {})
  cfg = video_dit_config(a.preset, **over)
  model = VideoDiT(cfg, rngs=nnx.Rngs(0))
  batch = data_lib.make_batch(jax.random.key(0), data_lib.BlobDataConfig.for_model(cfg), 1)
  batch["text_mask"] = jnp.ones_like(batch["text_mask"])
  n_all = len(jax.devices())
  counts = [int(x) for x in a.devices.split(",")] if a.devices else sorted({1, n_all})
  rows = []
  for n in counts:
    row = dict(devices=n)
    try:
      par = None if n == 1 else make_mesh(data=1, seq=n)
      row["step_ms"] = step_ms(model, batch, par, a.warmup, a.iters)
    except Exception as e:  # record, keep going
      row["error"] = f"{type(e).__name__}: {str(e)[:1000]}"
    rows.append(row)
    print(json.dumps(row), flush=True)
  base = next((r["step_ms"] for r in rows if r["devices"] == 1 and "step_ms" in r), None)
  for r in rows:
    if base and "step_ms" in r:
      r["speedup"] = base / r["step_ms"]
      r["efficiency"] = r["speedup"] / r["devices"]
  res = dict(device=jax.devices()[0].device_kind, jax=jax.__version__,
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             preset=a.preset, attention=a.attention, config=cfg.to_json(), results=rows)
  os.makedirs(a.out, exist_ok=True)
  with open(os.path.join(a.out, "scaling_bench.json"), "w") as f:
    json.dump(res, f, indent=1)
  for r in rows:
    print(f"{r['devices']} device(s): " + (f"{r['step_ms']:.1f} ms/step, speedup "
          f"{r.get('speedup', float('nan')):.2f}x, efficiency {r.get('efficiency', float('nan')):.0%}"
          if "step_ms" in r else r["error"][:200]))
  return res


if __name__ == "__main__":
  main()
