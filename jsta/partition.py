"""The backends' calls, run shard by shard when q, k, v are sharded over batch and/or heads.

Attention is independent across the batch and across heads, so a device holding some samples
and some heads of q, k, v can run the kernels on exactly those: no all-gather of q, k, v, and
the results come out sharded as the inputs. What a call needs is its head shard's windows (per-
head windows split into contiguous groups, :func:`head_shard_specs`). The sequence and head_dim
axes are never split here (each row needs every key of its window; sequence-sharded activations
go through :mod:`jsta.sharding` instead), so shards along them are gathered first.

:func:`run` picks the mechanism from what is known when the op is traced:

- arrays whose type carries an explicit sharding (a mesh with ``AxisType.Explicit`` axes, e.g.
  ``jax.make_mesh``'s default): a ``jax.shard_map`` over those axes, built at trace time;
- otherwise, with more than one device: ``custom_partitioning`` (as JAX's cuDNN attention
  does), whose callback sees the shardings the partitioner chose (under ``jax.jit`` with
  ``NamedSharding`` inputs on a mesh of ``Auto`` axes) and returns the per-shard call; under
  ``jax.vmap`` the vmapped axis is folded into the batch (``custom_vmap``), which is exact for
  attention;
- one device: the call itself.

Array layouts are strings of axis letters: ``"bshd"`` [batch, seq, heads, head_dim] (q, k, v,
o and their gradients), ``"bhs"`` [batch, heads, seq] (lse and its cotangent), ``"bs"`` [batch,
seq] (key validity).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math
from typing import Any, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import jax.extend
import jax.extend.source_info_util
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jsta import checks
from jsta.spec import STASpec


class ShardedCall(Protocol):
  """A backend call :func:`run` can split: hashable (it is a static argument)."""

  def __call__(self, *arrays) -> tuple: ...

  def for_head_shards(self, num_shards: int) -> tuple["ShardedCall", ...]:
    """The call of each of ``num_shards`` contiguous head shards, in order."""
    ...


def head_shard_specs(spec: STASpec, num_heads: int, num_shards: int) -> tuple[STASpec, ...]:
  """The spec of each of ``num_shards`` contiguous head shards (shard i holds heads
  ``i * num_heads / num_shards`` onwards): per-head windows are split into those groups; one
  window for all heads is every shard's. ValueError unless ``num_shards`` divides
  ``num_heads``."""
  num_heads = checks.check_int("num_heads", num_heads, minimum=1)
  num_shards = checks.check_int("num_shards", num_shards, minimum=1)
  if num_heads % num_shards:
    raise ValueError(f"heads ({num_heads}) must be divisible by the number of head shards "
                     f"({num_shards})")
  if not spec.is_per_head:
    return (spec,) * num_shards
  windows = spec.head_windows(num_heads)
  per = num_heads // num_shards
  return tuple(spec.with_window(tuple(windows[i * per:(i + 1) * per]))
               for i in range(num_shards))


def _axes(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a name, or a tuple of names) as a tuple of mesh axis names."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _layout_spec(layout: str, batch_axes, head_axes) -> P:
  """The PartitionSpec of an array of ``layout``: batch and heads sharded, nothing else."""
  return P(*({"b": _entry(batch_axes), "h": _entry(head_axes)}.get(c) for c in layout))


def _split(shape: Sequence[int], spec, mesh_shape: dict[str, int]) -> tuple[tuple, tuple]:
  """(batch axes, head axes) of a "bshd" array's spec that divide its batch and heads evenly
  (an axis that does not is dropped: that dimension is gathered, which stays correct)."""
  spec = tuple(spec) + (None,) * (4 - len(spec))
  out = []
  for dim in (0, 2):
    axes = _axes(spec[dim])
    if shape[dim] % math.prod(mesh_shape[a] for a in axes):
      axes = ()
    out.append(axes)
  return out[0], out[1]


def _local(call: ShardedCall, head_axes: tuple[str, ...], mesh_shape: dict[str, int]):
  """The function each device runs: ``call`` on its shards, with its head shard's windows.
  Shards whose calls differ (per-head windows) pick theirs by their index along the head axes
  (``lax.switch``); equal ones share one branch."""
  n = math.prod(mesh_shape[a] for a in head_axes)
  calls = call.for_head_shards(n) if n > 1 else (call,)
  branches = list(dict.fromkeys(calls))
  if len(branches) == 1:
    return branches[0]
  which = np.asarray([branches.index(c) for c in calls], np.int32)

  def run_shard(*arrays):
    index = 0
    for a in head_axes:           # a dimension split over several axes: the first is major
      index = index * mesh_shape[a] + lax.axis_index(a)
    return lax.switch(jnp.asarray(which)[index], branches, *arrays)
  return run_shard


# ---- explicit shardings: shard_map at trace time -------------------------------------------------
def _explicit_split(x):
  """(mesh, batch axes, head axes) when ``x``'s type shards its batch or heads over explicit
  mesh axes, else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty:
    return None
  explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}
  batch, heads = _split(x.shape, sharding.spec, dict(mesh.shape))
  batch = tuple(a for a in batch if a in explicit)
  heads = tuple(a for a in heads if a in explicit)
  if not batch and not heads:
    return None
  return mesh, batch, heads


def explicit_input_specs(q, kv_heads: int):
  """For arrays whose type carries an explicit sharding: (the sharding of q, that of k and v,
  that of a [batch] array) that keep only the batch and head sharding of q (the
  sequence and head_dim are gathered; k and v keep the head sharding when ``kv_heads`` splits
  as evenly as q's heads, else they are replicated over heads), or None when q has none."""
  found = _explicit_split(q)
  if found is None:
    return None
  mesh, batch, heads = found
  n = math.prod(mesh.shape[a] for a in heads)
  kv = heads if kv_heads % n == 0 else ()
  return tuple(NamedSharding(mesh, _layout_spec(layout, batch, h))
               for layout, h in (("bshd", heads), ("bshd", kv), ("b", ())))


