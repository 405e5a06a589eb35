"""A slow, obvious loop-over-tokens-and-experts MoE layer: the reference every fast path is checked against."""

from __future__ import annotations

import numpy as np

from prism_jax.budget import budget_pattern
from prism_jax.subexperts import LayerPartition


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _softmax(x):
  z = np.exp(x - x.max())
  return z / z.sum()


def reference_moe(x_SD: np.ndarray, mlp: dict, layer: LayerPartition | None, num_sub_experts: int, top_k: int,
                  budget: int, normalize: bool, router: str = "compound") -> tuple[np.ndarray, np.ndarray]:
  """Return (output [S, D], sub-experts run per token [S]) from expert-layout weights."""
  gate, up, down = (np.asarray(mlp[k], np.float64) for k in ("gate", "up", "down"))
  num_experts, _, width = gate.shape
  n = num_sub_experts
  group = width // n
  perm = np.tile(np.arange(width), (num_experts, 1)) if layer is None else layer.permutation_EF
  x_SD = np.asarray(x_SD, np.float64)
  out = np.zeros_like(x_SD)
  active = np.zeros(len(x_SD), np.int64)

  def sub_expert_output(x, e, s):
    neurons = perm[e, s * group:(s + 1) * group]
    act = _silu(x @ gate[e][:, neurons]) * (x @ up[e][:, neurons])
    return act @ down[e][neurons, :]

  for t, x in enumerate(x_SD):
    probs = _softmax(x @ np.asarray(mlp["router"], np.float64))
    if router == "linear":
      router_DG = layer.linear_router_DG if layer.linear_router_DG is not None else np.repeat(mlp["router"], n, 1)
      probs_g = _softmax(x @ np.asarray(router_DG, np.float64)) * n
      chosen = np.argsort(-probs_g, kind="stable")[:budget]
      weights = probs_g[chosen]
      if normalize:
        weights = weights * n / weights.sum()
      for g, w in zip(chosen, weights):
        out[t] += w * sub_expert_output(x, g // n, g % n)
      active[t] = budget
      continue
    experts = np.argsort(-probs, kind="stable")[:top_k]
    weights = probs[experts]
    if normalize:
      weights = weights / weights.sum()
    for rank, count in enumerate(budget_pattern(budget, n, top_k)):
      if count == 0:
        continue
      e = experts[rank]
      scores = []
      for s in range(n):
        cores = perm[e, s * group:(s + 1) * group][layer.core_ENC[e, s]] if layer is not None else []
        act = _silu(x @ gate[e][:, cores]) * (x @ up[e][:, cores]) if len(cores) else np.zeros(1)
        scores.append(np.abs(act).mean())
      order = np.argsort(-np.asarray(scores), kind="stable") if count < n else np.arange(n)
      for s in order[:count]:
        out[t] += weights[rank] * sub_expert_output(x, e, s)
      active[t] += count
  return out, active
