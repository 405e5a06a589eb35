"""The `native` grouped matmul: the C++ kernel through `jax.ffi.ffi_call`, with a custom VJP.

The kernel takes float32 `lhs [S, D]`, `rhs [G, D, F]` and int32 `group_sizes [G]` and
returns `[S, F]` with the `jax.lax.ragged_dot` contract (rows past the groups are zero).
d lhs runs the same kernel on the transposed weights; d rhs uses the tiled loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.native.build import load_kernels
from prism_jax.tile_matmul import tile_rhs_gradient


def _call(lhs_SD: jax.Array, rhs_GDF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  load_kernels()
  out_type = jax.ShapeDtypeStruct((lhs_SD.shape[0], rhs_GDF.shape[2]), jnp.float32)
  kernel = jax.ffi.ffi_call("prism_grouped_matmul_f32", out_type, vmap_method="sequential")
  return kernel(lhs_SD, rhs_GDF, group_sizes_G.astype(jnp.int32))


@jax.custom_vjp
def native_matmul(lhs_SD: jax.Array, rhs_GDF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  """Compute `ragged_dot(lhs_SD, rhs_GDF, group_sizes_G)` for float32 inputs with the C++ kernel."""
  if lhs_SD.dtype != jnp.float32 or rhs_GDF.dtype != jnp.float32:
    raise TypeError(f"native_matmul takes float32 inputs, got {lhs_SD.dtype} and {rhs_GDF.dtype}")
  return _call(lhs_SD, rhs_GDF, group_sizes_G)


def _fwd(lhs_SD, rhs_GDF, group_sizes_G):
  return native_matmul(lhs_SD, rhs_GDF, group_sizes_G), (lhs_SD, rhs_GDF, group_sizes_G)


def _bwd(residuals, dout_SF):
  lhs_SD, rhs_GDF, group_sizes_G = residuals
  dout_SF = dout_SF.astype(jnp.float32)
  # Through native_matmul, not the raw call, so that d lhs can be differentiated again.
  dlhs_SD = native_matmul(dout_SF, jnp.swapaxes(rhs_GDF, 1, 2), group_sizes_G)
  drhs_GDF = tile_rhs_gradient(lhs_SD, dout_SF, group_sizes_G)
  return dlhs_SD, drhs_GDF, None


native_matmul.defvjp(_fwd, _bwd)
