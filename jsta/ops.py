"""The public STA op: ``sliding_tile_attention`` with a custom VJP and backend selection."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from jsta import backends, checks, partition, token_order, xla_backend
from jsta.inputs import SUPPORTED_DTYPES, check_axis_order, check_text_lengths, checked_qkv
# The registry's names, importable from here as before it had its own module.
from jsta.backends import (AUTO_ORDER, backend_names, check_backend, get_backend,
                           gpu_compute_capability, is_backend_object, register_backend,
                           resolve_backend)
from jsta.schedule import BlockSchedule, block_schedule
from jsta.spec import STASpec

_LOG = logging.getLogger("jsta")


class Backend(Protocol):
  """What a backend provides. Layouts as in :mod:`jsta.xla_backend`."""

  name: str

  def default_blocks(self, spec: STASpec, head_dim: int, dtype) -> tuple[int, int]: ...

  def check(self, spec: STASpec, head_dim: int, dtype, block_q: int, block_kv: int) -> None: ...

  def forward(self, q, k, v, sched: BlockSchedule, scale: float, key_valid=None,
              with_o_low: bool = False): ...

  def backward(self, q, k, v, o, lse, do, sched: BlockSchedule, scale: float, key_valid=None,
               dlse=None): ...

  # Optional: forward_quantized(q, k, v, sched, scale, key_valid=None, *, precision) -> (o, lse),
  # the forward with 8-bit operands of a precision in QUANTIZED_PRECISIONS (inference only: no
  # backward), and check_quantized(spec, head_dim, dtype, block_q, block_kv, precision), which
  # raises ValueError for what that forward does not take. With quantized_takes_grouped_kv =
  # True, forward_quantized gets k and v with kv_heads (dividing heads) instead of repeated.
  # With quantized_zeroes_padding = True, forward_quantized gets q, k and v as the caller left
  # them in padded positions (of the schedule and of key_valid) and must keep whatever is there
  # out of its scales and products itself (the op does not zero them first).
  # Optional: forward_takes_raw_padded_kv = True: forward(..., raw_padded_kv=True) (asked for
  # in an inference call only: never with with_o_low) gets k and v as the caller left them in
  # padded positions and must keep whatever is there out of o and lse; a call under a VJP gets
  # them zeroed, as the backward needs.
  # Optional: kernel_head_dim(head_dim) -> int (>= head_dim): the head_dim its kernels run for
  # input of ``head_dim``. The op then zero-pads q, k and v to it along the channels (q . k and
  # P V are unchanged: the added channels are zeros), calls every method with it, and slices
  # o back (autodiff slices the gradients); the default scale stays head_dim ** -0.5.
  # Optional: takes_grouped_kv(sched, head_dim) -> bool: forward and backward then get k and v
  # with kv_heads (query head h reads head h // (heads // kv_heads)) and the backward returns
  # dk, dv with kv_heads.

  # key_valid: None (the schedule's key validity) or bool [batch, sched.seq_len], the run-time
  # validity of keys (text lengths per sample); only keys of blocks the schedule flags in
  # kv_needs_mask may be invalid. dlse: None or float32 [batch, heads, seq], the cotangent of
  # the forward's lse (it adds p * dlse to dS, i.e. delta becomes rowsum(o * do) - dlse).
  # with_o_low: forward also returns o_low = (o_f32 - o).astype(o.dtype), the rounding error of
  # o, as a third result; the op saves it for the backward, which receives o as float32 o +
  # o_low. The backward's delta = rowsum(o * do) must come from the unrounded o: where a row's
  # softmax is peaked, dS = P (dP - delta) cancels to almost nothing and o's rounding (2**-9
  # relative in bf16) in delta would dominate dQ and dK (docs/SEMANTICS.md, "Numerics of the
  # gradients").
  # Backends that do not take with_o_low get the rounded o.


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
  grow with the sequence beyond the inputs, outputs and gradients. None: 16 MiB on a CPU, 64 MiB
  elsewhere (:func:`jsta.xla_backend.default_memory_bytes`).
  """

  name: str = "xla"
  memory_bytes: int | None = None

  def __post_init__(self):
    if self.memory_bytes is not None:
      checks.check_int("memory_bytes", self.memory_bytes, minimum=1)

  def default_blocks(self, spec, head_dim, dtype):
    # Blocks inside tiles (all pairs whole): the tile lengths' gcd when small, else the
    # largest power-of-two block dividing it.
    a = spec.block_align
    b = a if a <= 128 else (_largest_divisor_block(a, (128, 64, 32, 16, 8)) or a)
    return b, b

  def check(self, spec, head_dim, dtype, block_q, block_kv):
    pass

  def forward(self, q, k, v, sched, scale, key_valid=None, with_o_low=False):
    return xla_backend.forward(q, k, v, sched, scale, self.memory_bytes, key_valid, with_o_low)

  def backward(self, q, k, v, o, lse, do, sched, scale, key_valid=None, dlse=None):
    return xla_backend.backward(q, k, v, o, lse, do, sched, scale, self.memory_bytes,
                                key_valid, dlse)


register_backend("xla", XlaBackend)


