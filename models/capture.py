"""Capture each attention layer's (q, k, v) from a :class:`models.video_dit.VideoDiT` forward.

Window calibration (:mod:`jsta.calibration.search`) needs the q, k, v every attention layer sees under
full attention. ``VideoDiT`` calls ``models.attention.joint_attention`` once per block (looked
up on the module at call time), so :func:`capture_qkv` swaps that function for a recording
wrapper for the duration of one eager (un-jitted) forward pass and restores it afterwards. The
model's own code is untouched, and the recorded layers come back in block order.

Checkpoints: :func:`load_checkpoint` reads ``models.train`` checkpoints (orbax-checkpoint
directories), with one clear error naming the path for anything else.
"""

from __future__ import annotations

import contextlib
import os
import threading

import jax
import numpy as np
from flax import nnx

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
      text_mask: [batch, text_len] bool or None (all valid); valid slots first.
    attention: the attention the forward pass runs with ("full": what calibration compares
      against; the activations then are those of the full-attention model).
  Returns:
    layers: list over blocks of (q, k, v), each [batch, seq_len, heads, head_dim] (video tokens
      in tile order, then text slots), as concrete arrays.
    spec: the layout of the calls (window = whole volume; text_len = the valid text prefix,
      the batch maximum when samples differ: calibrate one sample at a time to be exact).
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
  # Under "full" attention the model masks text keys per sample with text_mask; the STA layout
  # describes valid text as a static prefix, so report the batch maximum of the valid lengths
  # (exact for one sample, or when all samples have the same text length).
  tmax = model.config.text_max_len
  if text_mask is None:
    text_len = text.shape[1]  # the model pads text slots past the given ones as invalid
  else:
    m = np.asarray(jax.device_get(text_mask), bool)
    m = np.pad(m, ((0, 0), (0, tmax - m.shape[1])))
    text_len = attn_lib.static_text_len(m, tmax)
  spec = jsta.STASpec(spec.latent_shape, spec.tile_shape,
                      jsta.full_window(spec.latent_shape, spec.tile_shape), text_len=text_len,
                      text_max_len=spec.text_max_len)
  layers = [(q, k, v) for q, k, v, _ in records]
  return layers, spec


def load_checkpoint(path: str | os.PathLike) -> video_dit.VideoDiT:
  """A VideoDiT from a ``models.train`` checkpoint directory (config + parameters).

  Raises OSError (naming the path) when it cannot be read, and ValueError naming the path when
  it is not a checkpoint (a file, a directory without the checkpoint's items, an incomplete
  checkpoint, no valid config) or its parameters do not fit its config; see
  :func:`models.train.read_checkpoint`.
  """
  from models import train  # the training module owns the checkpoint format

  path = os.fspath(path)
  arrays = train.read_checkpoint(path, items=("params",))
  model = video_dit.VideoDiT(arrays["config"], rngs=nnx.Rngs(0))
  try:
    train.restore_arrays(arrays, model)
  except ValueError as e:
    raise ValueError(f"{path}: {e}") from None
  return model
