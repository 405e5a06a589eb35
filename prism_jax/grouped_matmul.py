"""Grouped matrix multiplication behind one `jax.lax.ragged_dot`-shaped function.

`grouped_matmul(lhs_SD, rhs_GDF, group_sizes_G)` multiplies the first `group_sizes[0]`
rows of `lhs` by `rhs[0]`, the next `group_sizes[1]` rows by `rhs[1]`, and so on. Rows
past `sum(group_sizes)` come out as zeros. Backends:

- `xla`: `jax.lax.ragged_dot`. The accelerator path. XLA:CPU lowers it to a masked dense
  product that costs G times the useful work, so it is not the CPU default.
- `native`: the CPU default for float32 where a C++ compiler is present. A C++ kernel,
  compiled for the host CPU on first use, runs one task per group and block of rows on
  every core of XLA's thread pool (`prism_jax.native`). Other dtypes go to `tiled`.
- `tiled`: the CPU fallback in pure JAX; its work also follows the rows that exist. Groups
  are cut into tiles of m rows (one row per tile in decode) and a loop multiplies a
  cache-sized chunk of tiles at a time (`tile_matmul`).
- `tokamax`: the tokamax kernels, used only when the package is installed and the
  platform is an accelerator.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import jax
import jax.numpy as jnp

from prism_jax import native
from prism_jax.config import Backend
from prism_jax.tile_matmul import default_tiling, tile_matmul

logger = logging.getLogger(__name__)

_BACKENDS = ("auto", "xla", "native", "tiled", "tokamax")


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
      raise ValueError("backend 'tokamax' has only a slow reference path on CPU; use 'auto' there")
    return backend
  if backend == "native":
    if platform != "cpu":
      raise ValueError(f"backend 'native' runs on CPU only, but the platform is {platform!r}; use 'auto'")
    try:
      native.load_kernels()
    except native.KernelBuildError as e:
      raise ValueError(f"backend 'native' is unavailable (choose backend 'tiled' or 'auto'): {e}") from e
    return backend
  if backend != "auto":
    return backend
  if platform == "cpu":
    return "native" if native.native_available() else "tiled"
  return "tokamax" if tokamax_available() else "xla"


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
  """Multiply consecutive row groups of `lhs_SD` by their own `rhs_GDF[g]`; returns [S, F].

  `tile_rows` sets the tile size of the `tiled` backend (None: chosen from the mean group
  size); the other backends ignore it. Group sizes must be non-negative: the backends treat
  negative sizes differently (`native` clamps each to [0, rows left]).
  """
  if lhs_SD.ndim != 2 or rhs_GDF.ndim != 3 or group_sizes_G.shape != rhs_GDF.shape[:1]:
    raise ValueError(
        f"expected lhs [S, D], rhs [G, D, F], group_sizes [G]; got {lhs_SD.shape}, {rhs_GDF.shape}, "
        f"{group_sizes_G.shape}"
    )
  if lhs_SD.shape[1] != rhs_GDF.shape[1]:
    raise ValueError(f"contracting sizes differ: lhs has D={lhs_SD.shape[1]}, rhs has D={rhs_GDF.shape[1]}")
  if tile_rows is not None and (not isinstance(tile_rows, int) or tile_rows < 1):
    raise ValueError(f"tile_rows must be a positive integer or None (automatic), got {tile_rows!r}")
  chosen = resolve_backend(backend)
  if chosen == "xla":
    return jax.lax.ragged_dot(lhs_SD, rhs_GDF, group_sizes_G.astype(jnp.int32))
  if chosen == "tokamax":
    return _tokamax(lhs_SD, rhs_GDF, group_sizes_G)
  num_rows, num_groups = lhs_SD.shape[0], rhs_GDF.shape[0]
  if num_rows == 0 or num_groups == 0:
    return jnp.zeros((num_rows, rhs_GDF.shape[2]), jnp.result_type(lhs_SD, rhs_GDF))
  if chosen == "native" and lhs_SD.dtype == rhs_GDF.dtype == jnp.float32:
    return native.native_matmul(lhs_SD, rhs_GDF, group_sizes_G)
  weight_bytes = rhs_GDF.shape[1] * rhs_GDF.shape[2] * rhs_GDF.dtype.itemsize
  default_rows, chunk_tiles = default_tiling(num_rows, num_groups, weight_bytes)
  tile_rows = default_rows if tile_rows is None else tile_rows
  return tile_matmul(lhs_SD, rhs_GDF, group_sizes_G, tile_rows, chunk_tiles)