@dataclasses.dataclass(frozen=True)
class AttentionPlan:
  """Everything static about one STA call; hashable, so it is a nondiff argument of the VJP.

  ``backend`` is the backend's name (the registered name, or a backend object's ``name``);
  ``implementation`` the backend object that runs (None: the one registered as ``backend``).
  ``head_dim`` is the input's; ``kernel_head_dim`` the one the backend's kernels run (its
  ``kernel_head_dim``), to which the op zero-pads q, k and v (None: head_dim itself).
  """

  spec: STASpec
  num_heads: int
  head_dim: int
  backend: str
  block_q: int
  block_kv: int
  scale: float
  dynamic_text: bool = False
  implementation: Backend | None = None
  precision: str = "default"
  kernel_head_dim: int | None = None

  @property
  def run_head_dim(self) -> int:
    """The head_dim the backend runs: ``kernel_head_dim``, else ``head_dim``."""
    return self.head_dim if self.kernel_head_dim is None else self.kernel_head_dim

  def runner(self) -> Backend:
    """The backend object that runs this plan."""
    return self.implementation if self.implementation is not None else get_backend(self.backend)

  @property
  def schedule(self) -> BlockSchedule:
    if self.dynamic_text:
      return block_schedule(self.spec, self.num_heads, self.block_q, self.block_kv,
                            dynamic_text=True)
    return block_schedule(self.spec, self.num_heads, self.block_q, self.block_kv)


# Names of the op's saved forward results, for remat policies (e.g.
# jax.checkpoint_policies.save_only_these_names(OUTPUT_NAME)): saving them spares the backward
# pass a second forward.
OUTPUT_NAME = "sta_output"
LSE_NAME = "sta_lse"


@dataclasses.dataclass(frozen=True)
class _BackendCall:
  """One backend forward or backward of a plan, on the arrays :func:`partition.run` passes:
  forward (q, k, v[, key_valid]) -> (o, lse[, o_low]); backward (q, k, v, o, lse, do
  [, key_valid][, dlse]) -> (dq, dk, dv)."""

  plan: AttentionPlan
  backward: bool
  key_valid: bool
  dlse: bool = False
  o_low: bool = False
  raw_padded_kv: bool = False

  def __call__(self, *arrays):
    plan, arrays = self.plan, list(arrays)
    dlse = arrays.pop() if self.dlse else None
    key_valid = arrays.pop() if self.key_valid else None
    if plan.precision != "default":
      return tuple(plan.runner().forward_quantized(*arrays, plan.schedule, plan.scale, key_valid,
                                                   precision=plan.precision))
    if self.backward:
      return tuple(plan.runner().backward(*arrays, plan.schedule, plan.scale, key_valid, dlse))
    # Only the keywords asked for: a user's backend object need not take them.
    options = {name: True for name, on in (("with_o_low", self.o_low),
                                            ("raw_padded_kv", self.raw_padded_kv)) if on}
    return tuple(plan.runner().forward(*arrays, plan.schedule, plan.scale, key_valid,
                                       **options))

  def for_head_shards(self, num_shards: int):
    heads = self.plan.num_heads // num_shards
    return tuple(dataclasses.replace(self, plan=dataclasses.replace(self.plan, spec=s,
                                                                    num_heads=heads))
                 for s in partition.head_shard_specs(self.plan.spec, self.plan.num_heads,
                                                     num_shards))


def _takes_o_low(runner) -> bool:
  """Whether a backend's forward takes ``with_o_low`` (every built-in one does; a user's
  backend object may not)."""
  try:
    return "with_o_low" in inspect.signature(runner.forward).parameters
  except (TypeError, ValueError):
    return False


def _forward(plan: AttentionPlan, q, k, v, key_valid, for_backward: bool = False,
             raw_padded_kv: bool = False, query_valid=None, scatter: bool = True):
  """(o, lse) or, ``for_backward``, (o, lse, o_low) with o_low None where the backend does not
  give it. Each result is named for remat policies (o_low as the output: saving the output
  must save all the backward needs of it). ``raw_padded_kv``: k and v hold whatever the caller
  left in padded positions (a backend with ``forward_takes_raw_padded_kv``; not
  ``for_backward``). ``query_valid`` (None or bool [1 or batch, seq]): o's rows where it is
  False are set to zero before o is named (:func:`_zero_padded_rows`, ``scatter`` as there),
  so that the output and the residual a VJP keeps are one array: zeroed after the forward
  rule instead, the rows would be rewritten in a copy of the saved o in a training step."""
  o_low = for_backward and _takes_o_low(plan.runner())
  call = _BackendCall(plan, False, key_valid is not None, o_low=o_low,
                      raw_padded_kv=raw_padded_kv)
  arrays, layouts = [q, k, v], ["bshd"] * 3
  if key_valid is not None:
    arrays.append(key_valid)
    layouts.append("bs")
  out = partition.run(call, arrays, layouts, ("bshd", "bhs", "bshd")[:3 if o_low else 2])
  o, = _valid_padded_rows(plan, query_valid, out[0], scatter=scatter)
  o, lse = checkpoint_name(o, OUTPUT_NAME), checkpoint_name(out[1], LSE_NAME)
  if not for_backward:
    return o, lse
  return o, lse, checkpoint_name(out[2], OUTPUT_NAME) if o_low else None


