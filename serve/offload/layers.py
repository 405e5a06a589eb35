"""The resident part of the model, split per layer, and the jitted steps of the offload forward.

Everything but the MoE expert weights stays on the device: embedding, attention, norms,
routers (with core-neuron columns or linear routers), shared experts, dense FFNs and the
head. Each piece is an (nnx GraphDef, State) pair built from `prism_jax.decoder` modules, so
the offload forward runs the same code as `PrismModel` for everything outside the experts.
A GraphDef is a static argument: layers of the same structure share one compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.config import ModelConfig, SubExpertConfig
from prism_jax.decoder import Decoder
from prism_jax.grouped_matmul import grouped_matmul
from prism_jax.moe import Dispatch
from prism_jax.rope import rotary_tables
from serve.offload.routing import RoutingSpec, candidates

Part = tuple[Any, Any]  # (nnx GraphDef, nnx State)
EXPERT_KEYS = ("gate", "up", "down")


def _split(module: nnx.Module, params: dict) -> Part:
  graphdef, state = nnx.split(module)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
  return graphdef, state


@dataclasses.dataclass
class LayerParts:
  """One decoder layer without its expert weights."""

  index: int
  is_moe: bool
  attention: tuple[Part, Part, Part]  # attn_norm, attn, mlp_norm
  router: dict[str, jax.Array] | None = None  # router, and core_gate/core_up or linear_router
  shared: Part | None = None  # shared-expert SwiGLU
  shared_gate: jax.Array | None = None
  dense: Part | None = None


@dataclasses.dataclass
class ResidentParts:
  """Embedding, per-layer parts, final norm and head of a model, on the device."""

  embed: Part
  layers: list[LayerParts]
  final_norm: Part
  lm_head: Part | None
  routing: RoutingSpec | None
  rope: Any
  head_dim: int
  tied: bool


def resident_parts(config: ModelConfig, sub: SubExpertConfig, params: dict) -> ResidentParts:
  """Split sub-expert-layout `params` into device-resident parts; expert weights are not touched."""
  abstract = nnx.eval_shape(lambda: Decoder(config, sub, Dispatch(), rngs=nnx.Rngs(0)))
  layers = []
  for i, block in enumerate(abstract.layers):
    p = params["layers"][i]
    attention = (_split(block.attn_norm, p["attn_norm"]), _split(block.attn, p["attn"]),
                 _split(block.mlp_norm, p["mlp_norm"]))
    if not block.is_moe:
      layers.append(LayerParts(i, False, attention, dense=_split(block.mlp, p["mlp"])))
      continue
    mlp = p["mlp"]
    router_keys = [k for k in ("router", "core_gate", "core_up", "linear_router") if k in mlp]
    router = {k: jnp.asarray(mlp[k]) for k in router_keys}
    shared = _split(block.mlp.shared_expert, mlp["shared_expert"]) if "shared_expert" in mlp else None
    shared_gate = jnp.asarray(mlp["shared_expert_gate"]) if "shared_expert_gate" in mlp else None
    layers.append(LayerParts(i, True, attention, router=router, shared=shared, shared_gate=shared_gate))
  routing = None
  if config.moe_layer_indices:
    mlp = abstract.layers[config.moe_layer_indices[0]].mlp
    routing = RoutingSpec(mlp.router_kind, mlp.num_experts, mlp.num_sub_experts, mlp.top_k, mlp.normalize)
  lm_head = None if config.tie_word_embeddings else _split(abstract.lm_head, params["lm_head"])
  return ResidentParts(_split(abstract.embed, params["embed"]), layers, _split(abstract.final_norm,
                       params["final_norm"]), lm_head, routing, config.rope, config.head_dim,
                       config.tie_word_embeddings)


def _merge(part: Part):
  return nnx.merge(*part)


# ---- jitted steps (GraphDefs and routing specs are static) ----------------------------------------


@functools.partial(jax.jit, static_argnames=("rope", "head_dim"))
def embed_step(embed: Part, tokens_BT, positions_BT, *, rope, head_dim):
  cos, sin = rotary_tables(rope, head_dim, positions_BT)
  return _merge(embed)(tokens_BT), cos, sin


@jax.jit
def attention_step(parts: tuple[Part, Part, Part], x_BTD, positions_BT, cos, sin, kv):
  """Attention with its residual; returns (x, mlp_norm(x), new KV cache of the layer)."""
  attn_norm, attn, mlp_norm = (_merge(p) for p in parts)
  out, kv = attn(attn_norm(x_BTD), positions_BT, cos, sin, kv)
  x_BTD = x_BTD + out
  return x_BTD, mlp_norm(x_BTD), kv


@jax.jit
def dense_step(mlp: Part, x_BTD, h_BTD):
  return x_BTD + _merge(mlp)(h_BTD)


@functools.partial(jax.jit, static_argnames=("spec", "budget"))
def predict_step(spec: RoutingSpec, mlp_norm: Part, router: dict, x_BTD, valid_BT, budget_B, *, budget: int):
  """Predict the next MoE layer's candidates from the current residual stream (for prefetching)."""
  b, t, d = x_BTD.shape
  h_SD = _merge(mlp_norm)(x_BTD).reshape(b * t, d)
  budget_S = jnp.repeat(budget_B.astype(jnp.int32), t)
  found = candidates(spec, router, h_SD, valid_BT.reshape(-1), budget_S, budget)
  return found.group_SA, found.mass_SA, found.valid_SA


