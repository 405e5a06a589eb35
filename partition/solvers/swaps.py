"""Swap moves on one expert's partition, scored incrementally.

A swap exchanges the neurons at positions p and q of the permutation, where p and q lie
in different groups, so every group keeps F/N neurons. Only two columns of the group
masses [T, N] change, so a proposal costs O(T * N) instead of O(T * F) for a full
re-evaluation. Per-token costs come from `partition.objective.token_costs`, the same
function the objective uses. Functions here work on one expert; callers vmap them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from partition.objective import labels_from_permutation, token_costs


def masses_of(acts_FT: jax.Array, permutation_F: jax.Array, num_groups: int) -> jax.Array:
  """Compute the group masses [T, N] of one expert's partition."""
  labels_F = labels_from_permutation(permutation_F, num_groups)
  onehot_FN = jax.nn.one_hot(labels_F, num_groups, dtype=acts_FT.dtype)
  return jnp.einsum("ft,fn->tn", acts_FT, onehot_FN, precision=jax.lax.Precision.HIGHEST)


def random_swaps(key: jax.Array, shape: tuple[int, ...], width: int, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """Uniform random position pairs (p, q) in different groups; needs num_groups >= 2."""
  group = width // num_groups
  key_p, key_shift, key_q = jax.random.split(key, 3)
  p = jax.random.randint(key_p, shape, 0, width)
  # Shift p's group by 1..N-1 (mod N) so q always lands in another group.
  shift = jax.random.randint(key_shift, shape, 1, num_groups)
  q = ((p // group + shift) % num_groups) * group + jax.random.randint(key_q, shape, 0, group)
  return p.astype(jnp.int32), q.astype(jnp.int32)


def swapped_masses(acts_FT: jax.Array, permutation_F: jax.Array, masses_TN: jax.Array, p: jax.Array, q: jax.Array,
                   group: int) -> jax.Array:
  """Masses after swapping positions p and q; p and q may carry a leading proposal axis M."""
  num_groups = masses_TN.shape[-1]
  moved_T = acts_FT[permutation_F[q]] - acts_FT[permutation_F[p]]
  # The neuron from q enters p's group and the one from p enters q's group.
  sign_N = jax.nn.one_hot(p // group, num_groups) - jax.nn.one_hot(q // group, num_groups)
  return masses_TN + moved_T[..., :, None] * sign_N[..., None, :]


def swap_costs(acts_FT: jax.Array, permutation_F: jax.Array, masses_TN: jax.Array, p_M: jax.Array, q_M: jax.Array,
               group: int, keep: int) -> tuple[jax.Array, jax.Array]:
  """Score M swaps: the costs [M] after each and the masses [M, T, N] they lead to."""
  masses_MTN = swapped_masses(acts_FT, permutation_F, masses_TN, p_M, q_M, group)
  return jnp.sum(token_costs(masses_MTN, keep), axis=-1), masses_MTN


def apply_swap(permutation_F: jax.Array, p: jax.Array, q: jax.Array) -> jax.Array:
  neuron_p, neuron_q = permutation_F[p], permutation_F[q]
  return permutation_F.at[p].set(neuron_q).at[q].set(neuron_p)


def guided_swaps(acts_FT: jax.Array, permutation_F: jax.Array, masses_TN: jax.Array, keep: int,
                 per_pair: int, blocked_F: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Propose swaps ranked by a first-order estimate of their gain.

  Moving neuron j from group a to group b lowers the cost, to first order, by
  gain[j, b] = A[j, b] - A[j, a], where A[j, s] is j's mass on the tokens whose `keep`
  heaviest groups include s, because only those tokens' kept mass grows when s grows. For
  every pair of groups (a, b), the `per_pair` best movers of a towards b are paired with
  the best movers of b towards a, giving N(N-1)/2 * per_pair**2 proposals. Their exact
  costs are computed afterwards, so the estimate only chooses what to try. Positions where
  `blocked_F` is True are proposed only when a group has fewer than `per_pair` others.
  """
  width, num_groups = acts_FT.shape[0], masses_TN.shape[1]
  group = width // num_groups
  kept_TN = jax.nn.one_hot(jax.lax.top_k(masses_TN, keep)[1], num_groups, dtype=acts_FT.dtype).sum(axis=1)
  affinity_FN = (acts_FT @ kept_TN)[permutation_F]
  own_F = affinity_FN[jnp.arange(width), jnp.arange(width) // group]
  gain_FN = affinity_FN - own_F[:, None]
  if blocked_F is not None:
    gain_FN = jnp.where(blocked_F[:, None], -jnp.inf, gain_FN)
  gain_aWb = gain_FN.reshape(num_groups, group, num_groups)
  best_aRb = jax.lax.top_k(jnp.moveaxis(gain_aWb, 1, 2), per_pair)[1]  # [a, b, r]: positions inside group a

  pairs = [(a, b) for a in range(num_groups) for b in range(a + 1, num_groups)]
  first = jnp.stack([a * group + best_aRb[a, b] for a, b in pairs])  # [pairs, r]
  second = jnp.stack([b * group + best_aRb[b, a] for a, b in pairs])
  p = jnp.broadcast_to(first[:, :, None], (len(pairs), per_pair, per_pair)).reshape(-1)
  q = jnp.broadcast_to(second[:, None, :], (len(pairs), per_pair, per_pair)).reshape(-1)
  return p.astype(jnp.int32), q.astype(jnp.int32)
