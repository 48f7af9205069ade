"""The op's input checks, shared by :func:`jsta.sliding_tile_attention` and the dense reference
(:func:`jsta.reference_attention`): q, k, v against a spec, and run-time text lengths. Raised
before any tracing or kernel work, with the conventions of :mod:`jsta.checks`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jsta import checks
from jsta.spec import STASpec

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def checked_qkv(q, k, v, spec: STASpec):
  """(q, k, v) as the op computes on them (:func:`as_input`), after :func:`check_inputs`."""
  given_dtypes = tuple(getattr(x, "dtype", None) for x in (q, k, v))
  q, k, v = (as_input(name, x) for name, x in (("q", q), ("k", k), ("v", v)))
  check_inputs(q, k, v, spec, given_dtypes)
  return q, k, v


def computed_dtype(dtype) -> np.dtype:
  """The dtype the op computes an input of ``dtype`` in: float64 as float32 (:func:`as_input`),
  any other as it is."""
  dtype = np.dtype(dtype)
  return np.dtype(np.float32) if dtype == np.float64 else dtype


def as_input(name: str, x):
  """A jax or numpy array as the op computes on it: numpy arrays become jax arrays (as
  ``jnp.asarray`` makes them), float64 (numpy input, or jax input with ``jax_enable_x64``)
  becomes float32, where the softmax statistics are kept anyway. Anything else is left for
  :func:`check_inputs` to refuse; lists and tuples are not arrays here (as in
  ``jax.typing.ArrayLike``)."""
  if isinstance(x, np.ndarray):
    x = jnp.asarray(x)
  if isinstance(x, jax.Array) and computed_dtype(x.dtype) != x.dtype:
    x = x.astype(computed_dtype(x.dtype))
  return x


def check_inputs(q, k, v, spec: STASpec, given_dtypes=None) -> None:
  """``given_dtypes``: the dtypes the caller passed, before :func:`as_input` (float64 input
  is computed in float32), for the error messages."""
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    checks.check_array(name, x)
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    check_axis_order(name, x, spec)
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape [batch, seq, kv_heads, head_dim], got "
                     f"k {k.shape}, v {v.shape}")
  for axis, name in ((0, "batch"), (2, "heads"), (3, "head_dim")):
    if q.shape[axis] < 1 or k.shape[axis] < 1:
      raise ValueError(f"q, k, v: {name} (axis {axis}) must be >= 1, got shapes q {q.shape}, "
                       f"k {k.shape}")
  if (q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]
      or q.shape[2] % k.shape[2]):
    raise ValueError(
        f"q, k and v must have the same shape [batch, seq, heads, head_dim], except that k and "
        f"v may have fewer heads dividing q's (grouped-query attention), got q {q.shape}, "
        f"k {k.shape}, v {v.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    given = given_dtypes or (q.dtype, k.dtype, v.dtype)
    names = [str(x.dtype) if g is None or g == x.dtype else f"{g} (computed as {x.dtype})"
             for x, g in zip((q, k, v), given)]
    raise TypeError(f"q, k and v must share a dtype, got {', '.join(names)}")
  if q.dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"q, k, v: dtype must be float32, bfloat16 or float16, got {q.dtype}")
  if q.shape[1] != spec.seq_len:
    order = ("text_max_len text slots, then the video tokens in tile order"
             if spec.text_position == "first" else
             "the video tokens in tile order, then text_max_len text slots")
    raise ValueError(
        f"q has seq {q.shape[1]} but the spec needs seq_len = padded_video_len "
        f"({spec.padded_video_len}) + text_max_len ({spec.text_max_len}) = {spec.seq_len} "
        f"({order}); put video tokens in tile order with jsta.tile_order first")
  spec.head_windows(q.shape[2])


def check_axis_order(name: str, x, spec: STASpec) -> None:
  """Raises ValueError with the axis-order hint when ``x`` looks like [batch, heads, seq,
  head_dim]: axis 2, not axis 1, has the sequence's length."""
  seqs = {spec.video_len + spec.text_max_len: "video_len + text_max_len (row-major tokens)",
          spec.seq_len: "seq_len"}
  if x.shape[1] not in seqs and x.shape[2] in seqs and x.shape[1] < x.shape[2]:
    raise ValueError(
        f"{name} has shape {x.shape}: its axis 2 has the sequence's length "
        f"({seqs[x.shape[2]]} = {x.shape[2]}), so it looks like [batch, heads, seq, head_dim]; "
        f"the op takes [batch, seq, heads, head_dim]: pass jnp.swapaxes({name}, 1, 2) (and "
        "swap the output back)")


def check_text_lengths(text_lengths, batch: int, spec: STASpec):
  """text_lengths -> int32 [batch] array (clamped to [0, text_max_len]); raises on a wrong type
  or shape, and on out-of-range values when they are concrete (not traced)."""
  if isinstance(text_lengths, (list, tuple)):
    text_lengths = np.asarray(text_lengths)
  if not isinstance(text_lengths, (jax.Array, np.ndarray)) or isinstance(text_lengths, bool):
    raise TypeError(f"text_lengths must be an int array [batch] or None, got "
                    f"{type(text_lengths).__name__}")
  if not jnp.issubdtype(text_lengths.dtype, jnp.integer):
    raise TypeError(f"text_lengths must have an integer dtype, got {text_lengths.dtype}")
  if text_lengths.shape != (batch,):
    raise ValueError(f"text_lengths must be [batch] = [{batch}], got shape "
                     f"{text_lengths.shape}")
  try:
    values = np.asarray(text_lengths)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    values = None                                   # traced: clamped below, as documented
  if values is not None:
    bad = values[(values < 0) | (values > spec.text_max_len)]
    if bad.size:
      raise ValueError(f"text_lengths must lie in [0, text_max_len={spec.text_max_len}], got "
                       f"{bad.tolist()}")
  return checks.clamp_lengths(text_lengths, spec.text_max_len)
