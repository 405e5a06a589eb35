"""Budget -> pattern rule and budget validation."""

import numpy as np
import pytest

from prism_jax.budget import budget_pattern, budget_patterns_table, check_budget, whole_expert_budgets


@pytest.mark.parametrize("budget,pattern", [
    (16, (4, 4, 4, 3, 1, 0, 0, 0)),  # r = 0: q - 1 full experts, then [N - 1, 1]
    (3, (3, 0, 0, 0, 0, 0, 0, 0)),  # k' <= N: all in the first expert
    (4, (4, 0, 0, 0, 0, 0, 0, 0)),
    (6, (4, 2, 0, 0, 0, 0, 0, 0)),  # r > 0: q full experts, then r
    (8, (4, 3, 1, 0, 0, 0, 0, 0)),
    (31, (4, 4, 4, 4, 4, 4, 4, 3)),
    (32, (4,) * 8),  # the original model
])
def test_pattern_examples(budget, pattern):
  assert budget_pattern(budget, 4, 8) == pattern


def test_patterns_sum_and_grow():
  for n, k in ((1, 4), (2, 3), (4, 8), (8, 2)):
    table = budget_patterns_table(n, k)
    assert (table.sum(axis=1) == np.arange(n * k + 1)).all(), (n, k)
    assert (np.diff(table, axis=0) >= 0).all(), f"patterns shrink somewhere for N={n}, K={k}"
    assert (table <= n).all()


def test_whole_expert_budgets_are_multiples_of_n():
  assert whole_expert_budgets(4, 3) == (4, 8, 12)


@pytest.mark.parametrize("budget", [0, -1, 33, 2.0, "8", None, True])
def test_invalid_budget_names_range(budget):
  with pytest.raises(ValueError, match=r"1\.\.32"):
    check_budget(budget, 4, 8)
