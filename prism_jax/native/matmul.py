"""The `native` grouped matmul: the C++ kernel through `jax.ffi.ffi_call`, with a custom VJP.

The kernel takes float32 `lhs [S, D]`, `rhs [G, D, F]` and int32 `group_sizes [G]` and
returns `[S, F]` with the `jax.lax.ragged_dot` contract (rows past the groups are zero).
d lhs runs the same kernel on the transposed weights. d rhs runs a second kernel, which
multiplies each group's rows, transposed, by its rows of d out.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prism_jax.native.build import load_kernels


def _kernel(target: str, shape: tuple[int, ...], *operands: jax.Array) -> jax.Array:
  load_kernels()
  return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(shape, jnp.float32), vmap_method="sequential")(*operands)


def _call(lhs_SD: jax.Array, rhs_GDF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  shape = (lhs_SD.shape[0], rhs_GDF.shape[2])
  return _kernel("prism_grouped_matmul_f32", shape, lhs_SD, rhs_GDF, group_sizes_G.astype(jnp.int32))


@jax.custom_vjp
def _rhs_gradient(lhs_SD: jax.Array, dout_SF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  shape = (group_sizes_G.shape[0], lhs_SD.shape[1], dout_SF.shape[1])
  return _kernel("prism_grouped_matmul_rhs_grad_f32", shape, lhs_SD.T, dout_SF, group_sizes_G.astype(jnp.int32))


def _rhs_gradient_fwd(lhs_SD, dout_SF, group_sizes_G):
  return _rhs_gradient(lhs_SD, dout_SF, group_sizes_G), (lhs_SD, dout_SF, group_sizes_G)


def _rhs_gradient_bwd(residuals, cotangent_GDF):
  # d rhs[g] = lhs_g^T @ dout_g, so d lhs_g = dout_g @ C[g]^T and d dout_g = lhs_g @ C[g].
  lhs_SD, dout_SF, group_sizes_G = residuals
  dlhs_SD = native_matmul(dout_SF, jnp.swapaxes(cotangent_GDF, 1, 2), group_sizes_G)
  ddout_SF = native_matmul(lhs_SD, cotangent_GDF, group_sizes_G)
  return dlhs_SD, ddout_SF, None


_rhs_gradient.defvjp(_rhs_gradient_fwd, _rhs_gradient_bwd)


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
  # Both products are differentiable again (native_matmul and _rhs_gradient have VJPs).
  dlhs_SD = native_matmul(dout_SF, jnp.swapaxes(rhs_GDF, 1, 2), group_sizes_G)
  drhs_GDF = _rhs_gradient(lhs_SD, dout_SF, group_sizes_G)
  return dlhs_SD, drhs_GDF, None


native_matmul.defvjp(_fwd, _bwd)
