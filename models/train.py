"""Flow-matching training of :class:`models.video_dit.VideoDiT` on synthetic blob videos.

CLI:
  python -m models.train --preset small --steps 300 --attention sta --out runs/small \
      [--init-from runs/full/ckpt] [--dtype bfloat16] [--batch 8] [--lr 3e-4] [--save-every 100]
writes ``<out>/ckpt`` (a checkpoint directory), ``<out>/loss.json`` and ``<out>/loss.png``. A
non-finite loss or gradient norm stops training with FloatingPointError (the CLI: one error line,
exit status 1); ``ckpt`` then keeps the last good state (the last ``--save-every`` save of this
run, or what was there before), never the diverged one.

Checkpoints are orbax-checkpoint directories (orbax-checkpoint is installed with flax) with the
items "params" (the model's nnx.Param state), "opt" (the optimizer state, optional) and "meta"
(JSON: the VideoDiTConfig and the step); see :func:`save_checkpoint`, :func:`read_checkpoint`.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx

import jsta
from jsta.calibration.cli import HelpFormatter
from models import attention as attn_lib
from models import data as data_lib
from models.video_dit import VideoDiT, VideoDiTConfig, count_params, video_dit_config


# ---- loss and step -------------------------------------------------------------------------------
def flow_matching_loss(model, batch: dict, key, *, attention: str | None = None,
                       text_len: int | None = None, parallel=None):
  """Rectified-flow loss: mean squared error between predicted and true velocity.

  x_t = (1 - t) x_0 + t * noise with t ~ logit-normal(0, 1) (SD3's sampling of t), target
  v = noise - x_0. batch: "latent" [b, T, H, W, C], "text" [b, L, D], "text_mask" [b, L].
  Returns a float32 scalar.
  """
  x0 = batch["latent"].astype(jnp.float32)
  kn, kt = jax.random.split(key)
  noise = jax.random.normal(kn, x0.shape, jnp.float32)
  t = jax.nn.sigmoid(jax.random.normal(kt, (x0.shape[0],), jnp.float32))
  tb = t[:, None, None, None, None]
  xt = (1 - tb) * x0 + tb * noise
  pred = model(xt, t, batch["text"], batch["text_mask"], attention=attention, text_len=text_len,
               parallel=parallel)
  return jnp.mean((pred - (noise - x0)) ** 2)


def make_optimizer(model, *, lr: float = 3e-4, weight_decay: float = 0.0, clip: float = 1.0,
                   warmup: int = 20) -> nnx.Optimizer:
  """AdamW with global-norm gradient clipping and a linear warm-up."""
  if not lr > 0:
    raise ValueError(f"lr must be positive, got {lr}")
  return nnx.Optimizer(model, _make_tx(float(lr), float(weight_decay), float(clip), int(warmup)),
                       wrt=nnx.Param)


@functools.lru_cache(maxsize=16)
def _make_tx(lr: float, weight_decay: float, clip: float, warmup: int):
  # Cached: the transformation is static data of the optimizer's graph, so an equal object lets
  # a second optimizer with the same settings reuse train_step's compiled executable.
  # Linear warm-up from lr / warmup (not 0: a first step with lr 0 would be wasted).
  sched = lr if warmup <= 1 else optax.linear_schedule(lr / warmup, lr, warmup - 1)
  return optax.chain(optax.clip_by_global_norm(clip),
                     optax.adamw(sched, b1=0.9, b2=0.99, weight_decay=weight_decay))


@nnx.jit(static_argnames=("attention", "text_len", "parallel"))
def train_step(model, optimizer, batch, key, attention=None, text_len=None, parallel=None):
  """One AdamW step on the flow-matching loss; returns (loss, grad_norm) float32 scalars.

  Parameters stay in ``param_dtype`` (float32 for mixed precision); the forward runs in
  ``config.dtype``, and gradients arrive in the parameter dtype. ``parallel`` (a
  :class:`models.parallel.Parallelism`) shards the batch and sequence over its mesh; put the
  batch on the mesh with ``parallel.shard_batch`` first.
  """
  def loss_fn(m):
    return flow_matching_loss(m, batch, key, attention=attention, text_len=text_len,
                              parallel=parallel)

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss, optax.tree.norm(grads)


# ---- checkpoints ---------------------------------------------------------------------------------
# A checkpoint is an orbax-checkpoint directory (orbax comes with flax) of three items: "params"
# (the model's nnx.Param state), "opt" (the optimizer state, optional) and "meta" (JSON: the
# VideoDiTConfig and the step).
_FORMAT = "models.train"


def _checkpointer() -> ocp.Checkpointer:
  # The items' handlers named up front: a fresh checkpointer then reads the items' metadata too.
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(
      params=ocp.PyTreeCheckpointHandler(), opt=ocp.PyTreeCheckpointHandler(),
      meta=ocp.JsonCheckpointHandler()))


def _nested(state) -> dict:
  """nnx state -> nested dict {str: ... numpy array} (orbax saves plain pytrees)."""
  out: dict = {}
  for path, var in nnx.to_flat_state(state):
    value = var.get_value() if hasattr(var, "get_value") else var
    node = out
    for key in path[:-1]:
      node = node.setdefault(str(key), {})
    node[str(path[-1])] = np.asarray(value)
  return out


def _flat(tree, prefix: str) -> dict[str, np.ndarray]:
  """Nested dict -> {prefix + "a/b/c": array}, the keys :func:`_restore_into` looks up."""
  out = {}
  for path, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out[prefix + "/".join(str(k.key) for k in path)] = value
  return out


def save_checkpoint(path: str | os.PathLike, model: VideoDiT,
                    optimizer: nnx.Optimizer | None = None, step: int = 0) -> None:
  """Writes model parameters (and optimizer state) to the checkpoint directory ``path``.

  orbax writes the checkpoint beside ``path`` and finalizes it there; it then replaces what was
  at ``path``, so that ``path`` never holds a half-written checkpoint.
  """
  path = os.path.abspath(os.fspath(path))
  args = {"params": ocp.args.PyTreeSave(_nested(nnx.state(model, nnx.Param))),
          "meta": ocp.args.JsonSave({"format": _FORMAT, "config": model.config.to_json(),
                                     "step": int(step)})}
  if optimizer is not None:
    args["opt"] = ocp.args.PyTreeSave(_nested(nnx.state(optimizer)))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp, old = path + ".saving", path + ".old"
  shutil.rmtree(tmp, ignore_errors=True)            # left by an interrupted save
  checkpointer = _checkpointer()
  try:
    checkpointer.save(tmp, args=ocp.args.Composite(**args))
  finally:
    checkpointer.close()
  shutil.rmtree(old, ignore_errors=True)
  if os.path.lexists(path):
    os.replace(path, old)
  os.replace(tmp, path)
  shutil.rmtree(old, ignore_errors=True)


def _restore_into(state, arrays: dict, prefix: str, what: str):
  flat = nnx.to_flat_state(state)
  missing, wrong = [], []
  for path, var in flat:
    key = prefix + "/".join(str(p) for p in path)
    if key not in arrays:
      missing.append(key)
      continue
    value = arrays[key]
    old = var.get_value()
    if tuple(value.shape) != tuple(np.shape(old)):
      wrong.append(f"{key}: checkpoint {value.shape} vs model {np.shape(old)}")
      continue
    var.set_value(jnp.asarray(value, dtype=jnp.asarray(old).dtype))
  if missing or wrong:
    raise ValueError(f"checkpoint does not match the {what}: missing {missing[:5]}"
                     f"{'...' if len(missing) > 5 else ''}, shape mismatches {wrong[:5]}")
  return nnx.from_flat_state(flat)


def read_checkpoint(path: str | os.PathLike, items: tuple[str, ...] = ("params", "opt")) -> dict:
  """The contents of a checkpoint directory, checked.

  Args:
    path: a directory written by :func:`save_checkpoint`.
    items: which arrays to read ("params", "opt"; those the checkpoint has); () reads only the
      config and the step.
  Returns:
    {"config": :class:`VideoDiTConfig`, "step": int} and a numpy array per saved leaf, keyed
    "params/<path>" and "opt/<path>".

  Raises:
    FileNotFoundError / PermissionError (OSError, naming the path) when it cannot be read.
    ValueError naming the path when it is not a ``models.train`` checkpoint: a file (the .npz
      checkpoints of earlier versions included: they are not read), a directory without the
      checkpoint's items, an incomplete or corrupt checkpoint, or no valid config.
  """
  name, path = os.fspath(path), os.path.abspath(os.fspath(path))
  what = (f"{name}: not a models.train checkpoint (an orbax checkpoint directory written by "
          f"models.train.save_checkpoint)")
  if not os.path.exists(path):
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
  if not os.path.isdir(path):
    raise ValueError(f"{what}: it is a file, not a directory (.npz checkpoints of earlier "
                     f"versions are not read)")
  if not os.path.isdir(os.path.join(path, "meta")):
    raise ValueError(f"{what}: it has no 'meta' item")
  checkpointer = _checkpointer()
  try:
    try:
      meta = checkpointer.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = meta["meta"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise _corrupt(what, e) from None
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
      raise ValueError(f"{what}: its 'meta' item is not a models.train one "
                       f"({str(meta)[:80]})")
    try:
      config = VideoDiTConfig.from_json(meta["config"])
      step = int(meta.get("step", 0))
    except (KeyError, AttributeError, TypeError, ValueError) as e:
      raise ValueError(f"{what}: its config is not a VideoDiTConfig ({e})") from None
    present = [i for i in items if os.path.isdir(os.path.join(path, i))]
    try:
      trees = {}
      if present:
        tree_meta = checkpointer.metadata(path).item_metadata
        # Arrays come back as numpy on the host, whatever devices wrote them.
        trees = checkpointer.restore(path, args=ocp.args.Composite(**{
            i: ocp.args.PyTreeRestore(restore_args=jax.tree.map(
                lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree_meta[i].tree))
            for i in present}))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
      raise _corrupt(what, e) from None
  finally:
    checkpointer.close()
  out = {"config": config, "step": step}
  for item in present:
    out |= _flat(trees[item], item + "/")
  return out


def _corrupt(what: str, e: Exception) -> Exception:
  """ValueError for a checkpoint orbax cannot read; an OSError of access stays itself."""
  if isinstance(e, PermissionError):
    return e
  return ValueError(f"{what}: the checkpoint is incomplete or corrupt ({type(e).__name__}: "
                    f"{str(e)[:300]})")


def load_config(path: str | os.PathLike) -> VideoDiTConfig:
  """The VideoDiTConfig stored in a checkpoint (errors as in :func:`read_checkpoint`)."""
  return read_checkpoint(path, items=())["config"]


def restore_checkpoint(path: str | os.PathLike, model: VideoDiT,
                       optimizer: nnx.Optimizer | None = None) -> int:
  """Loads parameters (and optimizer state when both are there) into ``model`` in place.

  Returns the saved step. Raises ValueError naming the path when it is not a checkpoint
  (see :func:`read_checkpoint`) or a parameter is missing or has another shape.
  """
  arrays = read_checkpoint(path, items=("params", "opt") if optimizer is not None
                           else ("params",))
  try:
    return restore_arrays(arrays, model, optimizer)
  except ValueError as e:
    raise ValueError(f"{os.fspath(path)}: {e}") from None


def restore_arrays(arrays: dict, model: VideoDiT, optimizer: nnx.Optimizer | None = None) -> int:
  """:func:`restore_checkpoint` from the dict of :func:`read_checkpoint` (no file access)."""
  nnx.update(model, _restore_into(nnx.state(model, nnx.Param), arrays, "params/", "model"))
  if optimizer is not None and any(k.startswith("opt/") for k in arrays):
    nnx.update(optimizer, _restore_into(nnx.state(optimizer), arrays, "opt/", "optimizer"))
  return int(arrays.get("step", 0))


# ---- loop ----------------------------------------------------------------------------------------
def _check_count(value, name: str, minimum: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"{name} must be an int, got {type(value).__name__}")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}")


def train(cfg: VideoDiTConfig, *, steps: int, batch: int = 8, lr: float = 3e-4, seed: int = 0,
          attention: str | None = None, init_from: str | None = None, out: str | None = None,
          progress: bool = True, log_every: int = 10, text_len: int | None = None,
          save_every: int | None = None) -> dict:
  """Trains for ``steps`` steps; returns {"losses": [...], "model": model, ...}.

  Every attention kind masks each sample's text exactly from its text mask (STA through
  run-time text lengths): one executable serves every batch. ``text_len`` (optional) caps the
  attended text slots for every sample (slots at or beyond it are never attended).

  With ``out``, the checkpoint directory ``<out>/ckpt`` is written at the end (and every
  ``save_every`` steps), then ``loss.json`` and ``loss.png``. Every step's loss and gradient
  norm are checked (in one transfer per ``log_every`` steps, so the loop does not wait on each
  step): a non-finite one raises FloatingPointError naming the step, and ``ckpt`` keeps the
  last good state (the last periodic save, or whatever was there before this run).
  """
  _check_count(steps, "steps")
  _check_count(batch, "batch")
  _check_count(log_every, "log_every")
  if save_every is not None:
    _check_count(save_every, "save_every")
  if isinstance(lr, bool) or not isinstance(lr, (int, float)):
    raise TypeError(f"lr must be a number, got {type(lr).__name__}")
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"lr must be a positive finite number, got {lr!r}")
  model = VideoDiT(cfg, rngs=nnx.Rngs(seed))
  if init_from:
    restore_checkpoint(init_from, model)
  optimizer = make_optimizer(model, lr=lr)
  data_cfg = data_lib.BlobDataConfig.for_model(cfg)
  key = jax.random.key(seed + 1)
  kind = cfg.attention if attention is None else attention
  ckpt = os.path.join(out, "ckpt") if out else None
  losses = []
  pending = []            # (step, loss, grad_norm) not yet checked, still on the device
  saved_step = None       # the step of this run's last checkpoint
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=steps, desc=f"train {kind}", dynamic_ncols=True)
  t0 = time.perf_counter()

  def check_pending():
    # One device->host transfer for all pending scalars; raises at the first non-finite one.
    values = jax.device_get([(l, g) for _, l, g in pending])
    for (step_i, _, _), (l, g) in zip(pending, values):
      if not (np.isfinite(l) and np.isfinite(g)):
        if bar is not None:
          bar.close()
        kept = (f"{ckpt} holds step {saved_step}, the last good state" if saved_step is not None
                else f"{ckpt} was not written" if ckpt else "nothing was written")
        raise FloatingPointError(
            f"training diverged: loss {float(l)} (grad norm {float(g)}) at step {step_i} of "
            f"{steps}; {kept}. Lower the learning rate (lr={lr}) or check the data")
    pending.clear()

  for step in range(steps):
    key, kd, ks = jax.random.split(key, 3)
    b = data_lib.make_batch(kd, data_cfg, batch)
    loss, gnorm = train_step(model, optimizer, b, ks, attention=attention, text_len=text_len)
    pending.append((step, loss, gnorm))
    last = step == steps - 1
    if step % log_every == 0 or last:
      check_pending()  # syncs; only every log_every steps
      loss = float(loss)
      losses.append({"step": step, "loss": loss, "grad_norm": float(gnorm),
                     "time_s": time.perf_counter() - t0})
      if bar is not None:
        bar.set_postfix(loss=f"{loss:.4f}")
    if ckpt and save_every and (step + 1) % save_every == 0 and not last:
      check_pending()
      save_checkpoint(ckpt, model, optimizer, step=step + 1)
      saved_step = step + 1
    if bar is not None:
      bar.update(1)
  if bar is not None:
    bar.close()
  result = {"losses": losses, "model": model, "optimizer": optimizer,
            "seconds": time.perf_counter() - t0}
  if out:
    os.makedirs(out, exist_ok=True)
    save_checkpoint(ckpt, model, optimizer, step=steps)
    write_loss_curve(out, losses, meta={
        "config": cfg.to_json(), "attention": kind, "steps": steps, "batch": batch, "lr": lr,
        "seed": seed, "init_from": init_from, "text_len": text_len, "params": count_params(model),
        "device": jax.devices()[0].device_kind, "jax": jax.__version__,
        "seconds": result["seconds"], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
  return result


def write_loss_curve(out: str, losses: list[dict], meta: dict) -> None:
  """Writes ``loss.json`` (meta + points) and ``loss.png`` into ``out``."""
  with open(os.path.join(out, "loss.json"), "w") as f:
    json.dump({"meta": meta, "losses": losses}, f, indent=1)
  loss_figure(losses, meta).savefig(os.path.join(out, "loss.png"), dpi=120)


def loss_figure(losses: list[dict], meta: dict):
  """The loss curve as a ``matplotlib.figure.Figure``: a log axis with plain labels when the
  loss spans a decade or more, a linear one otherwise."""
  from matplotlib.figure import Figure
  from matplotlib.ticker import FuncFormatter
  fig = Figure(figsize=(6, 4), layout="constrained")   # no pyplot: the caller's backend stays
  ax = fig.subplots()
  values = [p["loss"] for p in losses]
  ax.plot([p["step"] for p in losses], values, marker=".")
  ax.set_xlabel("step")
  ax.set_ylabel("flow-matching loss")
  if min(values) > 0 and max(values) / min(values) >= 10:
    # A log axis only over at least a decade, with plain numbers as labels (over a narrow range
    # a log axis labels its few ticks 1.04x10^0 and the like).
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    # Between the decades, label 2x and 5x only (every minor tick would overlap).
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda y, _: f"{y:g}" if f"{y:.0e}"[0] in "25" else ""))
  ax.set_title(f"VideoDiT ({meta.get('attention')}), {meta.get('device')}")
  ax.grid(True, alpha=0.3)
  return fig


def describe_attention(cfg: VideoDiTConfig) -> list[str]:
  """Lines that say what attention the run trains with: for STA each layer's window and its
  sparsity, and a warning when the windows skip nothing (they cover the whole volume)."""
  if cfg.attention != "sta":
    return [f"attention: {cfg.attention} (dense over the {math.prod(cfg.grid)} video tokens and "
            f"{cfg.text_max_len} text slots)"]
  spec = cfg.base_spec()
  lines = [f"attention: sta, token grid {cfg.grid} in tiles of {cfg.tile} -> {spec.num_tiles} "
           f"tiles"]
  sparsities = []
  windows = cfg.layer_windows()
  for layer, w in enumerate(windows):
    sparsity = cfg.spec(w).sparsity()
    sparsities.append(sparsity)
    if layer and w == windows[layer - 1]:
      continue
    same = sum(1 for x in windows[layer:] if x == w)
    name = (f"layer {layer}" if same == 1 else
            "every layer" if same == len(windows) else f"layers {layer}..{layer + same - 1}")
    lines.append(f"  {name}: window {w} (tiles), {sparsity:.1%} sparse")
  if max(sparsities) == 0:
    lines.append("warning: the STA window covers the whole volume: nothing is skipped and "
                 "STA computes full attention (pass a smaller --window, e.g. --window "
                 f"{','.join('1' * len(cfg.grid))})")
  return lines


def main(argv=None) -> int:
  """``python -m models.train``; returns 0. Bad options end in SystemExit(2) with one error line,
  a diverged run in SystemExit(1) with one error line."""
  p = argparse.ArgumentParser(prog="python -m models.train", description=__doc__.split("\n")[0],
                              formatter_class=HelpFormatter)
  p.add_argument("--preset", default="small", choices=["tiny", "small", "hunyuan-shape"],
                 help="model preset (models.video_dit.video_dit_config)")
  p.add_argument("--steps", type=int, default=300, help="optimizer steps (>= 1)")
  p.add_argument("--batch", type=int, default=8, help="samples per step (>= 1)")
  p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate (> 0)")
  p.add_argument("--seed", type=int, default=0, help="initialization and data seed (>= 0)")
  p.add_argument("--attention", choices=list(attn_lib.ATTENTION_KINDS), default=None,
                 help="attention kind (default: the preset's)")
  p.add_argument("--window", type=str, default=None,
                 help="STA window in tiles, e.g. 3,3,3 (default: the preset's)")
  p.add_argument("--backend", default=None, help="jsta backend (default: auto)")
  p.add_argument("--depth", type=int, default=None, help="blocks (default: the preset's)")
  p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                 help="compute dtype (default: the preset's; params stay float32)")
  p.add_argument("--text-len", type=int, default=None,
                 help="cap on the attended text slots for every sample (default: each sample's "
                      "own text mask, exactly)")
  p.add_argument("--init-from", default=None,
                 help="checkpoint directory to start from (a models.train <out>/ckpt)")
  p.add_argument("--out", default="runs/train", help="output directory")
  p.add_argument("--log-every", type=int, default=10, help="steps between logged losses")
  p.add_argument("--save-every", type=int, default=None,
                 help="also write <out>/ckpt every this many steps (default: only at the end)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  args = p.parse_args(argv)
  for name, minimum in (("steps", 1), ("batch", 1), ("seed", 0), ("depth", 1), ("log_every", 1),
                        ("save_every", 1), ("text_len", 0)):
    value = getattr(args, name)
    if value is not None and value < minimum:
      p.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
  if not (math.isfinite(args.lr) and args.lr > 0):
    p.error(f"--lr must be a positive finite number, got {args.lr}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    p.error(f"--out {args.out}: exists and is not a directory")
  overrides = {"param_dtype": "float32"}
  if args.attention:
    overrides["attention"] = args.attention
  if args.window:
    try:
      overrides["window"] = tuple(int(v) for v in args.window.split(","))
    except ValueError:
      p.error(f"--window must be comma-separated ints like 3,3,3, got {args.window!r}")
  if args.backend:
    try:
      jsta.resolve_backend(args.backend)
    except ValueError as e:
      p.error(f"--backend: {e}")
    overrides["backend"] = args.backend
  if args.depth is not None:
    overrides["depth"] = args.depth
  if args.dtype:
    overrides["dtype"] = args.dtype
  if args.init_from:
    try:
      saved = load_config(args.init_from)
    except OSError as e:
      p.error(f"--init-from {args.init_from}: {e.strerror or e}")
    except ValueError as e:
      p.error(f"--init-from {e}")
    for field in ("latent_shape", "patch", "hidden", "heads", "depth", "text_dim", "text_max_len"):
      overrides.setdefault(field, getattr(saved, field))
  try:
    cfg = video_dit_config(args.preset, **overrides)
  except ValueError as e:
    p.error(str(e))
  if args.text_len is not None and args.text_len > cfg.text_max_len:
    p.error(f"--text-len must be in [0, {cfg.text_max_len}] (the preset's text slots), "
            f"got {args.text_len}")
  print("\n".join(describe_attention(cfg)), flush=True)
  try:
    res = train(cfg, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                init_from=args.init_from, out=args.out, progress=not args.no_progress,
                log_every=args.log_every, text_len=args.text_len, save_every=args.save_every)
  except FloatingPointError as e:
    p.exit(1, f"{p.prog}: error: {e}\n")
  first, last = res["losses"][0]["loss"], res["losses"][-1]["loss"]
  print(json.dumps({"out": args.out, "params": count_params(res["model"]), "first_loss": first,
                    "last_loss": last, "seconds": round(res["seconds"], 1)}))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
