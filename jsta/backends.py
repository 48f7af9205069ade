"""The backend registry: the names ``implementation=`` takes and the objects that run them.

A backend is an object with the :class:`jsta.ops.Backend` protocol (a ``name`` and the methods
``default_blocks``, ``check``, ``forward``, ``backward``). The registry keeps a factory per name
and calls it on first use, so naming or listing a backend never imports its code (the kernels'
modules import Pallas GPU lowering).

Backends come from three places:

  register_backend(name, factory)   any code at run time (third-party backends, experiments);
                                    :mod:`jsta.ops` registers "xla" this way.
  entry points                      the group ``jsta.backends`` of any installed distribution:
                                    ``name = "module:attribute"``, the attribute a backend
                                    object or a function returning one. jsta's own
                                    pyproject.toml declares the kernels of pallas_kernels
                                    ("pallas_triton", "pallas_mosaic") there, so jsta never
                                    imports them by name.
  the checkout's pyproject.toml     a source checkout imported through PYTHONPATH has no
                                    installed metadata (or that of another copy): the
                                    ``jsta.backends`` table of the pyproject.toml beside the
                                    jsta package is read as well, and wins over installed
                                    entry points of the same name.

Entry points are read on the first lookup (:func:`backend_names`, :func:`get_backend`,
:func:`resolve_backend`) and never override a name given to :func:`register_backend`.
"""

from __future__ import annotations

import importlib.metadata
import pathlib
import tomllib
from typing import Any, Callable

import jax

from jsta import checks

ENTRY_POINT_GROUP = "jsta.backends"

# "auto" tries these in order from the first that suits the device (resolve_backend): the Hopper
# kernels, the portable kernels, then XLA, which runs any valid input on any device.
AUTO_ORDER = ("pallas_mosaic", "pallas_triton", "xla")

# The pyproject.toml of a source checkout: the directory that holds the jsta package.
CHECKOUT_PYPROJECT = pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml"

_BACKENDS: dict[str, Any] = {}                      # made backends, by name
_FACTORIES: dict[str, Callable[[], Any]] = {}       # every registered name
_plugins_read = False


def is_backend_object(x) -> bool:
  """Whether ``x`` provides the :class:`jsta.ops.Backend` protocol (a ``name`` str and the four
  methods): what ``implementation=`` takes besides names."""
  # A backend class has the name and the methods too, unbound: an instance is needed.
  return (not isinstance(x, (str, type)) and isinstance(getattr(x, "name", None), str)
          and all(callable(getattr(x, m, None))
                  for m in ("default_blocks", "check", "forward", "backward")))


def register_backend(name: str, factory: Callable[[], Any]) -> None:
  """Registers ``factory`` (no arguments, returns a backend object) under ``name``; it is called
  on first use, so registering never imports GPU code. Replaces an earlier registration of the
  name, plugins' included."""
  checks.check_backend_name(name)
  if name == "auto" or not name.strip():
    # "auto" is the op's choice among the backends, never a backend of its own.
    raise ValueError(f"name must be a backend name other than 'auto' and not empty, got "
                     f"{name!r}")
  if not callable(factory):
    raise TypeError(f"factory must be a callable returning a backend, got {factory!r}")
  _BACKENDS.pop(name, None)
  _FACTORIES[name] = factory


def checkout_entry_points(pyproject: pathlib.Path | None = None) -> list:
  """The ``jsta.backends`` entry points a source checkout's pyproject.toml declares
  (default :data:`CHECKOUT_PYPROJECT`; [] when there is none, it does not parse, or it is not
  jsta's)."""
  pyproject = CHECKOUT_PYPROJECT if pyproject is None else pyproject
  try:
    project = tomllib.loads(pyproject.read_text()).get("project", {})
  except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
    return []
  if project.get("name") != "jsta":
    return []
  table = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
  return [importlib.metadata.EntryPoint(name=n, value=v, group=ENTRY_POINT_GROUP)
          for n, v in table.items() if isinstance(v, str)]


