"""Partition objective against a NumPy reference."""

import numpy as np
import pytest

from partition.objective import expert_costs, labels_from_permutation, partition_cost


def reference_cost(acts_TF, permutation_F, num_groups, keep):
  """Loop-free but obvious: group masses by slicing the permuted neurons, then sort each row."""
  t, f = acts_TF.shape
  masses_TN = acts_TF[:, permutation_F].reshape(t, num_groups, f // num_groups).sum(-1).astype(np.float64)
  smallest = np.sort(masses_TN, axis=1)[:, :num_groups - keep]
  return smallest.sum()


def random_problem(seed, experts=3, candidates=5, tokens=40, width=24):
  rng = np.random.default_rng(seed)
  acts = np.abs(rng.normal(size=(experts, tokens, width))).astype(np.float32)
  perms = np.stack([[rng.permutation(width) for _ in range(candidates)] for _ in range(experts)]).astype(np.int32)
  return acts, perms


@pytest.mark.parametrize("num_groups,keep", [(2, 1), (4, 1), (4, 2), (4, 4), (8, 3)])
def test_cost_matches_numpy(num_groups, keep):
  acts, perms = random_problem(seed=num_groups * 10 + keep)
  got = np.asarray(partition_cost(acts, perms, num_groups, keep))
  want = np.array([[reference_cost(acts[e], perms[e, p], num_groups, keep) for p in range(perms.shape[1])]
                   for e in range(acts.shape[0])])
  assert got.shape == want.shape
  err = np.abs(got - want).max()
  assert err <= 1e-4 * np.abs(want).max() + 1e-6, f"max abs error {err:.3g}"


def test_expert_costs_one_permutation_each():
  acts, perms = random_problem(seed=1)
  got = np.asarray(expert_costs(acts, perms[:, 0], 4, 1))
  want = np.array([reference_cost(acts[e], perms[e, 0], 4, 1) for e in range(acts.shape[0])])
  err = np.abs(got - want).max()
  assert err <= 1e-4 * want.max(), f"max abs error {err:.3g}"


def test_labels_from_permutation():
  labels = np.asarray(labels_from_permutation(np.array([2, 0, 3, 1], np.int32), 2))
  assert labels.tolist() == [0, 1, 0, 1]


def test_zero_rows_cost_nothing():
  acts, perms = random_problem(seed=2)
  padded = np.concatenate([acts, np.zeros_like(acts)], axis=1)
  err = np.abs(np.asarray(partition_cost(padded, perms, 4, 1)) - np.asarray(partition_cost(acts, perms, 4, 1))).max()
  assert err <= 1e-3, f"padding changed the cost by {err:.3g}"


def test_planted_split_beats_random():
  acts = np.zeros((1, 8, 8), np.float32)
  for t in range(8):
    acts[0, t, (t % 2) * 4:(t % 2) * 4 + 4] = 1.0  # tokens fire neurons 0-3 or 4-7
  planted = np.arange(8, dtype=np.int32)[None]
  mixed = np.array([[0, 4, 1, 5, 2, 6, 3, 7]], np.int32)
  assert float(expert_costs(acts, planted, 2)[0]) == 0.0
  assert float(expert_costs(acts, mixed, 2)[0]) == pytest.approx(8 * 2.0)
