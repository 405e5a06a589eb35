"""Synthetic serving workloads (Poisson arrivals, QoS budgets, TTFT deadlines) and how to replay them.

`replay_realtime` submits on the wall clock to a started engine. `replay_simulated` drives an
unstarted engine over a `StubRunner` in virtual time, where each step costs what the latency
table predicts, so policies compare without timing noise.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Sequence

import numpy as np

from serve.config import smallest_fitting
from serve.engine import Engine
from serve.latency import LatencyTable
from serve.request import Completion, QoS, QueueFull, SamplingParams
from serve.testing import ManualClock

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
  """Arrival rate and duration, prompt and output lengths, budgets and deadlines.

  Prompt lengths are log-normal around `prompt_median`. Budgets are normal around the middle of
  1..N*K with standard deviation `budget_spread` x N*K, rounded and clipped. Each request's TTFT
  deadline is `slo_scale` x (predicted prefill step of its prompt alone at the full budget + one
  full-batch decode step at the full budget), from the latency table.
  """

  rate: float
  duration_s: float = 5.0
  prompt_median: int = 24
  prompt_sigma: float = 0.6
  prompt_min: int = 4
  prompt_max: int = 96
  max_tokens_min: int = 4
  max_tokens_max: int = 16
  budget_spread: float = 0.2
  slo_scale: float = 4.0
  seed: int = 0

  def __post_init__(self):
    if not self.rate > 0:
      raise ValueError(f"rate must be positive (requests per second), got {self.rate}")
    if not self.duration_s > 0:
      raise ValueError(f"duration_s must be positive, got {self.duration_s}")
    if not 1 <= self.prompt_min <= self.prompt_median <= self.prompt_max:
      raise ValueError(f"need 1 <= prompt_min <= prompt_median <= prompt_max, got {self.prompt_min}, "
                       f"{self.prompt_median}, {self.prompt_max}")
    if not 1 <= self.max_tokens_min <= self.max_tokens_max:
      raise ValueError(f"need 1 <= max_tokens_min <= max_tokens_max, got {self.max_tokens_min}, "
                       f"{self.max_tokens_max}")


@dataclasses.dataclass(frozen=True)
class WorkItem:
  """One request of a workload: arrival offset in seconds, prompt, output length, budget, deadline."""

  arrival_s: float
  prompt_ids: tuple[int, ...]
  max_tokens: int
  budget: int
  ttft_deadline_s: float


def make_workload(config: WorkloadConfig, *, vocab_size: int, full_budget: int, latency: LatencyTable,
                  batch_buckets: Sequence[int], token_buckets: Sequence[int]) -> list[WorkItem]:
  rng = np.random.default_rng(config.seed)
  items = []
  now = rng.exponential(1 / config.rate)
  largest_chunk = max(token_buckets)
  while now < config.duration_s:
    length = int(np.clip(round(config.prompt_median * rng.lognormal(0.0, config.prompt_sigma)), config.prompt_min,
                         config.prompt_max))
    budget = int(np.clip(round(rng.normal((full_budget + 1) / 2, config.budget_spread * full_budget)), 1,
                         full_budget))
    chunk = smallest_fitting(tuple(sorted({1, *token_buckets})), min(length, largest_chunk))
    chunks = -(-length // largest_chunk)
    prefill = chunks * latency.predict(1, chunk, full_budget)
    decode = latency.predict(max(batch_buckets), 1, full_budget)
    items.append(WorkItem(
        arrival_s=float(now),
        prompt_ids=tuple(int(t) for t in rng.integers(1, vocab_size, length)),
        max_tokens=int(rng.integers(config.max_tokens_min, config.max_tokens_max + 1)),
        budget=budget,
        ttft_deadline_s=config.slo_scale * (prefill + decode),
    ))
    now += rng.exponential(1 / config.rate)
  return items


@dataclasses.dataclass(frozen=True)
class ReplayResult:
  """Completions of a replay (None where the queue rejected the request) and the arrival window."""

  completions: list[Completion | None]
  duration_s: float

  @property
  def requests(self) -> int:
    return len(self.completions)

  def ttfts(self) -> np.ndarray:
    """TTFT of every request in seconds; rejected or failed requests count as infinite."""
    return np.array([np.inf if c is None or c.ttft_s is None else c.ttft_s for c in self.completions])

  @property
  def slo_met(self) -> int:
    return sum(1 for c in self.completions if c is not None and c.deadline_met)

  @property
  def attainment(self) -> float:
    return self.slo_met / max(self.requests, 1)

  @property
  def goodput(self) -> float:
    """Requests per second that met their TTFT deadline."""
    return self.slo_met / self.duration_s

  def ttft_percentile(self, q: float) -> float:
    return float(np.percentile(self.ttfts(), q)) if self.requests else float("nan")

  @property
  def mean_budget_run(self) -> float:
    runs = [c.budget_run_mean for c in self.completions if c is not None and c.budget_run]
    return float(np.mean(runs)) if runs else float("nan")


def _submit(engine: Engine, item: WorkItem, arrival: float | None = None):
  sampling = SamplingParams(max_tokens=item.max_tokens)
  qos = QoS(budget=item.budget, ttft_deadline_s=item.ttft_deadline_s)
  try:
    return engine.submit(item.prompt_ids, sampling, qos, arrival=arrival)
  except QueueFull:
    logger.info("queue full: request at %.3f s rejected", item.arrival_s)
    return None


def replay_realtime(engine: Engine, items: Sequence[WorkItem], duration_s: float, timeout_s: float = 120.0
                    ) -> ReplayResult:
  """Submit each item at its arrival time (wall clock) to a started engine and wait for all of them."""
  start = time.monotonic()
  handles = []
  for item in items:
    delay = start + item.arrival_s - time.monotonic()
    if delay > 0:
      time.sleep(delay)
    handles.append(_submit(engine, item))
  deadline = time.monotonic() + timeout_s
  completions = [None if h is None else h.result(max(deadline - time.monotonic(), 0.0)) for h in handles]
  return ReplayResult(completions, duration_s)


def replay_simulated(engine: Engine, clock: ManualClock, items: Sequence[WorkItem], duration_s: float
                     ) -> ReplayResult:
  """Replay in virtual time on an unstarted engine whose runner advances `clock` per step."""
  start = clock.now
  handles = []
  index = 0
  while True:
    while index < len(items) and start + items[index].arrival_s <= clock.now:
      handles.append(_submit(engine, items[index], arrival=start + items[index].arrival_s))
      index += 1
    if engine.step() is None:
      if index == len(items):
        break
      clock.now = max(clock.now, start + items[index].arrival_s)
  return ReplayResult([None if h is None else h.result(0) for h in handles], duration_s)
