"""`build_partition`: profile, solve every MoE layer, derive the routers, summarize."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx

from partition.calibration import Sequences, make_sequences
from partition.config import PartitionConfig
from partition.objective import expert_costs
from partition.profiler import LayerProfile, profile_layers
from partition.router_tuning import tune_linear_router
from partition.routers import core_neurons, repeated_linear_router
from partition.solvers import solve
from partition.solvers.base import identity_permutations
from prism_jax.checkpoint import fingerprint as checkpoint_fingerprint
from prism_jax.model import PrismModel
from prism_jax.subexperts import LayerPartition, Partition

logger = logging.getLogger(__name__)


def model_fingerprint(model: PrismModel) -> str:
  """Return the checkpoint fingerprint, computed from config and routers for a model built in memory."""
  if model.fingerprint is not None:
    return model.fingerprint
  decoder = model.module()
  routers = [np.asarray(decoder.layers[i].mlp.router[...]) for i in model.config.moe_layer_indices]
  return checkpoint_fingerprint(model.config, routers)


def expert_params(model: PrismModel) -> dict:
  """Return the model's parameters as an expert-layout (N = 1) pure dict of NumPy arrays."""
  if model.num_sub_experts != 1:
    raise ValueError("expected an unpartitioned model; load the checkpoint without a partition")
  return jax.tree_util.tree_map(np.asarray, nnx.to_pure_dict(model.state))


def partitioned_model(model: PrismModel, partition: Partition) -> PrismModel:
  """Build a model with the weights of the unpartitioned `model`, split into sub-experts by `partition`."""
  if partition.fingerprint != model_fingerprint(model):
    raise ValueError(f"partition was built for checkpoint {partition.fingerprint}, but the model has fingerprint "
                     f"{model_fingerprint(model)}; run `prism partition` on this checkpoint")
  return PrismModel(model.config, expert_params(model), partition=partition, backend=model.dispatch.backend,
                    tile_rows=model.dispatch.tile_rows, tokenizer=model.tokenizer, fingerprint=model.fingerprint,
                    path=model.path)


def check_model(model: PrismModel, config: PartitionConfig) -> None:
  """Raise with the fix when the model cannot be partitioned with `config`."""
  if not model.config.moe_layer_indices:
    raise ValueError(f"the checkpoint ({model.config.family}, {model.config.num_layers} layers) has no MoE layers, "
                     "so there are no experts to split; use a Mixture-of-Experts checkpoint")
  if model.num_sub_experts != 1:
    raise ValueError("the model is already partitioned; load the checkpoint without a partition")
  config.check_width(model.config.moe_intermediate_size)


def build_partition(model: PrismModel, calib_tokens: Sequence[int] | np.ndarray,
                    config: PartitionConfig = PartitionConfig(), *,
                    calibration_source: str | None = None) -> tuple[Partition, dict[str, Any]]:
  """Split every expert of `model` into `config.num_sub_experts` sub-experts.

  calib_tokens: one stream of token ids (cut into rows of `config.profile.sequence_length`)
  or rows [B, T]. Returns the partition and a JSON-ready summary: per layer the solver's
  objective, the reference solvers' objectives and the wall seconds, plus the calibration.
  """
  check_model(model, config)
  mc = model.config
  sequences = make_sequences(calib_tokens, config.profile.sequence_length, bos_token_id=mc.bos_token_id,
                             min_tokens=config.profile.min_tokens, max_tokens=config.profile.max_tokens,
                             vocab_size=mc.vocab_size)
  num_inputs = config.router_tuning.max_tokens if config.router_tuning.steps else 0
  key = jax.random.key(config.seed)
  layers: dict[int, LayerPartition] = {}
  layer_summaries: dict[str, Any] = {}
  start = time.perf_counter()
  for profile in profile_layers(model, sequences, config.profile, num_inputs=num_inputs):
    layers[profile.layer], layer_summaries[str(profile.layer)] = partition_layer(
        model, profile, config, jax.random.fold_in(key, profile.layer))

  total = sum(s["objective"] for s in layer_summaries.values())
  summary = {
      "solver": config.solver,
      "keep": config.keep,
      "objective": total,
      "reference_objectives": {
          name: sum(s["references"][name] for s in layer_summaries.values()) for name in config.reference_solvers
      },
      "seconds": time.perf_counter() - start,
      "calibration": _describe(sequences, calibration_source, config),
      "layers": layer_summaries,
      "config": dataclasses.asdict(config),
  }
  partition = Partition(config.num_sub_experts, config.router, layers, model_fingerprint(model))
  return partition, summary


def partition_layer(model: PrismModel, profile: LayerProfile, config: PartitionConfig,
                    key: jax.Array) -> tuple[LayerPartition, dict[str, Any]]:
  """Solve one profiled MoE layer and derive its routers; returns the layer and its summary."""
  n, keep = config.num_sub_experts, config.keep
  num_experts, _, width = profile.acts_ETF.shape
  result = solve(config.solver, profile.acts_ETF, n, keep, key, config.solvers)
  permutation_EF = result.permutation_EF.copy()
  # Experts the calibration never reached have no statistics: keep their neurons in stored order.
  silent = [int(e) for e in np.nonzero(profile.count_E == 0)[0]]
  permutation_EF[silent] = identity_permutations(len(silent), width)
  if silent:
    logger.warning("layer %d: experts %s received no calibration tokens; they keep the identity split",
                   profile.layer, silent)
  cost = float(np.sum(expert_costs(profile.acts_ETF, permutation_EF, n, keep)))

  references = {}
  for name in config.reference_solvers:
    ref = result if name == config.solver else solve(name, profile.acts_ETF, n, keep, key, config.solvers)
    references[name] = ref.cost
  core_ENC = core_neurons(profile.acts_ETF, permutation_EF, n, config.num_core_neurons)

  linear_router_DG = None
  tuning = None
  if config.router == "linear":
    mlp = model.module().layers[profile.layer].mlp
    linear_router_DG = repeated_linear_router(np.asarray(mlp.router[...]), n)
    if config.router_tuning.steps:
      linear_router_DG, tuning = tune_linear_router(mlp, permutation_EF, linear_router_DG, profile.inputs_SD, n,
                                                    config.router_tuning)

  random_cost = references.get("random")
  summary = {
      "objective": cost,
      "relative_to_random": cost / random_cost if random_cost else None,
      "references": references,
      "stages": result.stages,
      "seconds": result.seconds,
      "evaluations": result.evaluations,
      "tokens_routed": profile.routed_E.tolist(),
      "tokens_used": profile.count_E.tolist(),
      "fallback_experts": silent,
  }
  if tuning is not None:
    summary["router_tuning"] = tuning
  logger.info("layer %d: %s objective %.4g (random %s) in %.2fs", profile.layer, config.solver, cost,
              f"{random_cost:.4g}" if random_cost else "n/a", result.seconds)
  layer = LayerPartition(permutation_EF.astype(np.int32), core_ENC, linear_router_DG)
  layer.validate(num_experts, width, n, profile.layer)
  return layer, summary


def _describe(sequences: Sequences, source: str | None, config: PartitionConfig) -> dict[str, Any]:
  return {
      "source": source,
      "tokens": sequences.num_tokens,
      "sequences": int(sequences.tokens_BT.shape[0]),
      "sequence_length": int(sequences.tokens_BT.shape[1]),
      "max_tokens_per_expert": config.profile.max_tokens_per_expert,
  }
