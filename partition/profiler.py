"""Activation profiler: |a(x)| of every expert on the calibration tokens its router sends it.

The original (unpartitioned) model runs one block at a time over all calibration rows.
At an MoE layer, the parent router picks each valid token's top-K experts; each expert
keeps a uniform random subset of at most `max_tokens_per_expert` of its tokens, and for
those the profiler records a_j(x) = silu(x W_gate[:, j]) * (x W_up[:, j]) in absolute value.
Then the original layer runs on every row to give the next layer its input. One layer's
activations are yielded at a time, so memory contains the residual stream plus one layer.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from partition.calibration import Sequences
from partition.config import ProfileConfig
from partition.layerwise import attention_step, embed_tokens, ffn_step
from prism_jax.model import PrismModel
from prism_jax.moe import route_parent

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class LayerProfile:
  """Calibration statistics of one MoE layer.

  acts_ETF: |a| of the sampled tokens of each expert, zero rows past count_E[e].
  count_E: tokens kept per expert; routed_E: tokens the router sent each expert.
  inputs_SD: a random sample of the layer's (normed) inputs, for router tuning (may be empty).
  """

  layer: int
  acts_ETF: jax.Array
  count_E: np.ndarray
  routed_E: np.ndarray
  inputs_SD: np.ndarray


@functools.partial(jax.jit, static_argnames=("top_k", "normalize"))
def _route(router_DE: jax.Array, h_SD: jax.Array, *, top_k: int, normalize: bool) -> jax.Array:
  return route_parent(h_SD, router_DE, top_k, normalize)[1]


@jax.jit
def _expert_acts(gate_EDF: jax.Array, up_EDF: jax.Array, h_ECD: jax.Array, mask_EC: jax.Array) -> jax.Array:
  x = h_ECD.astype(jnp.float32)
  gate = jnp.einsum("ecd,edf->ecf", x, gate_EDF.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  up = jnp.einsum("ecd,edf->ecf", x, up_EDF.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
  return jnp.abs(jax.nn.silu(gate) * up) * mask_EC[:, :, None]


def _padded_rows(count: int, cap: int) -> int:
  """Rows per expert: the next power of two >= count, capped, so layers share compiled solvers."""
  return min(cap, 1 << max(0, int(count - 1).bit_length()))


def sample_tokens(experts_SK: np.ndarray, num_experts: int, cap: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Per expert, up to `cap` of the token rows routed to it: (rows [E, C], count [E], routed [E])."""
  num_tokens, top_k = experts_SK.shape
  flat = experts_SK.reshape(-1)
  order = np.argsort(flat, kind="stable")
  routed = np.bincount(flat, minlength=num_experts)
  starts = np.concatenate([[0], np.cumsum(routed)])
  chosen = []
  for e in range(num_experts):
    rows = order[starts[e]:starts[e + 1]] // top_k
    if len(rows) > cap:
      rows = np.sort(rng.choice(rows, cap, replace=False))
    chosen.append(rows)
  count = np.array([len(r) for r in chosen])
  width = _padded_rows(int(count.max(initial=1)), cap)
  table = np.zeros((num_experts, width), np.int64)
  for e, rows in enumerate(chosen):
    table[e, :len(rows)] = rows
  return table, count, routed


def profile_layers(model: PrismModel, sequences: Sequences, config: ProfileConfig = ProfileConfig(), *,
                   num_inputs: int = 0) -> Iterator[LayerProfile]:
  """Yield a `LayerProfile` for every MoE layer, in order."""
  if model.num_sub_experts != 1:
    raise ValueError("profile the original model: load the checkpoint without a partition")
  mc = model.config
  decoder = model.module()
  embed_graph, embed_state = nnx.split(decoder.embed)
  tokens_BT, valid_BT = sequences.tokens_BT, sequences.valid_BT
  rows = range(0, tokens_BT.shape[0], config.batch_size)
  x_chunks = [embed_tokens(embed_graph, embed_state, jnp.asarray(tokens_BT[r:r + config.batch_size])) for r in rows]
  valid_chunks = [jnp.asarray(valid_BT[r:r + config.batch_size]) for r in rows]
  rng = np.random.default_rng(config.seed)

  for layer, block in enumerate(tqdm(decoder.layers, desc="layers", unit="layer", leave=False)):
    graphdef, state = nnx.split(block)
    steps = [attention_step(graphdef, mc, state, x) for x in x_chunks]
    x_chunks = [x for x, _ in steps]
    h_chunks = [h for _, h in steps]
    if block.is_moe:
      yield _profile_moe(layer, block, h_chunks, valid_chunks, config, rng, num_inputs)
    x_chunks = [x + ffn_step(graphdef, state, h, v) for x, h, v in zip(x_chunks, h_chunks, valid_chunks)]


def _profile_moe(layer: int, block: nnx.Module, h_chunks: list[jax.Array], valid_chunks: list[jax.Array],
                 config: ProfileConfig, rng: np.random.Generator, num_inputs: int) -> LayerProfile:
  mlp = block.mlp
  d = h_chunks[0].shape[-1]
  h_SD = np.concatenate([np.asarray(h).reshape(-1, d)[np.asarray(v).reshape(-1)]
                         for h, v in zip(h_chunks, valid_chunks)])
  experts_SK = np.asarray(_route(mlp.router[...], jnp.asarray(h_SD), top_k=mlp.top_k, normalize=mlp.normalize))
  num_experts = mlp.num_experts
  table_EC, count_E, routed_E = sample_tokens(experts_SK, num_experts, config.max_tokens_per_expert, rng)
  mask_EC = np.arange(table_EC.shape[1])[None, :] < count_E[:, None]

  gate, up = mlp.gate[...], mlp.up[...]
  width = gate.shape[-1]
  # Experts per call so one call's gathered inputs and outputs stay near 2**26 floats.
  per_call = max(1, 2**26 // (table_EC.shape[1] * max(d, width)))
  pieces = []
  for e0 in range(0, num_experts, per_call):
    e1 = min(num_experts, e0 + per_call)
    pieces.append(_expert_acts(gate[e0:e1], up[e0:e1], jnp.asarray(h_SD[table_EC[e0:e1]]),
                               jnp.asarray(mask_EC[e0:e1])))
  acts_ETF = jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]

  sample = min(num_inputs, h_SD.shape[0])
  inputs_SD = h_SD[np.sort(rng.choice(h_SD.shape[0], sample, replace=False))] if sample else h_SD[:0]
  silent = [e for e in range(num_experts) if routed_E[e] == 0]
  logger.info("layer %d: %d tokens, %d-%d routed per expert, %d experts without tokens", layer, h_SD.shape[0],
              routed_E.min(), routed_E.max(), len(silent))
  return LayerProfile(layer, acts_ETF, count_E, routed_E, inputs_SD)
