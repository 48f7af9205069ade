"""Capture each attention layer's (q, k, v) from a :class:`models.video_dit.VideoDiT` forward.

Window calibration (:mod:`jsta.calibrate`) needs the q, k, v every attention layer sees under
full attention. ``VideoDiT`` calls ``models.attention.joint_attention`` once per block (looked
up on the module at call time), so :func:`capture_qkv` swaps that function for a recording
wrapper for the duration of one eager (un-jitted) forward pass and restores it afterwards. The
model's own code is untouched, and the recorded layers come back in block order.

Checkpoints: :func:`save_checkpoint` / :func:`load_checkpoint` store the config (JSON) and the
parameters (``nnx.to_pure_dict`` of the model state) in one msgpack file.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading

import jax
import numpy as np
from flax import nnx, serialization

import jsta
from models import attention as attn_lib
from models import video_dit

_LOCK = threading.Lock()  # one capture at a time: the patch is process-global


@contextlib.contextmanager
def recording_attention():
  """Context manager yielding a list that collects (q, k, v, spec) per joint-attention call."""
  records: list[tuple] = []
  with _LOCK:
    original = attn_lib.joint_attention

    def recording(kind, q, k, v, spec, text_mask=None, **kwargs):
      records.append((q, k, v, spec))
      return original(kind, q, k, v, spec, text_mask, **kwargs)

    attn_lib.joint_attention = recording
    try:
      yield records
    finally:
      attn_lib.joint_attention = original


def capture_qkv(model: video_dit.VideoDiT, x, t, text, text_mask=None, *,
                attention: str = "full") -> tuple[list[tuple], jsta.STASpec]:
  """One forward pass; returns ([(q, k, v)] per layer, the base spec of the attention calls).

  Args:
    model: a VideoDiT.
    x: [batch, T, H, W, C] latent; t: [batch] flow time; text: [batch, text_len, text_dim];
      text_mask: [batch, text_len] bool or None (all valid). Calibrate with all-valid text:
      the calibration metrics treat the spec's first ``text_len`` slots as valid keys.
    attention: the attention the forward pass runs with ("full": what calibration compares
      against; the activations then are those of the full-attention model).
  Returns:
    layers: list over blocks of (q, k, v), each [batch, seq_len, heads, head_dim] (video tokens
      in tile order, then text slots), as concrete arrays.
    spec: the layout of the calls (window = whole volume).
  """
  if isinstance(x, jax.core.Tracer):
    raise ValueError("capture_qkv must run eagerly (outside jax.jit): it records activations")
  with recording_attention() as records:
    model(x, t, text, text_mask, attention=attention)
  if len(records) != model.config.depth:
    raise RuntimeError(
        f"captured {len(records)} attention calls but the model has depth "
        f"{model.config.depth}; models.video_dit no longer calls "
        "models.attention.joint_attention once per block")
  spec = records[0][3]
  layers = [(q, k, v) for q, k, v, _ in records]
  return layers, spec.with_window(jsta.full_window(spec.latent_shape, spec.tile_shape))


def save_checkpoint(model: video_dit.VideoDiT, path: str | os.PathLike) -> None:
  """Writes config and parameters of ``model`` to one msgpack file."""
  state = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  blob = {"config": json.dumps(model.config.to_json()), "params": state}
  with open(path, "wb") as f:
    f.write(serialization.msgpack_serialize(blob))


def load_checkpoint(path: str | os.PathLike, **overrides) -> video_dit.VideoDiT:
  """A VideoDiT from :func:`save_checkpoint`'s file; ``overrides`` replace config fields."""
  with open(path, "rb") as f:
    try:
      blob = serialization.msgpack_restore(f.read())
    except Exception as e:  # msgpack raises several unrelated types on garbage
      raise ValueError(f"{path}: not a models.capture checkpoint ({e})") from None
  if not isinstance(blob, dict) or "config" not in blob or "params" not in blob:
    raise ValueError(f"{path}: not a models.capture checkpoint (needs 'config' and 'params')")
  cfg = video_dit.VideoDiTConfig.from_json(json.loads(blob["config"]) | overrides)
  model = video_dit.VideoDiT(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, blob["params"])
  nnx.update(model, state)
  return model
