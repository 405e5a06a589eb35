"""The unpartitioned model run one block at a time, with one jitted function per step.

The profiler needs each MoE layer's input on its own. The top-k baseline needs the
original layer with fewer experts. Both use the blocks of `PrismModel.module()` through
these functions. Blocks with the same structure share a graphdef, so their compiled
functions are shared too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.config import ModelConfig
from prism_jax.model import PrismModel
from prism_jax.moe import Assignments, route_parent
from prism_jax.rope import rotary_tables


@functools.partial(jax.jit, static_argnums=(0,))
def embed_tokens(graphdef: nnx.GraphDef, state: nnx.State, tokens_BT: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(tokens_BT)


@functools.partial(jax.jit, static_argnums=(0, 1))
def attention_step(graphdef: nnx.GraphDef, config: ModelConfig, state: nnx.State,
                   x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Residual stream after the block's attention, and the normed FFN input."""
  block = nnx.merge(graphdef, state)
  b, t = x_BTD.shape[:2]
  positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  cos, sin = rotary_tables(config.rope, config.head_dim, positions_BT)
  attn_out, _ = block.attn(block.attn_norm(x_BTD), positions_BT, cos, sin, None)
  x_BTD = x_BTD + attn_out
  return x_BTD, block.mlp_norm(x_BTD)


@functools.partial(jax.jit, static_argnums=(0,))
def ffn_step(graphdef: nnx.GraphDef, state: nnx.State, h_BTD: jax.Array, valid_BT: jax.Array) -> jax.Array:
  """Run the block's original feed-forward layer (all K experts of an MoE layer)."""
  block = nnx.merge(graphdef, state)
  if not block.is_moe:
    return block.mlp(h_BTD)
  b, t, d = h_BTD.shape
  y_SD, _ = block.mlp(h_BTD.reshape(b * t, d), valid_BT.reshape(-1))
  return y_SD.reshape(b, t, d)


def top_k_moe(mlp: nnx.Module, h_SD: jax.Array, valid_S: jax.Array, top_k: int, renormalize: bool) -> jax.Array:
  """Run the original MoE layer (N = 1) on each token's `top_k` best-ranked experts only.

  The weights are those of the full top-K routing (normalized over K when the config sets
  norm_topk_prob), cut to the first `top_k` ranks, so the output is the full layer's minus the dropped
  experts' terms. With `renormalize` they are rescaled to sum as the K weights did.
  """
  weights_SK, experts_SK, _ = route_parent(h_SD, mlp.router[...], mlp.top_k, mlp.normalize)
  weights_Sk, experts_Sk = weights_SK[:, :top_k], experts_SK[:, :top_k]
  if renormalize:
    weights_Sk = weights_Sk * (jnp.sum(weights_SK, -1, keepdims=True) / jnp.sum(weights_Sk, -1, keepdims=True))
  num_tokens = h_SD.shape[0]
  assignments = Assignments(
      token_A=jnp.repeat(jnp.arange(num_tokens), top_k),
      group_A=experts_Sk.reshape(-1).astype(jnp.int32),
      weight_A=weights_Sk.reshape(-1),
      valid_A=jnp.repeat(valid_S, top_k),
  )
  # NOTE: `_run_groups` is SubExpertMoE's private dispatch; it is used so the baseline runs
  # the same grouped matmuls as the partitioned model.
  y_SD = mlp._run_groups(h_SD, assignments)  # pylint: disable=protected-access
  if hasattr(mlp, "shared_expert"):
    gate_S1 = jax.nn.sigmoid(jnp.dot(h_SD, mlp.shared_expert_gate[...]).astype(jnp.float32))
    y_SD = y_SD + gate_S1 * mlp.shared_expert(h_SD).astype(jnp.float32)
  return y_SD.astype(h_SD.dtype)


def top_k_forward_fn(model: PrismModel, top_k: int, renormalize: bool):
  """Build a jitted `tokens_BT, valid_BT -> logits_BTV` of the original model with top-k lowered to `top_k`."""
  if model.num_sub_experts != 1:
    raise ValueError("the top-k baseline runs on the unpartitioned model; load the checkpoint without a partition")
  config = model.config
  graphdef, state = model.graphdef, model.state

  def forward(state, tokens_BT, valid_BT):
    decoder = nnx.merge(graphdef, state)
    b, t = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cos, sin = rotary_tables(config.rope, config.head_dim, positions_BT)
    x = decoder.embed(tokens_BT)
    for block in decoder.layers:
      attn_out, _ = block.attn(block.attn_norm(x), positions_BT, cos, sin, None)
      x = x + attn_out
      h = block.mlp_norm(x)
      if block.is_moe:
        x = x + top_k_moe(block.mlp, h.reshape(b * t, -1), valid_BT.reshape(-1), top_k, renormalize).reshape(x.shape)
      else:
        x = x + block.mlp(h)
    x = decoder.final_norm(x)
    logits = decoder.embed.attend(x) if config.tie_word_embeddings else decoder.lm_head(x)
    return logits.astype(jnp.float32)

  jitted = jax.jit(forward)
  return lambda tokens_BT, valid_BT: jitted(state, jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(valid_BT))
