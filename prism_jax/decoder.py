"""Decoder-only MoE transformer: embedding, blocks of attention + (MoE or dense) FFN, head."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from prism_jax.attention import Attention
from prism_jax.config import ModelConfig, SubExpertConfig
from prism_jax.layers import RMSNorm, SwiGLU
from prism_jax.moe import Dispatch, MoEInfo, SubExpertMoE
from prism_jax.rope import rotary_tables

KVCache = tuple[tuple[jax.Array, jax.Array], ...]


@struct.dataclass
class ForwardOutput:
  """Logits [B, T, V] in float32, the updated KV cache (or None), and one MoEInfo per MoE layer."""

  logits_BTV: jax.Array
  cache: KVCache | None
  moe: tuple[MoEInfo, ...]


def init_cache(config: ModelConfig, batch: int, max_len: int) -> KVCache:
  """Build a zeroed KV cache for `batch` rows of up to `max_len` positions."""
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  dtype = jnp.dtype(config.dtype)
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))


class Block(nnx.Module):
  """Pre-norm residual block: attention, then a dense or sub-expert MoE feed-forward."""

  def __init__(self, config: ModelConfig, layer: int, sub: SubExpertConfig, dispatch: Dispatch, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    self.attn_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
    self.attn = Attention(config, layer, rngs=rngs)
    self.mlp_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
    self.is_moe = config.moe_layers[layer]
    if self.is_moe:
      self.mlp = SubExpertMoE(config, sub, dispatch, rngs=rngs)
    else:
      self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, dtype=dtype, rngs=rngs)


class Decoder(nnx.Module):
  """The whole model. Call with int32 tokens [B, T]; see `__call__` for the options."""

  def __init__(
      self,
      config: ModelConfig,
      sub: SubExpertConfig = SubExpertConfig(),
      dispatch: Dispatch = Dispatch(),
      *,
      rngs: nnx.Rngs,
  ):
    dtype = jnp.dtype(config.dtype)
    self.config, self.sub = config, sub
    self.embed = nnx.Embed(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.layers = nnx.List([Block(config, i, sub, dispatch, rngs=rngs) for i in range(config.num_layers)])
    self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
    if not config.tie_word_embeddings:
      self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                param_dtype=dtype, rngs=rngs)

  def init_cache(self, batch: int, max_len: int) -> KVCache:
    return init_cache(self.config, batch, max_len)

  def __call__(
      self,
      tokens_BT: jax.Array,
      *,
      positions_BT: jax.Array | None = None,
      valid_BT: jax.Array | None = None,
      cache: KVCache | None = None,
      budget: int | None = None,
      budget_B: jax.Array | None = None,
      hidden_only: bool = False,
  ) -> ForwardOutput:
    """Run the model.

    positions_BT: absolute positions (default 0..T-1). valid_BT: False marks padding, which
    is kept out of routing and group sizes. cache: from `init_cache`, written at the
    positions. budget: static sub-experts per token (None = full). budget_B: per-row
    budgets, each <= `budget`, run inside the same program.
    """
    b, t = tokens_BT.shape
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if valid_BT is None:
      valid_BT = jnp.ones((b, t), bool)
    budget_S = None if budget_B is None else jnp.repeat(budget_B.astype(jnp.int32), t)
    cos, sin = rotary_tables(self.config.rope, self.config.head_dim, positions_BT)

    x = self.embed(tokens_BT)
    new_cache, infos = [], []
    for i, block in enumerate(self.layers):
      with jax.named_scope(f"layer_{i}"):
        attn_out, layer_cache = block.attn(block.attn_norm(x), positions_BT, cos, sin,
                                           None if cache is None else cache[i])
        x = x + attn_out
        new_cache.append(layer_cache)
        h = block.mlp_norm(x)
        if block.is_moe:
          y_SD, info = block.mlp(h.reshape(b * t, -1), valid_BT.reshape(-1), budget, budget_S)
          infos.append(info)
          x = x + y_SD.reshape(b, t, -1)
        else:
          x = x + block.mlp(h)

    x = self.final_norm(x)
    if hidden_only:
      logits = x
    elif self.config.tie_word_embeddings:
      logits = self.embed.attend(x)
    else:
      logits = self.lm_head(x)
    return ForwardOutput(
        logits_BTV=logits.astype(jnp.float32),
        cache=None if cache is None else tuple(new_cache),
        moe=tuple(infos),
    )
