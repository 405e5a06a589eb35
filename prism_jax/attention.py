"""Grouped-query attention with rotary embeddings, QK-norm, clipping and a KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from prism_jax.config import ModelConfig
from prism_jax.layers import RMSNorm
from prism_jax.rope import apply_rotary

_MASKED = -1e30


class Attention(nnx.Module):
  """Causal self-attention; optional sliding window, QKV bias, QK-norm and `clip_qkv`."""

  def __init__(self, config: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.dtype)
    d, h, hkv, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    linear = lambda d_in, d_out, bias: nnx.Linear(
        d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs
    )
    self.q_proj = linear(d, h * dh, config.qkv_bias)
    self.k_proj = linear(d, hkv * dh, config.qkv_bias)
    self.v_proj = linear(d, hkv * dh, config.qkv_bias)
    self.o_proj = linear(h * dh, d, False)
    if config.qk_norm == "projection":
      # OLMoE: one norm over the whole projection, before splitting into heads.
      self.q_norm = RMSNorm(h * dh, eps=config.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(hkv * dh, eps=config.rms_norm_eps, dtype=dtype)
    elif config.qk_norm == "head":
      # Qwen3: one norm per head over head_dim.
      self.q_norm = RMSNorm(dh, eps=config.rms_norm_eps, dtype=dtype)
      self.k_norm = RMSNorm(dh, eps=config.rms_norm_eps, dtype=dtype)
    self.qk_norm = config.qk_norm
    self.clip_qkv = config.clip_qkv
    self.num_heads, self.num_kv_heads, self.head_dim = h, hkv, dh
    self.window = config.layer_window(layer)

  def _project(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    q, k, v = self.q_proj(x_BTD), self.k_proj(x_BTD), self.v_proj(x_BTD)
    if self.qk_norm == "projection":
      q, k = self.q_norm(q), self.k_norm(k)
    if self.clip_qkv is not None:
      q, k, v = (jnp.clip(t, -self.clip_qkv, self.clip_qkv) for t in (q, k, v))
    b, t = x_BTD.shape[:2]
    q = q.reshape(b, t, self.num_heads, self.head_dim)
    k = k.reshape(b, t, self.num_kv_heads, self.head_dim)
    v = v.reshape(b, t, self.num_kv_heads, self.head_dim)
    if self.qk_norm == "head":
      q, k = self.q_norm(q), self.k_norm(k)
    return q, k, v

  def __call__(
      self,
      x_BTD: jax.Array,
      positions_BT: jax.Array,
      cos_BTD: jax.Array,
      sin_BTD: jax.Array,
      cache: tuple[jax.Array, jax.Array] | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attend over this chunk, or over the cache after writing this chunk into it.

    `cache` is (keys, values), each [B, T_max, H_kv, head_dim]. Tokens are written at their
    positions; a position >= T_max (used for padding) is dropped.
    """
    q_BTHD, k_BTKD, v_BTKD = self._project(x_BTD)
    q_BTHD = apply_rotary(q_BTHD, cos_BTD, sin_BTD)
    k_BTKD = apply_rotary(k_BTKD, cos_BTD, sin_BTD)

    if cache is None:
      keys, values, key_positions_BS = k_BTKD, v_BTKD, positions_BT
      new_cache = None
    else:
      cache_k, cache_v = cache
      batch_index = jnp.arange(x_BTD.shape[0])[:, None]
      cache_k = cache_k.at[batch_index, positions_BT].set(k_BTKD.astype(cache_k.dtype), mode="drop")
      cache_v = cache_v.at[batch_index, positions_BT].set(v_BTKD.astype(cache_v.dtype), mode="drop")
      keys, values = cache_k, cache_v
      key_positions_BS = jnp.broadcast_to(jnp.arange(cache_k.shape[1]), (x_BTD.shape[0], cache_k.shape[1]))
      new_cache = (cache_k, cache_v)

    b, t = x_BTD.shape[:2]
    groups = self.num_heads // self.num_kv_heads
    q_BTKRD = q_BTHD.reshape(b, t, self.num_kv_heads, groups, self.head_dim).astype(jnp.float32)
    scores = jnp.einsum("btkrd,bskd->bkrts", q_BTKRD, keys.astype(jnp.float32)) * self.head_dim**-0.5

    query_pos = positions_BT[:, None, None, :, None]
    key_pos = key_positions_BS[:, None, None, None, :]
    visible = key_pos <= query_pos
    if self.window is not None:
      visible &= query_pos - key_pos < self.window
    scores = jnp.where(visible, scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkrts,bskd->btkrd", probs, values.astype(jnp.float32))
    out = out.reshape(b, t, self.num_heads * self.head_dim).astype(x_BTD.dtype)
    return self.o_proj(out), new_cache
