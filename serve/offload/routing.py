"""Routing in offload mode: every token's ranked candidate sub-experts, with weights and mass.

This uses the scoring and ranking functions of `prism_jax.moe` (the offload tests compare
outputs against `SubExpertMoE`), but keeps the ranking that the budget-aware choice needs:

- compound router: the parent router picks and weights K experts; inside each, sub-experts
  are ranked by the mean |silu(x Wg) * (x Wu)| over their core neurons. The budget pattern
  then takes the top `pattern[r]` sub-experts of the expert ranked r. A candidate's mass is
  its parent weight times its share of the expert's core score, so a token's masses over all
  N*K sub-experts sum to its parent weights.
- linear router: top-k' over G = E*N sub-experts of softmax(x W_lin) * N; the mass is the
  softmax probability itself.

Candidates come in rank order along A (A = the static budget), padded slots marked invalid.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from prism_jax.budget import budget_pattern, row_patterns
from prism_jax.moe import core_scores, linear_route, rank_sub_experts, route_parent


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """Static routing settings of a MoE layer."""

  router: str
  num_experts: int
  num_sub_experts: int
  top_k: int
  normalize: bool


@struct.dataclass
class Candidates:
  """Ranked candidate sub-experts of S tokens at a static budget A."""

  group_SA: jax.Array
  weight_SA: jax.Array
  mass_SA: jax.Array
  valid_SA: jax.Array
  experts_SK: jax.Array
  probs_SE: jax.Array


def _compound(spec: RoutingSpec, router: dict, x_SD, valid_S, budget_S, budget: int) -> Candidates:
  n, k = spec.num_sub_experts, spec.top_k
  weights_SK, experts_SK, probs_SE = route_parent(x_SD, router["router"], k, spec.normalize)
  pattern = budget_pattern(budget, n, k)
  counts_SK = row_patterns(budget_S, n, k)
  num_tokens = x_SD.shape[0]
  if n > 1:
    score_SKN = core_scores(x_SD, router["core_gate"], router["core_up"], experts_SK, spec.num_experts, n)
    order_SKN = rank_sub_experts(score_SKN)
    total_SK1 = jnp.sum(score_SKN, axis=-1, keepdims=True)
    share_SKN = jnp.where(total_SK1 > 0, score_SKN / jnp.where(total_SK1 > 0, total_SK1, 1.0), 1.0 / n)
  else:
    order_SKN = jnp.zeros((num_tokens, k, 1), jnp.int32)
    share_SKN = jnp.ones((num_tokens, k, 1), jnp.float32)
  groups, weights, masses, valids = [], [], [], []
  for rank, count in enumerate(pattern):
    for j in range(count):
      sub_expert_S = order_SKN[:, rank, j]
      groups.append(experts_SK[:, rank] * n + sub_expert_S)
      weights.append(weights_SK[:, rank])
      share_S = jnp.take_along_axis(share_SKN[:, rank], sub_expert_S[:, None], axis=1)[:, 0]
      masses.append(weights_SK[:, rank] * share_S)
      valids.append(valid_S & (j < counts_SK[:, rank]))
  stack = lambda items: jnp.stack(items, axis=1)
  return Candidates(stack(groups).astype(jnp.int32), stack(weights), stack(masses), stack(valids), experts_SK,
                    probs_SE)


def _linear(spec: RoutingSpec, router: dict, x_SD, valid_S, budget_S, budget: int) -> Candidates:
  _, experts_SK, probs_SE = route_parent(x_SD, router["router"], spec.top_k, spec.normalize)
  slot = jnp.arange(budget)[None, :]
  valid_Sk = valid_S[:, None] & (slot < budget_S[:, None])
  weights_Sk, groups_Sk, mass_Sk = linear_route(x_SD, router["linear_router"], spec.num_sub_experts, budget, valid_Sk,
                                                spec.normalize)
  return Candidates(groups_Sk, weights_Sk, mass_Sk, valid_Sk, experts_SK, probs_SE)


def candidates(spec: RoutingSpec, router: dict, x_SD: jax.Array, valid_S: jax.Array, budget_S: jax.Array,
               budget: int) -> Candidates:
  """Ranked candidates of each token; `budget` is static, `budget_S` per-token budgets <= budget."""
  if spec.router == "linear" and spec.num_sub_experts > 1:
    return _linear(spec, router, x_SD, valid_S, budget_S, budget)
  return _compound(spec, router, x_SD, valid_S, budget_S, budget)


@functools.partial(jax.jit, static_argnames=("spec", "budget"))
def route_layer(spec: RoutingSpec, router: dict, h_BTD: jax.Array, valid_BT: jax.Array, budget_B: jax.Array, *,
                budget: int) -> Candidates:
  """Candidates of a layer's normed input h [B, T, D]."""
  b, t, d = h_BTD.shape
  budget_S = jnp.repeat(budget_B.astype(jnp.int32), t)
  return candidates(spec, router, h_BTD.reshape(b * t, d), valid_BT.reshape(-1), budget_S, budget)
