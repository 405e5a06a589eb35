"""Planted partition problems: activations drawn from known co-active neuron groups.

Each expert's neurons are dealt at random into N hidden groups of F/N. Each token fires one
hidden group strongly (neuron scales drawn log-normal), a second group weakly with
probability `secondary`, and every neuron a little (`noise`). With keep = 1 the hidden
split is close to optimal, while a random split leaves about (N-1)/N of the mass outside
each token's best group. Used by the tests and the solver benchmark.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PlantedProblem:
  """Activations [E, T, F] and the hidden split as permutations [E, F]."""

  acts_ETF: np.ndarray
  permutation_EF: np.ndarray


def planted_problem(num_experts: int = 4, num_tokens: int = 256, width: int = 64, num_groups: int = 4, *,
                    seed: int = 0, noise: float = 0.05, secondary: float = 0.3,
                    secondary_strength: float = 0.2) -> PlantedProblem:
  if width % num_groups:
    raise ValueError(f"num_groups={num_groups} does not divide width={width}")
  rng = np.random.default_rng(seed)
  group = width // num_groups
  acts = np.empty((num_experts, num_tokens, width), np.float32)
  perms = np.empty((num_experts, width), np.int32)
  for e in range(num_experts):
    perm = rng.permutation(width).astype(np.int32)
    labels = np.empty(width, np.int32)
    labels[perm] = np.arange(width) // group
    scale_F = rng.lognormal(0.0, 0.5, width)
    primary_T = rng.integers(0, num_groups, num_tokens)
    other_T = (primary_T + rng.integers(1, num_groups, num_tokens)) % num_groups if num_groups > 1 else primary_T
    strength_TF = (labels[None, :] == primary_T[:, None]).astype(np.float64)
    weak_T = (rng.random(num_tokens) < secondary) * secondary_strength
    strength_TF += (labels[None, :] == other_T[:, None]) * weak_T[:, None]
    values = strength_TF * scale_F[None, :] * rng.uniform(0.5, 1.5, (num_tokens, width))
    acts[e] = values + noise * np.abs(rng.normal(size=(num_tokens, width)))
    perms[e] = perm
  return PlantedProblem(acts, perms)
