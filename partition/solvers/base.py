"""Solver results and conversions between the partition encodings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SolveResult:
  """Partition of every expert of one layer, with the work it took.

  permutation_EF: neuron permutation per expert (group s is positions s*F/N .. (s+1)*F/N - 1).
  cost_E: the objective of each expert under `partition.objective.partition_cost`.
  evaluations: candidate partitions scored (a swap proposal or a population member is one).
  seconds: wall time of the solver call, compilation included when it happened.
  stages: total cost after each stage of a multi-stage solver, e.g. {"greedy": ..., "polish": ...}.
  """

  permutation_EF: np.ndarray
  cost_E: np.ndarray
  evaluations: int
  seconds: float
  stages: dict[str, float] = dataclasses.field(default_factory=dict)

  @property
  def cost(self) -> float:
    return float(np.sum(self.cost_E))


def permutation_from_labels(labels_F: jax.Array) -> jax.Array:
  """Permutation that lists the neurons of group 0 first, then group 1, ...

  Worked example: labels [1, 0, 0, 1] give the permutation [1, 2, 0, 3] (a stable sort).
  Every label must occur F/N times for the groups to land on the equal-size chunks.
  """
  return jnp.argsort(labels_F, axis=-1, stable=True).astype(jnp.int32)


def identity_permutations(num_experts: int, width: int) -> np.ndarray:
  return np.tile(np.arange(width, dtype=np.int32), (num_experts, 1))


def check_partition(permutation_EF: np.ndarray, num_experts: int, width: int) -> None:
  """Raise unless every row is a permutation of 0..F-1 (so all groups have F/N neurons)."""
  perm = np.asarray(permutation_EF)
  if perm.shape != (num_experts, width):
    raise AssertionError(f"solver returned permutations of shape {perm.shape}, expected {(num_experts, width)}")
  expected = np.arange(width)
  bad = [e for e in range(num_experts) if not np.array_equal(np.sort(perm[e]), expected)]
  if bad:
    raise AssertionError(f"solver returned an invalid permutation for experts {bad}")
