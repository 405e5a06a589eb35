"""Sub-expert budgets: validation and the budget -> pattern rule.

A budget k' is how many sub-experts a token runs per MoE layer, 1..N*K. The pattern says
how k' spreads over the token's K ranked experts. With (q, r) = divmod(k', N):
k' <= N gives [k']; k' = N*K gives every expert all N; r > 0 gives q full experts then r;
r = 0 gives q - 1 full experts then [N - 1, 1]. With N = 1 the budget is plain top-k'. For N=4, K=8, k'=16 the pattern is
[4, 4, 4, 3, 1, 0, 0, 0]. Patterns grow elementwise with k', so a batch compiled for its
largest budget can mask any smaller per-row budget.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np


def check_budget(budget: object, num_sub_experts: int, top_k: int) -> int:
  """Return `budget` as an int, or raise naming the valid range."""
  full = num_sub_experts * top_k
  if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
    raise ValueError(f"budget must be an integer in 1..{full} (N*K), got {budget!r}")
  if not 1 <= int(budget) <= full:
    raise ValueError(f"budget {budget} is out of range; expected 1..{full} (N={num_sub_experts} x K={top_k})")
  return int(budget)


def budget_pattern(budget: int, num_sub_experts: int, top_k: int) -> tuple[int, ...]:
  """Sub-experts run at each of the K expert ranks for budget k' (length K, sums to k')."""
  n = num_sub_experts
  budget = check_budget(budget, n, top_k)
  q, r = divmod(budget, n)
  if n == 1:
    pattern = [1] * budget  # whole experts: budget k' is plain top-k'
  elif budget <= n:
    pattern = [budget]
  elif budget == n * top_k:
    pattern = [n] * top_k
  elif r > 0:
    pattern = [n] * q + [r]
  else:
    pattern = [n] * (q - 1) + [n - 1, 1]
  return tuple(pattern + [0] * (top_k - len(pattern)))


def budget_patterns_table(num_sub_experts: int, top_k: int) -> np.ndarray:
  """Patterns of every budget as an int32 table [N*K + 1, K]; row 0 is all zeros."""
  full = num_sub_experts * top_k
  table = np.zeros((full + 1, top_k), np.int32)
  for budget in range(1, full + 1):
    table[budget] = budget_pattern(budget, num_sub_experts, top_k)
  return table


def row_patterns(budget_B: jnp.ndarray, num_sub_experts: int, top_k: int) -> jnp.ndarray:
  """Look up the pattern of each row's budget: int [B] -> int32 [B, K]."""
  table = jnp.asarray(budget_patterns_table(num_sub_experts, top_k))
  return table[jnp.clip(budget_B, 0, num_sub_experts * top_k)]


def whole_expert_budgets(num_sub_experts: int, top_k: int) -> tuple[int, ...]:
  """Budgets that run whole experts only (multiples of N): what plain top-k offers."""
  return tuple(num_sub_experts * k for k in range(1, top_k + 1))