def _backward(plan: AttentionPlan, q, k, v, o, o_low, lse, do, key_valid, dlse=None):
  call = _BackendCall(plan, True, key_valid is not None, dlse is not None)
  if o_low is not None:
    # The backward reads o only for delta = rowsum(o * do): give it the unrounded o.
    o = o.astype(jnp.float32) + o_low.astype(jnp.float32)
  arrays = [q, k, v, o, lse, do.astype(q.dtype)]
  layouts = ["bshd", "bshd", "bshd", "bshd", "bhs", "bshd"]
  for x, layout in ((key_valid, "bs"), (dlse, "bhs")):
    if x is not None:
      arrays.append(x)
      layouts.append(layout)
  return partition.run(call, arrays, layouts, ("bshd",) * 3)


# The kernels' entry points: q, k, v [batch, sched.seq_len, heads, head_dim] in the text-last
# layout; key_valid None or bool [batch, sched.seq_len] (not differentiated); query_valid None or
# bool [1 or batch, sched.seq_len] (not differentiated): where given, q may hold anything at the
# False rows. A forward's rows are independent, so garbage there reaches only those rows of o
# and lse, which are overwritten (o's inside, by _forward; lse by the op); but the backward
# sums dS^T Q over whole query pieces, so the rules for a VJP zero those rows of q first (and
# of dq, as that select's transpose).
# key_rows_valid None or bool [1 or batch, sched.seq_len] (not differentiated), given only to a
# backend with forward_takes_raw_padded_kv: k and v may hold anything at its False rows. The
# inference forward passes them on as they are; the rules for a VJP zero those rows of k and
# v (and of dk and dv, as their transpose), as the op zeroes them for other backends.
def _valid_rows(x, valid):
  return x if valid is None else jnp.where(valid[:, :, None, None], x, jnp.zeros((), x.dtype))


def _valid_padded_rows(plan: AttentionPlan, valid, *arrays, scatter: bool = True):
  """``arrays`` (k and v, dk and dv, o or do) with the rows where ``valid`` is False set to
  zero (:func:`_zero_padded_rows` over the plan's rows that may be padded, ``scatter`` as
  there); unchanged where ``valid`` is None."""
  if valid is None:
    return arrays
  rows = _maybe_padded_rows(plan.schedule)
  return tuple(_zero_padded_rows(x, valid, rows, scatter) for x in arrays)


# ``scatter`` (static): how o's padded rows are zeroed (:func:`_zero_padded_rows`); the rules
# zero o inside, so the VJP's residual is the output itself, and zero do's padded rows as the
# transpose of that.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sta(plan: AttentionPlan, scatter: bool, q, k, v, key_valid, query_valid, key_rows_valid):
  return _forward(plan, q, k, v, key_valid, raw_padded_kv=key_rows_valid is not None,
                  query_valid=query_valid, scatter=scatter)[0]


def _sta_fwd(plan, scatter, q, k, v, key_valid, query_valid, key_rows_valid):
  q = _valid_rows(q, query_valid)
  k, v = _valid_padded_rows(plan, key_rows_valid, k, v)
  o, lse, o_low = _forward(plan, q, k, v, key_valid, for_backward=True,
                           query_valid=query_valid, scatter=scatter)
  return o, (q, k, v, o, o_low, lse, key_valid, query_valid, key_rows_valid)


def _sta_bwd(plan, scatter, res, do):
  q, k, v, o, o_low, lse, key_valid, query_valid, key_rows_valid = res
  # The transpose of _forward's zeroing of o's padded rows.
  do, = _valid_padded_rows(plan, query_valid, do, scatter=scatter)
  dq, dk, dv = _backward(plan, q, k, v, o, o_low, lse, do, key_valid)
  dk, dv = _valid_padded_rows(plan, key_rows_valid, dk, dv)
  return _valid_rows(dq, query_valid), dk, dv, None, None, None


