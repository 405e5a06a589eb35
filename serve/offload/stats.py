"""Offloading statistics: per-step records and running totals.

A hit or miss counts one unit (a sub-expert, or a whole expert at expert granularity) that
one MoE layer needed in one step, however many tokens used it. Sub-expert counts are summed
over tokens and MoE layers, so `sub_experts_per_token` is per token per MoE layer, the same
unit as the budget.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Counters:
  """Counters of offloading work, recorded per step and summed unchanged into the totals.

  tokens: valid (non-padding) tokens. requested / run: candidate sub-experts of the budget
  and those that ran, summed over tokens and MoE layers. mass_requested / mass_run: their
  routing mass. hits / misses: units found in / missing from the cache. bytes_fetched: bytes
  copied from the slow tier into the cache. prefetched: misses whose data the prefetcher had
  already read; prefetch_wasted_bytes: bytes it read that no layer used. stall_s: time spent
  waiting for expert data (reads, waits on the prefetcher and cache writes). seconds: wall time.
  """

  tokens: int = 0
  requested: int = 0
  run: int = 0
  mass_requested: float = 0.0
  mass_run: float = 0.0
  hits: int = 0
  misses: int = 0
  bytes_fetched: int = 0
  prefetched: int = 0
  prefetch_wasted_bytes: int = 0
  stall_s: float = 0.0
  seconds: float = 0.0

  @property
  def hit_rate(self) -> float:
    accesses = self.hits + self.misses
    return self.hits / accesses if accesses else 1.0

  @property
  def mass_coverage(self) -> float:
    """Fraction of the candidates' routing mass that ran."""
    return self.mass_run / self.mass_requested if self.mass_requested > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class StepStats(Counters):
  """One forward call in offload mode: the `Counters`, plus what only a step has.

  moe_layers: MoE layers the call ran. min_run_per_token: the minimum number of sub-experts a
  token ran in a MoE layer. waves: extra passes over MoE layers whose units did not fit the
  cache at once (0 when every layer fit). error: why the step failed, or None.
  """

  moe_layers: int = 0
  min_run_per_token: int = 0
  waves: int = 0
  error: str | None = None

  @property
  def sub_experts_per_token(self) -> float:
    """Sub-experts run per token per MoE layer."""
    return self.run / max(self.tokens * self.moe_layers, 1)


@dataclasses.dataclass(frozen=True)
class OffloadStats(Counters):
  """Totals over every step since the model was built or `reset_stats` was called."""

  steps: int = 0
  failed_steps: int = 0
  moe_token_layers: int = 0

  def add(self, step: StepStats) -> OffloadStats:
    sums = {f.name: getattr(self, f.name) + getattr(step, f.name) for f in dataclasses.fields(Counters)}
    return dataclasses.replace(self, steps=self.steps + 1, failed_steps=self.failed_steps + (step.error is not None),
                               moe_token_layers=self.moe_token_layers + step.tokens * step.moe_layers, **sums)

  @property
  def stall_s_per_token(self) -> float:
    return self.stall_s / max(self.tokens, 1)

  @property
  def bytes_per_token(self) -> float:
    return self.bytes_fetched / max(self.tokens, 1)

  @property
  def sub_experts_per_token(self) -> float:
    """Sub-experts run per token per MoE layer."""
    return self.run / max(self.moe_token_layers, 1)
