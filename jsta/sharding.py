"""Head-parallel STA across devices (DeepSpeed-Ulysses style) with ``jax.shard_map``.

Activations are sharded over the sequence across the devices of one mesh axis. Before attention
an all-to-all turns sequence shards into head shards that hold the full sequence; each device runs
STA on its heads (with the schedules of those heads), and a second all-to-all returns sequence
shards. A second mesh axis may shard the batch (data parallel).
"""

from __future__ import annotations

import functools

import jax
from jax import lax
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec as P

from jsta import checks
from jsta.inputs import check_text_lengths, checked_qkv
from jsta.ops import check_implementation, sliding_tile_attention
from jsta.partition import head_shard_specs
from jsta.spec import STASpec


def local_head_specs(spec: STASpec, num_heads: int, num_shards: int) -> tuple[STASpec, ...]:
  """The spec of each head shard: per-head windows are split into contiguous head groups.
  ``num_shards`` must divide ``num_heads`` (both positive ints)."""
  if not isinstance(spec, STASpec):
    raise TypeError(f"spec must be a jsta.STASpec, got {type(spec).__name__}")
  num_heads = checks.check_int("num_heads", num_heads, minimum=1)
  num_shards = checks.check_int("num_shards", num_shards, minimum=1)
  if num_heads % num_shards:
    raise ValueError(f"num_heads ({num_heads}) must be divisible by num_shards ({num_shards}), "
                     f"the number of sequence shards")
  return head_shard_specs(spec, num_heads, num_shards)


def _check_mesh_axes(mesh: Mesh, seq_axis: str, batch_axis: str | None) -> None:
  if not isinstance(mesh, (Mesh, AbstractMesh)):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (or AbstractMesh), got "
                    f"{type(mesh).__name__}")
  if not isinstance(seq_axis, str):
    raise TypeError(f"seq_axis must be a str (a mesh axis name), got {type(seq_axis).__name__} "
                    f"{seq_axis!r}")
  if batch_axis is not None and not isinstance(batch_axis, str):
    raise TypeError(f"batch_axis must be None or a str (a mesh axis name), got "
                    f"{type(batch_axis).__name__} {batch_axis!r}")
  if seq_axis not in mesh.axis_names:
    raise ValueError(f"seq_axis {seq_axis!r} is not an axis of the mesh {mesh.axis_names}")
  if batch_axis is not None and batch_axis not in mesh.axis_names:
    raise ValueError(f"batch_axis {batch_axis!r} is not an axis of the mesh {mesh.axis_names}")
  if batch_axis == seq_axis:
    # One mesh axis cannot shard both the batch and the sequence of the activations.
    raise ValueError(f"batch_axis must be None or a mesh axis other than seq_axis, got "
                     f"{batch_axis!r} for both")


def _check_mesh(mesh: Mesh, seq_axis: str, batch_axis: str | None, q, k, v) -> int:
  """The ``seq_axis`` size n, checked to divide the sequence and heads of q, k and v (the
  all-to-all gives each device seq / n rows, then heads / n heads, of each) and the batch."""
  _check_mesh_axes(mesh, seq_axis, batch_axis)
  n = mesh.shape[seq_axis]
  for name, x in (("q", q), ("k", k), ("v", v)):
    b, s, h = x.shape[:3]
    if s % n:
      raise ValueError(f"{name}: seq ({s}) must be divisible by the {seq_axis!r} mesh size ({n})")
    if h % n:
      hint = ("" if name == "q" else "; for fewer key/value heads, repeat each r times "
              "(jnp.repeat(x, r, axis=2) on k and v) so that their heads are a multiple of "
              f"{n} dividing q's")
      raise ValueError(
          f"{name}: heads ({h}) must be divisible by the {seq_axis!r} mesh size ({n}){hint}")
    if batch_axis is not None and b % mesh.shape[batch_axis]:
      raise ValueError(f"{name}: batch ({b}) must be divisible by the {batch_axis!r} mesh size "
                       f"({mesh.shape[batch_axis]})")
  return n