@functools.partial(jax.jit, static_argnames=("backend", "tile_rows"))
def expert_step(gate_RDW, up_RDW, down_RWD, h_BTD, token_A, row_A, weight_SA, valid_A, *, backend, tile_rows):
  """SwiGLU of each (token, pool row) assignment, weighted and summed per token: float32 [S, D].

  The same sort / grouped matmul / scatter-add as SubExpertMoE, with the pool rows as groups.
  """
  num_rows = gate_RDW.shape[0]
  x_SD = h_BTD.reshape(-1, h_BTD.shape[-1])
  weight_A = weight_SA.reshape(-1)
  # Worked example, rows [2, 0, 2] with the middle one invalid: keys [2, R, 2] sort to order
  # [0, 2, 1] and row sizes [0, 0, 2, ...]; the invalid assignment lands past every row.
  key_A = jnp.where(valid_A, row_A, num_rows)
  order_A = jnp.argsort(key_A, stable=True)
  sizes_R = jnp.zeros((num_rows,), jnp.int32).at[row_A].add(valid_A.astype(jnp.int32))
  token_sorted = token_A[order_A]
  rows_AD = x_SD[token_sorted].astype(gate_RDW.dtype)
  kwargs = dict(backend=backend, tile_rows=tile_rows)
  gate = grouped_matmul(rows_AD, gate_RDW, sizes_R, **kwargs)
  up = grouped_matmul(rows_AD, up_RDW, sizes_R, **kwargs)
  out_AD = grouped_matmul(jax.nn.silu(gate) * up, down_RWD, sizes_R, **kwargs)
  scale_A = jnp.where(valid_A, weight_A, 0.0)[order_A]
  out_AD = out_AD.astype(jnp.float32) * scale_A[:, None]
  return jnp.zeros(x_SD.shape, jnp.float32).at[token_sorted].add(out_AD)


@jax.jit
def moe_residual_step(shared: Part | None, shared_gate, x_BTD, h_BTD, y_SD):
  """Add the shared expert (if any) and the residual, in the dtypes SubExpertMoE uses."""
  h_SD = h_BTD.reshape(-1, h_BTD.shape[-1])
  if shared is not None:
    gate_S1 = jax.nn.sigmoid(jnp.dot(h_SD, shared_gate).astype(jnp.float32))
    y_SD = y_SD + gate_S1 * _merge(shared)(h_SD).astype(jnp.float32)
  return x_BTD + y_SD.astype(h_SD.dtype).reshape(x_BTD.shape)


@functools.partial(jax.jit, static_argnames=("tied", "hidden_only"))
def head_step(final_norm: Part, embed: Part, lm_head: Part | None, x_BTD, *, tied: bool, hidden_only: bool):
  x_BTD = _merge(final_norm)(x_BTD)
  if hidden_only:
    out = x_BTD
  elif tied:
    out = _merge(embed).attend(x_BTD)
  else:
    out = _merge(lm_head)(x_BTD)
  return out.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("tied",))
def logits_step(final_norm: Part, embed: Part, lm_head: Part | None, hidden_BD, *, tied: bool):
  """Logits [B, V] from already-normed hidden states (what `hidden_only` returns)."""
  hidden_BD = hidden_BD.astype(_merge(final_norm).scale.dtype)
  out = _merge(embed).attend(hidden_BD) if tied else _merge(lm_head)(hidden_BD)
  return out.astype(jnp.float32)
