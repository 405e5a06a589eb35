"""The C++ grouped-matmul kernel: shapes that reach every code path, gradients, build and fallback."""

import concurrent.futures
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prism_jax import native
from prism_jax.grouped_matmul import grouped_matmul, resolve_backend
from prism_jax.native import build


# (rows, groups, D, F, used rows): register-tile panels plus vector and scalar column tails,
# groups longer than one row block, one busy group (columns split across threads), decode.
SHAPES = [(300, 5, 32, 70, 290), (120, 2, 17, 160, 120), (400, 3, 64, 128, 400), (9, 16, 48, 64, 9),
          (50, 4, 8, 1, 33)]


@pytest.mark.parametrize("shape", SHAPES)
def test_native_matches_ragged_dot(shape):
  rows, groups, depth, width, used = shape
  rng = np.random.default_rng(sum(shape))
  lhs = rng.normal(size=(rows, depth)).astype(np.float32)
  rhs = rng.normal(size=(groups, depth, width)).astype(np.float32)
  sizes = jnp.asarray(rng.multinomial(used, np.full(groups, 1 / groups)), jnp.int32)
  got = np.asarray(jax.jit(native.native_matmul)(lhs, rhs, sizes))
  want = np.asarray(jax.lax.ragged_dot(lhs, rhs, sizes))
  assert np.isfinite(got).all()
  err = np.abs(got - want).max()
  assert err <= 1e-4 * max(1.0, np.abs(want).max()), f"max abs err {err:.2e}"
  assert (got[used:] == 0).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_native_gradients_match_ragged_dot(shape):
  rows, groups, depth, width, used = shape
  rng = np.random.default_rng(sum(shape) + 1)
  lhs = jnp.asarray(rng.normal(size=(rows, depth)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(groups, depth, width)), jnp.float32)
  sizes = jnp.asarray(rng.multinomial(used, np.full(groups, 1 / groups)), jnp.int32)

  def loss(matmul, a, b):
    return jnp.sum(jnp.sin(matmul(a, b, sizes)))

  got = jax.jit(jax.grad(functools.partial(loss, native.native_matmul), argnums=(0, 1)))(lhs, rhs)
  want = jax.grad(functools.partial(loss, jax.lax.ragged_dot), argnums=(0, 1))(lhs, rhs)
  for name, g, w in zip(("d lhs", "d rhs"), got, want):
    err = np.abs(np.asarray(g) - np.asarray(w)).max()
    assert err <= 1e-4 * max(1.0, np.abs(np.asarray(w)).max()), f"{name}: max abs err {err:.2e}"


def test_native_clamps_group_sizes_past_rows():
  lhs = jnp.ones((4, 3), jnp.float32)
  rhs = jnp.ones((2, 3, 2), jnp.float32)
  got = np.asarray(native.native_matmul(lhs, rhs, jnp.asarray([3, 5], jnp.int32)))
  np.testing.assert_array_equal(got, np.full((4, 2), 3.0, np.float32))


def test_native_under_vmap_matches_each_call():
  rng = np.random.default_rng(0)
  lhs = jnp.asarray(rng.normal(size=(3, 10, 8)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(4, 8, 16)), jnp.float32)
  sizes = jnp.asarray([2, 3, 0, 5], jnp.int32)
  got = jax.vmap(native.native_matmul, in_axes=(0, None, None))(lhs, rhs, sizes)
  for i in range(3):
    want = jax.lax.ragged_dot(lhs[i], rhs, sizes)
    assert np.abs(np.asarray(got[i]) - np.asarray(want)).max() <= 1e-5


def test_native_second_derivative_matches_loop():
  rng = np.random.default_rng(3)
  lhs = jnp.asarray(rng.normal(size=(12, 5)), jnp.float32)
  rhs = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32)
  sizes = jnp.asarray([4, 0, 6], jnp.int32)

  def outer(matmul):
    inner = jax.grad(lambda a, b: jnp.sum(jnp.sin(matmul(a, b, sizes))), argnums=(0, 1))
    return jax.grad(lambda a, b: sum(jnp.sum(g ** 2) for g in inner(a, b)), argnums=(0, 1))(lhs, rhs)

  def loop_matmul(a, b, group_sizes):
    # Slices by the concrete sizes: differentiable to any order, unlike ragged_dot's d rhs.
    bounds = np.cumsum([0, *np.asarray(group_sizes)])
    parts = [a[bounds[g]:bounds[g + 1]] @ b[g] for g in range(b.shape[0])]
    return jnp.concatenate(parts + [jnp.zeros((a.shape[0] - bounds[-1], b.shape[2]))])

  got = outer(native.native_matmul)
  want = outer(loop_matmul)
  for name, g, w in zip(("d lhs", "d rhs"), got, want):
    err = np.abs(np.asarray(g) - np.asarray(w)).max()
    assert err <= 1e-4 * max(1.0, np.abs(np.asarray(w)).max()), f"{name}: max abs err {err:.2e}"


def test_native_rejects_other_dtypes():
  with pytest.raises(TypeError, match="float32 inputs, got bfloat16"):
    native.native_matmul(jnp.ones((2, 3), jnp.bfloat16), jnp.ones((1, 3, 2), jnp.float32), jnp.asarray([2]))


