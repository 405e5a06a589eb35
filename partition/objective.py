"""The partition objective: activation mass that falls outside each token's `keep` best groups.

For one expert with activations |a| [T, F] and a split of its F neurons into N equal
groups, the mass of group s on token t is g[t, s] = sum of |a_j(x_t)| over neurons j in s.
The cost is the sum over tokens of the N - keep smallest entries of g[t, :]. Lower is
better: a token then finds most of its activation mass in `keep` sub-experts.

A partition is stored as a permutation [F] of neuron ids: positions s*F/N .. (s+1)*F/N - 1
hold the neurons of group s (the layout `prism_jax.subexperts` expects). Padded token rows
are all zeros and so cost nothing under any partition.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def token_costs(masses_N: jax.Array, keep: int) -> jax.Array:
  """Sum of the N - keep smallest group masses along the last axis."""
  total = jnp.sum(masses_N, axis=-1)
  if keep == 1:
    return total - jnp.max(masses_N, axis=-1)
  if keep >= masses_N.shape[-1]:
    return jnp.zeros_like(total)
  return total - jnp.sum(jax.lax.top_k(masses_N, keep)[0], axis=-1)


def labels_from_permutation(permutation_F: jax.Array, num_groups: int) -> jax.Array:
  """Group of every neuron: neuron permutation[p] belongs to group p // (F / N)."""
  width = permutation_F.shape[-1]
  group_F = jnp.arange(width, dtype=jnp.int32) // (width // num_groups)
  flat = permutation_F.reshape(-1, width)
  # Worked example, F = 4, N = 2: permutation [2, 0, 3, 1] puts neurons 2, 0 in group 0 and
  # 3, 1 in group 1, so the labels of neurons 0..3 are [0, 1, 0, 1].
  labels = jax.vmap(lambda perm: jnp.zeros((width,), jnp.int32).at[perm].set(group_F))(flat)
  return labels.reshape(permutation_F.shape)


def group_masses(acts_ETF: jax.Array, labels_EPF: jax.Array,
                 num_groups: int) -> jax.Array:
  """Mass of every group on every token, for P candidate labelings of each expert."""
  onehot_EPFN = jax.nn.one_hot(labels_EPF, num_groups, dtype=acts_ETF.dtype)
  return jnp.einsum("etf,epfn->eptn", acts_ETF, onehot_EPFN, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("num_groups", "keep"))
def labels_cost(acts_ETF: jax.Array, labels_EPF: jax.Array, num_groups: int,
                keep: int = 1) -> jax.Array:
  """Cost of P candidate labelings per expert (every label used F/N times)."""
  return jnp.sum(token_costs(group_masses(acts_ETF, labels_EPF, num_groups), keep), axis=-1)


@functools.partial(jax.jit, static_argnames=("num_groups", "keep"))
def partition_cost(acts_ETF: jax.Array, permutation_EPF: jax.Array, num_groups: int,
                   keep: int = 1) -> jax.Array:
  """Cost of P candidate permutations per expert: the one objective every solver reports."""
  labels_EPF = labels_from_permutation(permutation_EPF, num_groups)
  return labels_cost(acts_ETF, labels_EPF, num_groups, keep)


def expert_costs(acts_ETF: jax.Array, permutation_EF: jax.Array, num_groups: int,
                 keep: int = 1) -> jax.Array:
  """Cost of one permutation per expert."""
  perm = jnp.asarray(permutation_EF, jnp.int32)[:, None, :]
  return partition_cost(jnp.asarray(acts_ETF, jnp.float32), perm, num_groups, keep)[:, 0]
