"""End-to-end denoising-step latency of the video DiT: full attention vs STA windows.

For each configuration (full attention, then each STA window) it measures
  step_ms       one model forward (= one denoising step), jit-compiled, after a warm-up,
                median of --steps timed calls;
  attn_op_ms    the attention op alone at the same shape (q, k, v [1, seq_len, heads, head_dim]),
                same dtype, same masks, median of --steps calls;
and derives
  attention_share  depth * attn_op_ms / step_ms,
  non_attention_ms step_ms - depth * attn_op_ms,
  speedup          step_ms(full) / step_ms(config),
  amdahl_bound     step_ms(full) / non_attention_ms(full): the speedup if attention were free,
  predicted_speedup step_ms(full) / (non_attention_ms(full) + depth * attn_op_ms(config)),
  why_not_faster   for an STA configuration slower than full attention: the likely reason.
Every configuration is measured independently: an error is recorded in its entry and the run
goes on; configurations that would start after --time-budget seconds are recorded as skipped.

  python -m benchmarks.e2e_bench                       # hunyuan-shape, depth 2, on a GPU
  python -m benchmarks.e2e_bench --preset wan14b-720p-shape   # Wan 2.1 14B 720p geometry
  python -m benchmarks.e2e_bench --preset tiny --steps 2 --out /tmp/bench   # CPU, seconds
Writes e2e_<preset>_<timestamp>.json and .png into --out (default ./out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jsta
from benchmarks.common import WINDOWS_HELP, parse_windows
from jsta.demo import slower_reason
from jsta.timing import timed_calls_ms
from models import attention as attn_lib
from models.video_dit import VideoDiT, count_params, video_dit_config

DEFAULT_WINDOWS = {"hunyuan-shape": "3,3,3;5,5,5", "wan14b-720p-shape": "5,3,3",
                   "small": "3,3,1;3,3,3", "tiny": "1,1,1;3,3,3"}


def _timed(fn, *args, steps: int) -> tuple[float, list[float], float]:
  """(median ms, all ms, first-call seconds incl. compile) of ``fn(*args)``."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))  # warm-up: compile + first run
  first = time.perf_counter() - t0
  times = timed_calls_ms(fn, *args, warmup=0, iters=steps)
  return statistics.median(times), times, first


