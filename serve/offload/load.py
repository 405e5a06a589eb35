"""Build an `OffloadedModel` from a loaded `PrismModel` or straight from a checkpoint directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from flax import nnx

from prism_jax.checkpoint import load_params
from prism_jax.config import Backend, SubExpertConfig
from prism_jax.model import PrismModel, apply_partition, load_tokenizer
from prism_jax.moe import Dispatch
from prism_jax.subexperts import Partition
from serve.offload.config import OffloadConfig
from serve.offload.model import OffloadedModel
from serve.offload.store import weights_digest

logger = logging.getLogger(__name__)


def offload_model(model: PrismModel, offload: OffloadConfig = OffloadConfig(), *,
                  progress: bool = False) -> OffloadedModel:
  """Build an offloaded copy of `model` that shares its non-expert arrays and copies its experts out.

  The PrismModel keeps its own expert weights: drop it to free them.
  """
  params = nnx.to_pure_dict(model.state)
  digest = weights_digest(model.config, model.sub, params["layers"], model.fingerprint)
  return OffloadedModel(model.config, params, model.sub, offload, digest=digest, dispatch=model.dispatch,
                        tokenizer=model.tokenizer, fingerprint=model.fingerprint, path=model.path, progress=progress)


def load_offloaded(path: str | os.PathLike, partition: str | os.PathLike | Partition | None = None,
                   offload: OffloadConfig = OffloadConfig(), *, backend: Backend = "auto",
                   tile_rows: int | None = None, progress: bool = True) -> OffloadedModel:
  """Load a checkpoint in offload mode: weights are read on the host, and only the resident
  part and the cache go to the device (unlike `prism_jax.load`, which puts every weight there).
  """
  path = Path(path)
  config, params, meta = load_params(path)
  sub = SubExpertConfig()
  if partition is not None:
    if not isinstance(partition, Partition):
      from prism_jax.partition_io import read_partition  # pylint: disable=import-outside-toplevel

      partition = read_partition(partition)
    if partition.fingerprint != meta["fingerprint"]:
      raise ValueError(f"partition was built for checkpoint {partition.fingerprint}, but {path} has fingerprint "
                       f"{meta['fingerprint']}; run `prism partition` on this checkpoint")
    sub = SubExpertConfig(partition.num_sub_experts, partition.router, partition.num_core_neurons)
    sub.check_divides(config.moe_intermediate_size)
    params = apply_partition(config, params, partition)
  digest = weights_digest(config, sub, params["layers"], meta["fingerprint"])
  logger.info("loading %s in offload mode (%s, %d layers, N=%d)", path, config.family, config.num_layers,
              sub.num_sub_experts)
  return OffloadedModel(config, params, sub, offload, digest=digest, dispatch=Dispatch(backend, tile_rows),
                        tokenizer=load_tokenizer(path), fingerprint=meta["fingerprint"], path=path, progress=progress)
