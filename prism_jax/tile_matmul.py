"""CPU grouped matmul: rows cut into one-group tiles, multiplied a chunk of tiles at a time.

Rows arrive sorted by group. Each group is cut into tiles of m rows (its last tile may be
partial), so every tile belongs to one group. A scan walks the tiles in chunks of b. Each
step gathers the chunk's rows `[b, m, D]` and its tiles' weights `[b, D, F]` and runs one
batched matmul, so the chunk's weights stay in cache while they are used. Chunks past the
last row are skipped, so the work follows the rows that exist, whatever the group sizes.
Each row is then read back from its tile slot.

The gradient is a custom VJP built from the same loop, which skips empty chunks too and
keeps no per-chunk residuals. d lhs runs the loop on the transposed weights, and d rhs adds
each tile's `rows^T @ d out` into its group.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Gathered weights per chunk. An estimate from one sweep on a 2-core x86 machine (1 MiB L2 per core,
# 32 MiB L3): chunks of 1-8 MiB ran within noise of each other, and 2 MiB was slightly ahead in most cases.
_CHUNK_WEIGHT_BYTES = 2 << 20
_MAX_CHUNK_TILES = 64


class TileLayout(NamedTuple):
  rows_Tm: jax.Array  # row index held by each tile slot; num_rows where the slot is empty
  group_T: jax.Array  # group of each tile
  used_chunks: jax.Array  # chunks of b tiles that hold at least one row
  slot_S: jax.Array  # flat tile slot of each row; T * m for rows past sum(group_sizes)


def tile_layout(group_sizes_G: jax.Array, num_rows: int, tile_rows: int, chunk_tiles: int) -> TileLayout:
  """Compute where every row goes when each group is cut into tiles of `tile_rows` rows."""
  m, b = tile_rows, chunk_tiles
  num_groups = group_sizes_G.shape[0]
  # Each non-empty group adds at most one partial tile; round up to whole chunks.
  bound = -(-num_rows // m) + min(num_groups, num_rows)
  num_tiles = max(b, -(-bound // b) * b)

  # Worked example, m=2, sizes=[3, 0, 1]: tiles per group [2, 0, 1], tile ends [2, 2, 3];
  # tile 0 -> group 0 rows 0-1, tile 1 -> group 0 row 2, tile 2 -> group 2 row 3.
  sizes_G = group_sizes_G.astype(jnp.int32)
  row_end_G = jnp.cumsum(sizes_G)
  row_start_G = row_end_G - sizes_G
  tiles_G = (sizes_G + m - 1) // m
  tile_end_G = jnp.cumsum(tiles_G)
  tile_start_G = tile_end_G - tiles_G

  tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
  group_T = jnp.searchsorted(tile_end_G, tile_ids, side="right").astype(jnp.int32)
  tile_valid = group_T < num_groups
  group_T = jnp.minimum(group_T, num_groups - 1)
  local_T = tile_ids - tile_start_G[group_T]
  first_T = row_start_G[group_T] + local_T * m
  left_T = sizes_G[group_T] - local_T * m
  offsets = jnp.arange(m, dtype=jnp.int32)
  filled_Tm = tile_valid[:, None] & (offsets[None, :] < left_T[:, None])
  rows_Tm = jnp.where(filled_Tm, first_T[:, None] + offsets[None, :], num_rows)

  row_ids = jnp.arange(num_rows, dtype=jnp.int32)
  group_S = jnp.minimum(jnp.searchsorted(row_end_G, row_ids, side="right"), num_groups - 1)
  position_S = row_ids - row_start_G[group_S]
  slot_S = (tile_start_G[group_S] + position_S // m) * m + position_S % m
  slot_S = jnp.where(row_ids < row_end_G[-1], slot_S, num_tiles * m)
  used_chunks = (tile_end_G[-1] + b - 1) // b
  return TileLayout(rows_Tm, group_T, used_chunks, slot_S)


def _chunk(layout: TileLayout, c, b):
  rows_bm = jax.lax.dynamic_slice_in_dim(layout.rows_Tm, c * b, b)
  groups_b = jax.lax.dynamic_slice_in_dim(layout.group_T, c * b, b)
  return rows_bm, groups_b


def _forward(lhs_SD, rhs_GDF, layout: TileLayout, chunk_tiles):
  b = chunk_tiles
  num_chunks = layout.group_T.shape[0] // b
  zeros_bmF = jnp.zeros((b, layout.rows_Tm.shape[1], rhs_GDF.shape[-1]), jnp.float32)

  def multiply(c):
    rows_bm, groups_b = _chunk(layout, c, b)
    x_bmD = jnp.take(lhs_SD, rows_bm, axis=0, mode="fill", fill_value=0)
    w_bDF = jnp.take(rhs_GDF, groups_b, axis=0)
    return jnp.einsum("bmd,bdf->bmf", x_bmD, w_bDF, preferred_element_type=jnp.float32)

  # The scan writes each chunk's result into its slot of the stacked output. Chunks past the
  # last row are skipped.
  chunk_ids = jnp.arange(num_chunks, dtype=jnp.int32)
  out_CbmF = jax.lax.map(lambda c: jax.lax.cond(c < layout.used_chunks, multiply, lambda _: zeros_bmF, c), chunk_ids)
  flat = out_CbmF.reshape(-1, out_CbmF.shape[-1])
  out_SF = jnp.take(flat, layout.slot_S, axis=0, mode="fill", fill_value=0)
  return out_SF.astype(jnp.result_type(lhs_SD, rhs_GDF))


def _rhs_gradient(lhs_SD, dout_SF, layout: TileLayout, num_groups, chunk_tiles):
  """Compute d rhs[g] = (rows of g)^T @ (d out rows of g) for every group: [G, D, F]."""
  b = chunk_tiles
  grad_GDF = jnp.zeros((num_groups, lhs_SD.shape[1], dout_SF.shape[1]), jnp.float32)

  def body(c, grad_GDF):
    rows_bm, groups_b = _chunk(layout, c, b)
    x_bmD = jnp.take(lhs_SD, rows_bm, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    dy_bmF = jnp.take(dout_SF, rows_bm, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
    return grad_GDF.at[groups_b].add(jnp.einsum("bmd,bmf->bdf", x_bmD, dy_bmF))

  return jax.lax.fori_loop(0, layout.used_chunks, body, grad_GDF)


def tile_matmul(lhs_SD: jax.Array, rhs_GDF: jax.Array, group_sizes_G: jax.Array, tile_rows: int,
                chunk_tiles: int) -> jax.Array:
  """Compute `ragged_dot(lhs_SD, rhs_GDF, group_sizes_G)` tile by tile; returns [S, F]."""
  for name, value in (("tile_rows", tile_rows), ("chunk_tiles", chunk_tiles)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if lhs_SD.shape[0] == 0 or rhs_GDF.shape[0] == 0:
    return jnp.zeros((lhs_SD.shape[0], rhs_GDF.shape[2]), jnp.result_type(lhs_SD, rhs_GDF))
  return _tile_matmul(lhs_SD, rhs_GDF, group_sizes_G, tile_rows, chunk_tiles)


def _multiply_tiles(lhs_SD, rhs_GDF, group_sizes_G, tile_rows: int, chunk_tiles: int):
  layout = tile_layout(group_sizes_G, lhs_SD.shape[0], tile_rows, chunk_tiles)
  return _forward(lhs_SD, rhs_GDF, layout, chunk_tiles)


_tile_matmul = jax.custom_vjp(_multiply_tiles, nondiff_argnums=(3, 4))


def _fwd(lhs_SD, rhs_GDF, group_sizes_G, tile_rows, chunk_tiles):
  out = _multiply_tiles(lhs_SD, rhs_GDF, group_sizes_G, tile_rows, chunk_tiles)
  return out, (lhs_SD, rhs_GDF, group_sizes_G)


def _bwd(tile_rows, chunk_tiles, residuals, dout_SF):
  lhs_SD, rhs_GDF, group_sizes_G = residuals
  # d lhs and d rhs walk the same tiles as the forward pass.
  layout = tile_layout(group_sizes_G, lhs_SD.shape[0], tile_rows, chunk_tiles)
  rhs_GFD = jnp.swapaxes(rhs_GDF, 1, 2)
  dlhs = _forward(dout_SF.astype(rhs_GDF.dtype), rhs_GFD, layout, chunk_tiles)
  drhs = _rhs_gradient(lhs_SD, dout_SF, layout, rhs_GDF.shape[0], chunk_tiles)
  return dlhs.astype(lhs_SD.dtype), drhs.astype(rhs_GDF.dtype), None


_tile_matmul.defvjp(_fwd, _bwd)


def default_tiling(num_rows: int, num_groups: int, weight_bytes: int) -> tuple[int, int]:
  """Choose (tile rows m, chunk tiles b) for groups whose weight takes `weight_bytes`.

  m is the mean rows per group rounded down to a power of two, from 1 (decode: a tile per
  row) to 16, and 32 from 128 rows up. b makes a chunk's weights about 2 MiB, so they stay in
  cache while the chunk runs.
  """
  mean = num_rows / max(num_groups, 1)
  tile_rows = 32 if mean >= 128 else min(16, 1 << (max(int(mean), 1).bit_length() - 1))
  chunk_tiles = max(1, min(_MAX_CHUNK_TILES, _CHUNK_WEIGHT_BYTES // max(weight_bytes, 1)))
  return tile_rows, chunk_tiles