def run(preset: str = "hunyuan-shape", *, depth: int | None = None, steps: int = 5,
        windows: list[tuple[int, ...]] | None = None, backend: str = "auto",
        text_len: int | None = None, time_budget: float = 170.0, seed: int = 0) -> dict:
  """Runs the benchmark; returns the result dict (see the module docstring)."""
  start = time.perf_counter()
  overrides = {"backend": backend}
  if depth is not None:
    overrides["depth"] = depth
  cfg = video_dit_config(preset, **overrides)
  windows = windows if windows is not None else parse_windows(DEFAULT_WINDOWS[preset])
  windows = [jsta.full_window(cfg.grid, cfg.tile) if w == "dense" else w for w in windows]
  text_len = cfg.text_max_len if text_len is None else text_len
  dev = jax.devices()[0]
  result = {
      "benchmark": "e2e_denoising_step", "preset": preset,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
      "config": cfg.to_json(), "grid": cfg.grid, "text_len": text_len, "steps": steps,
      "batch": 1, "time_budget_s": time_budget, "full_attention_implementation": attn_lib.full_attention_implementation(cfg.dtype),
      "configs": [],
  }
  try:
    result["sta_backend"] = jsta.resolve_backend(backend)
  except Exception as e:  # noqa: BLE001 - recorded, the full-attention run still goes on
    result["sta_backend"] = f"error: {e!r}"

  # Inputs and model, built once; every configuration reuses the same parameters.
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (1, *cfg.latent_shape), jnp.float32)
  t = jnp.full((1,), 0.5, jnp.float32)
  text = jax.random.normal(keys[1], (1, cfg.text_max_len, cfg.text_dim), jnp.float32)
  # numpy (static): with all text valid the model's full attention runs unmasked (cuDNN flash).
  mask = np.arange(cfg.text_max_len)[None] < text_len
  t0 = time.perf_counter()
  model = VideoDiT(cfg, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(model)
  result["params"] = count_params(model)
  result["init_s"] = time.perf_counter() - t0
  dt = jnp.dtype(cfg.dtype)
  spec0 = cfg.base_spec(text_len)
  qkv_shape = (1, spec0.seq_len, cfg.heads, cfg.head_dim)
  q, k, v = (jax.random.normal(kk, qkv_shape, jnp.float32).astype(dt) for kk in
             jax.random.split(keys[2], 3))
  result["seq_len"] = spec0.seq_len

  plans = [("full", "full", None)] + [(f"sta_{'x'.join(map(str, w))}", "sta", w) for w in windows]
  for name, kind, window in plans:
    entry = {"name": name, "attention": kind, "window_tiles": window}
    if window is not None:
      entry["window_tokens"] = tuple(a * b for a, b in zip(window, cfg.tile))
      entry["sparsity"] = cfg.spec(window, text_len).sparsity()
    result["configs"].append(entry)
    if time.perf_counter() - start > time_budget:
      entry["error"] = f"skipped: time budget of {time_budget:.0f} s used up"
      continue
    try:
      def fwd(state, x, t, text, kind=kind, window=window):
        m = nnx.merge(graphdef, state)
        return m(x, t, text, mask, attention=kind, window=window, text_len=text_len)
      ms, all_ms, first = _timed(jax.jit(fwd), state, x, t, text, steps=steps)
      entry.update(step_ms=ms, step_all_ms=all_ms, step_first_call_s=first)
    except Exception as e:  # noqa: BLE001 - record and go on with the next configuration
      entry["error"] = f"step: {e!r}"[:2000]
      entry["traceback"] = traceback.format_exc()[-3000:]
      continue
    try:
      spec = cfg.spec(window if window is not None else spec0.window, text_len)
      if kind == "full":
        op_mask = None if mask.all() else jnp.asarray(mask)  # as the model passes it
        op = jax.jit(lambda q, k, v: attn_lib.full_attention(q, k, v, spec, op_mask))
      else:
        op = jax.jit(lambda q, k, v: jsta.sliding_tile_attention(q, k, v, spec, backend=backend))
      ams, all_ams, afirst = _timed(op, q, k, v, steps=steps)
      entry.update(attn_op_ms=ams, attn_op_all_ms=all_ams, attn_op_first_call_s=afirst,
                   attn_total_ms=ams * cfg.depth, attention_share=ams * cfg.depth / ms,
                   non_attention_ms=ms - ams * cfg.depth)
    except Exception as e:  # noqa: BLE001
      entry["error"] = f"attention op: {e!r}"[:2000]
      entry["traceback"] = traceback.format_exc()[-3000:]

  full = result["configs"][0]
  if "step_ms" in full:
    for e in result["configs"]:
      if "step_ms" in e:
        e["speedup"] = full["step_ms"] / e["step_ms"]
      if "non_attention_ms" in full and "attn_op_ms" in e:
        e["predicted_speedup"] = full["step_ms"] / (full["non_attention_ms"]
                                                    + cfg.depth * e["attn_op_ms"])
      if e["attention"] == "sta" and e.get("speedup", 1.0) < 1.0:
        spec = cfg.spec(tuple(e["window_tiles"]), text_len)
        e["why_not_faster"] = slower_reason(spec, dev.platform, "try a larger preset")
    if "non_attention_ms" in full and full["non_attention_ms"] > 0:
      result["amdahl_bound"] = full["step_ms"] / full["non_attention_ms"]
  result["total_s"] = time.perf_counter() - start
  return result


def plot(result: dict, path: str) -> None:
  """Writes :func:`figure` as a PNG."""
  figure(result).savefig(path, dpi=120)


def figure(result: dict):
  """Stacked bars: attention (depth x op) and the rest of the step, per configuration, each
  labelled with its step time and speedup below the title."""
  from matplotlib.figure import Figure
  rows = [e for e in result["configs"] if "step_ms" in e]
  fig = Figure(figsize=(7, 4), layout="constrained")   # no pyplot: the caller's backend stays
  ax = fig.subplots()
  names = [e["name"] for e in rows]
  # The op timed alone can exceed its share of the step (fusion, noise on tiny shapes): clip so
  # the bar's height stays the measured step time.
  attn = [min(e.get("attn_total_ms", 0.0), e["step_ms"]) for e in rows]
  rest = [e["step_ms"] - a for e, a in zip(rows, attn)]
  ax.bar(names, attn, label="attention (op alone x depth)")
  ax.bar(names, rest, bottom=attn, label="rest of the step")
  for i, e in enumerate(rows):
    label = f"{e['step_ms']:.1f} ms"
    if "speedup" in e:
      label += f"\n{e['speedup']:.2f}x"
    ax.text(i, e["step_ms"], label, ha="center", va="bottom", fontsize=8)
  ax.set_ylabel("ms per denoising step (batch 1)")
  title = (f"{result['preset']} depth {result['config']['depth']}, {result['device']}, "
           f"JAX {result['jax']}")
  if "amdahl_bound" in result:
    title += f"\nAmdahl bound {result['amdahl_bound']:.2f}x"
  ax.set_title(title, fontsize=9, pad=10)
  # Head room above the tallest bar for its two-line label and the legend, so neither reaches
  # the title.
  ax.set_ylim(0, 1.45 * max((e["step_ms"] for e in rows), default=1.0))
  ax.legend(fontsize=8, loc="upper left")
  return fig


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="hunyuan-shape", choices=sorted(DEFAULT_WINDOWS))
  p.add_argument("--depth", type=int, default=None, help="blocks (hunyuan-shape default 2)")
  p.add_argument("--steps", type=int, default=5, help="timed calls per measurement (median)")
  p.add_argument("--windows", default=None, help=WINDOWS_HELP)
  p.add_argument("--backend", default="auto", help="jsta backend for STA")
  p.add_argument("--text-len", type=int, default=None, help="valid text tokens (default: all)")
  p.add_argument("--time-budget", type=float, default=170.0,
                 help="seconds after which remaining configurations are skipped")
  p.add_argument("--out", default="out")
  args = p.parse_args(argv)
  if args.steps <= 0:
    raise ValueError(f"--steps must be positive, got {args.steps}")
  windows = parse_windows(args.windows) if args.windows else None
  result = run(args.preset, depth=args.depth, steps=args.steps, windows=windows,
               backend=args.backend, text_len=args.text_len, time_budget=args.time_budget)
  os.makedirs(args.out, exist_ok=True)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
  base = os.path.join(args.out, f"e2e_{args.preset}_{stamp}")
  with open(base + ".json", "w") as f:
    json.dump(result, f, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
  try:
    plot(result, base + ".png")
  except Exception as e:  # noqa: BLE001 - the JSON is the record; a plot failure must not lose it
    print(f"plot failed: {e!r}")
  summary = {e["name"]: {k: (round(e[k], 3) if isinstance(e.get(k), float) else e.get(k))
                         for k in ("step_ms", "attn_op_ms", "attention_share", "speedup",
                                   "predicted_speedup", "why_not_faster", "error") if k in e}
             for e in result["configs"]}
  print(json.dumps({"json": base + ".json", "device": result["device"],
                    "amdahl_bound": result.get("amdahl_bound"), "configs": summary}, indent=1))
  return result


if __name__ == "__main__":
  main()
