"""Small building blocks: RMSNorm and the SwiGLU feed-forward network."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
  """Root-mean-square norm computed in float32, as the reference implementations do."""

  def __init__(self, size: int, *, eps: float, dtype: jnp.dtype = jnp.float32):
    self.scale = nnx.Param(jnp.ones((size,), dtype))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...] * x32.astype(dtype)


class SwiGLU(nnx.Module):
  """Dense feed-forward `down(silu(x @ gate) * (x @ up))`: dense layers and shared experts."""

  def __init__(self, hidden_size: int, width: int, *, dtype: jnp.dtype, rngs: nnx.Rngs):
    make = lambda d_in, d_out: nnx.Linear(d_in, d_out, use_bias=False, dtype=dtype, param_dtype=dtype, rngs=rngs)
    self.gate_proj = make(hidden_size, width)
    self.up_proj = make(hidden_size, width)
    self.down_proj = make(width, hidden_size)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))
