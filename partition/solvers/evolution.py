"""The product solver: evosax SNES over random keys, seeded from the greedy split, then a swap polish.

Encoding: every neuron carries a real key; sorting the keys and cutting the order into N
chunks of F/N gives an equal-size partition. Worked example with F = 4, N = 2: keys
[0.9, 0.1, 0.5, 0.7] sort to neurons [1, 2, 3, 0], so groups {1, 2} and {3, 0}. The search
mean starts at (label + 0.5) * seed_spread of the greedy split, which decodes to that split.
SNES (separable natural evolution strategy, evosax 0.3.2) runs for every expert of the
layer in one program: vmap over experts, lax.scan over generations. The best key vector
found (or the seed, if nothing beat it) goes to `polish.polish`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from evosax.algorithms import SNES

from partition.config import EvosaxConfig
from partition.objective import labels_from_permutation, token_costs


def _decode(keys_PF: jax.Array, num_groups: int) -> jax.Array:
  """Labels [P, F] of a population of key vectors."""
  return labels_from_permutation(jnp.argsort(keys_PF, axis=-1).astype(jnp.int32), num_groups)


def _fitness(acts_TF: jax.Array, keys_PF: jax.Array, num_groups: int, keep: int) -> jax.Array:
  onehot_PFN = jax.nn.one_hot(_decode(keys_PF, num_groups), num_groups, dtype=acts_TF.dtype)
  masses_PTN = jnp.einsum("tf,pfn->ptn", acts_TF, onehot_PFN, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(token_costs(masses_PTN, keep), axis=-1)


def _search_one(acts_TF: jax.Array, labels_F: jax.Array, key: jax.Array, *, num_groups: int, keep: int,
                config: EvosaxConfig) -> jax.Array:
  width = acts_TF.shape[1]
  strategy = SNES(population_size=config.population_size, solution=jnp.zeros((width,), jnp.float32))
  params = strategy.default_params.replace(std_init=jnp.float32(config.std_init * config.seed_spread))
  seed_keys_F = (labels_F.astype(jnp.float32) + 0.5) * config.seed_spread
  key_init, key_run = jax.random.split(key)
  state = strategy.init(key_init, seed_keys_F, params)

  def generation(state, step_key):
    key_ask, key_tell = jax.random.split(step_key)
    population_PF, state = strategy.ask(key_ask, state, params)
    fitness_P = _fitness(acts_TF, population_PF, num_groups, keep)
    state, _ = strategy.tell(key_tell, population_PF, fitness_P, state, params)
    return state, None

  state, _ = jax.lax.scan(generation, state, jax.random.split(key_run, config.generations))
  seed_cost = _fitness(acts_TF, seed_keys_F[None], num_groups, keep)[0]
  best_keys_F = jnp.where(state.best_fitness < seed_cost, state.best_solution, seed_keys_F)
  return jnp.argsort(best_keys_F).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("num_groups", "keep", "config"))
def evolve(acts_ETF: jax.Array, permutation_EF: jax.Array, key: jax.Array, *, num_groups: int, keep: int,
           config: EvosaxConfig) -> jax.Array:
  """SNES from the partitions `permutation_EF` (one per expert); returns the best permutations [E, F]."""
  labels_EF = labels_from_permutation(permutation_EF, num_groups)
  keys = jax.random.split(key, acts_ETF.shape[0])
  run = functools.partial(_search_one, num_groups=num_groups, keep=keep, config=config)
  return jax.vmap(run)(acts_ETF, labels_EF, keys)
