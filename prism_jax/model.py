"""`PrismModel`: a converted checkpoint, optionally partitioned, with jitted entry points."""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from prism_jax.budget import check_budget
from prism_jax.checkpoint import TOKENIZER_DIR, load_params
from prism_jax.config import Backend, ModelConfig, SubExpertConfig
from prism_jax.decoder import Decoder, ForwardOutput, KVCache, init_cache
from prism_jax.moe import Dispatch
from prism_jax.subexperts import Partition, split_expert_params

logger = logging.getLogger(__name__)


class PrismModel:
  """A model ready to run: `model(tokens_BT, budget=k)` returns float32 logits [B, T, V]."""

  def __init__(self, config: ModelConfig, params: dict, *, partition: Partition | None = None,
               backend: Backend = "auto", tile_rows: int | None = None, tokenizer: Any = None,
               fingerprint: str | None = None, path: Path | None = None):
    self.config = config
    self.partition = partition
    self.tokenizer = tokenizer
    self.fingerprint = fingerprint
    self.path = path
    if partition is None:
      self.sub = SubExpertConfig()
    else:
      self.sub = SubExpertConfig(partition.num_sub_experts, partition.router, partition.num_core_neurons)
      self.sub.check_divides(config.moe_intermediate_size)
      params = apply_partition(config, params, partition)
    self.dispatch = Dispatch(backend=backend, tile_rows=tile_rows)
    abstract = nnx.eval_shape(lambda: Decoder(config, self.sub, self.dispatch, rngs=nnx.Rngs(0)))
    self.graphdef, state = nnx.split(abstract)
    expected = nnx.to_pure_dict(state)
    _check_tree(expected, params)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
    self.state = state

  @property
  def full_budget(self) -> int:
    return self.sub.num_sub_experts * self.config.num_experts_per_tok

  @property
  def num_sub_experts(self) -> int:
    return self.sub.num_sub_experts

  def module(self) -> Decoder:
    """Merge this model's weights into its Flax NNX module and return it."""
    return nnx.merge(self.graphdef, self.state)

  def check_budget(self, budget: int | None) -> int | None:
    if budget is None:
      return None
    return check_budget(budget, self.sub.num_sub_experts, self.config.num_experts_per_tok)

  def forward(self, tokens_BT, *, budget: int | None = None, budget_B=None, positions_BT=None,
              valid_BT=None, cache: KVCache | None = None, hidden_only: bool = False) -> ForwardOutput:
    """Jitted forward pass; see `Decoder.__call__` for the arguments."""
    budget = self.check_budget(budget)
    tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
    if tokens_BT.ndim != 2:
      raise ValueError(f"tokens must be int32 [B, T], got shape {tokens_BT.shape}")
    if budget_B is not None:
      budget_B = np.asarray(budget_B)
      limit = budget if budget is not None else self.full_budget
      if budget_B.shape != tokens_BT.shape[:1] or budget_B.min() < 1 or budget_B.max() > limit:
        raise ValueError(f"budget_B must hold one budget in 1..{limit} per row ({tokens_BT.shape[0]} rows), "
                         f"got {budget_B.tolist()}")
      budget_B = jnp.asarray(budget_B, jnp.int32)
    return _run(self.graphdef, self.state, tokens_BT, positions_BT, valid_BT, cache, budget_B,
                budget=budget, hidden_only=hidden_only)

  def __call__(self, tokens_BT, budget: int | None = None, **kwargs) -> jax.Array:
    return self.forward(tokens_BT, budget=budget, **kwargs).logits_BTV

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return init_cache(self.config, batch, max_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "budget", "hidden_only"))
def _run(graphdef, state, tokens_BT, positions_BT, valid_BT, cache, budget_B, *, budget, hidden_only):
  # The graph definition is a static argument, so models of the same structure share compiled programs.
  model = nnx.merge(graphdef, state)
  return model(tokens_BT, positions_BT=positions_BT, valid_BT=valid_BT, cache=cache, budget=budget,
               budget_B=budget_B, hidden_only=hidden_only)


def apply_partition(config: ModelConfig, params: dict, partition: Partition) -> dict:
  """Permute and split expert weights of every MoE layer (done once, at load)."""
  width = config.moe_intermediate_size
  n = partition.num_sub_experts
  missing = [i for i in config.moe_layer_indices if i not in partition.layers]
  if missing:
    raise ValueError(f"partition has no entry for MoE layers {missing}; build it for this checkpoint")
  layers = dict(params["layers"])
  for i in config.moe_layer_indices:
    partition.layers[i].validate(config.num_experts, width, n, i)
    block = dict(layers[i])
    block["mlp"] = split_expert_params(block["mlp"], partition.layers[i], n, partition.router)
    layers[i] = block
  return {**params, "layers": layers}


def _check_tree(expected: dict, actual: dict, prefix: str = "") -> None:
  if not isinstance(actual, dict):
    raise ValueError(f"parameter {prefix or '<root>'}: expected a subtree, got {type(actual).__name__}")
  missing = sorted(str(k) for k in expected if k not in actual)
  extra = sorted(str(k) for k in actual if k not in expected)
  if missing or extra:
    raise ValueError(f"parameters at {prefix or '<root>'} do not match the model: missing {missing}, unexpected {extra}")
  for key, value in expected.items():
    path = f"{prefix}.{key}" if prefix else str(key)
    if isinstance(value, dict):
      _check_tree(value, actual[key], path)
    elif tuple(value.shape) != tuple(np.shape(actual[key])):
      raise ValueError(f"parameter {path} has shape {tuple(np.shape(actual[key]))}, expected {tuple(value.shape)}")


def load_tokenizer(path: Path):
  """Load the checkpoint's `tokenizers.Tokenizer`, or return None when it has no tokenizer.json."""
  file = Path(path) / TOKENIZER_DIR / "tokenizer.json"
  if not file.is_file():
    return None
  from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel

  return Tokenizer.from_file(str(file))


def load(path: str | os.PathLike, partition: str | os.PathLike | Partition | None = None, *,
         backend: Backend = "auto", tile_rows: int | None = None) -> PrismModel:
  """Load a prism checkpoint, optionally with a partition directory for sub-expert budgets."""
  path = Path(path)
  config, params, meta = load_params(path)
  if partition is not None and not isinstance(partition, Partition):
    from prism_jax.partition_io import read_partition  # pylint: disable=import-outside-toplevel

    partition = read_partition(partition)
  if partition is not None and partition.fingerprint != meta["fingerprint"]:
    raise ValueError(f"partition was built for checkpoint {partition.fingerprint}, but {path} has fingerprint "
                     f"{meta['fingerprint']}; run `prism partition` on this checkpoint")
  logger.info("loaded %s (%s, %d layers, fingerprint %s)", path, config.family, config.num_layers, meta["fingerprint"])
  return PrismModel(config, params, partition=partition, backend=backend, tile_rows=tile_rows,
                    tokenizer=load_tokenizer(path), fingerprint=meta["fingerprint"], path=path)
