"""Grouped-matmul backends against a NumPy loop over groups, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax.grouped_matmul import grouped_matmul, resolve_backend
from prism_jax.tile_matmul import tile_matmul


def loop_reference(lhs, rhs, sizes):
  out = np.zeros((lhs.shape[0], rhs.shape[-1]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = lhs[start:start + size] @ rhs[g]
    start += size
  return out


def problem(num_rows, num_groups, used_rows, seed=0, concentration=0.5):
  rng = np.random.default_rng(seed)
  lhs = rng.normal(size=(num_rows, 8)).astype(np.float32)
  rhs = rng.normal(size=(num_groups, 8, 6)).astype(np.float32)
  sizes = rng.multinomial(used_rows, rng.dirichlet(np.full(num_groups, concentration)))
  return lhs, rhs, sizes


# (rows, groups, used rows): decode-sized, one busy group, few large groups, empty groups, no rows used.
SHAPES = [(5, 16, 5), (40, 16, 33), (300, 6, 290), (257, 32, 200), (64, 8, 0)]


@pytest.mark.parametrize("backend,tile_rows",
                         [("native", None), ("tiled", None), ("tiled", 1), ("tiled", 3), ("xla", None)])
@pytest.mark.parametrize("shape", SHAPES)
def test_backend_matches_loop(backend, tile_rows, shape):
  lhs, rhs, sizes = problem(*shape)
  fn = jax.jit(lambda a, b, c: grouped_matmul(a, b, c, backend=backend, tile_rows=tile_rows))
  got = np.asarray(fn(lhs, rhs, jnp.asarray(sizes)))
  want = loop_reference(lhs, rhs, sizes)
  assert np.isfinite(got).all()
  err = np.abs(got - want).max()
  assert err <= 1e-4, f"max abs err {err:.2e}"


@pytest.mark.parametrize("tile_rows,chunk_tiles", [(1, 4), (8, 4), (16, 1), (64, 64)])
def test_tile_gradients_match_xla(tile_rows, chunk_tiles):
  lhs, rhs, sizes = problem(200, 12, 180, seed=1)
  sizes = jnp.asarray(sizes)

  def loss_xla(a, b):
    return jnp.sum(jnp.sin(jax.lax.ragged_dot(a, b, sizes)))

  def loss_tiled(a, b):
    return jnp.sum(jnp.sin(tile_matmul(a, b, sizes, tile_rows, chunk_tiles)))

  want = jax.grad(loss_xla, argnums=(0, 1))(lhs, rhs)
  got = jax.jit(jax.grad(loss_tiled, argnums=(0, 1)))(lhs, rhs)
  for name, g, w in zip(("d lhs", "d rhs"), got, want):
    err = np.abs(np.asarray(g) - np.asarray(w)).max()
    assert err <= 1e-4, f"{name}: max abs err {err:.2e}"


def test_auto_backend_is_native_on_cpu():
  assert resolve_backend("auto", "cpu") == "native"
  assert resolve_backend("auto", "gpu") in ("xla", "tokamax")


def test_unknown_backend_raises():
  with pytest.raises(ValueError, match="unknown grouped-matmul backend 'cuda'"):
    resolve_backend("cuda")


def test_tokamax_without_package_raises():
  from prism_jax.grouped_matmul import tokamax_available

  if tokamax_available():
    pytest.skip("tokamax is installed here")
  with pytest.raises(ValueError, match="tokamax package is not installed"):
    resolve_backend("tokamax", "gpu")


def test_shape_mismatch_raises():
  with pytest.raises(ValueError, match="contracting sizes differ"):
    grouped_matmul(jnp.zeros((4, 3)), jnp.zeros((2, 5, 6)), jnp.array([2, 2]))


@pytest.mark.parametrize("backend,tile_rows", [("native", None), ("tiled", None), ("tiled", 2)])
def test_unused_nan_row_keeps_gradients_finite(backend, tile_rows):
  lhs = np.ones((3, 4), np.float32)
  lhs[2] = np.nan  # past sum(group_sizes): must reach neither the output nor the gradients
  rhs = np.ones((8, 4, 3), np.float32)
  sizes = jnp.asarray([0, 1, 0, 0, 1, 0, 0, 0])

  def loss(a, b):
    return jnp.sum(grouped_matmul(a, b, sizes, backend=backend, tile_rows=tile_rows))

  out = grouped_matmul(lhs, rhs, sizes, backend=backend, tile_rows=tile_rows)
  assert np.isfinite(np.asarray(out)).all()
  assert (np.asarray(out)[2] == 0).all()
  dlhs, drhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs)
  assert np.isfinite(np.asarray(drhs)).all()
  assert np.isfinite(np.asarray(dlhs)[:2]).all()


@pytest.mark.parametrize("backend,tile_rows", [("native", None), ("tiled", None), ("tiled", 3)])
def test_zero_rows_or_groups_give_empty_output(backend, tile_rows):
  out = grouped_matmul(jnp.zeros((0, 4)), jnp.zeros((3, 4, 5)), jnp.zeros(3, jnp.int32), backend=backend,
                       tile_rows=tile_rows)
  assert out.shape == (0, 5)
  out = grouped_matmul(jnp.ones((2, 4)), jnp.zeros((0, 4, 5)), jnp.zeros(0, jnp.int32), backend=backend,
                       tile_rows=tile_rows)
  assert out.shape == (2, 5)
  assert (np.asarray(out) == 0).all()


@pytest.mark.parametrize("tile_rows", [0, -2, 1.5])
def test_invalid_tile_rows_raises(tile_rows):
  with pytest.raises(ValueError, match="tile_rows must be a positive integer"):
    grouped_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2]), backend="tiled", tile_rows=tile_rows)


def test_invalid_chunk_tiles_raises():
  with pytest.raises(ValueError, match="chunk_tiles must be a positive integer, got 0"):
    tile_matmul(jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2]), 2, 0)


@pytest.mark.parametrize("backend,tile_rows", [("native", None), ("tiled", None), ("tiled", 2)])
def test_mixed_dtypes_promote_like_ragged_dot(backend, tile_rows):
  lhs = jnp.ones((4, 3), jnp.bfloat16)
  rhs = jnp.ones((2, 3, 5), jnp.float32)
  sizes = jnp.array([2, 2])
  want = jax.lax.ragged_dot(lhs, rhs, sizes).dtype
  assert grouped_matmul(lhs, rhs, sizes, backend=backend, tile_rows=tile_rows).dtype == want
