"""Counting what one offload forward does."""

from __future__ import annotations

import dataclasses

import numpy as np

from serve.offload.stats import StepStats


@dataclasses.dataclass
class StepRecorder:
  """Mutable counters of one forward call; `finish` freezes them into a `StepStats`."""

  tokens: int
  moe_layers: int = 0
  requested: int = 0
  run: int = 0
  min_run_per_token: int | None = None
  mass_requested: float = 0.0
  mass_run: float = 0.0
  hits: int = 0
  misses: int = 0
  bytes_fetched: int = 0
  prefetched: int = 0
  prefetch_wasted_bytes: int = 0
  stall_s: float = 0.0
  waves: int = 0
  error: str | None = None

  def count_candidates(self, valid_SA: np.ndarray, run_SA: np.ndarray, mass_SA: np.ndarray) -> None:
    """Add one MoE layer's candidates and what ran; padding tokens (no valid candidate) are left out."""
    self.moe_layers += 1
    self.requested += int(valid_SA.sum())
    self.run += int(run_SA.sum())
    self.mass_requested += float(np.sum(mass_SA, where=valid_SA))
    self.mass_run += float(np.sum(mass_SA, where=run_SA))
    tokens_S = valid_SA.any(axis=1)
    if tokens_S.any():
      fewest = int(run_SA.sum(axis=1)[tokens_S].min())
      self.min_run_per_token = fewest if self.min_run_per_token is None else min(self.min_run_per_token, fewest)

  def finish(self, seconds: float) -> StepStats:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(StepStats) if hasattr(self, f.name)}
    fields["min_run_per_token"] = self.min_run_per_token or 0
    return StepStats(**fields, seconds=seconds)
