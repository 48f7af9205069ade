"""The public STA op: ``sliding_tile_attention`` with a custom VJP and backend selection."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from jsta import checks, xla_backend
from jsta.schedule import BlockSchedule, block_schedule
from jsta.spec import STASpec

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


class Backend(Protocol):
  """What a backend provides. Layouts as in :mod:`jsta.xla_backend`."""

  name: str

  def default_blocks(self, spec: STASpec, head_dim: int, dtype) -> tuple[int, int]: ...

  def check(self, spec: STASpec, head_dim: int, dtype, block_q: int, block_kv: int) -> None: ...

  def forward(self, q, k, v, sched: BlockSchedule, scale: float): ...

  def backward(self, q, k, v, o, lse, do, sched: BlockSchedule, scale: float): ...


def _largest_divisor_block(size: int, candidates) -> int | None:
  for b in candidates:
    if size % b == 0:
      return b
  return None


@dataclasses.dataclass(frozen=True)
class XlaBackend:
  """Block-sparse attention in plain XLA (any device; the CPU default).

  ``memory_bytes`` bounds the intermediates of one step of :mod:`jsta.xla_backend` (query
  blocks are processed in chunks and key blocks in steps that fit it), so peak memory does not
  grow with the sequence beyond the inputs, outputs and gradients.
  """

  name: str = "xla"
  memory_bytes: int = xla_backend.DEFAULT_MEMORY_BYTES

  def default_blocks(self, spec, head_dim, dtype):
    # Blocks inside tiles (all pairs whole): the tile lengths' gcd when small, else the
    # largest power-of-two block dividing it.
    a = spec.block_align
    b = a if a <= 128 else (_largest_divisor_block(a, (128, 64, 32, 16, 8)) or a)
    return b, b

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    pass

  def forward(self, q, k, v, sched, scale):
    return xla_backend.forward(q, k, v, sched, scale, self.memory_bytes)

  def backward(self, q, k, v, o, lse, do, sched, scale):
    return xla_backend.backward(q, k, v, o, lse, do, sched, scale, self.memory_bytes)


_BACKENDS: dict[str, Backend] = {"xla": XlaBackend()}
_LAZY_BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, factory: Callable[[], Backend]) -> None:
  """Registers a backend made on first use (so importing jsta never imports GPU code)."""
  checks.check_backend_name(name)
  if not callable(factory):
    raise TypeError(f"factory must be a callable returning a backend, got {factory!r}")
  _BACKENDS.pop(name, None)
  _LAZY_BACKENDS[name] = factory


def backend_names() -> list[str]:
  """The names ``backend=`` accepts: "auto" and every registered backend, sorted."""
  return ["auto", *sorted(set(_BACKENDS) | set(_LAZY_BACKENDS))]


def check_backend(backend) -> None:
  """Raises (TypeError, ValueError) unless ``backend`` is "auto" or a registered name; does not
  create the backend (no GPU code is imported)."""
  checks.check_backend_name(backend)
  if backend not in backend_names():
    raise ValueError(f"backend must be one of {backend_names()}, got {backend!r}")


def get_backend(name: str) -> Backend:
  if name not in _BACKENDS:
    check_backend(name)
    if name == "auto":
      raise ValueError("get_backend needs a backend name; resolve 'auto' with resolve_backend")
    _BACKENDS[name] = _LAZY_BACKENDS[name]()
  return _BACKENDS[name]


def _gpu_compute_capability() -> tuple[int, int] | None:
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
  GPUs, 'xla' elsewhere. Other names are checked and returned."""
  check_backend(backend)
  if backend != "auto":
    get_backend(backend)
    return backend
  cc = _gpu_compute_capability()
  if cc is None:
    return "xla"
  if cc[0] == 9 and "pallas_mosaic" in _LAZY_BACKENDS:
    return "pallas_mosaic"
  if "pallas_triton" in _LAZY_BACKENDS:
    return "pallas_triton"
  return "xla"


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Everything static about one STA call; hashable, so it is a nondiff argument of the VJP."""

  spec: STASpec
  num_heads: int
  head_dim: int
  backend: str
  block_q: int
  block_kv: int
  scale: float

  @property
  def schedule(self) -> BlockSchedule:
    return block_schedule(self.spec, self.num_heads, self.block_q, self.block_kv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sta(plan: AttentionPlan, q, k, v):
  o, _ = get_backend(plan.backend).forward(q, k, v, plan.schedule, plan.scale)
  return o


def _sta_fwd(plan, q, k, v):
  o, lse = get_backend(plan.backend).forward(q, k, v, plan.schedule, plan.scale)
  return o, (q, k, v, o, lse)


def _sta_bwd(plan, res, do):
  q, k, v, o, lse = res
  return get_backend(plan.backend).backward(q, k, v, o, lse, do, plan.schedule, plan.scale)


_sta.defvjp(_sta_fwd, _sta_bwd)


def _check_inputs(q, k, v, spec: STASpec) -> None:
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  for name, x in (("q", q), ("k", k), ("v", v)):
    checks.check_array(name, x)
    if x.ndim != 4:
      raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
  if not (q.shape == k.shape == v.shape):
    raise ValueError(
        f"q, k and v must have the same shape [batch, seq, heads, head_dim], got "
        f"q {q.shape}, k {k.shape}, v {v.shape}")
  for axis, name in ((0, "batch"), (2, "heads"), (3, "head_dim")):
    if q.shape[axis] < 1:
      raise ValueError(f"q, k, v: {name} (axis {axis}) must be >= 1, got shape {q.shape}")
  if not (q.dtype == k.dtype == v.dtype):
    raise TypeError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  if q.dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"q, k, v: dtype must be float32, bfloat16 or float16, got {q.dtype}")
  if q.shape[1] != spec.seq_len:
    raise ValueError(
        f"q has seq {q.shape[1]} but the spec needs seq_len = padded_video_len "
        f"({spec.padded_video_len}) + text_max_len ({spec.text_max_len}) = {spec.seq_len}; "
        "put video tokens in tile order with jsta.tile_order first")
  spec.head_windows(q.shape[2])


def make_plan(spec: STASpec, num_heads: int, head_dim: int, dtype, *, scale=None,
              backend: str = "auto", block_q: int | None = None,
              block_kv: int | None = None) -> AttentionPlan:
  """Resolves backend, block sizes and scale, and validates them against the spec."""
  scale = checks.check_scale(scale)
  for arg, value in (("block_q", block_q), ("block_kv", block_kv)):
    if value is not None:
      checks.check_int(arg, value, minimum=1)
  name = resolve_backend(backend)
  if backend == "auto" and name == "pallas_mosaic":
    # The Hopper kernels cover bf16/fp16, head_dim 64/128 and tiles of a multiple of 64 tokens;
    # "auto" sends anything else (float32, say) to the portable kernels instead of failing.
    mb = get_backend(name)
    bq, bk = mb.default_blocks(spec, head_dim, dtype)
    try:
      mb.check(spec, head_dim, dtype, block_q or bq, block_kv or bk)
    except ValueError:
      name = "pallas_triton"
  be = get_backend(name)
  dq, dkv = be.default_blocks(spec, head_dim, dtype)
  block_q = dq if block_q is None else block_q
  block_kv = dkv if block_kv is None else block_kv
  be.check(spec, head_dim, dtype, block_q, block_kv)
  scale = float(head_dim ** -0.5 if scale is None else scale)
  plan = AttentionPlan(spec, num_heads, head_dim, name, block_q, block_kv, scale)
  plan.schedule  # builds (and validates) the schedule now, not inside tracing
  return plan


def sliding_tile_attention(q, k, v, spec: STASpec, *, scale: float | None = None,
                           backend: str = "auto", block_q: int | None = None,
                           block_kv: int | None = None) -> jnp.ndarray:
  """Sliding tile attention.

  Args:
    q, k, v: [batch, seq, heads, head_dim], seq = spec.seq_len: the video tokens in tile order
      (see :func:`jsta.tile_order`) followed by ``spec.text_max_len`` text slots.
      float32, bfloat16 or float16, all the same dtype.
    spec: the :class:`jsta.STASpec` layout (one window, or one per head).
    scale: softmax scale; default ``head_dim ** -0.5``.
    backend: "auto", "xla", "pallas_triton" or "pallas_mosaic".
    block_q, block_kv: kernel block sizes (must divide the tile's token count); default per
      backend.
  Returns:
    [batch, seq, heads, head_dim] in the input dtype. Outputs of padded queries (padded latent
    positions and padded text slots) are zeros.
  """
  _check_inputs(q, k, v, spec)
  b, s, h, d = q.shape
  plan = make_plan(spec, h, d, q.dtype, scale=scale, backend=backend, block_q=block_q,
                   block_kv=block_kv)
  sched = plan.schedule
  extra = sched.seq_len - s
  if extra:
    pad = ((0, 0), (0, extra), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  if sched.has_invalid_queries:
    # Padded positions (latent padding, padded text slots) hold whatever the caller left there.
    # The mask never attends them, but 0 * NaN in P @ V would still reach every row: select
    # them to zero (a select, not a multiply, so NaN and inf are dropped too). The select's
    # VJP also makes their gradients exact zeros. XLA fuses it with the pad above.
    valid = jnp.asarray(sched.query_valid)[None, :, None, None]
    q, k, v = (jnp.where(valid, x, jnp.zeros((), x.dtype)) for x in (q, k, v))
  o = _sta(plan, q, k, v)
  if sched.has_invalid_queries:
    o = jnp.where(valid, o, jnp.zeros((), o.dtype))
  return o[:, :s] if extra else o
