"""Simulated annealing over equal-size swaps: the MoE-Prism paper's solver, as a baseline.

From the greedy balanced split, each step proposes one random swap between two groups,
accepts it when it lowers the cost or with probability exp(-delta / temperature), and
multiplies the temperature by `cooling`. The best partition seen is kept. MoE-Prism
(Xia et al., arXiv 2510.19366) uses 100k steps, initial temperature 100 and cooling 0.995
per step. All experts
of a layer anneal side by side in one `lax.scan`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from partition.config import AnnealConfig
from partition.objective import token_costs
from partition.solvers import swaps


def _anneal_one(acts_FT: jax.Array, permutation_F: jax.Array, key: jax.Array, *, num_groups: int, keep: int,
                steps: int, initial_temperature: float, cooling: float) -> tuple[jax.Array, jax.Array]:
  width = acts_FT.shape[0]
  group = width // num_groups
  key_swaps, key_accept = jax.random.split(key)
  p_S, q_S = swaps.random_swaps(key_swaps, (steps,), width, num_groups)
  uniform_S = jax.random.uniform(key_accept, (steps,))
  masses_TN = swaps.masses_of(acts_FT, permutation_F, num_groups)
  cost = jnp.sum(token_costs(masses_TN, keep))

  def step(carry, xs):
    perm, masses, cost, best_perm, best_cost, temperature = carry
    p, q, u = xs
    new_masses = swaps.swapped_masses(acts_FT, perm, masses, p, q, group)
    new_cost = jnp.sum(token_costs(new_masses, keep))
    delta = new_cost - cost
    accept = (delta <= 0) | (u < jnp.exp(-delta / temperature))
    perm = jnp.where(accept, swaps.apply_swap(perm, p, q), perm)
    masses = jnp.where(accept, new_masses, masses)
    cost = jnp.where(accept, new_cost, cost)
    better = cost < best_cost
    best_perm = jnp.where(better, perm, best_perm)
    best_cost = jnp.where(better, cost, best_cost)
    return (perm, masses, cost, best_perm, best_cost, temperature * cooling), None

  init = (permutation_F, masses_TN, cost, permutation_F, cost, jnp.float32(initial_temperature))
  (_, _, _, best_perm, best_cost, _), _ = jax.lax.scan(step, init, (p_S, q_S, uniform_S))
  return best_perm, best_cost


@functools.partial(jax.jit, static_argnames=("num_groups", "keep", "config"))
def anneal(acts_ETF: jax.Array, permutation_EF: jax.Array, key: jax.Array, *, num_groups: int, keep: int,
           config: AnnealConfig) -> jax.Array:
  """Anneal every expert from `permutation_EF`; returns the best permutations [E, F]."""
  keys = jax.random.split(key, acts_ETF.shape[0])
  run = functools.partial(_anneal_one, num_groups=num_groups, keep=keep, steps=config.steps,
                          initial_temperature=config.initial_temperature, cooling=config.cooling)
  best_perm, _ = jax.vmap(lambda acts_TF, perm, k: run(acts_TF.T, perm, k))(acts_ETF, permutation_EF, keys)
  return best_perm
