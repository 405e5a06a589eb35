"""Swap polish: tabu search over a sampled swap neighbourhood, for every expert at once.

Each step scores, exactly and in parallel, a batch of random swaps plus the swaps that a
first-order gain estimate ranks highest (`swaps.guided_swaps`). It applies the best one
even when that raises the cost, so the search walks out of local minima. Neurons just moved
are tabu (not moved again) for `tenure` steps, unless a swap involving them beats the best
cost so far. The best partition seen is returned. The search stops after `steps` steps or
after `patience` steps in a row without a new best. Scoring many proposals per step suits
accelerators, where a step of simulated annealing (one proposal) leaves the device idle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from partition.objective import token_costs
from partition.solvers import swaps


def _polish_one(acts_FT: jax.Array, permutation_F: jax.Array, key: jax.Array, *, num_groups: int, keep: int,
                steps: int, proposals: int, per_pair: int, patience: int, tenure: int) -> tuple[jax.Array, jax.Array]:
  width = acts_FT.shape[0]
  group = width // num_groups
  per_pair = min(per_pair, group)
  masses_TN = swaps.masses_of(acts_FT, permutation_F, num_groups)
  cost = jnp.sum(token_costs(masses_TN, keep))

  def keep_going(carry):
    step, stall = carry[-2:]
    return (step < steps) & (stall < patience)

  def step_fn(carry):
    perm, masses, cost, best_perm, best_cost, tabu_until_F, step, stall = carry
    blocked_F = tabu_until_F[perm] > step
    p_random, q_random = swaps.random_swaps(jax.random.fold_in(key, step), (proposals,), width, num_groups)
    p_guided, q_guided = swaps.guided_swaps(acts_FT, perm, masses, keep, per_pair, blocked_F)
    p_M = jnp.concatenate([p_guided, p_random])
    q_M = jnp.concatenate([q_guided, q_random])
    cost_M, masses_MTN = swaps.swap_costs(acts_FT, perm, masses, p_M, q_M, group, keep)
    # A margin keeps float rounding from counting a tie with the best as progress.
    new_best_M = cost_M < best_cost - 1e-6 * (jnp.abs(best_cost) + 1.0)
    allowed_M = (~blocked_F[p_M] & ~blocked_F[q_M]) | new_best_M
    choice = jnp.argmin(jnp.where(allowed_M, cost_M, jnp.inf))
    move = allowed_M[choice]
    p, q = p_M[choice], q_M[choice]
    moved = jnp.stack([perm[p], perm[q]])
    perm = jnp.where(move, swaps.apply_swap(perm, p, q), perm)
    masses = jnp.where(move, masses_MTN[choice], masses)
    cost = jnp.where(move, cost_M[choice], cost)
    tabu_until_F = jnp.where(move, tabu_until_F.at[moved].set(step + 1 + tenure), tabu_until_F)
    improved = move & new_best_M[choice]
    best_perm = jnp.where(improved, perm, best_perm)
    best_cost = jnp.where(improved, cost, best_cost)
    stall = jnp.where(improved, 0, stall + 1)
    return perm, masses, cost, best_perm, best_cost, tabu_until_F, step + 1, stall

  init = (permutation_F, masses_TN, cost, permutation_F, cost, jnp.zeros((width,), jnp.int32), jnp.int32(0),
          jnp.int32(0))
  carry = jax.lax.while_loop(keep_going, step_fn, init)
  return carry[3], carry[6]


def proposals_per_step(width: int, num_groups: int, proposals: int, per_pair: int) -> int:
  pairs = num_groups * (num_groups - 1) // 2
  return proposals + pairs * min(per_pair, width // num_groups) ** 2


@functools.partial(jax.jit, static_argnames=("num_groups", "keep", "steps", "proposals", "per_pair", "patience",
                                             "tenure"))
def polish(acts_ETF: jax.Array, permutation_EF: jax.Array, key: jax.Array, *, num_groups: int, keep: int,
           steps: int, proposals: int, per_pair: int, patience: int, tenure: int) -> tuple[jax.Array, jax.Array]:
  """Polish every expert; returns permutations [E, F] and the steps each expert ran [E]."""
  keys = jax.random.split(key, acts_ETF.shape[0])
  run = functools.partial(_polish_one, num_groups=num_groups, keep=keep, steps=steps, proposals=proposals,
                          per_pair=per_pair, patience=patience, tenure=tenure)
  return jax.vmap(lambda acts_TF, perm, k: run(acts_TF.T, perm, k))(acts_ETF, permutation_EF, keys)
