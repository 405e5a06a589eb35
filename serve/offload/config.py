"""`OffloadConfig`: the settings of offloading mode, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Literal

from serve.offload.memory import ExpertMemory, Granularity
from serve.offload.policy import POLICIES, PolicyName
from serve.offload.selection import Selection

TierKind = Literal["auto", "disk", "host"]


@dataclasses.dataclass(frozen=True)
class OffloadConfig:
  """Settings that split expert weights between the fast tier (a cache) and the slow tier.

  expert_memory: fast memory for expert weights: a fraction (0.25), a percentage ('25%'),
    a size ('512MB', '1GiB') or an int of bytes. Non-expert weights are always resident.
  granularity: 'sub_expert' caches and fetches sub-experts; 'expert' caches whole experts
    (the expert-granularity offloading baseline).
  policy: eviction policy, 'lru' or 'lfu'.
  prefetch: read the next MoE layer's predicted units in the background.
  prefetch_limit: most units prefetched per layer (None: every predicted miss).
  selection: which candidates run (`Selection`): exact, or resident first under a target.
  tier: 'disk' (memory-mapped files; the CPU path), 'host' (pinned host memory next to an
    accelerator) or 'auto' (host on accelerators, disk on CPU).
  offload_dir: directory of the disk tier's files; None writes them to a temporary
    directory that is deleted on `close()`.
  max_batch: rows of the largest decode step; the budget must hold one MoE layer's units
    for that many rows at the full budget.
  allow_host_tier_on_cpu: run the host tier on the CPU backend (tests only).
  """

  expert_memory: ExpertMemory = "50%"
  granularity: Granularity = "sub_expert"
  policy: PolicyName = "lru"
  prefetch: bool = True
  prefetch_limit: int | None = None
  selection: Selection = Selection()
  tier: TierKind = "auto"
  offload_dir: str | None = None
  max_batch: int = 1
  allow_host_tier_on_cpu: bool = False

  def __post_init__(self):
    if self.granularity not in ("sub_expert", "expert"):
      raise ValueError(f"granularity must be 'sub_expert' or 'expert', got {self.granularity!r}")
    if self.policy not in POLICIES:
      raise ValueError(f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
    if self.tier not in ("auto", "disk", "host"):
      raise ValueError(f"tier must be 'auto', 'disk' or 'host', got {self.tier!r}")
    if self.prefetch_limit is not None and self.prefetch_limit < 1:
      raise ValueError(f"prefetch_limit must be >= 1 or None, got {self.prefetch_limit}")
    if not isinstance(self.selection, Selection):
      raise ValueError(f"selection must be a Selection, got {type(self.selection).__name__}; "
                       "use Selection.parse('mass:0.9') for the text form")
    if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
      raise ValueError(f"max_batch must be an integer >= 1, got {self.max_batch!r}")

  def replace(self, **changes) -> OffloadConfig:
    return dataclasses.replace(self, **changes)
