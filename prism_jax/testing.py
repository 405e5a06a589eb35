"""Tiny named configs and random weights for tests, benchmarks and notebooks."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from prism_jax.checkpoint import save_params
from prism_jax.config import ModelConfig
from prism_jax.decoder import Decoder
from prism_jax.model import PrismModel

TINY = ModelConfig(
    family="qwen3_moe",
    vocab_size=128,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    qk_norm="head",
    max_position_embeddings=256,
    eos_token_ids=(0,),
)


def random_params(config: ModelConfig, seed: int = 0, scale: float = 1.0) -> dict:
  """Random expert-layout (N=1) params as a pure dict of NumPy arrays.

  `scale` multiplies every weight matrix, so tests can make routing and activations less uniform.
  """
  module = Decoder(config, rngs=nnx.Rngs(seed))
  params = jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  return jax.tree_util.tree_map(lambda x: x * scale if x.ndim >= 2 else x, params)


def tiny_model(config: ModelConfig = TINY, seed: int = 0, **kwargs) -> PrismModel:
  return PrismModel(config, random_params(config, seed), **kwargs)


def tiny_checkpoint(path: str | Path, config: ModelConfig = TINY, seed: int = 0) -> Path:
  """Write a random-weight prism checkpoint (no tokenizer) and return its path."""
  return save_params(path, config, random_params(config, seed), source=f"random seed {seed}")
