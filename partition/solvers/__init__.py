"""Partition solvers behind one interface: `solve(name, acts_ETF, num_sub_experts, keep, key, config)`.

evosax:   greedy or k-means split (per expert, the better), SNES over random keys, tabu swap polish (the product).
sa:       greedy split, simulated annealing with equal-size swaps (the MoE-Prism paper's solver).
kmeans:   balanced k-means on normalized activation patterns.
random:   a uniformly random equal split.
identity: contiguous groups of neurons, as stored in the checkpoint.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from partition.config import SOLVER_NAMES, SolverConfig
from partition.objective import expert_costs
from partition.solvers.annealing import anneal
from partition.solvers.base import SolveResult, check_partition, identity_permutations, permutation_from_labels
from partition.solvers.evolution import evolve
from partition.solvers.greedy import greedy_permutations
from partition.solvers.kmeans import balanced_kmeans
from partition.solvers.polish import polish, proposals_per_step

Stages = dict[str, jax.Array]


def _better_of(acts, first, second, n, keep) -> jax.Array:
  """Pick, per expert, the lower-cost of two permutations [E, F]."""
  first_wins = expert_costs(acts, first, n, keep) <= expert_costs(acts, second, n, keep)
  return jnp.where(first_wins[:, None], first, second)


def _evosax(acts, n, keep, key, config: SolverConfig) -> tuple[jax.Array, Stages, int]:
  cfg = config.evosax
  num_experts, _, width = acts.shape
  key_search, key_polish = jax.random.split(key)
  greedy = greedy_permutations(acts, n, keep)
  # Greedy and k-means get stuck in different experts, so each expert starts from the better one.
  clustered = balanced_kmeans(acts, greedy, num_groups=n, iterations=config.kmeans.iterations)
  start = _better_of(acts, greedy, clustered, n, keep)
  searched = evolve(acts, start, key_search, num_groups=n, keep=keep, config=cfg)
  polished, steps_E = polish(acts, searched, key_polish, num_groups=n, keep=keep, steps=cfg.polish_steps,
                             proposals=cfg.polish_proposals, per_pair=cfg.polish_per_pair,
                             patience=cfg.polish_patience, tenure=cfg.polish_tenure)
  per_step = proposals_per_step(width, n, cfg.polish_proposals, cfg.polish_per_pair)
  evaluations = (num_experts * (width * n + config.kmeans.iterations + cfg.population_size * cfg.generations)
                 + int(jnp.sum(steps_E)) * per_step)
  stages = {"greedy": greedy, "kmeans": clustered, "start": start, "search": searched, "polish": polished}
  return polished, stages, evaluations


def _sa(acts, n, keep, key, config: SolverConfig) -> tuple[jax.Array, Stages, int]:
  num_experts, _, width = acts.shape
  greedy = greedy_permutations(acts, n, keep)
  annealed = anneal(acts, greedy, key, num_groups=n, keep=keep, config=config.sa)
  return annealed, {"greedy": greedy, "anneal": annealed}, num_experts * (width * n + config.sa.steps)


def _kmeans(acts, n, keep, key, config: SolverConfig) -> tuple[jax.Array, Stages, int]:
  greedy = greedy_permutations(acts, n, keep)
  clustered = balanced_kmeans(acts, greedy, num_groups=n, iterations=config.kmeans.iterations)
  return clustered, {"greedy": greedy, "kmeans": clustered}, acts.shape[0] * config.kmeans.iterations


def _random(acts, n, keep, key, config: SolverConfig) -> tuple[jax.Array, Stages, int]:
  num_experts, _, width = acts.shape
  keys = jax.random.split(key, num_experts)
  perm = jax.vmap(lambda k: jax.random.permutation(k, width))(keys).astype(jnp.int32)
  return perm, {}, num_experts


def _identity(acts, n, keep, key, config: SolverConfig) -> tuple[jax.Array, Stages, int]:
  num_experts, _, width = acts.shape
  return jnp.asarray(identity_permutations(num_experts, width)), {}, num_experts


SOLVERS: dict[str, Callable] = {"evosax": _evosax, "sa": _sa, "kmeans": _kmeans, "random": _random,
                                "identity": _identity}
assert tuple(SOLVERS) == SOLVER_NAMES


def solve(name: str, acts_ETF, num_sub_experts: int, keep: int, key: jax.Array,
          config: SolverConfig = SolverConfig()) -> SolveResult:
  """Split the F neurons of each of E experts into `num_sub_experts` equal groups.

  acts_ETF: |a_j(x_t)| of each expert on its calibration tokens, zero rows for padding.
  Returns permutations [E, F] whose consecutive chunks of F/N positions are the groups.
  """
  if name not in SOLVERS:
    raise ValueError(f"unknown solver {name!r}; expected one of {', '.join(SOLVERS)}")
  acts = jnp.asarray(acts_ETF, jnp.float32)
  if acts.ndim != 3:
    raise ValueError(f"activations must be [E, T, F], got shape {acts.shape}")
  num_experts, _, width = acts.shape
  if num_sub_experts < 1 or width % num_sub_experts:
    raise ValueError(f"num_sub_experts={num_sub_experts} does not divide the expert width F={width}")
  if not 1 <= keep <= num_sub_experts:
    raise ValueError(f"keep must be in 1..{num_sub_experts}, got {keep}")

  start = time.perf_counter()
  if num_sub_experts == 1:
    perm, stages, evaluations = _identity(acts, 1, keep, key, config)
  else:
    perm, stages, evaluations = SOLVERS[name](acts, num_sub_experts, keep, key, config)
  perm = np.asarray(jax.block_until_ready(perm))
  seconds = time.perf_counter() - start

  check_partition(perm, num_experts, width)
  cost_E = np.asarray(expert_costs(acts, perm, num_sub_experts, keep))
  stage_costs = {stage: float(np.sum(expert_costs(acts, p, num_sub_experts, keep))) for stage, p in stages.items()}
  return SolveResult(perm, cost_E, int(evaluations), seconds, stage_costs)


__all__ = ["SOLVERS", "SolveResult", "solve", "permutation_from_labels", "greedy_permutations"]