_sta.defvjp(_sta_fwd, _sta_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _sta_lse(plan: AttentionPlan, scatter: bool, q, k, v, key_valid, query_valid,
             key_rows_valid):
  return _forward(plan, q, k, v, key_valid, raw_padded_kv=key_rows_valid is not None,
                  query_valid=query_valid, scatter=scatter)


def _sta_lse_fwd(plan, scatter, q, k, v, key_valid, query_valid, key_rows_valid):
  q = _valid_rows(q, query_valid)
  k, v = _valid_padded_rows(plan, key_rows_valid, k, v)
  o, lse, o_low = _forward(plan, q, k, v, key_valid, for_backward=True,
                           query_valid=query_valid, scatter=scatter)
  return (o, lse), (q, k, v, o, o_low, lse, key_valid, query_valid, key_rows_valid)


def _sta_lse_bwd(plan, scatter, res, cts):
  q, k, v, o, o_low, lse, key_valid, query_valid, key_rows_valid = res
  do, dlse = cts
  # The transpose of _forward's zeroing of o's padded rows.
  do, = _valid_padded_rows(plan, query_valid, do, scatter=scatter)
  # Rows with lse = +inf attend nothing: their cotangent must not turn into inf - inf.
  dlse = jnp.where(jnp.isfinite(lse), dlse.astype(jnp.float32), 0.0)
  dq, dk, dv = _backward(plan, q, k, v, o, o_low, lse, do, key_valid, dlse)
  dk, dv = _valid_padded_rows(plan, key_rows_valid, dk, dv)
  return _valid_rows(dq, query_valid), dk, dv, None, None, None


_sta_lse.defvjp(_sta_lse_fwd, _sta_lse_bwd)


# The 8-bit forwards (inference only; docs/PERFORMANCE.md, "FP8 forward: quantization choice"):
# "fp8": e4m3 operands in Q K^T and P V; "qk_int8": int8 Q K^T, P V in the inputs' dtype (the
# most accurate); "int8": int8 Q K^T and int8 P V (P per row and key step, V per channel);
# "qk_int8_pv_fp8": int8 Q K^T, e4m3 P V.
QUANTIZED_PRECISIONS = ("fp8", "qk_int8", "int8", "qk_int8_pv_fp8")
PRECISIONS = ("default",) + QUANTIZED_PRECISIONS


def check_precision(precision) -> str:
  """The checked ``precision=``: None or "default" (the inputs' dtype) -> "default", or one of
  :data:`QUANTIZED_PRECISIONS`."""
  if precision is None:
    return "default"
  if not isinstance(precision, str):
    raise TypeError(f"precision must be None or one of {PRECISIONS}, got "
                    f"{type(precision).__name__} {precision!r}")
  if precision not in PRECISIONS:
    raise ValueError(f"precision must be None or one of {PRECISIONS}, got {precision!r}")
  return precision


# The 8-bit precisions: the forward only. Its VJP raises, so that a gradient through quantized
# attention is an error, not a silent recomputation in another precision.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sta_quantized(plan: AttentionPlan, q, k, v, key_valid):
  return _forward(plan, q, k, v, key_valid)


def _sta_quantized_fwd(plan, q, k, v, key_valid):
  return _forward(plan, q, k, v, key_valid), None


def _sta_quantized_bwd(plan, res, cts):
  raise ValueError(
      f"sliding_tile_attention(..., precision={plan.precision!r}) is for inference only: it "
      "has no gradient. Differentiate with precision=None (the inputs' dtype), or pass "
      "jax.lax.stop_gradient(q), (k), (v) where no gradient is needed")


_sta_quantized.defvjp(_sta_quantized_fwd, _sta_quantized_bwd)


def _check_choice(arg: str, x) -> None:
  if is_backend_object(x):
    try:
      hash(x)
    except TypeError:
      raise TypeError(f"{arg}: a backend object must be hashable (the plan that holds it is a "
                      f"static argument), e.g. a frozen dataclass, got {type(x).__name__}"
                      ) from None
    return
  if isinstance(x, type):
    raise TypeError(f"{arg} takes backend objects, not classes: pass an instance, e.g. "
                    f"{x.__name__}(), got the class {x.__name__}")
  if not isinstance(x, str):
    raise TypeError(f"{arg} must name backends with str or give backend objects (with name, "
                    f"default_blocks, check, forward and backward), got {type(x).__name__} "
                    f"{x!r}")
  check_backend(x, arg)


def check_implementation(implementation=None, backend=None):
  """The checked value of ``implementation=`` and its alias ``backend=`` (both may be given
  only with the same value): "auto" for neither, else a backend name, a backend object
  (anything with the :class:`Backend` protocol, e.g. ``XlaBackend(memory_bytes=...)``), or a
  tuple of these, tried in order. Raises TypeError or ValueError naming the argument; creates
  no backend (no GPU code is imported)."""
  if isinstance(implementation, list):
    implementation = tuple(implementation)
  if isinstance(backend, list):
    backend = tuple(backend)
  if implementation is not None and backend is not None and implementation != backend:
    raise ValueError(f"give implementation= or its alias backend=, not both (got "
                     f"implementation={implementation!r}, backend={backend!r})")
  arg = "backend" if implementation is None and backend is not None else "implementation"
  choice = implementation if implementation is not None else backend
  if choice is None:
    return "auto"
  if isinstance(choice, (str, type)) or is_backend_object(choice):
    _check_choice(arg, choice)
    return choice
  if not isinstance(choice, tuple) or not choice:
    raise TypeError(f"implementation (or its alias backend) must be None, a backend name (a "
                    f"str), a backend object, or a non-empty sequence of names or backend "
                    f"objects, got {arg}={choice!r}")
  for x in choice:
    _check_choice(arg, x)
  return choice


def _candidates(implementation, backend) -> list:
  """The backends to try, in order (names and backend objects), from ``implementation`` and
  its alias ``backend``."""
  choice = check_implementation(implementation, backend)
  return list(choice) if isinstance(choice, tuple) else [choice]


def make_plan(spec: STASpec, num_heads: int, head_dim: int, dtype, *, scale=None,
              implementation=None, block_q: int | None = None, block_kv: int | None = None,
              dynamic_text: bool = False, backend=None, precision=None) -> AttentionPlan:
  """Resolves backend, block sizes and scale, and validates them against the spec.

  ``implementation`` (alias ``backend``): as :func:`sliding_tile_attention`'s. "auto" (the
  default) tries :data:`AUTO_ORDER` from the first backend that suits the device, so it runs
  any valid input; a sequence is tried in order (ValueError with every reason if none can run
  the input). Each skipped backend is logged with its reason on the ``"jsta"`` logger (INFO).
  ``dynamic_text``: text lengths come at run time (:func:`jsta.block_schedule`). The plan is of
  the text-last layout (``spec.text_last()``). ``precision`` as :func:`sliding_tile_attention`'s:
  with an 8-bit precision only backends with a quantized forward are tried.
  """
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  num_heads = checks.check_int("num_heads", num_heads, minimum=1)
  head_dim = checks.check_int("head_dim", head_dim, minimum=1)
  dynamic_text = checks.check_bool("dynamic_text", dynamic_text)
  spec.head_windows(num_heads)
  precision = check_precision(precision)
  scale = checks.check_scale(scale)
  try:
    if dtype is None:
      raise TypeError
    dtype = jnp.dtype(dtype)
  except TypeError:
    raise TypeError(f"dtype must be a dtype (float32, bfloat16 or float16), got "
                    f"{type(dtype).__name__} {dtype!r}") from None
  if dtype not in SUPPORTED_DTYPES:
    raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
  for arg, value in (("block_q", block_q), ("block_kv", block_kv)):
    if value is not None:
      checks.check_int(arg, value, minimum=1)
  requested = _candidates(implementation, backend)
  choices = []
  for c in requested:
    for x in (backends.auto_chain() if isinstance(c, str) and c == "auto" else [c]):
      if x not in choices:
        choices.append(x)
  names = [x if isinstance(x, str) else x.name for x in choices]
  reasons = []
  for i, (choice, name) in enumerate(zip(choices, names)):
    try:
      plan = _make_plan(spec.text_last(), num_heads, head_dim, dtype, scale, choice, block_q,
                        block_kv, bool(dynamic_text), precision)
    except ValueError as e:
      if len(choices) == 1:
        raise
      reasons.append(f"{name}: {e}")
      if i + 1 < len(choices):
        _LOG.info("jsta: backend %s cannot run this input (%s); trying %s", name, e,
                  names[i + 1])
      continue
    _LOG.log(logging.INFO if reasons else logging.DEBUG,
             "jsta: sliding tile attention runs on %s (blocks %d x %d)%s", plan.backend,
             plan.block_q, plan.block_kv, f"; skipped {'; '.join(reasons)}" if reasons else "")
    return plan
  raise ValueError("no backend of " + repr(names) + " can run this input: " + "; ".join(reasons))


def _make_plan(spec, num_heads, head_dim, dtype, scale, choice, block_q, block_kv,
               dynamic_text, precision="default") -> AttentionPlan:
  be, name = (get_backend(choice), choice) if isinstance(choice, str) else (choice, choice.name)
  if precision != "default":
    if not callable(getattr(be, "forward_quantized", None)):
      raise ValueError(f"precision={precision!r} needs a backend with an 8-bit forward "
                       f"(pallas_mosaic, on a compute capability 9.x GPU); {name} has none")
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
      raise ValueError(f"precision={precision!r} takes bfloat16 or float16 q, k, v (quantized "
                       f"inside the op), got {jnp.dtype(dtype).name}")
  run_dim = _kernel_head_dim(be, name, head_dim)
  dq, dkv = be.default_blocks(spec, run_dim, dtype)
  block_q = dq if block_q is None else block_q
  block_kv = dkv if block_kv is None else block_kv
  be.check(spec, run_dim, dtype, block_q, block_kv)
  check_quantized = getattr(be, "check_quantized", None)
  if precision != "default" and callable(check_quantized):
    check_quantized(spec, run_dim, dtype, block_q, block_kv, precision)
  scale = float(head_dim ** -0.5 if scale is None else scale)
  plan = AttentionPlan(spec, num_heads, head_dim, name, block_q, block_kv, scale,
                       dynamic_text and spec.text_max_len > 0, be, precision,
                       None if run_dim == head_dim else run_dim)
  plan.schedule  # builds (and validates) the schedule now, not inside tracing
  return plan


def _kernel_head_dim(be, name: str, head_dim: int) -> int:
  """The head_dim backend ``be`` runs for input of ``head_dim`` (its optional
  ``kernel_head_dim``), checked: an int >= head_dim."""
  pick = getattr(be, "kernel_head_dim", None)
  if not callable(pick):
    return head_dim
  run_dim = pick(head_dim)
  if not isinstance(run_dim, int) or isinstance(run_dim, bool) or run_dim < head_dim:
    raise TypeError(f"backend {name}: kernel_head_dim({head_dim}) must return an int >= "
                    f"{head_dim}, got {run_dim!r}")
  return run_dim


def _takes_grouped_kv(plan: AttentionPlan, explicit_specs) -> bool:
  """Whether k and v go to the backend with their own (fewer) heads, on one device (sharded
  inputs split q's and k's heads by their own counts): an 8-bit forward whose backend says it
  indexes the shared head itself (``quantized_takes_grouped_kv``), or a backend whose
  ``takes_grouped_kv(schedule, head_dim)`` says its forward and backward do (summing the
  group's dK and dV in float32)."""
  if explicit_specs is not None or jax.device_count() != 1:
    return False
  runner = plan.runner()
  if plan.precision != "default":
    return bool(getattr(runner, "quantized_takes_grouped_kv", False))
  takes = getattr(runner, "takes_grouped_kv", None)
  return callable(takes) and bool(takes(plan.schedule, plan.run_head_dim))


def _to_text_last(x, spec: STASpec):
  """[batch, seq_len, ...] in the spec's order -> text-last order (a no-op when it is)."""
  return jnp.roll(x, -spec.text_max_len, axis=1) if spec.text_position == "first" else x


def _from_text_last(x, spec: STASpec):
  return jnp.roll(x, spec.text_max_len, axis=1) if spec.text_position == "first" else x


def sliding_tile_attention(q, k, v, spec: STASpec, *, text_lengths=None,
                           return_lse: bool = False, scale: float | None = None,
                           implementation=None, block_q: int | None = None,
                           block_kv: int | None = None, backend=None, precision=None):
  """Sliding tile attention (docs/SEMANTICS.md).

  Args:
    q: [batch, seq, heads, head_dim], seq = spec.seq_len: the video tokens in tile order (see
      :func:`jsta.tile_order`) and ``spec.text_max_len`` text slots, after the video
      (``spec.text_position == "last"``) or before it ("first").
    k, v: [batch, seq, kv_heads, head_dim], kv_heads dividing heads: query head h uses key and
      value head ``h // (heads // kv_heads)`` (grouped-query attention; kv_heads = heads is
      plain multi-head attention). float32, bfloat16 or float16, the dtype of q.
      q, k, v may be jax or NumPy arrays (not lists); NumPy arrays are converted with
      ``jnp.asarray``, and float64 input (NumPy, or jax with ``jax_enable_x64``) is computed
      in float32 and gives a float32 output.
    spec: the :class:`jsta.STASpec` layout (one window, or one per query head).
    text_lengths: None (``spec.text_len`` valid text slots in every sample) or an int array
      [batch] in [0, spec.text_max_len]: the valid text slots of each sample, given at run time
      (a traced value under jit: no recompilation when it changes). Keys beyond a sample's
      length are never attended and its queries there output zeros. Values out of range raise
      ValueError when concrete; traced ones are clamped into range (in their own dtype, so a
      large unsigned value becomes text_max_len).
    return_lse: a bool (known before tracing): also return the log-sum-exp of each query row.
    scale: softmax scale, a static real number; default ``head_dim ** -0.5``. It must be
      finite in float32 together with the kernels' factor log2(e): ``|scale| <=
      jsta.checks.MAX_SCALE`` (about 2.36e38), else ValueError.
    implementation: None or "auto" (the default: the Hopper kernels, the portable kernels,
      then XLA, from the first that suits the device, each tried in turn, so any valid input
      runs; skipped backends and their reasons are logged on the ``"jsta"`` logger at INFO), a
      backend name ("xla", "pallas_triton", "pallas_mosaic" or a registered one), or a
      sequence of names tried in order: a backend that cannot run the input (say, float32 on
      "pallas_mosaic") is skipped, and ValueError gives every reason if none can.
      A backend object (anything with the :class:`Backend` protocol, hashable) runs with
      its own configuration, alone or in the sequence, e.g.
      ``MosaicBackend(backward_variant="split")`` (bitwise-reproducible gradients) or
      ``XlaBackend(memory_bytes=2**28)``. ``backend`` is an alias (both may be given only
      with the same value).
    block_q, block_kv: kernel block sizes; default per backend.
    precision: None or "default" (the matrix products take the inputs' dtype), or an 8-bit
      forward for inference on the Hopper kernels: "qk_int8" (int8 Q K^T with per-row and
      per-key-block scales, P V in the inputs' dtype: the most accurate, about 1% relative L2
      on random inputs), "int8" (int8 in both products: P per row and key step, V per
      channel; about 2%), "qk_int8_pv_fp8" (int8 Q K^T, float8_e4m3fn P V: about 4%) or "fp8"
      (float8_e4m3fn in both products: about 5%). bf16 or fp16 q, k, v are quantized inside
      the op (K smoothed by its mean, channels balanced between Q and K) and the output keeps
      their dtype; docs/PERFORMANCE.md has the error study and the speed. Only backends with
      an 8-bit forward are tried ("auto" never picks one by itself: it must be asked for), and
      differentiating raises ValueError.
  Returns:
    o: [batch, seq, heads, head_dim] in the input dtype; outputs of padded queries (padded
    latent positions, padded text slots, text slots beyond a sample's length) are zeros. With
    ``return_lse``, ``(o, lse)``: lse [batch, seq, heads] float32 (the layout of
    ``jax.nn.dot_product_attention(..., return_residual=True)``), the natural log of
    sum_j exp(scale * q . k_j) over the keys the row attends, +inf on rows that attend no
    valid key (padded queries); it is differentiable (gradients flow into q and k).

  Transformations: jit, vmap, grad/vjp (a custom VJP) and jax.checkpoint. Forward mode
  (jax.jvp, jax.jacfwd) is not supported: JAX raises a TypeError on a custom VJP function.
  The saved forward results carry ``jax.ad_checkpoint.checkpoint_name`` names, ``"sta_output"``
  (o) and ``"sta_lse"`` (lse), so that a remat policy can keep them (e.g.
  ``jax.checkpoint_policies.save_only_these_names("sta_output", "sta_lse")``: the backward
  pass then runs no second forward) or drop them.
  """
  q, k, v = checked_qkv(q, k, v, spec)
  return_lse = checks.check_bool("return_lse", return_lse)
  b, s, h, d = q.shape
  if text_lengths is not None:
    text_lengths = check_text_lengths(text_lengths, b, spec)
  specs = partition.explicit_input_specs(q, k.shape[2])
  if specs is not None:
    # Explicitly sharded input: keep its batch and head sharding through the layout passes
    # below (the sequence must be whole), and shard the text lengths with the batch.
    q_sharding, kv_sharding, batch_sharding = specs
    q = jax.sharding.reshard(q, q_sharding)
    k, v = (jax.sharding.reshard(x, kv_sharding) for x in (k, v))
    if text_lengths is not None:
      text_lengths = jax.sharding.reshard(text_lengths, batch_sharding)
  plan = make_plan(spec, h, d, q.dtype, scale=scale, implementation=implementation,
                   backend=backend, block_q=block_q, block_kv=block_kv,
                   dynamic_text=text_lengths is not None, precision=precision)
  plan, q = _positive_scale(plan, q)
  if plan.run_head_dim != d:
    # Zero channels change neither q . k nor P V; o and (by autodiff) the gradients are
    # sliced back below.
    pad = ((0, 0), (0, 0), (0, 0), (0, plan.run_head_dim - d))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  sched = plan.schedule
  q, k, v = (_to_text_last(x, spec) for x in (q, k, v))
  if k.shape[2] != h and not _takes_grouped_kv(plan, specs):
    # Grouped-query attention: each key/value head serves heads // kv_heads query heads. The
    # copy fuses with the layout selects below; its VJP sums dK and dV over each group.
    # Explicitly sharded input: the copies take q's sharding (heads split as q's), so the
    # kernels' dK and dV come back with the type of the k and v they were given.
    k, v = (jnp.repeat(x, h // k.shape[2], axis=2,
                       **({} if specs is None else dict(out_sharding=specs[0])))
            for x in (k, v))
  extra = sched.seq_len - s
  if extra:
    pad = ((0, 0), (0, extra), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
  valid = jnp.asarray(sched.query_valid)[None, :]                       # [1 or B, seq]
  if plan.dynamic_text:
    slot = jnp.arange(sched.seq_len) - spec.padded_video_len
    valid = valid & ((slot < 0) | (slot < text_lengths[:, None]))
  masked = plan.dynamic_text or sched.has_invalid_queries
  # Rows of q that may hold garbage, for the kernels' entry points (_sta, _sta_lse) to zero
  # only under a VJP; the 8-bit forwards quantize q over blocks of rows, so they take it clean.
  query_valid = valid if masked and plan.precision == "default" else None
  # An 8-bit forward that zeroes padded positions inside its own quantization passes: zeroing
  # them here too is one more pass over q, k and v (at Wan-14B 720p XLA even ran these
  # scatters on transposed copies; docs/PERFORMANCE.md, "FP8 forward: the quantization's
  # layout at shapes with padding").
  zeroed_by_backend = plan.precision != "default" and bool(
      getattr(plan.runner(), "quantized_zeroes_padding", False))
  rows = _maybe_padded_rows(sched) if masked else None
  # A backend whose forward keeps padded keys out itself gets k and v as they are (its VJP
  # rules zero them): zeroing them here reads and writes both whole, a copy of each where
  # they are program arguments (docs/PERFORMANCE.md, "Padded keys from zeroed copies").
  key_rows_valid = valid if (
      masked and not zeroed_by_backend and plan.precision == "default" and specs is None
      and bool(getattr(plan.runner(), "forward_takes_raw_padded_kv", False))) else None
  if masked and not zeroed_by_backend:
    # Padded positions (latent padding, padded text slots) hold whatever the caller left there.
    # The mask never attends them, but 0 * NaN in P @ V would still reach every row: set them
    # to zero (not a multiply, so NaN and inf are dropped too), and their gradients are exact
    # zeros. Only the rows that can be padded are rewritten where they are few, in place
    # where k and v are intermediates of the caller's program (_zero_padded_rows).
    if key_rows_valid is None:
      k, v = (_zero_padded_rows(x, valid, rows, scatter=specs is None) for x in (k, v))
    if query_valid is None:
      q = _zero_padded_rows(q, valid, rows, scatter=specs is None)
  key_valid = jnp.broadcast_to(valid, (b, sched.seq_len)) if plan.dynamic_text else None
  if plan.precision != "default":
    o, lse = _sta_quantized(plan, q, k, v, key_valid)
    if masked:
      o = _zero_padded_rows(o, valid, rows, scatter=specs is None)
  elif return_lse:
    # Where masked, query_valid is valid and the rules zero o's padded rows themselves.
    o, lse = _sta_lse(plan, specs is None, q, k, v, key_valid, query_valid, key_rows_valid)
  else:
    o = _sta(plan, specs is None, q, k, v, key_valid, query_valid, key_rows_valid)
  o = _from_text_last(o[:, :s] if extra else o, spec)
  if plan.run_head_dim != d:
    o = o[..., :d]
  if not return_lse:
    return o
  lse = jnp.where(valid[:, None, :], lse, jnp.inf)
  # The backends keep [batch, heads, seq]; the op returns jax.nn.dot_product_attention's
  # residual layout, [batch, seq, heads].
  lse = jnp.swapaxes(lse[:, :, :s] if extra else lse, 1, 2)
  return o, _from_text_last(lse, spec)


def _positive_scale(plan: AttentionPlan, q):
  """(plan, q) with the same scores ``scale * q . k`` and a positive scale. The kernels take
  each row's largest score and scale it, max(s) * c = max(s * c), which holds only for c > 0
  (masked scores are -inf, and -inf * 0 is NaN). A negative scale becomes -q and -scale
  (exact); a zero scale, q times zero (exact zeros; NaN and inf in q give NaN, as 0 * q . k
  does) and scale 1: every attended key gets the same weight. Autodiff carries dq through."""
  if plan.scale > 0:
    return plan, q
  if plan.scale < 0:
    return dataclasses.replace(plan, scale=-plan.scale), -q
  return dataclasses.replace(plan, scale=1.0), q * jnp.zeros((), q.dtype)


def _maybe_padded_rows(sched) -> np.ndarray:
  """int32[n], sorted: the rows of the op's text-last sequence that may be padded positions
  (:meth:`~jsta.schedule.BlockSchedule.maybe_padded`: the schedule's invalid queries, and
  with run-time text lengths every text slot)."""
  return np.flatnonzero(sched.maybe_padded()).astype(np.int32)


def _zero_padded_rows(o, valid, rows: np.ndarray, scatter: bool = True):
  """o [B, seq, H, D] (the output, or q, k, v on their way in) with the rows where ``valid``
  ([1 or B, seq]) is False set to zero (exactly, whatever was there). ``rows``
  (:func:`_maybe_padded_rows`) holds every row that can be False. Where they are few (latent
  padding is a few percent of the rows), only they are rewritten: a scatter, which XLA can do
  in place when nothing else reads the array (the kernel's output in an inference call; q, k
  and v computed in the caller's program), where a select reads and writes all of it; an
  array that must be kept (a program argument, a residual) costs a copy either way. Its VJP
  zeroes the same rows of the cotangent, as the select's does. ``scatter=False`` (explicitly
  sharded input, whose scatter would need its output sharding spelled out) always selects."""
  if not scatter or rows.size * 8 > o.shape[1]:
    return _valid_rows(o, valid)
  keep = valid[:, rows][:, :, None, None]
  update = jnp.where(keep, o[:, rows], jnp.zeros((), o.dtype))
  return o.at[:, rows].set(update, indices_are_sorted=True, unique_indices=True)


def sliding_tile_attention_row_major(q, k, v, spec: STASpec, **kwargs):
  """:func:`sliding_tile_attention` for tokens in row-major (t, h, w) order.

  Puts the video tokens in tile order (padding partial tiles), runs the op, and restores the
  row-major order: two extra passes over q, k, v and o (and over the gradients). A model
  should rather reorder once at its input and once at its output (:func:`jsta.tile_order`);
  this entry point is for trying STA in a model without that change.

  Args:
    q: [batch, spec.video_len + spec.text_max_len, heads, head_dim]: the video tokens in
      row-major order (no padding) and the text slots, in ``spec.text_position`` order.
    k, v: the same with kv_heads heads.
    spec, **kwargs: as :func:`sliding_tile_attention` (``return_lse`` too: lse is then
      [batch, video_len + text_max_len, heads] in the same order).
  """
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  n, t = spec.video_len, spec.text_max_len
  first = spec.text_position == "first"
  for name, x in (("q", q), ("k", k), ("v", v)):
    checks.check_array(name, x)
    if x.ndim == 4 and x.shape[1] != n + t:
      check_axis_order(name, x, spec)
    if x.ndim != 4 or x.shape[1] != n + t:
      raise ValueError(f"{name} must be [batch, video_len + text_max_len = {n + t}, heads, "
                       f"head_dim] (row-major video tokens and the text slots), got shape "
                       f"{x.shape}")

  def to_tiles(x):
    video, text = (x[:, t:], x[:, :t]) if first else (x[:, :n], x[:, n:])
    return token_order.join_video_text(token_order.tile_order(video, spec), text, spec)

  def from_tiles(x):
    video, text = token_order.split_video_text(x, spec)
    video = token_order.untile_order(video, spec)
    return jnp.concatenate([text, video] if first else [video, text], axis=1)

  out = sliding_tile_attention(to_tiles(q), to_tiles(k), to_tiles(v), spec, **kwargs)
  if kwargs.get("return_lse"):
    o, lse = out
    lse = from_tiles(lse[..., None])[..., 0]
    return from_tiles(o), lse
  return from_tiles(out)