def _shard_map_call(call, arrays, in_layouts, out_layouts, mesh, batch, heads):
  in_specs = tuple(_layout_spec(l, batch, heads) for l in in_layouts)
  out_specs = tuple(_layout_spec(l, batch, heads) for l in out_layouts)
  arrays = [jax.sharding.reshard(x, NamedSharding(mesh, s)) for x, s in zip(arrays, in_specs)]
  local = _local(call, heads, dict(mesh.shape))
  # check_vma=False: the backends' pallas_calls do not say how their outputs vary over the
  # mesh axes (JAX 0.11.2), which the check requires; the out_specs are exact by construction.
  return jax.shard_map(lambda *a: tuple(local(*a)), mesh=mesh, in_specs=in_specs,
                       out_specs=out_specs, axis_names=set(batch) | set(heads),
                       check_vma=False)(*arrays)


# ---- shardings chosen by the partitioner: custom_partitioning ------------------------------------
@dataclasses.dataclass(frozen=True)
class _Static:
  call: Any                       # a ShardedCall
  in_layouts: tuple[str, ...]
  out_layouts: tuple[str, ...]


@functools.partial(jax.jit, static_argnums=0)
def _traced(call, *arrays):
  # custom_partitioning takes a function without constants; under jit the schedules' numpy
  # tables are the inner computation's own.
  return tuple(call(*arrays))


@functools.partial(custom_partitioning, static_argnums=(0,))
def _partitioned(static: _Static, *arrays):
  return _traced(static.call, *arrays)


def _mesh_and_split(static: _Static, mesh, arg_shapes):
  """The mesh and (batch axes, head axes) from the first operand's sharding (a "bshd" array):
  the partitioner's choice for q."""
  sharding = arg_shapes[0].sharding
  if not isinstance(sharding, NamedSharding) or mesh.empty:
    # No mesh to name axes by: everything replicated, on the devices of the computation.
    devices = sorted(sharding.device_set, key=lambda d: d.id)
    return Mesh(np.asarray(devices), ("devices",)), (), ()
  batch, heads = _split(arg_shapes[0].shape, sharding.spec, dict(mesh.shape))
  return mesh, batch, heads


def _partition(static: _Static, mesh, arg_shapes, result_shape):
  mesh, batch, heads = _mesh_and_split(static, mesh, arg_shapes)
  arg_shardings = tuple(NamedSharding(mesh, _layout_spec(l, batch, heads))
                        for l in static.in_layouts)
  out_shardings = tuple(NamedSharding(mesh, _layout_spec(l, batch, heads))
                        for l in static.out_layouts)
  local = _local(static.call, heads, dict(mesh.shape))

  def lower(*arrays):
    # This runs inside XLA's partitioner, below the Python frames of whatever called the
    # compile; source locations of those frames, merged into the partitioned module, can form
    # a cycle in XLA's stack-frame table (the compile then never ends). Trace with a traceback
    # of no user frames: one taken on a worker thread.
    with jax.extend.source_info_util.user_context(_bare_traceback()):
      return tuple(local(*arrays))
  return mesh, lower, out_shardings, arg_shardings


def _bare_traceback():
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(jax.extend.source_info_util.current).result().traceback


def _infer_sharding(static: _Static, mesh, arg_shapes, result_shape):
  mesh, batch, heads = _mesh_and_split(static, mesh, arg_shapes)
  return tuple(NamedSharding(mesh, _layout_spec(l, batch, heads)) for l in static.out_layouts)


def _sharding_rule(static: _Static, mesh, operand_types, result_types):
  # Batch and heads follow one another across operands and results; the sequence and
  # head_dim are never split.
  ins = ", ".join(" ".join(l) for l in static.in_layouts)
  outs = ", ".join(" ".join(l) for l in static.out_layouts)
  return f"{ins} -> {outs}", dict(need_replication_factors=("s", "d"))


_partitioned.def_partition(partition=_partition, infer_sharding_from_operands=_infer_sharding,
                           sharding_rule=_sharding_rule)


@functools.lru_cache(maxsize=None)
def _batched(static: _Static):
  """``_partitioned`` for one static call, with a vmap rule (custom_partitioning has none): the
  vmapped axis joins the batch (every array has its batch first; attention does not mix
  samples)."""

  @jax.custom_batching.custom_vmap
  def call(*arrays):
    return tuple(_partitioned(static, *arrays))

  @call.def_vmap
  def call_vmap(axis_size, in_batched, *arrays):
    arrays = [x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
              for x, b in zip(arrays, in_batched)]
    outs = call(*(x.reshape(-1, *x.shape[2:]) for x in arrays))
    return (tuple(o.reshape(axis_size, -1, *o.shape[1:]) for o in outs),
            tuple(True for _ in outs))
  return call


def run(call: ShardedCall, arrays: Sequence[jax.Array], in_layouts: Sequence[str],
        out_layouts: Sequence[str]) -> tuple:
  """``call(*arrays)``, shard by shard where the arrays are sharded over batch and/or heads
  (see the module docstring). ``arrays[0]`` is "bshd" (q): its sharding decides."""
  in_layouts, out_layouts = tuple(in_layouts), tuple(out_layouts)
  found = _explicit_split(arrays[0])
  if found is not None:
    return _shard_map_call(call, arrays, in_layouts, out_layouts, *found)
  if jax.device_count() > 1:
    return _batched(_Static(call, in_layouts, out_layouts))(*arrays)
  return tuple(call(*arrays))
