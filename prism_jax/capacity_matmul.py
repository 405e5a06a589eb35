"""CPU grouped matmul for many rows per group: a group-major batched pass plus an overflow loop.

Rows are sorted by group. The first C rows of every group go into a [G, C, D] block that
is multiplied by the weights in place ([G, D, F], no copy) in one batched matmul. Rows
past C in a group (the overflow of busy groups) run in a `while_loop` over tiles of m
rows whose trip count is the number of overflow tiles actually present, so the work
follows the rows that exist. The backward pass reuses the same two passes (custom VJP),
because reverse-mode autodiff cannot differentiate a loop with a dynamic trip count.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _layout(group_sizes_G: jax.Array, capacity: int, tile: int):
  sizes = group_sizes_G.astype(jnp.int32)
  start_G = jnp.cumsum(sizes) - sizes
  over_G = jnp.maximum(sizes - capacity, 0)
  tiles_G = (over_G + tile - 1) // tile
  tile_end_G = jnp.cumsum(tiles_G)
  return sizes, start_G, over_G, tiles_G, tile_end_G


def _overflow_tile(t, start_G, over_G, tiles_G, tile_end_G, capacity, tile):
  """Group, first row and row count of overflow tile t."""
  g = jnp.searchsorted(tile_end_G, t, side="right").astype(jnp.int32)
  local = t - (tile_end_G[g] - tiles_G[g])
  first = start_G[g] + capacity + local * tile
  count = jnp.minimum(tile, over_G[g] - local * tile)
  return g, first, count


def _block_rows(start_G, sizes, num_rows, capacity):
  """Row index of slot (g, c) of the group-major block, or num_rows where the slot is empty."""
  slots = jnp.arange(capacity, dtype=jnp.int32)
  filled = slots[None, :] < sizes[:, None]
  return jnp.where(filled, start_G[:, None] + slots[None, :], num_rows)


def _forward(lhs_SD, rhs_GDF, group_sizes_G, capacity, tile):
  num_rows = lhs_SD.shape[0]
  sizes, start_G, over_G, tiles_G, tile_end_G = _layout(group_sizes_G, capacity, tile)
  rows_GC = _block_rows(start_G, sizes, num_rows, capacity)
  block_GCD = jnp.take(lhs_SD, rows_GC, axis=0, mode="fill", fill_value=0)
  out_GCF = jnp.einsum("gcd,gdf->gcf", block_GCD, rhs_GDF, preferred_element_type=jnp.float32)
  out_SF = jnp.zeros((num_rows + tile, rhs_GDF.shape[-1]), jnp.float32)
  out_SF = out_SF.at[rows_GC.reshape(-1)].set(out_GCF.reshape(-1, out_GCF.shape[-1]), mode="drop")
  padded_SD = jnp.concatenate([lhs_SD, jnp.zeros((tile, lhs_SD.shape[1]), lhs_SD.dtype)])
  offsets = jnp.arange(tile)

  def body(state):
    t, out = state
    g, first, count = _overflow_tile(t, start_G, over_G, tiles_G, tile_end_G, capacity, tile)
    rows_mD = jax.lax.dynamic_slice_in_dim(padded_SD, first, tile)
    new_mF = jnp.dot(rows_mD, rhs_GDF[g], preferred_element_type=jnp.float32)
    old_mF = jax.lax.dynamic_slice_in_dim(out, first, tile)
    merged = jnp.where((offsets < count)[:, None], new_mF, old_mF)
    return t + 1, jax.lax.dynamic_update_slice_in_dim(out, merged, first, 0)

  _, out_SF = jax.lax.while_loop(lambda s: s[0] < tile_end_G[-1], body, (jnp.int32(0), out_SF))
  return out_SF[:num_rows].astype(lhs_SD.dtype)


def _rhs_gradient(lhs_SD, dout_SF, group_sizes_G, capacity, tile, num_groups):
  """d rhs[g] = lhs rows of g transposed @ d out rows of g, for every group: [G, D, F]."""
  num_rows = lhs_SD.shape[0]
  sizes, start_G, over_G, tiles_G, tile_end_G = _layout(group_sizes_G, capacity, tile)
  rows_GC = _block_rows(start_G, sizes, num_rows, capacity)
  block_GCD = jnp.take(lhs_SD, rows_GC, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
  dblock_GCF = jnp.take(dout_SF, rows_GC, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
  grad_GDF = jnp.einsum("gcd,gcf->gdf", block_GCD, dblock_GCF)
  pad = lambda a: jnp.concatenate([a, jnp.zeros((tile, a.shape[1]), a.dtype)])
  padded_SD, padded_SF = pad(lhs_SD.astype(jnp.float32)), pad(dout_SF.astype(jnp.float32))
  offsets = jnp.arange(tile)

  def body(state):
    t, grad = state
    g, first, count = _overflow_tile(t, start_G, over_G, tiles_G, tile_end_G, capacity, tile)
    keep = (offsets < count)[:, None]
    rows_mD = jnp.where(keep, jax.lax.dynamic_slice_in_dim(padded_SD, first, tile), 0)
    drows_mF = jnp.where(keep, jax.lax.dynamic_slice_in_dim(padded_SF, first, tile), 0)
    return t + 1, grad.at[g].add(rows_mD.T @ drows_mF)

  _, grad_GDF = jax.lax.while_loop(lambda s: s[0] < tile_end_G[-1], body, (jnp.int32(0), grad_GDF))
  return grad_GDF


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def capacity_matmul(lhs_SD, rhs_GDF, group_sizes_G, capacity: int, tile: int):
  """`ragged_dot(lhs_SD, rhs_GDF, group_sizes_G)` computed as block pass + overflow loop."""
  return _forward(lhs_SD, rhs_GDF, group_sizes_G, capacity, tile)


def _fwd(lhs_SD, rhs_GDF, group_sizes_G, capacity, tile):
  return _forward(lhs_SD, rhs_GDF, group_sizes_G, capacity, tile), (lhs_SD, rhs_GDF, group_sizes_G)


def _bwd(capacity, tile, residuals, dout_SF):
  lhs_SD, rhs_GDF, group_sizes_G = residuals
  dlhs = _forward(dout_SF.astype(rhs_GDF.dtype), jnp.swapaxes(rhs_GDF, 1, 2), group_sizes_G, capacity, tile)
  drhs = _rhs_gradient(lhs_SD, dout_SF, group_sizes_G, capacity, tile, rhs_GDF.shape[0])
  return dlhs.astype(lhs_SD.dtype), drhs.astype(rhs_GDF.dtype), None


capacity_matmul.defvjp(_fwd, _bwd)


def default_capacity(num_rows: int, num_groups: int) -> tuple[int, int]:
  """(capacity C, overflow tile m): C is the mean rows per group rounded up to a power of two
  below 8 and to a multiple of 8 above."""
  mean = -(-num_rows // max(num_groups, 1))
  if mean <= 8:
    capacity = 1 << (mean - 1).bit_length()
  else:
    capacity = -(-mean // 8) * 8
  tile = min(max(4, capacity // 2), 64)
  return capacity, tile