def _plugin_factory(entry_point) -> Callable[[], Any]:
  def make():
    obj = entry_point.load()
    # A backend object, or a function making one; anything else reaches get_backend's check.
    return obj() if callable(obj) and not is_backend_object(obj) else obj
  return make


def _read_plugins() -> None:
  global _plugins_read
  if _plugins_read:
    return
  _plugins_read = True
  found = {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
  found.update({ep.name: ep for ep in checkout_entry_points()})
  for name, ep in sorted(found.items()):
    try:
      checks.check_backend_name(name)
    except (TypeError, ValueError):
      continue                    # an entry point jsta could never look up: not a backend name
    _FACTORIES.setdefault(name, _plugin_factory(ep))


def backend_names() -> list[str]:
  """The names ``backend=`` accepts: "auto" and every registered backend, sorted."""
  _read_plugins()
  return ["auto", *sorted(_FACTORIES)]


def check_backend(backend, arg: str = "backend") -> None:
  """Raises (TypeError, ValueError, naming ``arg``) unless ``backend`` is "auto", a registered
  name or a backend object (:func:`is_backend_object`); does not create the backend (no GPU
  code is imported). :func:`jsta.ops.check_implementation` checks everything
  ``implementation=`` takes."""
  if is_backend_object(backend):
    return
  checks.check_backend_name(backend)
  if backend not in backend_names():
    raise ValueError(f"{arg} must be one of {backend_names()} (or a sequence of them, or a "
                     f"backend object), got {backend!r}")


def get_backend(name: str):
  """The backend object registered as ``name``, made on first use."""
  checks.check_backend_name(name)
  if name not in _BACKENDS:
    check_backend(name)
    if name == "auto":
      raise ValueError("get_backend needs a backend name; resolve 'auto' with resolve_backend")
    made = _FACTORIES[name]()
    if not is_backend_object(made):
      raise TypeError(f"the factory registered as backend {name!r} returned "
                      f"{type(made).__name__}, not a backend object (name, default_blocks, "
                      f"check, forward, backward)")
    _BACKENDS[name] = made
  return _BACKENDS[name]


def gpu_compute_capability() -> tuple[int, int] | None:
  """(major, minor) compute capability of JAX's default device when it is a GPU ((0, 0) if
  the device does not say), None otherwise: what backend choices and checks go by."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:
    return None
  if dev.platform != "gpu":
    return None
  cc = getattr(dev, "compute_capability", None)
  if not cc:
    return (0, 0)
  major, minor = (int(x) for x in str(cc).split("."))
  return major, minor


def resolve_backend(backend: str) -> str:
  """'auto' -> 'pallas_mosaic' on compute capability 9.x, 'pallas_triton' on other NVIDIA
  GPUs, 'xla' elsewhere (each only when registered): the first backend "auto" tries
  (:func:`auto_chain` goes on down :data:`AUTO_ORDER`). Other names are checked, made and
  returned."""
  checks.check_backend_name(backend)
  check_backend(backend)
  if backend != "auto":
    get_backend(backend)
    return backend
  cc = gpu_compute_capability()
  if cc is None:
    return "xla"
  if cc[0] == 9 and "pallas_mosaic" in _FACTORIES:
    return "pallas_mosaic"
  if "pallas_triton" in _FACTORIES:
    return "pallas_triton"
  return "xla"


def auto_chain() -> list[str]:
  """The names "auto" tries, in order: from :func:`resolve_backend`'s choice for this device
  down :data:`AUTO_ORDER` (registered backends only), always ending with "xla"."""
  first = resolve_backend("auto")
  order = AUTO_ORDER[AUTO_ORDER.index(first):] if first in AUTO_ORDER else (first, "xla")
  registered = set(backend_names())
  return [n for n in order if n in registered]
