"""Build the C++ kernels with the machine's compiler, cache the library, register its targets.

The library is compiled for the host CPU (`-march=native`) against the XLA FFI headers
that ship with jaxlib, so the cache key covers the source, the compiler, the flags, the
jax version and the CPU's feature flags. Builds land in `$XDG_CACHE_HOME/prism-jax/native`
(`~/.cache/prism-jax/native` by default) and are written to a temporary name first, so a
build that fails or is interrupted never leaves a broken library under the final name.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("grouped_matmul.cc")
TARGETS = {"prism_grouped_matmul_f32": "PrismGroupedMatmulF32"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 300
_registered: pathlib.Path | None = None


class KernelBuildError(RuntimeError):
  """The C++ kernels could not be compiled or loaded on this machine."""


def cache_dir() -> pathlib.Path:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "prism-jax" / "native"


def find_compiler() -> str | None:
  """Return the C++ compiler: `$CXX` when set, else the first of g++, c++, clang++ on PATH."""
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  for name in ("g++", "c++", "clang++"):
    if path := shutil.which(name):
      return path
  return None


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def _build_key(compiler: str, version: str) -> str:
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), compiler.encode(), version.encode(), " ".join(_FLAGS).encode(),
               jax.__version__.encode(), platform.machine().encode(), _cpu_features().encode()):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:16]


def _compile(compiler: str, output: pathlib.Path) -> None:
  try:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=output.stem + ".", suffix=".tmp", dir=output.parent)
  except OSError as e:
    raise KernelBuildError(f"cannot write to the kernel cache {output.parent}: {e}; set XDG_CACHE_HOME to a "
                           "writable directory") from e
  os.close(fd)
  command = [compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", tmp_name]
  logger.info("compiling the native kernels: %s", " ".join(command))
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
      raise KernelBuildError(f"{compiler} failed with exit status {result.returncode}; its output ends:\n"
                             f"{result.stderr[-4000:]}")
    os.replace(tmp_name, output)
  except subprocess.TimeoutExpired as e:
    raise KernelBuildError(f"{compiler} did not finish within {_COMPILE_TIMEOUT_S} s") from e
  except OSError as e:
    raise KernelBuildError(f"cannot run the C++ compiler {compiler!r}: {e}") from e
  finally:
    if os.path.exists(tmp_name):
      os.remove(tmp_name)


@functools.cache
def load_kernels() -> pathlib.Path:
  """Compile the kernels if no cached build matches, load them and register their FFI targets.

  Returns the path of the loaded library. Raises KernelBuildError when no C++ compiler is
  found or the build fails.
  """
  compiler = find_compiler()
  if compiler is None:
    raise KernelBuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++); install g++")
  try:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise KernelBuildError(f"cannot run the C++ compiler {compiler!r}: {e}") from e

  library = cache_dir() / f"prism_native_{_build_key(compiler, version)}.so"
  if not library.exists():
    _compile(compiler, library)
  try:
    _register(library)
  except OSError as e:
    # A cached library that no longer loads (truncated by a full disk, say) is rebuilt once.
    logger.warning("cannot load the cached kernels %s (%s); rebuilding them", library, e)
    library.unlink(missing_ok=True)
    _compile(compiler, library)
    try:
      _register(library)
    except OSError as e2:
      raise KernelBuildError(f"cannot load the freshly built {library}: {e2}") from e2
  return library


def _register(library: pathlib.Path) -> None:
  # XLA accepts one handler per target name for the life of the process. Only the first
  # library loaded is registered, because later builds of the same source are identical.
  global _registered
  if _registered is not None:
    return
  handle = ctypes.CDLL(str(library))
  for target, symbol in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
  _registered = library


@functools.cache
def native_available() -> bool:
  """Return whether the kernels build and load here; logs the reason once when they do not."""
  try:
    load_kernels()
  except KernelBuildError as e:
    logger.warning("native CPU kernels unavailable, using the 'tiled' backend instead: %s", e)
    return False
  return True
