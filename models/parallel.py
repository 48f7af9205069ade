"""Data + sequence/head parallelism for the video DiT on a device mesh.

Activations [batch, seq, hidden] are sharded as P(data_axis, seq_axis): the token-wise layers
(projections, MLP, norms) run on each device's slice of the sequence with no communication;
attention is Ulysses-style (``jsta.sharding.ulysses``): an all-to-all trades sequence shards for
head shards holding the whole sequence, each device attends its heads, and a second all-to-all
restores sequence shards. Parameters are replicated; under ``jit`` the gradient reduction over
both axes is inserted by the compiler.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jsta import sharding as jsta_sharding


@dataclasses.dataclass(frozen=True)
class Parallelism:
  """How the DiT is laid out on ``mesh``: batch over ``data_axis``, sequence over ``seq_axis``."""

  mesh: Mesh
  seq_axis: str = "seq"
  data_axis: str | None = "data"

  def __post_init__(self):
    if not isinstance(self.mesh, Mesh):
      raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(self.mesh).__name__}")
    for name in (self.seq_axis, self.data_axis):
      if name is not None and name not in self.mesh.axis_names:
        raise ValueError(f"axis {name!r} is not an axis of the mesh {self.mesh.axis_names}")

  @property
  def seq_shards(self) -> int:
    return self.mesh.shape[self.seq_axis]

  def activation_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.data_axis, self.seq_axis))

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P(self.data_axis))

  def constrain(self, x):
    """x: [batch, seq, ...] -> the same, constrained to P(data_axis, seq_axis)."""
    return jax.lax.with_sharding_constraint(x, self.activation_sharding())

  def attention(self, attend_local):
    """``attend_local(shard, q, k, v, *extras)`` -> sequence-parallel attention (see ulysses)."""
    return jsta_sharding.ulysses(attend_local, self.mesh, seq_axis=self.seq_axis,
                                 batch_axis=self.data_axis)

  def shard_batch(self, batch: dict) -> dict:
    """Places every [batch, ...] array of a data batch on the mesh, split over data_axis."""
    return jax.tree.map(lambda x: jax.device_put(x, self.batch_sharding()), batch)


def make_mesh(data: int = 1, seq: int | None = None, devices=None) -> Parallelism:
  """A (data, seq) mesh over ``devices`` (default: all); ``seq`` defaults to the rest."""
  devices = list(jax.devices() if devices is None else devices)
  if seq is None:
    if len(devices) % data:
      raise ValueError(f"data ({data}) must divide the number of devices ({len(devices)})")
    seq = len(devices) // data
  if data * seq > len(devices) or data <= 0 or seq <= 0:
    raise ValueError(f"data x seq = {data} x {seq} must be positive and <= {len(devices)} devices")
  mesh = Mesh(np.array(devices[:data * seq]).reshape(data, seq), ("data", "seq"))
  return Parallelism(mesh)
