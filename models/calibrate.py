"""Per-head window calibration of the video DiT: ``python -m models.calibrate``.

Captures every block's q, k, v (:func:`models.capture.capture_qkv`) of a
:class:`models.video_dit.VideoDiT` (a ``models.train`` checkpoint, or a random-init preset) and
calibrates per-(layer, head) STA windows with :func:`jsta.calibration.search.calibrate`. The
table, heatmap, options and outputs are those of ``jsta-calibrate`` (:mod:`jsta.calibration.cli`):
``--out`` gets ``strategy.json`` and ``recall_heatmap.png``.

Input i is one sample of ``models.data`` blob videos noised to flow time t_i
(x_t = (1 - t) x_0 + t noise, t spread over 0.9..0.1): one sample per call, so the spec's valid
text prefix is exact for it.

Example (run from the repository root)::

    python -m models.calibrate --checkpoint runs/small/ckpt \
        --candidates "1,1,1;3,3,1;3,3,3;full" --error-budget 0.1 --num-inputs 4 --out /tmp/calib
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jsta.calibration import cli
from models import capture, data, video_dit

PRESETS = ("tiny", "small", "hunyuan-shape")


def dit_capture(model: video_dit.VideoDiT, num_inputs: int, seed: int = 0):
  """(capture_fn, inputs) for :func:`jsta.calibration.search.calibrate` on ``model``.

  ``capture_fn(i)`` runs one eager forward pass on blob video sample i (batch 1) noised to flow
  time t_i and returns ``[(q, k, v, spec)]`` per block, q/k/v [1, seq_len, heads, head_dim].
  """
  if isinstance(num_inputs, bool) or not isinstance(num_inputs, int):
    raise TypeError(f"num_inputs must be an int, got {type(num_inputs).__name__}")
  if num_inputs < 1:
    raise ValueError(f"num_inputs must be >= 1, got {num_inputs}")
  data_cfg = data.BlobDataConfig.for_model(model.config)
  # Flow times spread over the trajectory: attention locality changes with the noise level.
  times = np.linspace(0.9, 0.1, num_inputs) if num_inputs > 1 else np.array([0.5])

  def capture_fn(i):
    kd, kn = jax.random.split(jax.random.key(seed * 1000 + i))
    batch = data.make_batch(kd, data_cfg, 1)
    t = jnp.full((1,), times[i], jnp.float32)
    noise = jax.random.normal(kn, batch["latent"].shape, jnp.float32)
    tb = t[:, None, None, None, None]
    x = (1 - tb) * batch["latent"] + tb * noise
    layers, spec = capture.capture_qkv(model, x, t, batch["text"], batch["text_mask"])
    return [(q, k, v, spec) for q, k, v in layers]

  return capture_fn, range(num_inputs)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``python -m models.calibrate`` with ``argv``; returns the exit status (0).

  Bad options, an unreadable ``--checkpoint`` and bad values end in ``SystemExit(2)`` with one
  ``error:`` line on stderr.
  """
  p = argparse.ArgumentParser(prog="python -m models.calibrate",
                              description=__doc__.split("\n")[0],
                              formatter_class=cli.HelpFormatter)
  p.add_argument("--checkpoint", default=None,
                 help="models.train checkpoint directory (<out>/ckpt); default: a random-init "
                      "--preset model")
  p.add_argument("--preset", default="tiny", choices=PRESETS,
                 help="VideoDiT preset when there is no --checkpoint")
  p.add_argument("--num-inputs", type=cli.int_arg, default=4,
                 help="calibration inputs: single samples at flow times spread over 0.9..0.1")
  p.add_argument("--seed", type=cli.int_arg, default=0,
                 help="seed of the init, the data and the noise")
  cli.add_calibration_args(p)
  args = p.parse_args(argv)
  cli.check_calibration_args(p, args)
  if args.num_inputs < 1:
    p.error(f"--num-inputs must be >= 1, got {args.num_inputs}")
  if args.seed < 0:
    p.error(f"--seed must be >= 0, got {args.seed}")
  if args.checkpoint:
    try:
      model = capture.load_checkpoint(args.checkpoint)
    except OSError as e:
      p.error(f"--checkpoint {args.checkpoint}: {e.strerror or e}")
    except ValueError as e:
      p.error(f"--checkpoint {e}")
    what = f"VideoDiT from {args.checkpoint}"
  else:
    model = video_dit.VideoDiT(video_dit.video_dit_config(args.preset),
                               rngs=nnx.Rngs(args.seed))
    what = f"VideoDiT preset {args.preset!r}, random init (no --checkpoint)"
  capture_fn, inputs = dit_capture(model, args.num_inputs, args.seed)
  return cli.run_calibration(p, args, capture_fn, inputs, model.config.base_spec(), what)


if __name__ == "__main__":
  sys.exit(main())
