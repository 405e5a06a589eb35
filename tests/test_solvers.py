"""Solvers: valid equal-size partitions, and near-optimal costs on planted problems."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from partition.config import AnnealConfig, EvosaxConfig, KMeansConfig, SolverConfig
from partition.objective import expert_costs
from partition.planted import planted_problem
from partition.solvers import SOLVERS, solve
from partition.solvers.annealing import anneal
from partition.solvers.evolution import evolve
from partition.solvers.polish import polish

SMALL = SolverConfig(
    evosax=EvosaxConfig(population_size=16, generations=16, polish_steps=300),
    sa=AnnealConfig(steps=20_000),
    kmeans=KMeansConfig(iterations=5),
)


@pytest.fixture(scope="module")
def problem():
  # Heavy secondary activity and noise, so the greedy start alone is far from the optimum.
  return planted_problem(num_experts=3, num_tokens=192, width=48, num_groups=4, seed=1, noise=0.3, secondary=0.8,
                         secondary_strength=0.6)


@pytest.fixture(scope="module")
def planted_cost(problem):
  return float(np.sum(expert_costs(problem.acts_ETF, problem.permutation_EF, 4)))


def random_start(num_experts, width, seed=5):
  keys = jax.random.split(jax.random.key(seed), num_experts)
  return jax.vmap(lambda k: jax.random.permutation(k, width))(keys).astype(jnp.int32)


def check_equal_split(problem, name, num_groups, keep):
  result = solve(name, problem.acts_ETF, num_groups, keep, jax.random.key(0), SMALL)
  perm = result.permutation_EF
  assert perm.shape == (3, 48)
  for e in range(3):
    assert sorted(perm[e].tolist()) == list(range(48)), f"{name}: expert {e} is not a permutation"
  want = np.asarray(expert_costs(problem.acts_ETF, perm, num_groups, keep))
  assert np.allclose(result.cost_E, want, rtol=1e-5), f"{name}: reported {result.cost_E}, recomputed {want}"
  return result


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_solver_returns_equal_split(problem, name):
  check_equal_split(problem, name, 4, 1)


@pytest.mark.slow
@pytest.mark.parametrize("num_groups,keep", [(2, 1), (4, 2)])
def test_other_group_counts_and_keep(problem, num_groups, keep):
  greedy = check_equal_split(problem, "sa", num_groups, keep).stages["greedy"]
  annealed = check_equal_split(problem, "sa", num_groups, keep).cost
  assert annealed <= greedy, f"annealing ended above its greedy start: {annealed:.1f} > {greedy:.1f}"


@pytest.mark.parametrize("name", ["evosax", "sa"])
def test_search_solvers_reach_planted_optimum(problem, planted_cost, name):
  result = solve(name, problem.acts_ETF, 4, 1, jax.random.key(0), SMALL)
  ratio = result.cost / planted_cost
  assert ratio <= 1.05, f"{name}: cost {result.cost:.1f} is {ratio:.3f} x the planted {planted_cost:.1f}"


@pytest.mark.parametrize("name", ["random", "identity"])
def test_baselines_stay_far_from_optimum(problem, planted_cost, name):
  ratio = solve(name, problem.acts_ETF, 4, 1, jax.random.key(0), SMALL).cost / planted_cost
  assert ratio > 1.2, f"{name}: cost ratio {ratio:.3f} to the planted optimum is suspiciously good"


@pytest.mark.slow
def test_annealing_from_random_start(problem, planted_cost):
  acts = jnp.asarray(problem.acts_ETF)
  start = random_start(3, 48)
  best = anneal(acts, start, jax.random.key(1), num_groups=4, keep=1, config=AnnealConfig(steps=20_000))
  start_ratio = float(np.sum(expert_costs(acts, start, 4))) / planted_cost
  ratio = float(np.sum(expert_costs(acts, best, 4))) / planted_cost
  assert start_ratio > 1.2, f"random start ratio {start_ratio:.3f}"
  assert ratio <= 1.05, f"annealing from a random start ended at {ratio:.3f} x the planted optimum"


@pytest.mark.slow
def test_search_and_polish_from_random_start(problem, planted_cost):
  acts = jnp.asarray(problem.acts_ETF)
  start = random_start(3, 48)
  cfg = SMALL.evosax
  searched = evolve(acts, start, jax.random.key(1), num_groups=4, keep=1, config=cfg)
  polished, steps = polish(acts, searched, jax.random.key(2), num_groups=4, keep=1, steps=cfg.polish_steps,
                           proposals=cfg.polish_proposals, per_pair=cfg.polish_per_pair,
                           patience=cfg.polish_patience, tenure=cfg.polish_tenure)
  start_cost = float(np.sum(expert_costs(acts, start, 4)))
  searched_cost = float(np.sum(expert_costs(acts, searched, 4)))
  ratio = float(np.sum(expert_costs(acts, polished, 4))) / planted_cost
  assert searched_cost < start_cost, f"SNES did not improve on its start: {searched_cost:.1f} >= {start_cost:.1f}"
  assert ratio <= 1.05, f"search + polish from a random start ended at {ratio:.3f} x the planted optimum"
  assert np.all(np.asarray(steps) >= 1)


def test_single_group_is_identity(problem):
  result = solve("evosax", problem.acts_ETF, 1, 1, jax.random.key(0), SMALL)
  assert np.array_equal(result.permutation_EF, np.tile(np.arange(48), (3, 1)))


def test_solver_rejects_bad_arguments(problem):
  with pytest.raises(ValueError, match="does not divide"):
    solve("sa", problem.acts_ETF, 5, 1, jax.random.key(0), SMALL)
  with pytest.raises(ValueError, match="unknown solver"):
    solve("genetic", problem.acts_ETF, 4, 1, jax.random.key(0), SMALL)
  with pytest.raises(ValueError, match="keep"):
    solve("sa", problem.acts_ETF, 4, 5, jax.random.key(0), SMALL)