def test_bfloat16_falls_back_to_tiled():
  lhs = jnp.ones((4, 3), jnp.bfloat16)
  rhs = jnp.ones((2, 3, 5), jnp.bfloat16)
  out = grouped_matmul(lhs, rhs, jnp.asarray([1, 3]), backend="native")
  assert out.dtype == jnp.bfloat16
  assert (np.asarray(out, np.float32) == 3).all()


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
  """Point the build cache at an empty directory and forget earlier build results."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setattr(build, "_loaded", {})
  monkeypatch.setattr(build, "_available", None)
  return tmp_path / "prism-jax" / "native"


def forget_loads(monkeypatch):
  monkeypatch.setattr(build, "_loaded", {})
  monkeypatch.setattr(build, "_available", None)


def fake_compiler(tmp_path, body):
  """Write a shell script that prints a version for --version and otherwise runs `body`."""
  path = tmp_path / "fake-cxx"
  path.write_text('#!/bin/sh\n[ "$1" = --version ] && echo fake 1.0 && exit 0\n'
                  'for a; do [ "$prev" = -o ] && out=$a; prev=$a; done\n' + body)
  path.chmod(0o755)
  return path


def test_build_is_cached(fresh_build, monkeypatch):
  library = build.load_kernels()
  assert library.parent == fresh_build
  assert sorted(p.name for p in fresh_build.iterdir()) == sorted([library.name, library.with_suffix(".sha256").name])
  assert library.stat().st_mode & 0o777 == 0o755
  assert library.with_suffix(".sha256").stat().st_mode & 0o777 == 0o644
  forget_loads(monkeypatch)
  monkeypatch.setattr(build, "_compile", lambda *_: pytest.fail("a cached build was compiled again"))
  assert build.load_kernels() == library


@pytest.mark.parametrize("damage", ["overwrite", "truncate"])
def test_damaged_cached_library_is_rebuilt(fresh_build, monkeypatch, damage):
  library = build.load_kernels()
  good = library.read_bytes()
  # Loading a truncated shared library can kill the process with SIGBUS, so the digest check must
  # catch the damage before the library is loaded.
  library.write_bytes(b"not a shared library" if damage == "overwrite" else good[:len(good) // 2])
  forget_loads(monkeypatch)
  monkeypatch.setattr(build, "_registered", None)
  monkeypatch.setattr(build.jax.ffi, "register_ffi_target", lambda *args, **kwargs: None)
  assert build.load_kernels() == library
  assert build._is_intact(library)


def test_failed_build_leaves_nothing_and_falls_back(fresh_build, tmp_path, monkeypatch, caplog):
  # A compiler that writes half a library to its -o path, then fails.
  compiler = fake_compiler(tmp_path, 'echo partial > "$out"; echo "error: out of memory" >&2; exit 3\n')
  monkeypatch.setenv("CXX", str(compiler))
  with pytest.raises(build.KernelBuildError, match="(?s)failed with exit status 3.*out of memory"):
    build.load_kernels()
  assert not any(fresh_build.iterdir())
  with caplog.at_level(logging.WARNING):
    assert resolve_backend("auto", "cpu") == "tiled"
    assert resolve_backend("auto", "cpu") == "tiled"
  assert caplog.text.count("using the 'tiled' backend instead") == 1
  unavailable = r"backend 'native' is unavailable \(choose backend 'tiled' or 'auto'\): .*fake-cxx failed"
  with pytest.raises(ValueError, match=unavailable):
    resolve_backend("native", "cpu")


def test_model_with_unavailable_backend_fails_at_load(fresh_build, monkeypatch):
  from prism_jax.model import PrismModel
  from prism_jax.testing import random_params
  from tests.test_runtime import CONFIG

  monkeypatch.setattr(build, "find_compiler", lambda: None)
  with pytest.raises(ValueError, match="backend 'native' is unavailable.*no C\\+\\+ compiler found"):
    PrismModel(CONFIG, random_params(CONFIG, seed=0), backend="native")


def test_unloadable_build_is_removed(fresh_build, tmp_path, monkeypatch):
  # A "compiler" that exits 0 but writes something that is not a shared library.
  monkeypatch.setenv("CXX", str(fake_compiler(tmp_path, 'echo garbage > "$out"\n')))
  monkeypatch.setattr(build, "_registered", None)
  with pytest.raises(build.KernelBuildError, match="cannot be loaded.*Check that \\$CXX is a C\\+\\+ compiler"):
    build.load_kernels()
  assert not any(fresh_build.iterdir())


def test_compiler_with_arguments(fresh_build, monkeypatch):
  monkeypatch.setenv("CXX", "env LC_ALL=C g++")
  assert build.find_compiler() == ["env", "LC_ALL=C", "g++"]
  assert build.load_kernels().parent == fresh_build


def test_concurrent_first_use_builds_once(fresh_build, monkeypatch):
  calls = []
  compile_once = build._compile
  monkeypatch.setattr(build, "_compile", lambda *args: calls.append(1) or compile_once(*args))
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda _: build.native_available(), range(4)))
  assert results == [True] * 4
  assert len(calls) == 1


def test_unwritable_cache_is_reported(fresh_build, tmp_path, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("")
  monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a regular file: no directory can be made under it
  with pytest.raises(build.KernelBuildError, match="cannot write to the kernel cache.*set XDG_CACHE_HOME"):
    build.load_kernels()


def test_relative_cache_home_is_ignored(monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")
  assert build.cache_dir().is_absolute()


def test_missing_compiler_is_reported(fresh_build, monkeypatch):
  monkeypatch.setattr(build, "find_compiler", lambda: None)
  with pytest.raises(build.KernelBuildError, match="no C\\+\\+ compiler found.*install g\\+\\+"):
    build.load_kernels()


def test_native_off_cpu_raises():
  with pytest.raises(ValueError, match="runs on CPU only.*'gpu'"):
    resolve_backend("native", "gpu")
