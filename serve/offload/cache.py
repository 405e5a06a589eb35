"""The fast tier: a preallocated pool of cache slots shared by every MoE layer.

The pool is three device arrays, gate and up [R, D, F/N] and down [R, F/N, D], with R =
capacity x groups per unit. A unit in slot s occupies rows s*u .. s*u + u - 1 (u = 1 for
sub-experts, N for whole experts), so group g of a resident unit is row
slot(unit(g)) * u + g % u. The expert FFN reads those rows directly; apart from transfers
in flight, no other expert weights are on the device.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np

from serve.offload.memory import MemoryPlan
from serve.offload.policy import PolicyName, make_policy
from serve.offload.tier import UnitData

logger = logging.getLogger(__name__)


@functools.partial(jax.jit, donate_argnums=(0, 1, 2))
def _write_rows(gate_RDW, up_RDW, down_RWD, rows_m, gate_mDW, up_mDW, down_mWD):
  # The buffers are donated, so the update happens in place.
  return (gate_RDW.at[rows_m].set(gate_mDW), up_RDW.at[rows_m].set(up_mDW), down_RWD.at[rows_m].set(down_mWD))


class SlotCache:
  """Slot table of (layer, unit) keys, the pool arrays, and the eviction policy."""

  def __init__(self, plan: MemoryPlan, layers: tuple[int, ...], *, hidden_size: int, width: int, dtype,
               policy: PolicyName = "lru"):
    self.plan = plan
    self.capacity, self.unit_groups = plan.capacity, plan.unit_groups
    self.policy_name = policy
    self.policy = make_policy(policy)
    rows = self.capacity * self.unit_groups
    # Uncommitted arrays on the default device, like the rest of the model: committed ones
    # would give every jitted step a second compiled variant.
    zeros = lambda shape: jnp.zeros(shape, dtype)
    self.gate_RDW = zeros((rows, hidden_size, width))
    self.up_RDW = zeros((rows, hidden_size, width))
    self.down_RWD = zeros((rows, width, hidden_size))
    self._compile_writes(dtype)
    self._slot_of: dict[Hashable, int] = {}
    self._free = list(range(self.capacity - 1, -1, -1))
    self._slot_LU = {layer: np.full(plan.units_per_layer, -1, np.int64) for layer in layers}
    logger.info("expert cache: %d %s slots (%.1f MiB of %.1f MiB of expert weights), policy %s", self.capacity,
                plan.unit_name, plan.held_bytes / 2**20, plan.total_bytes / 2**20, policy)

  # ---- lookups ------------------------------------------------------------------------------

  def slots(self, layer: int, units: np.ndarray) -> np.ndarray:
    """Slot of each unit, -1 where it is not resident."""
    return self._slot_LU[layer][np.asarray(units, np.int64)]

  def resident_mask(self, layer: int, units: np.ndarray) -> np.ndarray:
    return self.slots(layer, units) >= 0

  def group_rows(self, layer: int, groups: np.ndarray) -> np.ndarray:
    """Pool row of each group of a resident unit; raises if a unit is not resident."""
    groups = np.asarray(groups, np.int64)
    slots = self._slot_LU[layer][groups // self.unit_groups]
    if np.any(slots < 0):
      missing = sorted(set((groups[slots < 0] // self.unit_groups).tolist()))
      raise RuntimeError(f"layer {layer}: units {missing[:8]} are not resident; load them before computing")
    return slots * self.unit_groups + groups % self.unit_groups

  def num_resident(self) -> int:
    return len(self._slot_of)

  def bytes_held(self) -> int:
    """Bytes of the pool arrays: the fast memory the expert weights occupy."""
    return int(self.gate_RDW.nbytes + self.up_RDW.nbytes + self.down_RWD.nbytes)

  # ---- updates --------------------------------------------------------------------------------

  def ensure(self, layer: int, units: np.ndarray,
             read: Callable[[int, np.ndarray], UnitData | list[UnitData]]) -> tuple[np.ndarray, np.ndarray]:
    """Make `units` of `layer` resident; returns (hit units, missed units).

    Misses are read with `read(layer, misses)` before anything changes, so a failed read
    leaves the cache as it was (hits are still counted as used). Eviction never removes one
    of `units`, so at most `capacity` distinct units fit in one call.
    """
    units = np.unique(np.asarray(units, np.int64))
    if len(units) > self.capacity:
      raise ValueError(f"layer {layer} needs {len(units)} units at once but the cache capacity is {self.capacity}; "
                       "split the work into waves of at most the capacity")
    resident = self.resident_mask(layer, units)
    hits, misses = units[resident], units[~resident]
    for unit in hits.tolist():
      self.policy.touch((layer, unit))
    if len(misses):
      self.insert(layer, read(layer, misses), protected=units)
    return hits, misses

  def insert(self, layer: int, data: UnitData | list[UnitData], *, protected: np.ndarray = ()) -> None:
    """Write the units of `data` into free or evicted slots (never evicting `protected` units).

    Slots are assigned and units admitted to the policy in ascending unit order, whatever the
    order or split of `data`. So whether data came from a prefetch or a direct read changes
    neither the slot a unit gets nor what is evicted later.
    """
    parts = [data] if isinstance(data, UnitData) else list(data)
    units = sorted(int(u) for part in parts for u in part.units)
    shortfall = len(units) - len(self._free)
    if shortfall > 0:
      keep = {(layer, int(u)) for u in np.asarray(protected).tolist()} | {(layer, u) for u in units}
      for key in self.policy.evict(shortfall, keep):
        slot = self._slot_of.pop(key)
        self._slot_LU[key[0]][key[1]] = -1
        self._free.append(slot)
    slot_of = {unit: self._free.pop() for unit in units}
    try:
      for part in parts:
        slots = np.asarray([slot_of[int(u)] for u in part.units], np.int64)
        self._write(slots, part)
    except Exception:
      self._free.extend(slot_of.values())
      raise
    for unit in units:
      self._slot_of[(layer, unit)] = slot_of[unit]
      self._slot_LU[layer][unit] = slot_of[unit]
      self.policy.admit((layer, unit))

  def _write(self, slots: np.ndarray, part: UnitData) -> None:
    """Copy a part's rows into the pool in power-of-two chunks (few compiled shapes, no padding copy)."""
    rows = (slots[:, None] * self.unit_groups + np.arange(self.unit_groups)[None, :]).reshape(-1).astype(np.int32)
    start = 0
    while start < len(rows):
      size = 1 << ((len(rows) - start).bit_length() - 1)  # the largest power of two that fits
      chunk = slice(start, start + size)
      self.gate_RDW, self.up_RDW, self.down_RWD = _write_rows(
          self.gate_RDW, self.up_RDW, self.down_RWD, rows[chunk], part.gate_mDW[chunk], part.up_mDW[chunk],
          part.down_mWD[chunk])
      start += size

  def _compile_writes(self, dtype) -> None:
    """Run the pool write once per chunk size, so no step pays a compile while it waits for data."""
    rows = self.gate_RDW.shape[0]
    size = 1
    while size <= rows:
      zeros = lambda array: np.zeros((size, *array.shape[1:]), dtype)
      self.gate_RDW, self.up_RDW, self.down_RWD = _write_rows(
          self.gate_RDW, self.up_RDW, self.down_RWD, np.arange(size, dtype=np.int32), zeros(self.gate_RDW),
          zeros(self.up_RDW), zeros(self.down_RWD))
      size *= 2

  def clear(self) -> None:
    """Forget every resident unit (the pool keeps its size); the policy starts afresh."""
    self._slot_of.clear()
    self._free = list(range(self.capacity - 1, -1, -1))
    for table in self._slot_LU.values():
      table.fill(-1)
    self.policy = make_policy(self.policy_name)
