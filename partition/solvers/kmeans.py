"""Balanced k-means of neurons on their activation patterns (a baseline solver).

Each neuron is described by its |a_j| over the calibration tokens, scaled to unit length,
so neurons that fire on the same tokens are close. Centroids start from the greedy split.
Each iteration assigns neurons under the equal-size constraint: (neuron, group) pairs are
visited from the most to the least similar, and a pair is taken when the neuron is still
free and the group still has room. Then centroids are recomputed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from partition.objective import labels_from_permutation
from partition.solvers.base import permutation_from_labels


def _balanced_assign(similarity_FN: jax.Array) -> jax.Array:
  width, num_groups = similarity_FN.shape
  group = width // num_groups
  order = jnp.argsort(-similarity_FN.reshape(-1), stable=True)

  def visit(i, carry):
    labels_F, counts_N = carry
    neuron, choice = order[i] // num_groups, order[i] % num_groups
    take = (labels_F[neuron] < 0) & (counts_N[choice] < group)
    labels_F = jnp.where(take, labels_F.at[neuron].set(choice), labels_F)
    counts_N = jnp.where(take, counts_N.at[choice].add(1), counts_N)
    return labels_F, counts_N

  init = (jnp.full((width,), -1, jnp.int32), jnp.zeros((num_groups,), jnp.int32))
  labels_F, _ = jax.lax.fori_loop(0, width * num_groups, visit, init)
  return labels_F


def _kmeans_one(acts_TF: jax.Array, labels_F: jax.Array, num_groups: int, iterations: int) -> jax.Array:
  features_FT = acts_TF.T / (jnp.linalg.norm(acts_TF.T, axis=-1, keepdims=True) + 1e-12)

  def iterate(_, labels_F):
    onehot_FN = jax.nn.one_hot(labels_F, num_groups, dtype=features_FT.dtype)
    centroids_NT = onehot_FN.T @ features_FT
    centroids_NT = centroids_NT / (jnp.linalg.norm(centroids_NT, axis=-1, keepdims=True) + 1e-12)
    return _balanced_assign(features_FT @ centroids_NT.T)

  return jax.lax.fori_loop(0, iterations, iterate, labels_F)


@functools.partial(jax.jit, static_argnames=("num_groups", "iterations"))
def balanced_kmeans(acts_ETF: jax.Array, permutation_EF: jax.Array, *, num_groups: int,
                    iterations: int) -> jax.Array:
  """Balanced k-means of every expert, started from `permutation_EF`; returns permutations [E, F]."""
  labels_EF = labels_from_permutation(permutation_EF, num_groups)
  labels_EF = jax.vmap(lambda acts, labels: _kmeans_one(acts, labels, num_groups, iterations))(acts_ETF, labels_EF)
  return permutation_from_labels(labels_EF)
