"""Expert parallelism: place the group axis (E*N) of every expert weight across a device mesh.

Weights of shape [G, ...] are split along G over the mesh axis `expert`; everything else
is replicated. `jax.jit` then partitions the grouped matmuls by the weights' shardings.

NOTE: the CPU `native` backend is an XLA custom call, which the SPMD partitioner cannot
split. Each device then gathers every group's weights and runs the whole grouped matmul, so
expert sharding saves no memory or time there (the results are the same).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from prism_jax.model import PrismModel

EXPERT_AXIS = "expert"
_GROUPED = ("gate", "up", "down")


def expert_mesh(num_devices: int | None = None) -> Mesh:
  """Build a 1-D mesh named `expert` over the first `num_devices` devices (all by default)."""
  devices = jax.devices()
  num_devices = num_devices or len(devices)
  if num_devices > len(devices):
    raise ValueError(f"requested {num_devices} devices but only {len(devices)} are present")
  return Mesh(np.asarray(devices[:num_devices]), (EXPERT_AXIS,))


def _spec(path: tuple, leaf: jax.Array, mesh: Mesh) -> NamedSharding:
  names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
  grouped = "mlp" in names and any(n in _GROUPED for n in names[-2:]) and leaf.ndim == 3
  if grouped:
    if leaf.shape[0] % mesh.shape[EXPERT_AXIS]:
      raise ValueError(f"cannot shard {leaf.shape[0]} expert groups over {mesh.shape[EXPERT_AXIS]} devices; "
                       "choose a device count that divides E*N")
    return NamedSharding(mesh, PartitionSpec(EXPERT_AXIS))
  return NamedSharding(mesh, PartitionSpec())


def shard_model(model: PrismModel, mesh: Mesh) -> PrismModel:
  """Move the model's weights onto `mesh` in place (expert groups split, the rest replicated)."""
  model.state = jax.tree_util.tree_map_with_path(lambda p, x: jax.device_put(x, _spec(p, x, mesh)), model.state)
  return model
