"""Choose and fill the slow tier for a model: disk files on CPU, pinned host memory on accelerators."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prism_jax.config import ModelConfig, SubExpertConfig
from serve.offload.config import OffloadConfig
from serve.offload.disk_tier import DiskTier, OffloadManifest, prepare_offload_dir
from serve.offload.host_tier import HostTier
from serve.offload.tier import SlowTier

logger = logging.getLogger(__name__)

ExpertSource = Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]]


def weights_digest(config: ModelConfig, sub: SubExpertConfig, layers: dict, fingerprint: str | None) -> str:
  """Identify the expert weights of a sub-expert model cheaply.

  Hashes the config, the sub-expert settings, the checkpoint fingerprint, each MoE layer's
  router, and one row of every group's gate, up and down ([G, F/N] each), so another
  checkpoint or another neuron permutation gives another digest without reading all weights.
  """
  digest = hashlib.sha256()
  digest.update(config.to_json().encode())
  digest.update(repr(dataclasses.astuple(sub)).encode())
  digest.update((fingerprint or "").encode())
  for layer in config.moe_layer_indices:
    mlp = layers[layer]["mlp"]
    digest.update(np.asarray(mlp["router"]).tobytes())
    for sample in (mlp["gate"][:, 0, :], mlp["up"][:, 0, :], mlp["down"][:, :, 0]):
      digest.update(np.ascontiguousarray(np.asarray(sample)).tobytes())
  return digest.hexdigest()[:16]


def build_tier(offload: OffloadConfig, config: ModelConfig, sub: SubExpertConfig, moe_layers: tuple[int, ...],
               source: ExpertSource, unit_groups: int, digest: str, *,
               progress: bool = False) -> tuple[SlowTier, Path | None]:
  """Build the slow tier that `offload.tier` names; also return the temporary directory to delete, or None."""
  kind = offload.tier
  if kind == "auto":
    kind = "disk" if jax.default_backend() == "cpu" else "host"
  if kind == "host":
    return HostTier(moe_layers, source, unit_groups, allow_cpu=offload.allow_host_tier_on_cpu,
                    progress=progress), None
  temporary = None
  directory = offload.offload_dir
  if directory is None:
    temporary = Path(tempfile.mkdtemp(prefix="prism-offload-"))
    directory = temporary
    logger.info("no offload_dir given; writing expert files to %s (deleted on close)", directory)
  width = config.moe_intermediate_size // sub.num_sub_experts
  manifest = OffloadManifest(digest=digest, dtype=str(jnp.dtype(config.dtype)), hidden_size=config.hidden_size,
                             width=width, num_groups=config.num_experts * sub.num_sub_experts,
                             layers=tuple(moe_layers))
  prepare_offload_dir(directory, manifest, source, progress=progress)
  return DiskTier(directory, unit_groups), temporary
