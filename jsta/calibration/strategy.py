"""Per-(layer, head) STA window strategies, stored as a versioned JSON file.

A strategy is what training-free calibration (:mod:`jsta.calibration.search`) produces: for every
attention layer and head, the window (in tiles) to use. File format, version 1::

    {
      "version": 1,
      "spec": {"latent_shape": [T, H, W], "tile_shape": [t, h, w],
               "text_len": 0, "text_max_len": 0, "text_position": "last",
               "causal_axes": [0]},                                  # only when causal
      "num_layers": L,
      "num_heads": N,
      "windows": {"0": {"0": [3, 3, 3], "1": [5, 5, 5], ...}, ...},   # or [[[3,3,3], ...], ...]
      "metrics": {...}                                                  # optional, free-form JSON
    }

``windows`` maps layer -> head -> window; layers and heads may be given as JSON objects keyed
by their index ("0", "1", ...: decimal, without sign, spaces or leading zeros) or as lists.
Entries other than those above, and a key repeated within one JSON object, are errors. The
strategy is tied to the latent and tile shapes (windows are in tiles, so a different tiling
changes what a window means); the text lengths and the text
position ("last": the text slots after the video tokens, "first": before them; "last" when
absent) are recorded for information only, because windows only concern video->video
attention and the number of text tokens varies with the prompt. The causal axes (none when
absent) are part of the layout: a window on a causal axis counts the tiles up to the query's,
so it may be even, and it means something else on a spec without that causal axis.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import uuid
from typing import Any, Mapping, Sequence

import numpy as np

from jsta import checks
from jsta.spec import STASpec, Window

VERSION = 1
_SPEC_KEYS = ("latent_shape", "tile_shape", "text_len", "text_max_len", "text_position",
              "causal_axes")
_TOP_KEYS = ("version", "spec", "num_layers", "num_heads", "windows", "metrics")
# int() would also take "01", " 1", "-0", "1_0" and non-ASCII digits, so that two keys of one
# object could name the same index and one silently overwrite the other.
_INDEX_KEY = re.compile(r"0|[1-9][0-9]*")


def _int_tuple(value, name: str) -> tuple[int, ...]:
  if isinstance(value, np.ndarray):
    value = value.tolist()
  if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
    raise ValueError(f"{name} must be a list of ints, got {value!r}")
  out = []
  for v in value:
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be a list of ints, got {value!r}")
    out.append(int(v))
  return tuple(out)


def _check_window(window: Window, rank: int, name: str, causal_axes: tuple[int, ...]) -> None:
  if len(window) != rank:
    raise ValueError(
        f"{name} = {list(window)} has rank {len(window)} but the latent shape has rank {rank}")
  for d, w in enumerate(window):
    if w <= 0 or (w % 2 == 0 and d not in causal_axes):
      causal = f" (any positive int on the causal axes {list(causal_axes)})" if causal_axes else ""
      raise ValueError(
          f"{name} = {list(window)}: window sizes must be positive odd ints (in tiles){causal}, "
          f"got {w} on axis {d}")


def _indexed(obj, count_name: str, name: str) -> list:
  """A JSON list, or a JSON object keyed "0".."n-1" (any order), as a list."""
  if isinstance(obj, np.ndarray):
    obj = obj.tolist()
  if isinstance(obj, Mapping):
    keyed = {}
    for k, v in obj.items():
      if isinstance(k, str) and _INDEX_KEY.fullmatch(k):
        if len(k) > 18:
          raise ValueError(f"{name} has index {k[:20]}... beyond any {count_name} count")
        i = int(k)
      elif isinstance(k, (int, np.integer)) and not isinstance(k, (bool, np.bool_)) and k >= 0:
        i = int(k)
      else:
        raise ValueError(f"{name} keys must be indices written as decimal ints without sign, "
                         f"spaces or leading zeros (\"0\", \"1\", ...), got {k!r}")
      if i in keyed:
        raise ValueError(f"{name} has index {i} twice")
      keyed[i] = v
    expected = set(range(len(keyed)))
    if set(keyed) != expected:
      missing = sorted(expected - set(keyed))
      extra = sorted(set(keyed) - expected)
      raise ValueError(
          f"{name} must have {count_name} 0..{len(keyed) - 1} exactly; "
          f"missing {missing}, unexpected {extra}")
    return [keyed[i] for i in range(len(keyed))]
  if isinstance(obj, (list, tuple)):
    return list(obj)
  raise ValueError(f"{name} must be a list or an object keyed by index, got {type(obj).__name__}")


class _RepeatedKey(ValueError):
  pass


def _unique_keys(pairs) -> dict:
  # json keeps the last of repeated keys; in a strategy file that hides an edit (two windows for
  # one head), so a repeated key is an error.
  out = {}
  for k, v in pairs:
    if k in out:
      raise _RepeatedKey(f"the key {k!r} appears twice in one JSON object")
    out[k] = v
  return out


def _normalize_metrics(metrics):
  # JSON-normalized (tuples -> lists, int keys -> str), so that save/load round trips compare equal.
  if metrics is None:
    return None
  try:
    return json.loads(json.dumps(metrics, allow_nan=False))
  except (TypeError, ValueError) as e:
    raise ValueError(f"metrics must be JSON-serializable (finite numbers only): {e}") from None
  except RecursionError:
    raise ValueError("metrics are nested too deeply to be stored as JSON") from None


@dataclasses.dataclass(frozen=True)
class WindowStrategy:
  """Per-(layer, head) windows for one latent/tile layout.

  Attributes:
    latent_shape, tile_shape: the layout the windows were calibrated for.
    text_len, text_max_len: text lengths at calibration (informational).
    windows: [num_layers][num_heads] windows in tiles, each an odd tuple of the latent rank.
    metrics: optional JSON-serializable calibration metrics (not used for equality's hash).
    text_position: where the text slots were at calibration, "last" or "first"
      (informational, as :class:`jsta.STASpec`'s).
    causal_axes: the causal axes of the calibration layout (as :class:`jsta.STASpec`'s); a
      spec the strategy is used with must have the same.
  """

  latent_shape: tuple[int, ...]
  tile_shape: tuple[int, ...]
  windows: tuple[tuple[Window, ...], ...]
  text_len: int = 0
  text_max_len: int = 0
  metrics: Any = dataclasses.field(default=None, hash=False)
  text_position: str = "last"
  causal_axes: tuple[int, ...] = ()

  def __post_init__(self):
    latent = _int_tuple(self.latent_shape, "latent_shape")
    tile = _int_tuple(self.tile_shape, "tile_shape")
    # The same checks as STASpec (rank, positivity, text lengths and position, causal axes),
    # with its messages.
    spec = STASpec(latent, tile, (1,) * len(latent), self.text_len, self.text_max_len,
                   self.text_position, self.causal_axes)
    causal = spec.causal_axes
    layers = _indexed(self.windows, "layers", "windows")
    if not layers:
      raise ValueError("windows must hold at least one layer")
    out = []
    num_heads = None
    for li, layer in enumerate(layers):
      heads = _indexed(layer, "heads", f"windows[{li}]")
      if not heads:
        raise ValueError(f"windows[{li}] must hold at least one head")
      if num_heads is None:
        num_heads = len(heads)
      elif len(heads) != num_heads:
        raise ValueError(
            f"windows[{li}] has {len(heads)} heads but windows[0] has {num_heads}; every "
            "layer must have the same number of heads")
      row = []
      for hi, w in enumerate(heads):
        w = _int_tuple(w, f"windows[{li}][{hi}]")
        _check_window(w, len(latent), f"windows[{li}][{hi}]", causal)
        row.append(w)
      out.append(tuple(row))
    object.__setattr__(self, "latent_shape", latent)
    object.__setattr__(self, "tile_shape", tile)
    object.__setattr__(self, "windows", tuple(out))
    object.__setattr__(self, "causal_axes", causal)
    # Python ints: numpy ints would make save() fail in json.
    object.__setattr__(self, "text_len", spec.text_len)
    object.__setattr__(self, "text_max_len", spec.text_max_len)
    object.__setattr__(self, "metrics", _normalize_metrics(self.metrics))

  # ---- shape --------------------------------------------------------------------------------
  @property
  def num_layers(self) -> int:
    return len(self.windows)

  @property
  def num_heads(self) -> int:
    return len(self.windows[0])

  def base_spec(self, window: Window | None = None) -> STASpec:
    """The calibration layout as an :class:`STASpec` (default window: whole volume)."""
    from jsta.spec import full_window
    window = full_window(self.latent_shape, self.tile_shape) if window is None else window
    return STASpec(self.latent_shape, self.tile_shape, window, self.text_len, self.text_max_len,
                   self.text_position, self.causal_axes)

  # ---- checks -------------------------------------------------------------------------------
  def _check_spec(self, spec: STASpec, name: str = "spec") -> None:
    if not isinstance(spec, STASpec):
      raise TypeError(f"{name} must be a jsta.STASpec, got {type(spec).__name__}")
    if spec.latent_shape != self.latent_shape:
      raise ValueError(
          f"strategy was calibrated for latent_shape {self.latent_shape} but spec has "
          f"{spec.latent_shape}; recalibrate for this resolution/length")
    if spec.tile_shape != self.tile_shape:
      raise ValueError(
          f"strategy was calibrated for tile_shape {self.tile_shape} but spec has "
          f"{spec.tile_shape}; windows are in tiles, so they do not transfer between tilings")
    if spec.causal_axes != self.causal_axes:
      raise ValueError(
          f"strategy was calibrated for causal_axes {self.causal_axes} but spec has "
          f"{spec.causal_axes}; a window means other tiles on a causal axis, so recalibrate "
          "with this spec")

  def validate(self, num_layers: int, num_heads: int, spec: STASpec) -> None:
    """Raises ValueError unless the strategy fits a model with these layers, heads and layout
    (TypeError for arguments of the wrong type)."""
    num_layers = checks.check_int("num_layers", num_layers)
    num_heads = checks.check_int("num_heads", num_heads)
    if num_layers != self.num_layers:
      raise ValueError(
          f"strategy has {self.num_layers} layers but the model has num_layers={num_layers}")
    if num_heads != self.num_heads:
      raise ValueError(
          f"strategy has {self.num_heads} heads per layer but the model has "
          f"num_heads={num_heads}")
    self._check_spec(spec)

  def spec_for_layer(self, base_spec: STASpec, layer: int) -> STASpec:
    """``base_spec`` with this layer's per-head windows (heads with equal windows share a schedule).

    Args:
      base_spec: the model's layout (its window is replaced); must match latent and tile shapes.
      layer: 0 <= layer < num_layers.
    """
    self._check_spec(base_spec, "base_spec")
    layer = checks.check_int("layer", layer)
    if not 0 <= layer < self.num_layers:
      raise ValueError(f"layer must be an int in [0, {self.num_layers}), got {layer!r}")
    return base_spec.with_window(self.windows[layer])

  def sparsity(self) -> float:
    """Mean video tile-pair sparsity over layers and heads."""
    spec = self.base_spec()
    ws = [w for layer in self.windows for w in layer]
    return sum(spec.sparsity(w) for w in ws) / len(ws)

  # ---- JSON ---------------------------------------------------------------------------------
  def to_dict(self) -> dict:
    d = {
        "version": VERSION,
        "spec": {"latent_shape": list(self.latent_shape), "tile_shape": list(self.tile_shape),
                 "text_len": self.text_len, "text_max_len": self.text_max_len,
                 "text_position": self.text_position},
        "num_layers": self.num_layers,
        "num_heads": self.num_heads,
        "windows": {str(li): {str(hi): list(w) for hi, w in enumerate(layer)}
                    for li, layer in enumerate(self.windows)},
    }
    if self.causal_axes:
      # Only when causal: files of non-causal strategies stay as they were.
      d["spec"]["causal_axes"] = list(self.causal_axes)
    if self.metrics is not None:
      d["metrics"] = self.metrics
    return d

  @classmethod
  def from_dict(cls, d: Mapping) -> "WindowStrategy":
    if not isinstance(d, Mapping):
      raise ValueError(f"a strategy must be a JSON object, got {type(d).__name__}")
    version = d.get("version")
    if isinstance(version, bool) or version != VERSION:
      raise ValueError(
          f"unknown strategy version {version!r}; this jsta reads version {VERSION}")
    # A misspelt or misplaced entry would otherwise load as its default.
    unknown = [k for k in d if k not in _TOP_KEYS]
    if unknown:
      where = ("; the layout's entries belong in 'spec'"
               if any(k in _SPEC_KEYS for k in unknown) else "")
      raise ValueError(f"strategy has unknown entries {unknown}; allowed: "
                       f"{list(_TOP_KEYS)}{where}")
    for key in ("spec", "num_layers", "num_heads", "windows"):
      if key not in d:
        raise ValueError(f"strategy is missing the {key!r} entry")
    spec = d["spec"]
    if not isinstance(spec, Mapping):
      raise ValueError(f"strategy 'spec' must be an object with keys {_SPEC_KEYS}")
    unknown = [k for k in spec if k not in _SPEC_KEYS]
    if unknown:
      raise ValueError(f"strategy 'spec' has unknown entries {unknown}; allowed: "
                       f"{list(_SPEC_KEYS)}")
    for key in ("latent_shape", "tile_shape"):
      if key not in spec:
        raise ValueError(f"strategy 'spec' is missing {key!r}")
    s = cls(latent_shape=spec["latent_shape"], tile_shape=spec["tile_shape"],
            windows=d["windows"], text_len=spec.get("text_len", 0),
            text_max_len=spec.get("text_max_len", 0), metrics=d.get("metrics"),
            text_position=spec.get("text_position", "last"),
            causal_axes=_int_tuple(spec.get("causal_axes", ()), "causal_axes"))
    # The counts are redundant with "windows"; a disagreement means a hand-edited or truncated file.
    for key in ("num_layers", "num_heads"):
      if isinstance(d[key], bool) or not isinstance(d[key], int):
        raise ValueError(f"strategy {key!r} must be an int, got {d[key]!r}")
    if d["num_layers"] != s.num_layers:
      raise ValueError(
          f"strategy says num_layers={d['num_layers']} but 'windows' holds {s.num_layers} layers")
    if d["num_heads"] != s.num_heads:
      raise ValueError(
          f"strategy says num_heads={d['num_heads']} but 'windows' holds {s.num_heads} heads "
          "per layer")
    return s

  def save(self, path: str | os.PathLike) -> None:
    """Writes the strategy file: a temporary file beside ``path``, then renamed onto it, so that
    ``path`` is never left half-written (it keeps its old content if writing fails)."""
    path = os.fspath(path)
    text = json.dumps(self.to_dict(), indent=1) + "\n"
    tmp = os.path.join(os.path.dirname(path),
                       f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.tmp")
    # os.open with mode 0o666 (not tempfile's 0o600): the file gets the permissions of the umask,
    # as open(path, "w") would give it.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
      os.replace(tmp, path)
    except BaseException:
      try:
        os.unlink(tmp)
      except OSError:
        pass
      raise

  @classmethod
  def load(cls, path: str | os.PathLike) -> "WindowStrategy":
    """Reads a strategy file written by :meth:`save`.

    Raises OSError (naming the path) when it cannot be opened, and ValueError naming the path
    when it is not a valid strategy JSON file: binary, not UTF-8, truncated, malformed or too
    deeply nested JSON, or JSON that is not a strategy (see :meth:`from_dict`), values of the
    wrong type included.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
      raw = f.read()
    try:
      d = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as e:
      raise ValueError(f"{path}: not a valid strategy JSON file (not UTF-8 text: {e.reason} at "
                       f"byte {e.start}; a binary file?)") from None
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: not a valid strategy JSON file (malformed or truncated JSON: "
                       f"{e})") from None
    except RecursionError:
      raise ValueError(f"{path}: not a valid strategy JSON file (its JSON is nested too "
                       "deeply to be read)") from None
    except _RepeatedKey as e:
      raise ValueError(f"{path}: not a valid strategy JSON file: {e}") from None
    except ValueError as e:
      # Not a JSONDecodeError: e.g. an integer of more digits than int() converts.
      raise ValueError(f"{path}: not a valid strategy JSON file (a number in it is too long "
                       f"to read: {e})") from None
    try:
      return cls.from_dict(d)
    except (TypeError, ValueError) as e:
      # A value of the wrong type in the file (say "text_len": "3") is a wrong file content.
      raise ValueError(f"{path}: not a valid strategy JSON file: {e}") from None
    except RecursionError:
      raise ValueError(f"{path}: not a valid strategy JSON file (an entry is nested too "
                       "deeply)") from None

  @classmethod
  def uniform(cls, spec: STASpec, num_layers: int, num_heads: int,
              window: Window | None = None) -> "WindowStrategy":
    """Every layer and head with one window (default ``spec.window``; must not be per-head)."""
    if not isinstance(spec, STASpec):
      raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
    num_layers = checks.check_int("num_layers", num_layers, minimum=1)
    num_heads = checks.check_int("num_heads", num_heads, minimum=1)
    if window is None:
      if spec.is_per_head:
        raise ValueError("uniform: pass a single window, not per-head windows")
      window = spec.window
    elif spec.with_window(window).is_per_head:
      raise ValueError("uniform: pass a single window, not per-head windows")
    window = spec.check_window(window)
    return cls(spec.latent_shape, spec.tile_shape, ((window,) * num_heads,) * num_layers,
               spec.text_len, spec.text_max_len, text_position=spec.text_position,
               causal_axes=spec.causal_axes)
