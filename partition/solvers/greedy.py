"""Greedy balanced split: the starting point of simulated annealing and of the evolutionary search.

Every group starts from one anchor neuron, chosen far apart: the heaviest neuron first,
then repeatedly the neuron with the largest mass x (1 - max cosine similarity to the
anchors so far). The other neurons follow in order of decreasing total mass. Each joins
the group, among those not yet full, whose objective grows least when it joins. With
keep = 1 that is the group whose mass already dominates on the tokens where the neuron
fires, so co-active neurons end up together.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from partition.objective import token_costs
from partition.solvers.base import permutation_from_labels


def _anchors(acts_FT: jax.Array, num_groups: int) -> jax.Array:
  mass_F = jnp.sum(acts_FT, axis=-1)
  unit_FT = acts_FT / (jnp.linalg.norm(acts_FT, axis=-1, keepdims=True) + 1e-12)
  first = jnp.argmax(mass_F)
  anchors = jnp.zeros((num_groups,), jnp.int32).at[0].set(first)
  similarity_F = unit_FT @ unit_FT[first]
  taken_F = jnp.zeros(mass_F.shape, bool).at[first].set(True)

  def add(k, carry):
    anchors, similarity_F, taken_F = carry
    score_F = jnp.where(taken_F, -jnp.inf, mass_F * (1.0 - similarity_F))
    pick = jnp.argmax(score_F)
    similarity_F = jnp.maximum(similarity_F, unit_FT @ unit_FT[pick])
    return anchors.at[k].set(pick), similarity_F, taken_F.at[pick].set(True)

  anchors, _, _ = jax.lax.fori_loop(1, num_groups, add, (anchors, similarity_F, taken_F))
  return anchors


def greedy_labels(acts_FT: jax.Array, num_groups: int, keep: int) -> jax.Array:
  """Group label of every neuron of one expert; each label is used F/N times."""
  width, num_tokens = acts_FT.shape
  group = width // num_groups
  anchors = _anchors(acts_FT, num_groups)
  labels_F = jnp.full((width,), -1, jnp.int32).at[anchors].set(jnp.arange(num_groups, dtype=jnp.int32))
  counts_N = jnp.ones((num_groups,), jnp.int32)
  masses_TN = acts_FT[anchors].T
  order_F = jnp.argsort(-jnp.sum(acts_FT, axis=-1), stable=True)
  eye_NN = jnp.eye(num_groups, dtype=acts_FT.dtype)

  def place(i, carry):
    labels_F, counts_N, masses_TN = carry
    neuron = order_F[i]
    # Masses if the neuron joined group s, for every s: [N (choice), T, N].
    trial_STN = masses_TN[None] + acts_FT[neuron][None, :, None] * eye_NN[:, None, :]
    cost_S = jnp.sum(token_costs(trial_STN, keep), axis=-1)
    choice = jnp.argmin(jnp.where(counts_N < group, cost_S, jnp.inf))
    free = labels_F[neuron] < 0
    labels_F = jnp.where(free, labels_F.at[neuron].set(choice), labels_F)
    counts_N = jnp.where(free, counts_N.at[choice].add(1), counts_N)
    masses_TN = jnp.where(free, trial_STN[choice], masses_TN)
    return labels_F, counts_N, masses_TN

  labels_F, _, _ = jax.lax.fori_loop(0, width, place, (labels_F, counts_N, masses_TN))
  return labels_F


@functools.partial(jax.jit, static_argnames=("num_groups", "keep"))
def greedy_permutations(acts_ETF: jax.Array, num_groups: int, keep: int) -> jax.Array:
  """Greedy balanced split of every expert: permutations [E, F]."""
  labels_EF = jax.vmap(lambda acts_TF: greedy_labels(acts_TF.T, num_groups, keep))(acts_ETF)
  return permutation_from_labels(labels_EF)
