"""Command line for window calibration: ``python -m jsta.calibrate``.

Calibrates per-(layer, head) STA windows of the small video DiT (``models.video_dit``; q, k, v
captured with ``models.capture``) or, with ``--synthetic``, of a synthetic model whose heads are
random projections of Fourier positional features (no models/ dependency). Prints a layers x
heads table (window, sparsity, error), and writes into ``--out``:

  strategy.json       the :class:`jsta.strategy.WindowStrategy` (with metrics)
  recall_heatmap.png  per-head recall of every candidate window, and the chosen windows

Example::

    python -m jsta.calibrate --preset tiny --candidates "1,1,1;3,3,3" --error-budget 0.05 \
        --out /tmp/calib
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import jsta
from jsta import calibrate as cal
from jsta.strategy import WindowStrategy


def parse_candidates(text: str, spec: jsta.STASpec) -> list[tuple[int, ...]]:
  """'1,1,1;3,3,3;full' -> [(1, 1, 1), (3, 3, 3), whole-volume window] (validated, deduplicated)."""
  out = []
  for part in text.split(";"):
    part = part.strip()
    if not part:
      continue
    if part == "full":
      w = jsta.full_window(spec.latent_shape, spec.tile_shape)
    else:
      try:
        w = tuple(int(x) for x in part.split(","))
      except ValueError:
        raise ValueError(f"--candidates: {part!r} is not a comma-separated window like 3,3,3 "
                         "or 'full'") from None
    spec.with_window(w)  # odd, positive, rank
    # Windows that clip to the same tiles (e.g. 5x5x5 and 3x3x3 on a 2x2x2 tile grid) are the
    # same candidate; keep the first.
    if spec.effective_window(w) in {spec.effective_window(o) for o in out}:
      print(f"note: candidate {'x'.join(map(str, w))} covers the same tiles as an earlier one "
            f"on {spec.num_tiles} tiles; skipped")
      continue
    out.append(w)
  if not out:
    raise ValueError("--candidates must name at least one window, e.g. '1,1,1;3,3,3;full'")
  return out


# ---- capture functions --------------------------------------------------------------------------

def dit_capture(args):
  """(capture_fn, inputs, spec, description) for the video DiT.

  Input i is one sample of ``models.data`` blob videos noised to flow time t_i
  (x_t = (1 - t) x_0 + t noise, t spread over (0.1, 0.9)): one sample per call, so the spec's
  valid text prefix is exact for it.
  """
  from flax import nnx
  from models import capture, data, video_dit

  if args.checkpoint:
    model = capture.load_checkpoint(args.checkpoint)
    what = f"VideoDiT from {args.checkpoint}"
  else:
    cfg = video_dit.video_dit_config(args.preset)
    model = video_dit.VideoDiT(cfg, rngs=nnx.Rngs(args.seed))
    what = f"VideoDiT preset {args.preset!r}, random init (no --checkpoint)"
  cfg = model.config
  data_cfg = data.BlobDataConfig.for_model(cfg)
  # Flow times spread over the trajectory: attention locality changes with the noise level.
  times = np.linspace(0.9, 0.1, args.num_inputs) if args.num_inputs > 1 else np.array([0.5])

  def capture_fn(i):
    kd, kn = jax.random.split(jax.random.key(args.seed * 1000 + i))
    batch = data.make_batch(kd, data_cfg, 1)
    t = jnp.full((1,), times[i], jnp.float32)
    noise = jax.random.normal(kn, batch["latent"].shape, jnp.float32)
    x = (1 - t[:, None, None, None, None]) * batch["latent"] + t[:, None, None, None, None] * noise
    layers, spec = capture.capture_qkv(model, x, t, batch["text"], batch["text_mask"])
    return [(q, k, v, spec) for q, k, v in layers]

  return capture_fn, range(args.num_inputs), cfg.base_spec(), what


def synthetic_capture(args):
  """(capture_fn, inputs, spec, description) for a synthetic model of random projections.

  Tokens are Fourier features of their (t, h, w) coordinates plus noise; head h of layer l has
  q = s_lh * X W_lh, k = X W_lh with a shared random projection W_lh, so q . k peaks at nearby
  tokens with a sharpness s_lh drawn log-uniformly: heads range from local to nearly global.
  """
  from models import video_dit  # only for the preset geometry; no model is built

  cfg = video_dit.video_dit_config(args.preset)
  spec = cfg.base_spec()
  heads, head_dim, depth = cfg.heads, cfg.head_dim, cfg.depth
  grid = np.stack(np.meshgrid(*[np.arange(s) for s in spec.padded_latent_shape], indexing="ij"),
                  -1).reshape(1, -1, 3).astype(np.float32)
  coords = np.asarray(jsta.tile_order(jnp.asarray(grid), spec))[0] / np.asarray(spec.tile_shape)
  freqs = np.array([0.25, 0.5, 1.0], np.float32)
  ang = coords[:, :, None] * freqs[None, None, :] * np.pi                # [nv, 3, F]
  feats = np.concatenate([np.cos(ang), np.sin(ang)], -1).reshape(coords.shape[0], -1)
  rng = np.random.default_rng(args.seed)
  proj = rng.normal(size=(depth, heads, feats.shape[1], head_dim)) / np.sqrt(feats.shape[1])
  sharp = np.exp(rng.uniform(np.log(0.1), np.log(30.0), size=(depth, heads)))
  nv, s = spec.padded_video_len, spec.seq_len

  def capture_fn(i):
    r = np.random.default_rng(args.seed * 1000 + i)
    layers = []
    for l in range(depth):
      x = feats[None] + 0.1 * r.normal(size=(1,) + feats.shape)
      kk = np.einsum("bnf,hfd->bnhd", x, proj[l])
      qq = kk * sharp[l][None, None, :, None]
      q = np.zeros((1, s, heads, head_dim), np.float32)
      k = np.zeros_like(q)
      q[:, :nv], k[:, :nv] = qq, kk
      q[:, nv:] = r.normal(size=q[:, nv:].shape)
      k[:, nv:] = r.normal(size=k[:, nv:].shape)
      v = r.normal(size=q.shape).astype(np.float32)
      layers.append((jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)))
    return layers

  return capture_fn, range(args.num_inputs), spec, (
      f"synthetic random-projection heads on preset {args.preset!r} geometry")


# ---- output -------------------------------------------------------------------------------------

def format_table(strategy: WindowStrategy) -> str:
  """Layers x heads: 'window sparsity error' per cell, '*' where the budget was not met."""
  cals = cal.layer_calibrations(strategy)
  lines = []
  head = "layer | " + " | ".join(f"head {h:<17d}" for h in range(strategy.num_heads))
  lines.append(head)
  lines.append("-" * len(head))
  for li, c in enumerate(cals):
    cells = []
    for h in range(strategy.num_heads):
      i = int(c.chosen[h])
      w = "x".join(str(v) for v in c.candidates[i])
      flag = " " if c.met[h] else "*"
      cells.append(f"{w:>7s} {100 * c.sparsity[i]:5.1f}% {c.error[i, h]:.3f}{flag}")
    lines.append(f"{li:5d} | " + " | ".join(f"{x:22s}" for x in cells))
  lines.append("cell: window (tiles), sparsity, relative L2 error vs full attention; "
               "* = budget not met (lowest-error/sparsest fallback)")
  return "\n".join(lines)


def save_heatmap(strategy: WindowStrategy, path: str) -> None:
  """One panel per candidate (recall, layers x heads) and one of the chosen windows' sparsity."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  cals = cal.layer_calibrations(strategy)
  cands = cals[0].candidates
  nl, nh = strategy.num_layers, strategy.num_heads
  n = len(cands) + 1
  fig, axes = plt.subplots(1, n, figsize=(2.2 + 0.45 * nh * n, 1.5 + 0.4 * nl), squeeze=False,
                           layout="constrained")
  for ci, w in enumerate(cands):
    ax = axes[0, ci]
    rec = np.stack([c.recall[ci] for c in cals])                        # [L, H]
    im = ax.imshow(rec, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_title(f"recall {'x'.join(map(str, w))}\n({100 * cals[0].sparsity[ci]:.1f}% sparse)",
                 fontsize=9)
    for (l, h), r in np.ndenumerate(rec):
      ax.text(h, l, f"{r:.2f}", ha="center", va="center", fontsize=6,
              color="white" if r < 0.6 else "black")
  ax = axes[0, -1]
  sp = np.stack([c.sparsity[c.chosen] for c in cals])
  ax.imshow(sp, vmin=0, vmax=1, cmap="magma", aspect="auto")
  ax.set_title("chosen window\n(colour: sparsity)", fontsize=9)
  for l, c in enumerate(cals):
    for h in range(nh):
      ax.text(h, l, "x".join(map(str, c.candidates[c.chosen[h]])), ha="center", va="center",
              fontsize=6, color="white" if sp[l, h] < 0.6 else "black")
  for ax in axes[0]:
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(nh))
    ax.set_yticks(range(nl))
  fig.colorbar(im, ax=axes[0, len(cands) - 1], label="recall")
  fig.savefig(path, dpi=130, bbox_inches="tight")
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m jsta.calibrate", description=__doc__.split("\n")[0])
  p.add_argument("--preset", default="tiny", choices=("tiny", "small"),
                 help="VideoDiT preset (ignored with --checkpoint)")
  p.add_argument("--checkpoint", default=None,
                 help="models.capture.save_checkpoint file (default: random-init preset model)")
  p.add_argument("--synthetic", action="store_true",
                 help="synthetic random-projection heads on the preset geometry instead of the DiT")
  p.add_argument("--candidates", default="1,1,1;3,3,3;5,5,5;full",
                 help="';'-separated windows in tiles, 'full' = whole volume")
  budget = p.add_mutually_exclusive_group()
  budget.add_argument("--error-budget", type=float, default=None,
                      help="max relative L2 error per head (default 0.05)")
  budget.add_argument("--sparsity-budget", type=float, default=None,
                      help="min sparsity per head (instead of an error budget)")
  p.add_argument("--num-inputs", type=int, default=4,
                 help="calibration inputs: single samples at flow times spread over (0.1, 0.9)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--block-q", type=int, default=None, help="query rows per block (memory)")
  p.add_argument("--sta-backend", default=None,
                 help="compute STA outputs with jsta.sliding_tile_attention on this backend "
                      "(xla, pallas_triton, ...) instead of the shared blockwise softmax")
  p.add_argument("--out", required=True, help="output directory")
  args = p.parse_args(argv)
  if args.error_budget is None and args.sparsity_budget is None:
    args.error_budget = 0.05
  if args.num_inputs < 1:
    p.error("--num-inputs must be >= 1")

  t0 = time.time()
  make = synthetic_capture if args.synthetic else dit_capture
  capture_fn, inputs, spec, what = make(args)
  try:
    candidates = parse_candidates(args.candidates, spec)
  except ValueError as e:
    p.error(str(e))
  print(f"calibrating: {what}")
  print(f"layout: latent {spec.latent_shape}, tile {spec.tile_shape}, tiles {spec.num_tiles}, "
        f"text slots {spec.text_max_len}; candidates "
        f"{', '.join('x'.join(map(str, w)) for w in candidates)}; "
        + (f"error budget {args.error_budget}" if args.error_budget is not None
           else f"sparsity budget {args.sparsity_budget}"))
  strategy = cal.calibrate(capture_fn, inputs, spec, candidates, error_budget=args.error_budget,
                           sparsity_budget=args.sparsity_budget, block_q=args.block_q,
                           sta_backend=args.sta_backend,
                           progress=lambda msg: print("  " + msg, flush=True))
  strategy = WindowStrategy(strategy.latent_shape, strategy.tile_shape, strategy.windows,
                            strategy.text_len, strategy.text_max_len,
                            metrics=strategy.metrics | {"source": what})
  print(format_table(strategy))
  met = np.concatenate([c.met for c in cal.layer_calibrations(strategy)])
  print(f"mean sparsity {100 * strategy.sparsity():.1f}%; {int((~met).sum())} of {met.size} "
        f"heads outside the budget; {time.time() - t0:.1f} s")
  os.makedirs(args.out, exist_ok=True)
  spath = os.path.join(args.out, "strategy.json")
  hpath = os.path.join(args.out, "recall_heatmap.png")
  strategy.save(spath)
  save_heatmap(strategy, hpath)
  print(f"wrote {spath} and {hpath}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
