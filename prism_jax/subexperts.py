"""Neuron partitions and how they turn an expert-layout model into a sub-expert one.

A `Partition` contains, per MoE layer, a neuron permutation of every expert ([E, F]): after
permuting, sub-expert s of expert e is neurons s*F/N .. (s+1)*F/N - 1. It also contains the
core neurons of each sub-expert ([E, N, C], positions inside the sub-expert) for the
compound router, and optionally a linear router [D, G].
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class LayerPartition:
  """Partition of one MoE layer."""

  permutation_EF: np.ndarray
  core_ENC: np.ndarray
  linear_router_DG: np.ndarray | None = None

  def validate(self, num_experts: int, width: int, num_sub_experts: int, layer: int) -> None:
    perm = self.permutation_EF
    if perm.shape != (num_experts, width):
      raise ValueError(f"layer {layer}: permutation shape {perm.shape} does not match (E={num_experts}, F={width})")
    expected = np.arange(width)
    for e in range(num_experts):
      if not np.array_equal(np.sort(perm[e]), expected):
        raise ValueError(f"layer {layer}, expert {e}: the neuron permutation is not a permutation of 0..{width - 1}")
    group = width // num_sub_experts
    if self.core_ENC.ndim != 3 or self.core_ENC.shape[:2] != (num_experts, num_sub_experts):
      raise ValueError(f"layer {layer}: core neurons shape {self.core_ENC.shape} is not (E, N, C)")
    if self.core_ENC.min() < 0 or self.core_ENC.max() >= group:
      raise ValueError(f"layer {layer}: core neuron indices must lie in 0..{group - 1}")


@dataclasses.dataclass(frozen=True)
class Partition:
  """Neuron partition of every MoE layer, keyed by layer index."""

  num_sub_experts: int
  router: str
  layers: dict[int, LayerPartition]
  fingerprint: str

  @property
  def num_core_neurons(self) -> int:
    return int(next(iter(self.layers.values())).core_ENC.shape[-1])


def identity_partition(num_experts: int, width: int, num_sub_experts: int, moe_layers: tuple[int, ...],
                       fingerprint: str, num_core_neurons: int = 4) -> Partition:
  """Contiguous split with the first neurons of each group as cores (a test and fallback layout)."""
  group = width // num_sub_experts
  cores = min(num_core_neurons, group)
  perm = np.tile(np.arange(width, dtype=np.int32), (num_experts, 1))
  core = np.tile(np.arange(cores, dtype=np.int32), (num_experts, num_sub_experts, 1))
  layers = {i: LayerPartition(perm, core) for i in moe_layers}
  return Partition(num_sub_experts, "compound", layers, fingerprint)


def split_expert_params(params: dict, layer: LayerPartition, num_sub_experts: int, router: str) -> dict:
  """Turn one MoE layer's expert-layout params (N=1) into sub-expert params.

  `params` has gate/up [E, D, F], down [E, F, D]; the result has [G, D, F/N] / [G, F/N, D]
  plus the core-neuron columns or the linear router the chosen router needs.
  """
  gate, up, down = (np.asarray(params[k]) for k in ("gate", "up", "down"))
  e, d, f = gate.shape
  n = num_sub_experts
  perm = layer.permutation_EF
  gate_p = np.take_along_axis(gate, perm[:, None, :], axis=2)
  up_p = np.take_along_axis(up, perm[:, None, :], axis=2)
  down_p = np.take_along_axis(down, perm[:, :, None], axis=1)
  width = f // n
  out = dict(params)
  out["gate"] = gate_p.reshape(e, d, n, width).transpose(0, 2, 1, 3).reshape(e * n, d, width)
  out["up"] = up_p.reshape(e, d, n, width).transpose(0, 2, 1, 3).reshape(e * n, d, width)
  out["down"] = down_p.reshape(e * n, width, d)
  if n > 1 and router == "compound":
    # Core column of (e, s, c) in the permuted expert: s * width + core[e, s, c].
    cols_ENC = np.arange(n)[None, :, None] * width + layer.core_ENC
    out["core_gate"] = np.take_along_axis(gate_p, cols_ENC.reshape(e, 1, -1), axis=2).transpose(1, 0, 2).reshape(d, -1)
    out["core_up"] = np.take_along_axis(up_p, cols_ENC.reshape(e, 1, -1), axis=2).transpose(1, 0, 2).reshape(d, -1)
  if n > 1 and router == "linear":
    if layer.linear_router_DG is not None:
      out["linear_router"] = np.asarray(layer.linear_router_DG, gate.dtype)
    else:
      out["linear_router"] = np.repeat(np.asarray(params["router"]), n, axis=1)
  return out