def ulysses(attend_local, mesh: Mesh, *, seq_axis: str, batch_axis: str | None = None):
  """Wraps a per-device attention function into sequence-parallel (Ulysses) attention.

  ``attend_local(shard_index, q, k, v, *extras)`` sees the full sequence and ``heads / n``
  heads of shard ``shard_index`` (an int32 tracer: the ``seq_axis`` index); ``extras`` are
  per-sample arrays ([batch, ...], e.g. a text mask) sharded over ``batch_axis`` only.
  The returned function takes q, k, v: [batch, seq, heads, head_dim] sharded P(batch_axis,
  seq_axis), plus the extras, and returns the output sharded like q.
  """

  _check_mesh_axes(mesh, seq_axis, batch_axis)

  def wrapped(q, k, v, *extras):
    for name, x in (("q", q), ("k", k), ("v", v)):
      checks.check_array(name, x)
      if x.ndim != 4:
        raise ValueError(f"{name} must be [batch, seq, heads, head_dim], got shape {x.shape}")
    _check_mesh(mesh, seq_axis, batch_axis, q, k, v)

    def body(q, k, v, *extras):
      # [b, s/n, h, d] -> [b, s, h/n, d]: split heads across devices, gather the sequence.
      to_heads = lambda x: lax.all_to_all(x, seq_axis, split_axis=2, concat_axis=1, tiled=True)
      oh = attend_local(lax.axis_index(seq_axis), to_heads(q), to_heads(k), to_heads(v), *extras)
      return lax.all_to_all(oh, seq_axis, split_axis=1, concat_axis=2, tiled=True)

    act = P(batch_axis, seq_axis)
    in_specs = (act, act, act) + tuple(P(batch_axis) for _ in extras)
    args = (q, k, v, *extras)
    if AxisType.Explicit in tuple(mesh.axis_types):
      # On explicit axes shard_map takes only arrays already sharded as its in_specs (an
      # Auto mesh's reshards them itself): put them there, e.g. text lengths made on one
      # device.
      args = tuple(jax.sharding.reshard(x, NamedSharding(mesh, spec))
                   for x, spec in zip(args, in_specs))
    # check_vma=False: a Pallas kernel's pallas_call inside does not say how its outputs vary
    # over the mesh axes (JAX 0.11.2), which the check requires of every output.
    return jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=act,
                         check_vma=False)(*args)

  return wrapped


def head_parallel_attention(q, k, v, spec: STASpec, mesh: Mesh, *, seq_axis: str,
                            batch_axis: str | None = None, text_lengths=None,
                            scale: float | None = None, implementation=None, backend=None,
                            **op_kwargs):
  """STA on sequence-sharded activations.

  Args:
    q, k, v: [batch, seq, heads, head_dim], seq == spec.seq_len, sharded (or to be sharded) as
      ``P(batch_axis, seq_axis)``. seq and heads must be divisible by the ``seq_axis`` size.
      k and v may have fewer heads dividing q's (grouped-query attention, as
      :func:`jsta.sliding_tile_attention`), also divisible by the ``seq_axis`` size.
    mesh: the device mesh; ``seq_axis`` names the sequence/head-parallel axis, ``batch_axis``
      (optional) the data-parallel axis.
    text_lengths: None or int [batch], the valid text slots of each sample (as in
      :func:`jsta.sliding_tile_attention`), sharded with the batch over ``batch_axis``.
    scale, implementation (alias backend), **op_kwargs: as
      :func:`jsta.sliding_tile_attention`.
  Returns:
    [batch, seq, heads, head_dim], sharded like the inputs.
  """
  # Checked on the global shapes: inside shard_map the errors would quote per-shard ones.
  q, k, v = checked_qkv(q, k, v, spec)
  n = _check_mesh(mesh, seq_axis, batch_axis, q, k, v)
  specs = local_head_specs(spec, q.shape[2], n)
  implementation = check_implementation(implementation, backend)
  extras = ()
  if text_lengths is not None:
    # Checked (and concrete values range-checked) against the whole batch, before each
    # device sees its samples.
    extras = (check_text_lengths(text_lengths, q.shape[0], spec),)
  attend = functools.partial(sliding_tile_attention, scale=scale, implementation=implementation,
                             **op_kwargs)

  def local(shard, q, k, v, *lengths):
    run = lambda q, k, v, sp: attend(q, k, v, sp, text_lengths=lengths[0] if lengths else None)
    if len(set(specs)) == 1:
      return run(q, k, v, specs[0])
    # Per-head windows: each device needs the schedule of its own heads.
    branches = [functools.partial(run, sp=sp) for sp in specs]
    return lax.switch(shard, branches, q, k, v)

  return ulysses(local, mesh, seq_axis=seq_axis, batch_axis=batch_axis)(q, k, v, *extras)
