"""Expert-memory budgets: parse '25%', 0.25, '512MB' or a byte count, and size the cache from it.

The budget covers the fast-tier expert weights held between steps: the preallocated cache
slots. Attention, embeddings, routers, core-neuron columns, shared experts and dense layers
always stay resident and are reported separately. Transfers in flight are not counted.
While a layer's misses are copied into the slots, up to one MoE layer's misses also sit in a
transfer buffer. On the host tier, the prefetcher's staged reads (at most one layer's
predicted misses, capped by `prefetch_limit`) also occupy device memory.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from typing import Literal

Granularity = Literal["sub_expert", "expert"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")

ExpertMemory = int | float | str


def format_bytes(size: float) -> str:
  """Bytes as a short human-readable string in binary units, e.g. '12.5 MiB'."""
  for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if size >= scale:
      return f"{size / scale:.1f} {unit}"
  return f"{int(size)} B"


def parse_expert_memory(value: ExpertMemory, total_bytes: int) -> int:
  """Bytes of fast memory for experts from a fraction, a percentage, a size string or an int.

  `0.25` and `"25%"` mean a quarter of `total_bytes` (all expert weights); `"512MB"` (decimal),
  `"512MiB"` (binary) and a plain int are bytes. The result is capped at `total_bytes`.
  """
  hint = "give a fraction in (0, 1] such as 0.25, a percentage such as '25%', or bytes such as '512MB' or 536870912"
  if isinstance(value, bool):
    raise ValueError(f"expert_memory must be a size or a fraction, got {value!r}; {hint}")
  if isinstance(value, numbers.Integral):
    size = int(value)
  elif isinstance(value, numbers.Real):
    if not 0 < value <= 1:
      raise ValueError(f"expert_memory {value!r} as a float is a fraction of all expert weights and must be in "
                       f"(0, 1]; {hint}")
    size = math.floor(float(value) * total_bytes)
  elif isinstance(value, str):
    text = value.strip()
    if text.endswith("%"):
      try:
        percent = float(text[:-1])
      except ValueError:
        raise ValueError(f"expert_memory {value!r} is not a valid percentage; {hint}") from None
      if not 0 < percent <= 100:
        raise ValueError(f"expert_memory {value!r} must be a percentage in (0, 100]; {hint}")
      size = math.floor(percent / 100 * total_bytes)
    else:
      match = _SIZE.match(text)
      if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"expert_memory {value!r} is not a valid size; {hint}")
      number, unit = float(match.group(1)), match.group(2).lower()
      if "." in match.group(1) and unit in ("", "b"):
        # '0.25' as a string reads as a fraction, like the float.
        return parse_expert_memory(number, total_bytes)
      size = math.floor(number * _UNITS[unit])
  else:
    raise ValueError(f"expert_memory must be an int, float or str, got {type(value).__name__}; {hint}")
  if size <= 0:
    raise ValueError(f"expert_memory {value!r} is {size} bytes; it must be positive. {hint}")
  return min(size, total_bytes)


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Cache slots that a byte budget buys for one model and caching granularity.

  A unit is what the cache stores and fetches: one sub-expert, or one whole expert (N
  sub-experts). `capacity` is the number of units that fit in the fast tier, across all MoE layers.
  """

  granularity: Granularity
  budget_bytes: int
  total_bytes: int
  unit_bytes: int
  unit_groups: int
  units_per_layer: int
  num_moe_layers: int
  capacity: int
  working_set: int

  @property
  def held_bytes(self) -> int:
    """Bytes of the preallocated cache slots (at most `budget_bytes`)."""
    return self.capacity * self.unit_bytes

  @property
  def fraction(self) -> float:
    return self.held_bytes / self.total_bytes

  @property
  def unit_name(self) -> str:
    return "sub-expert" if self.granularity == "sub_expert" else "expert"


def plan_memory(expert_memory: ExpertMemory, *, granularity: Granularity, num_moe_layers: int, num_experts: int,
                num_sub_experts: int, top_k: int, hidden_size: int, width: int, itemsize: int,
                max_batch: int) -> MemoryPlan:
  """Size the cache; reject a budget that cannot hold one decode step's units of one MoE layer.

  `width` is F/N, the neurons of one sub-expert. The working set of a decode step is what one
  MoE layer may need for `max_batch` rows at the full budget: max_batch * N * K sub-experts
  (or max_batch * K whole experts), at most every unit of the layer. Longer prefill chunks
  that need more run in several passes (waves) instead of being rejected.
  """
  if granularity not in ("sub_expert", "expert"):
    raise ValueError(f"granularity must be 'sub_expert' or 'expert', got {granularity!r}")
  if max_batch < 1:
    raise ValueError(f"max_batch must be >= 1, got {max_batch}")
  sub_expert_bytes = 3 * hidden_size * width * itemsize
  unit_groups = 1 if granularity == "sub_expert" else num_sub_experts
  units_per_layer = num_experts * num_sub_experts // unit_groups
  unit_bytes = sub_expert_bytes * unit_groups
  total = num_moe_layers * units_per_layer * unit_bytes
  budget = parse_expert_memory(expert_memory, total)
  capacity = min(budget // unit_bytes, num_moe_layers * units_per_layer)
  per_row = num_sub_experts * top_k if granularity == "sub_expert" else top_k
  working_set = min(max_batch * per_row, units_per_layer)
  plan = MemoryPlan(granularity, budget, total, unit_bytes, unit_groups, units_per_layer, num_moe_layers, capacity,
                    working_set)
  if capacity < working_set:
    need = working_set * unit_bytes
    percent = math.ceil(need / total * 1000) / 10
    raise ValueError(
        f"expert_memory {expert_memory!r} ({format_bytes(budget)}) fits {capacity} {plan.unit_name}s of "
        f"{format_bytes(unit_bytes)}, but one decode step with {max_batch} rows at the full budget may need "
        f"{working_set} {plan.unit_name}s of one MoE layer; set expert_memory to at least {need} bytes "
        f"({format_bytes(need)}) or '{percent:g}%' of the {format_bytes(total)} of expert weights")
  return plan
