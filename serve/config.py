"""Typed, frozen settings of the serving engine: buckets, budgets, quality tiers, policy."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal, NamedTuple

Policy = Literal["fcfs", "edf", "throughput", "per_row"]
POLICIES: tuple[str, ...] = ("fcfs", "edf", "throughput", "per_row")

# Quality tiers as fractions of the full budget N*K; `resolve_tiers` turns them into budgets.
DEFAULT_TIERS: tuple[tuple[str, float], ...] = (("full", 1.0), ("high", 0.75), ("balanced", 0.5), ("economy", 0.25))

DEFAULT_COMPILATION_CACHE = Path("~/.cache/prism-jax/jax-compilation")


class Program(NamedTuple):
  """One compiled shape: `batch` rows x `tokens` tokens at static `budget`."""

  batch: int
  tokens: int
  budget: int


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def bucket_sizes(maximum: int, linear_step: int, minimum: int = 1) -> tuple[int, ...]:
  """Powers of two from `minimum` below `linear_step`, then multiples of `linear_step` up to `maximum`.

  bucket_sizes(64, 16) == (1, 2, 4, 8, 16, 32, 48, 64); the last bucket is always `maximum`.
  """
  _require(1 <= minimum <= maximum, f"bucket sizes need 1 <= minimum <= maximum, got {minimum} and {maximum}")
  _require(linear_step >= 1, f"linear_step must be >= 1, got {linear_step}")
  sizes = []
  size = minimum
  while size < min(linear_step, maximum):
    sizes.append(size)
    size *= 2
  size = max(linear_step, sizes[-1] * 2 if sizes else minimum)
  size = math.ceil(size / linear_step) * linear_step
  while size < maximum:
    sizes.append(size)
    size += linear_step
  sizes.append(maximum)
  return tuple(sorted(set(sizes)))


def smallest_fitting(sizes: tuple[int, ...], needed: int) -> int:
  """Return the smallest size >= `needed`; raise ValueError when `needed` exceeds every size."""
  for size in sizes:
    if size >= needed:
      return size
  raise ValueError(f"{needed} does not fit any bucket size {sizes}")


def _check_sizes(name: str, sizes: tuple[int, ...]) -> None:
  _require(isinstance(sizes, tuple) and len(sizes) > 0, f"{name} must be a non-empty tuple, got {sizes!r}")
  _require(all(isinstance(s, int) and s >= 1 for s in sizes), f"{name} must hold positive integers, got {sizes}")
  _require(list(sizes) == sorted(set(sizes)), f"{name} must be strictly increasing, got {sizes}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Settings of `serve.Engine`.

  batch_buckets: compiled batch sizes (rows per step); the largest is the number of KV-cache
    slots, that is, how many requests run at once.
  token_buckets: compiled prefill chunk lengths; decode steps always use 1 token per row.
    Prompts longer than the largest bucket are prefilled in several chunks.
  budgets: static budgets to compile, or None for the full budget plus every tier's budget.
    A request whose budget is not compiled runs in the next larger program with its row
    masked to its own budget (per-row budgets), so every budget 1..N*K is served exactly.
  max_len: KV-cache positions per slot (prompt + completion), or None for the model's
    max_position_embeddings.
  max_queue: waiting requests beyond which `submit` raises `QueueFull` (HTTP 429).
  policy: fcfs | edf | throughput | per_row, see `serve.scheduler`.
  tiers: (name, fraction of the full budget) pairs; a request may name a tier instead of a budget.
  default_budget: budget of requests that give neither budget nor tier; None = full budget.
  whole_experts: round every request budget up to a multiple of N, which restricts the engine
    to what the unsplit model offers (the baseline of the scheduling benchmark).
  compilation_cache_dir: JAX persistent compilation cache directory, None to leave it off.
  compile_workers: threads that compile programs at start-up.
  profile_repeats: when no latency table is given, time each program this many times at
    start-up to build one (0 = predict from a flat guess instead).
  seed: seeds requests that give no seed of their own.
  """

  batch_buckets: tuple[int, ...] = (1, 4)
  token_buckets: tuple[int, ...] = (32,)
  budgets: tuple[int, ...] | None = None
  max_len: int | None = None
  max_queue: int = 64
  policy: Policy = "fcfs"
  tiers: tuple[tuple[str, float], ...] = DEFAULT_TIERS
  default_budget: int | None = None
  whole_experts: bool = False
  compilation_cache_dir: str | None = str(DEFAULT_COMPILATION_CACHE)
  compile_workers: int = 2
  profile_repeats: int = 3
  seed: int = 0

  def __post_init__(self):
    _check_sizes("batch_buckets", self.batch_buckets)
    _check_sizes("token_buckets", self.token_buckets)
    if self.budgets is not None:
      _check_sizes("budgets", self.budgets)
    _require(self.max_len is None or self.max_len >= 2, f"max_len must be >= 2, got {self.max_len}")
    _require(self.max_queue >= 1, f"max_queue must be >= 1, got {self.max_queue}")
    _require(self.policy in POLICIES, f"policy {self.policy!r} is not one of {', '.join(POLICIES)}")
    names = [name for name, _ in self.tiers]
    _require(len(names) == len(set(names)), f"tier names must be unique, got {names}")
    for name, fraction in self.tiers:
      _require(isinstance(name, str) and name.isidentifier(), f"tier name {name!r} must be an identifier")
      _require(0 < fraction <= 1, f"tier {name!r}: fraction of the full budget must be in (0, 1], got {fraction}")
    _require(self.compile_workers >= 1, f"compile_workers must be >= 1, got {self.compile_workers}")
    _require(self.profile_repeats >= 0, f"profile_repeats must be >= 0, got {self.profile_repeats}")

  @property
  def max_batch(self) -> int:
    return self.batch_buckets[-1]

  @property
  def max_chunk(self) -> int:
    return self.token_buckets[-1]

  @property
  def step_token_sizes(self) -> tuple[int, ...]:
    """Token buckets of all compiled programs: 1 for decode plus the prefill chunks."""
    return tuple(sorted({1, *self.token_buckets}))

  def resolve_tiers(self, full_budget: int) -> dict[str, int]:
    """Tier name -> budget for a model whose full budget is `full_budget` (at least 1)."""
    return {name: max(1, min(full_budget, round(fraction * full_budget))) for name, fraction in self.tiers}

  def resolve_budgets(self, full_budget: int, num_sub_experts: int) -> tuple[int, ...]:
    """Static budgets to compile for a model, validated against 1..full_budget."""
    if self.budgets is None:
      budgets = {full_budget, *self.resolve_tiers(full_budget).values()}
    else:
      budgets = set(self.budgets)
      _require(max(budgets) <= full_budget,
               f"compiled budgets {sorted(budgets)} exceed the model's full budget {full_budget} (N*K)")
      budgets.add(full_budget)
    if self.whole_experts:
      budgets = {round_to_whole_experts(b, num_sub_experts) for b in budgets}
    return tuple(sorted(budgets))

  def programs(self, full_budget: int, num_sub_experts: int) -> tuple[Program, ...]:
    """List every (batch bucket, token bucket, budget) program the engine compiles."""
    budgets = self.resolve_budgets(full_budget, num_sub_experts)
    return tuple(Program(b, t, k) for b in self.batch_buckets for t in self.step_token_sizes for k in budgets)

  def cache_dir(self) -> Path | None:
    if self.compilation_cache_dir is None:
      return None
    return Path(os.path.expanduser(self.compilation_cache_dir))

  def replace(self, **changes) -> EngineConfig:
    return dataclasses.replace(self, **changes)


def round_to_whole_experts(budget: int, num_sub_experts: int) -> int:
  """Round a budget up to the next multiple of N: whole experts only."""
  return -(-budget // num_sub_experts) * num_sub_experts
