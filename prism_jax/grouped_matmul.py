"""Grouped matrix multiplication behind one `jax.lax.ragged_dot`-shaped function.

`grouped_matmul(lhs_SD, rhs_GDF, group_sizes_G)` multiplies the first `group_sizes[0]`
rows of `lhs` by `rhs[0]`, the next `group_sizes[1]` rows by `rhs[1]`, and so on. Rows
past `sum(group_sizes)` come out as zeros. Backends:

- `xla`: `jax.lax.ragged_dot`. The accelerator path. XLA:CPU lowers it to a masked dense
  product that costs G times the useful work, so it is not the CPU default.
- `tiled`: the CPU default; its work follows the rows that exist. With few rows per
  group (decode), each row is multiplied by its own group's gathered weight. With many
  (prefill), a group-major batched pass takes the first C rows of every group and an
  overflow loop the rest (`capacity_matmul`).
- `tokamax`: the tokamax kernels, used only when the package is installed and the
  platform is an accelerator.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import jax
import jax.numpy as jnp

from prism_jax.capacity_matmul import capacity_matmul, default_capacity
from prism_jax.config import Backend

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "xla", "tiled", "tokamax")


def tokamax_available() -> bool:
  return importlib.util.find_spec("tokamax") is not None


def resolve_backend(backend: Backend = "auto", platform: str | None = None) -> str:
  """Map `auto` to the fastest backend for the platform; reject unknown names."""
  if backend not in _BACKENDS:
    raise ValueError(f"unknown grouped-matmul backend {backend!r}; expected one of {', '.join(_BACKENDS)}")
  platform = platform or jax.default_backend()
  if backend == "tokamax":
    if not tokamax_available():
      raise ValueError("backend 'tokamax' requested but the tokamax package is not installed (pip install tokamax)")
    if platform == "cpu":
      raise ValueError("backend 'tokamax' has only a slow reference path on CPU; use 'tiled' or 'auto' there")
    return backend
  if backend != "auto":
    return backend
  if platform == "cpu":
    return "tiled"
  return "tokamax" if tokamax_available() else "xla"


def _tiled(lhs_SD: jax.Array, rhs_GDF: jax.Array, group_sizes_G: jax.Array, tile_rows: int) -> jax.Array:
  num_rows, _ = lhs_SD.shape
  num_groups = rhs_GDF.shape[0]
  m = tile_rows
  # Every non-empty tile contains at least one row, and each group adds at most one partial tile.
  num_tiles = min(-(-num_rows // m) + min(num_groups, num_rows), num_rows)

  # Worked example, m=2, group_sizes=[3, 0, 1]: row starts [0, 3, 3], tiles per group [2, 0, 1],
  # tile ends [2, 2, 3]; tile 0 -> group 0 rows 0-1, tile 1 -> group 0 row 2, tile 2 -> group 2 row 3.
  sizes_G = group_sizes_G.astype(jnp.int32)
  row_start_G = jnp.cumsum(sizes_G) - sizes_G
  tiles_G = (sizes_G + m - 1) // m
  tile_end_G = jnp.cumsum(tiles_G)
  tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
  group_of_tile = jnp.searchsorted(tile_end_G, tile_ids, side="right").astype(jnp.int32)
  tile_valid = group_of_tile < num_groups
  group_of_tile = jnp.minimum(group_of_tile, num_groups - 1)
  local_tile = tile_ids - (tile_end_G[group_of_tile] - tiles_G[group_of_tile])
  first_row = row_start_G[group_of_tile] + local_tile * m
  rows_left = sizes_G[group_of_tile] - local_tile * m

  offsets = jnp.arange(m, dtype=jnp.int32)
  row_valid_Tm = tile_valid[:, None] & (offsets[None, :] < rows_left[:, None])
  row_index_Tm = jnp.where(row_valid_Tm, first_row[:, None] + offsets[None, :], num_rows)

  lhs_TmD = jnp.take(lhs_SD, row_index_Tm, axis=0, mode="fill", fill_value=0)
  rhs_TDF = jnp.take(rhs_GDF, group_of_tile, axis=0)
  out_TmF = jnp.einsum("tmd,tdf->tmf", lhs_TmD, rhs_TDF, preferred_element_type=jnp.float32)
  out_SF = jnp.zeros((num_rows, rhs_GDF.shape[-1]), jnp.float32)
  out_SF = out_SF.at[row_index_Tm.reshape(-1)].set(out_TmF.reshape(-1, out_TmF.shape[-1]), mode="drop")
  return out_SF.astype(lhs_SD.dtype)


def _tokamax(lhs_SD: jax.Array, rhs_GDF: jax.Array, group_sizes_G: jax.Array) -> jax.Array:
  import tokamax  # pylint: disable=import-outside-toplevel

  return tokamax.ragged_dot(lhs_SD, rhs_GDF, group_sizes_G.astype(jnp.int32))


@functools.partial(jax.named_call, name="grouped_matmul")
def grouped_matmul(
    lhs_SD: jax.Array,
    rhs_GDF: jax.Array,
    group_sizes_G: jax.Array,
    *,
    backend: Backend = "auto",
    tile_rows: int | None = None,
) -> jax.Array:
  """Multiply consecutive row groups of `lhs_SD` by their own `rhs_GDF[g]`; returns [S, F]."""
  if lhs_SD.ndim != 2 or rhs_GDF.ndim != 3 or group_sizes_G.shape != rhs_GDF.shape[:1]:
    raise ValueError(
        f"expected lhs [S, D], rhs [G, D, F], group_sizes [G]; got {lhs_SD.shape}, {rhs_GDF.shape}, "
        f"{group_sizes_G.shape}"
    )
  if lhs_SD.shape[1] != rhs_GDF.shape[1]:
    raise ValueError(f"contracting sizes differ: lhs has D={lhs_SD.shape[1]}, rhs has D={rhs_GDF.shape[1]}")
  chosen = resolve_backend(backend)
  if chosen == "xla":
    return jax.lax.ragged_dot(lhs_SD, rhs_GDF, group_sizes_G.astype(jnp.int32))
  if chosen == "tokamax":
    return _tokamax(lhs_SD, rhs_GDF, group_sizes_G)
  num_rows, num_groups = lhs_SD.shape[0], rhs_GDF.shape[0]
  if tile_rows is not None:
    return _tiled(lhs_SD, rhs_GDF, group_sizes_G, tile_rows)
  # Fewer rows than half the groups: most groups are empty, so gather only the weights rows need.
  if 2 * num_rows < num_groups:
    return _tiled(lhs_SD, rhs_GDF, group_sizes_G, 1)
  capacity, tile = default_capacity(num_rows, num_groups)
  return capacity_matmul(lhs_SD, rhs_GDF, group_sizes_G, capacity, tile)
