"""Request checks before queueing: prompt and length limits, and the budget a request runs."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from serve.config import round_to_whole_experts
from serve.request import InvalidRequest, QoS, SamplingParams


@dataclasses.dataclass(frozen=True)
class Admission:
  """Limits of one engine: budgets 1..full_budget, tiers, context length, vocabulary."""

  full_budget: int
  num_sub_experts: int
  tiers: dict[str, int]
  max_len: int
  vocab_size: int
  has_tokenizer: bool
  whole_experts: bool
  default_budget: int

  def check_budget(self, budget: object, field: str) -> int:
    """Return `budget` as an int, or raise InvalidRequest naming `field` and the valid range."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or not 1 <= budget <= self.full_budget:
      raise InvalidRequest(field, f"{field} must be an integer in 1..{self.full_budget} (N={self.num_sub_experts} "
                           f"sub-experts x K={self.full_budget // self.num_sub_experts} experts), got {budget!r}")
    return int(budget)

  def resolve_budget(self, qos: QoS) -> int:
    """Resolve the budget a request runs: its own, its tier's or the default, rounded to whole experts if configured."""
    if qos.quality_tier is not None:
      if qos.quality_tier not in self.tiers:
        raise InvalidRequest("quality_tier", f"unknown quality_tier {qos.quality_tier!r}; expected one of "
                             f"{', '.join(self.tiers)}")
      budget = self.tiers[qos.quality_tier]
    elif qos.budget is not None:
      budget = self.check_budget(qos.budget, "budget")
    else:
      budget = self.default_budget
    if self.whole_experts:
      budget = round_to_whole_experts(budget, self.num_sub_experts)
    return budget

  def check_request(self, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
    """Raise InvalidRequest naming the field when the prompt or max_tokens cannot be served."""
    if len(prompt_ids) == 0:
      raise InvalidRequest("prompt", "the prompt is empty; give at least one token")
    bad = [t for t in prompt_ids if not 0 <= t < self.vocab_size]
    if bad:
      raise InvalidRequest("prompt", f"token ids {bad[:5]} are outside the vocabulary 0..{self.vocab_size - 1}")
    if len(prompt_ids) >= self.max_len:
      raise InvalidRequest("prompt", f"the prompt has {len(prompt_ids)} tokens but the context has {self.max_len} "
                           f"positions; shorten it to at most {self.max_len - 1} tokens")
    if len(prompt_ids) + sampling.max_tokens > self.max_len:
      raise InvalidRequest("max_tokens", f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) "
                           f"exceeds the context of {self.max_len} positions; set max_tokens <= "
                           f"{self.max_len - len(prompt_ids)}")
    if sampling.stop and not self.has_tokenizer:
      raise InvalidRequest("stop", "stop strings need a tokenizer, and this engine has none")
