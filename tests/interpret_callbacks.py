"""A faster host side for Pallas's GPU interpret mode in the tests (JAX 0.11.2).

In GPU interpret mode every simulated operation of a Hopper kernel (a barrier, a shared-memory
read or write, a TMA copy, a wgmma) is a host callback (``io_callback``). JAX's implementation
of the callback first copies each of its arguments, which arrive as numpy arrays, into a CPU
``jax.Array`` (one ``device_put`` per argument), and the interpreter turns most of them back
into Python ints and numpy arrays: it computes on numpy (its wgmma is ``np.matmul``). In a
27 s interpret-mode case of tests/test_attention.py (2026-12-07, 2 cores), 19.5 s went to those
copies: about 9,700 callbacks and 107,000 ``device_put`` calls.

:func:`install` hands the callbacks their numpy arguments as they are, and lets the
interpreter's one scalar conversion that insists on a ``jax.Array`` (``_to_int`` of the mesh
locations) take numpy scalars too: the same case then takes 9 s. Nothing the kernels compute
changes (tests/test_interpret_callbacks.py checks a kernel's outputs bit for bit with and
without). It touches two private names of JAX, so conftest.py installs it only for the JAX
version it was written against (:data:`JAX_VERSION`), and not where ``JSTA_PLAIN_INTERPRET=1``
(to see the interpreter exactly as JAX ships it). Every ``io_callback`` of the test process
then gets numpy arguments; nothing in jsta, its kernels or its models makes one.
"""

from __future__ import annotations

import contextlib
import logging

import jax
import numpy as np

JAX_VERSION = "0.11.2"
_logger = logging.getLogger(__name__)
_originals: dict[str, object] = {}


def _modules():
  from jax._src import callback
  from jax._src.pallas.mosaic_gpu.interpret import shared_memory
  return callback, shared_memory


def _io_callback_impl(*args, result_avals, callback, sharding, ordered):
  """``jax._src.callback.io_callback_impl`` without the copy of each argument to a CPU
  ``jax.Array`` (still run with the CPU as the default device, as JAX's)."""
  del result_avals, sharding, ordered
  cpu_device, *_ = jax.local_devices(backend="cpu")
  with jax.default_device(cpu_device):
    try:
      return jax.tree_util.tree_map(np.asarray, callback(*(np.asarray(a) for a in args)))
    except BaseException:
      _logger.exception("jax.io_callback failed")
      raise


def _to_int(x):
  """The interpreter's ``_to_int``, for numpy scalars too."""
  if isinstance(x, (np.ndarray, np.generic)):
    return x.item()
  return _originals["_to_int"](x)


def installable() -> bool:
  """Whether this JAX is the one the replacement was written against and has both names."""
  if jax.__version__ != JAX_VERSION:
    return False
  try:
    callback, shared_memory = _modules()
  except ImportError:
    return False
  return hasattr(callback, "io_callback_impl") and hasattr(shared_memory, "_to_int")


def installed() -> bool:
  return bool(_originals)


def install() -> bool:
  """Puts the replacements in place (idempotent); False (and nothing changed) where
  :func:`installable` is False."""
  if installed():
    return True
  if not installable():
    return False
  callback, shared_memory = _modules()
  _originals["io_callback_impl"] = callback.io_callback_impl
  _originals["_to_int"] = shared_memory._to_int
  callback.io_callback_impl = _io_callback_impl
  shared_memory._to_int = _to_int
  return True


def uninstall() -> None:
  """Puts JAX's own functions back (nothing if they are in place)."""
  if not installed():
    return
  callback, shared_memory = _modules()
  callback.io_callback_impl = _originals.pop("io_callback_impl")
  shared_memory._to_int = _originals.pop("_to_int")


@contextlib.contextmanager
def plain_interpreter():
  """JAX's own callback path for the duration (programs compiled inside look it up at each
  call, so the same program can run either way)."""
  was = installed()
  uninstall()
  try:
    yield
  finally:
    if was:
      install()
