"""Frozen, self-validating settings of the offline refactoring engine."""

from __future__ import annotations

import dataclasses
from typing import Literal

SolverName = Literal["evosax", "sa", "kmeans", "random", "identity"]
SOLVER_NAMES: tuple[str, ...] = ("evosax", "sa", "kmeans", "random", "identity")


def _require(condition: bool, message: str) -> None:
  if not condition:
    raise ValueError(message)


def _positive(name: str, value: object) -> None:
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f"{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ProfileConfig:
  """Calibration row shape, token limits and the number of activations kept per expert.

  At most `max_tokens` calibration tokens are used (all when None), and fewer than
  `min_tokens` is an error. Each expert keeps at most `max_tokens_per_expert` of the
  tokens routed to it (a uniform random subset), so the activations of one layer take at
  most E x max_tokens_per_expert x F floats.
  """

  sequence_length: int = 256
  batch_size: int = 8
  max_tokens: int | None = None
  max_tokens_per_expert: int = 1024
  min_tokens: int = 64
  seed: int = 0

  def __post_init__(self):
    for name in ("sequence_length", "batch_size", "max_tokens_per_expert", "min_tokens"):
      _positive(name, getattr(self, name))
    if self.max_tokens is not None:
      _positive("max_tokens", self.max_tokens)
      _require(self.max_tokens >= self.min_tokens,
               f"max_tokens ({self.max_tokens}) is below min_tokens ({self.min_tokens}); raise max_tokens")


@dataclasses.dataclass(frozen=True)
class EvosaxConfig:
  """The evolutionary search: SNES over random keys, then a swap polish.

  Every neuron gets a real-valued key; sorting the keys and cutting the order into N equal
  chunks gives the groups. The search starts, per expert, at the better of the greedy
  balanced split and balanced k-means (`seed_spread` is the gap between the keys of
  neighbouring groups, `std_init` the initial spread of the samples in units of that gap).

  The polish is a tabu search. Each step it applies the best of `polish_proposals` random
  swaps and, for every pair of groups, the `polish_per_pair`**2 swaps that a first-order
  gain estimate ranks highest, even when that swap raises the cost. A moved neuron stays
  put for `polish_tenure` steps. The best partition seen is kept; the polish stops after
  `polish_steps` steps or after `polish_patience` steps without improvement.

  The defaults were tuned on CPU (2 cores) with E=16, F=128, N=4 and 1024 tokens per
  expert, on planted and on clustered-input SwiGLU activations and on the trained
  reference model (tests/benchmarks/bench_partition.py). There the cost ended 0.3-1.5%
  below simulated annealing's (100k steps) on every layer, in about a third of its time.
  """

  population_size: int = 32
  generations: int = 128
  std_init: float = 0.5
  seed_spread: float = 1.0
  polish_steps: int = 1000
  polish_proposals: int = 4
  polish_patience: int = 400
  polish_per_pair: int = 3
  polish_tenure: int = 8

  def __post_init__(self):
    for name in ("population_size", "generations", "polish_proposals", "polish_patience",
                 "polish_per_pair", "polish_tenure"):
      _positive(name, getattr(self, name))
    _require(self.population_size >= 2, f"population_size must be >= 2, got {self.population_size}")
    _require(self.polish_steps >= 0, f"polish_steps must be >= 0, got {self.polish_steps}")
    _require(self.std_init > 0, f"std_init must be positive, got {self.std_init}")
    _require(self.seed_spread > 0, f"seed_spread must be positive, got {self.seed_spread}")


@dataclasses.dataclass(frozen=True)
class AnnealConfig:
  """Simulated annealing with equal-size swap moves; the defaults are the MoE-Prism paper's."""

  steps: int = 100_000
  initial_temperature: float = 100.0
  cooling: float = 0.995

  def __post_init__(self):
    _positive("steps", self.steps)
    _require(self.initial_temperature > 0, f"initial_temperature must be positive, got {self.initial_temperature}")
    _require(0 < self.cooling <= 1, f"cooling must be in (0, 1], got {self.cooling}")


