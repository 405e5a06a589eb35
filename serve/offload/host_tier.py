"""The host tier: on an accelerator, expert weights wait in pinned host memory.

Each unit's gate, up and down live as separate `pinned_host` arrays, so a fetch is a list of
`jax.device_put` calls into device memory. JAX runs those asynchronously, so the
prefetcher's reads overlap with compute without a thread doing the copy.

NOTE: untested on accelerators. The code path runs in the tests only on the CPU backend
(`allow_cpu=True`), where pinned_host and device memory are both system RAM.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from serve.offload.tier import SlowTierError, UnitData

logger = logging.getLogger(__name__)


class HostTier:
  """Units of every MoE layer in pinned host memory of one device."""

  kind = "host"

  def __init__(self, layers: tuple[int, ...], source: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
               unit_groups: int, *, device: jax.Device | None = None, allow_cpu: bool = False,
               progress: bool = False):
    device = device or jax.devices()[0]
    if device.platform == "cpu" and not allow_cpu:
      raise ValueError("the host tier needs an accelerator (on CPU, device and host memory are the same RAM); "
                       "use the disk tier (tier='disk') on CPU")
    kinds = {memory.kind for memory in device.addressable_memories()}
    if "pinned_host" not in kinds:
      raise ValueError(f"device {device} has no pinned_host memory (memories: {sorted(kinds)}); use tier='disk'")
    self.unit_groups = unit_groups
    self._host = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
    self._device = jax.sharding.SingleDeviceSharding(device, memory_kind="device")
    self._units: dict[int, list[tuple[jax.Array, jax.Array, jax.Array]]] = {}
    self.nbytes = 0
    for layer in tqdm(layers, desc="copying experts to pinned host memory", unit="layer", disable=not progress):
      gate, up, down = (np.asarray(a) for a in source(layer))
      units = []
      for start in range(0, gate.shape[0], unit_groups):
        block = slice(start, start + unit_groups)
        units.append(tuple(jax.device_put(np.ascontiguousarray(a[block]), self._host) for a in (gate, up, down)))
        self.nbytes += gate[block].nbytes + up[block].nbytes + down[block].nbytes
      self._units[layer] = units
    logger.info("host tier: %d MoE layers, %.1f MiB in pinned host memory", len(layers), self.nbytes / 2**20)

  def read(self, layer: int, units: np.ndarray) -> UnitData:
    """Start asynchronous copies of `units` to device memory; the arrays are ready when used."""
    try:
      chosen = [self._units[layer][int(u)] for u in units]
    except (KeyError, IndexError) as error:
      raise SlowTierError(f"layer {layer} units {list(units)} are not in the host tier: {error}") from error
    moved = jax.device_put([array for unit in chosen for array in unit], self._device)
    gate, up, down = (jnp.concatenate(moved[part::3], axis=0) for part in range(3))
    return UnitData(np.asarray(units), gate, up, down)

  def close(self) -> None:
    self._units.clear()
