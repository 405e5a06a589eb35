"""The slow tier's interface: where expert weights live when they are not in the cache.

Two implementations: `DiskTier` (memory-mapped .npy files; the CPU path) and `HostTier`
(host memory next to an accelerator). Both return `UnitData` for a list of units of one MoE
layer; a unit is one sub-expert (N=1 groups) or one whole expert (N consecutive groups).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import numpy as np


class SlowTierError(RuntimeError):
  """A read from the slow tier failed (file missing, truncated or unreadable)."""


@dataclasses.dataclass(frozen=True)
class UnitData:
  """Weights of `units` of one MoE layer, stacked group by group in unit order.

  gate_mDW and up_mDW are [m, D, F/N], down_mWD is [m, F/N, D] with m = len(units) x groups
  per unit; NumPy arrays from the disk tier, device arrays from the host tier.
  """

  units: np.ndarray
  gate_mDW: Any
  up_mDW: Any
  down_mWD: Any

  @property
  def nbytes(self) -> int:
    return int(self.gate_mDW.nbytes + self.up_mDW.nbytes + self.down_mWD.nbytes)

  def take(self, units: np.ndarray) -> UnitData:
    """The rows of a subset of `units` (each must be present), in the given order."""
    if np.array_equal(units, self.units):
      return self
    position = {int(u): i for i, u in enumerate(self.units)}
    groups = self.gate_mDW.shape[0] // max(len(self.units), 1)
    index = np.asarray([position[int(u)] * groups + g for u in units for g in range(groups)], np.int32)
    return UnitData(np.asarray(units), self.gate_mDW[index], self.up_mDW[index], self.down_mWD[index])


class SlowTier(Protocol):
  """Holds every unit's weights; `read` copies some of them out."""

  kind: str
  unit_groups: int

  def read(self, layer: int, units: np.ndarray) -> UnitData:
    """Weights of `units` of MoE layer `layer`; raises SlowTierError when the tier cannot supply them."""
    ...

  def close(self) -> None:
    ...


def unit_groups_index(units: np.ndarray, unit_groups: int) -> np.ndarray:
  """Group indices of units in order: units [2, 0] with 2 groups per unit -> [4, 5, 0, 1]."""
  units = np.asarray(units, np.int64)
  return (units[:, None] * unit_groups + np.arange(unit_groups)[None, :]).reshape(-1)
