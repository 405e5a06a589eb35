"""Shared pieces of the offload tests (this module has no tests): a tiny model, one call signature.

Every offload test calls the model with the same shapes and static budget (`call_kwargs`),
so the per-layer programs compile once for the whole suite.
"""

from __future__ import annotations

import numpy as np

from prism_jax.model import PrismModel
from prism_jax.subexperts import LayerPartition, Partition
from prism_jax.testing import TINY, random_params
from serve.offload import OffloadConfig, offload_model

N = 4
TOLERANCE = 1e-5
BATCH, TOKENS, MAX_LEN, BUDGET = 2, 6, 16, 8


def random_partition(config, num_sub_experts, seed=0, cores=2):
  """A random neuron permutation and random core neurons per expert, for every MoE layer."""
  rng = np.random.default_rng(seed)
  e, f = config.num_experts, config.moe_intermediate_size
  width = f // num_sub_experts
  layers = {}
  for i in config.moe_layer_indices:
    perm = np.stack([rng.permutation(f) for _ in range(e)]).astype(np.int32)
    core = np.stack([[rng.choice(width, cores, replace=False) for _ in range(num_sub_experts)] for _ in range(e)])
    layers[i] = LayerPartition(perm, core.astype(np.int32))
  return Partition(num_sub_experts, "compound", layers, "test")


def tiny_partitioned_model() -> PrismModel:
  # scale=2 makes routing and budgets matter: logits differ by ~1e-3 between budgets 7 and 8.
  return PrismModel(TINY, random_params(TINY, seed=0, scale=2.0), partition=random_partition(TINY, N))


def token_batches(count: int, seed: int = 1) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(1, TINY.vocab_size, (BATCH, TOKENS)).astype(np.int32) for _ in range(count)]


def call_kwargs(model, budget_B=(8, 3), lengths=(TOKENS, TOKENS - 2)) -> dict:
  """Per-row budgets below the static one; tokens past each row's length are padding."""
  valid = np.arange(TOKENS)[None, :] < np.asarray(lengths)[:, None]
  positions = np.where(valid, np.arange(TOKENS), MAX_LEN).astype(np.int32)
  return dict(budget=BUDGET, budget_B=np.asarray(budget_B, np.int32), positions_BT=positions, valid_BT=valid,
              cache=model.init_cache(BATCH, MAX_LEN))


def offloaded(model, directory, **kwargs):
  kwargs.setdefault("offload_dir", str(directory))
  kwargs.setdefault("max_batch", BATCH)
  return offload_model(model, OffloadConfig(**kwargs))


def max_abs(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