@dataclasses.dataclass(frozen=True)
class KMeansConfig:
  """Balanced k-means of neurons on their normalized activation patterns."""

  iterations: int = 20

  def __post_init__(self):
    _positive("iterations", self.iterations)


@dataclasses.dataclass(frozen=True)
class SolverConfig:
  """Settings of every solver; `solve` reads the part that belongs to the chosen one."""

  evosax: EvosaxConfig = EvosaxConfig()
  sa: AnnealConfig = AnnealConfig()
  kmeans: KMeansConfig = KMeansConfig()


@dataclasses.dataclass(frozen=True)
class RouterTuningConfig:
  """Router-only fine-tuning of the linear router (expert weights frozen).

  `steps` = 0 keeps the parent router columns repeated N times. Training minimizes the
  squared error between the MoE layer output at a budget and the original layer output,
  averaged over budgets K..b, where b is annealed linearly from K up to N*K over the steps.
  At most `max_tokens` calibration inputs per layer are used (full batch). Gradients treat
  the top-b choice as a sigmoid of (logit - cut) / `temperature` (straight-through). Every
  `eval_every` steps the exact errors are measured; the best router seen (possibly the
  starting one) is kept.
  """

  steps: int = 0
  learning_rate: float = 1e-4
  max_tokens: int = 4096
  temperature: float = 0.1
  eval_every: int = 10

  def __post_init__(self):
    _require(self.steps >= 0, f"router tuning steps must be >= 0, got {self.steps}")
    _require(self.learning_rate > 0, f"learning_rate must be positive, got {self.learning_rate}")
    _positive("max_tokens", self.max_tokens)
    _require(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
    _positive("eval_every", self.eval_every)


@dataclasses.dataclass(frozen=True)
class PartitionConfig:
  """Everything `build_partition` needs besides the model and the calibration tokens."""

  num_sub_experts: int = 4
  solver: SolverName = "evosax"
  router: Literal["compound", "linear"] = "compound"
  keep: int = 1
  num_core_neurons: int = 4
  seed: int = 0
  profile: ProfileConfig = ProfileConfig()
  solvers: SolverConfig = SolverConfig()
  router_tuning: RouterTuningConfig = RouterTuningConfig()
  reference_solvers: tuple[str, ...] = ("random", "identity")

  def __post_init__(self):
    _positive("num_sub_experts", self.num_sub_experts)
    _require(self.solver in SOLVER_NAMES, f"solver {self.solver!r} is not one of {', '.join(SOLVER_NAMES)}")
    _require(self.router in ("compound", "linear"), f"router {self.router!r} is not one of compound, linear")
    _require(isinstance(self.keep, int) and 1 <= self.keep <= self.num_sub_experts,
             f"keep must be an integer in 1..num_sub_experts ({self.num_sub_experts}), got {self.keep!r}")
    _positive("num_core_neurons", self.num_core_neurons)
    for name in self.reference_solvers:
      _require(name in SOLVER_NAMES, f"reference solver {name!r} is not one of {', '.join(SOLVER_NAMES)}")
    _require(self.router_tuning.steps == 0 or self.router == "linear",
             f"router tuning ({self.router_tuning.steps} steps) trains the linear router; "
             f"set router='linear' or steps=0 (router is {self.router!r})")

  def check_width(self, width: int) -> None:
    """Raise unless N divides the expert width F and the cores fit in a sub-expert."""
    _require(width % self.num_sub_experts == 0,
             f"num_sub_experts={self.num_sub_experts} does not divide the expert width F={width}; "
             f"choose N among the divisors of {width}: {[d for d in range(1, width + 1) if width % d == 0]}")
    _require(self.num_core_neurons <= width // self.num_sub_experts,
             f"num_core_neurons={self.num_core_neurons} exceeds the sub-expert width "
             f"{width // self.num_sub_experts} (F={width} / N={self.num_sub_experts}); lower --num-core-neurons")
