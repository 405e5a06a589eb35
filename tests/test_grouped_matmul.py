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


@pytest.mark.parametrize("backend,tile_rows", [("tiled", None), ("tiled", 1), ("tiled", 3), ("xla", None)])
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


def test_auto_backend_is_tiled_on_cpu():
  assert resolve_backend("auto", "cpu") == "tiled"
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
