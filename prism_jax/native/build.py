"""Build the C++ kernels with the machine's compiler, cache the library, register its targets.

The library is compiled for the host CPU (`-march=native`) against the XLA FFI headers
that ship with jaxlib, so the cache key covers the source, the compiler, the flags, the
jax version and the CPU's feature flags. Builds land in `$XDG_CACHE_HOME/prism-jax/native`
(`~/.cache/prism-jax/native` by default). Each build is written under a temporary name,
flushed to disk and renamed, and a `.sha256` file beside it records its digest. A library
whose digest does not match (truncated or overwritten) is rebuilt before it is loaded,
because loading a truncated shared library can crash the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading

import jax

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("grouped_matmul.cc")
TARGETS = {"prism_grouped_matmul_f32": "PrismGroupedMatmulF32",
           "prism_grouped_matmul_rhs_grad_f32": "PrismGroupedMatmulRhsGradF32"}
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_COMPILE_TIMEOUT_S = 300

# Guards the state below: model loading may trace programs on several threads at once.
_lock = threading.RLock()
_registered: pathlib.Path | None = None  # XLA keeps one handler per target for the process
_loaded: dict[tuple[str, ...], pathlib.Path] = {}  # (cache dir, compiler) -> library
_available: bool | None = None


class KernelBuildError(RuntimeError):
  """The C++ kernels could not be compiled or loaded on this machine."""


def cache_dir() -> pathlib.Path:
  # The XDG spec says to ignore a relative XDG_CACHE_HOME.
  root = os.environ.get("XDG_CACHE_HOME", "")
  if not os.path.isabs(root):
    root = os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(root) / "prism-jax" / "native"


def find_compiler() -> list[str] | None:
  """Return the C++ compiler command: `$CXX` (split like a shell word list) when set, else the
  first of g++, c++, clang++ on PATH."""
  if os.environ.get("CXX", "").strip():
    return shlex.split(os.environ["CXX"])
  for name in ("g++", "c++", "clang++"):
    if path := shutil.which(name):
      return [path]
  return None


def _cpu_features() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
      return next((line for line in f if line.startswith(("flags", "Features"))), "")
  except OSError:
    return platform.processor()


def _build_key(compiler: list[str], version: str) -> str:
  digest = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join(compiler).encode(), version.encode(), " ".join(_FLAGS).encode(),
               jax.__version__.encode(), platform.machine().encode(), _cpu_features().encode()):
    digest.update(part)
    digest.update(b"\0")
  return digest.hexdigest()[:16]


def _digest(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _is_intact(library: pathlib.Path) -> bool:
  """Return whether `library` exists and matches the digest recorded when it was built."""
  checksum = library.with_suffix(".sha256")
  try:
    return library.is_file() and checksum.read_text().strip() == _digest(library.read_bytes())
  except OSError:
    return False


def _write_atomically(path: pathlib.Path, data: bytes, mode: int) -> None:
  fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp_name, mode)  # mkstemp makes the file 0600; other users of a shared cache must read it
    os.replace(tmp_name, path)
  finally:
    if os.path.exists(tmp_name):
      os.remove(tmp_name)


def _compile(compiler: list[str], library: pathlib.Path) -> None:
  try:
    library.parent.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="prism-native-build.")
  except OSError as e:
    raise KernelBuildError(f"cannot write to the kernel cache {library.parent}: {e}; set XDG_CACHE_HOME to a "
                           "writable directory") from e
  output = pathlib.Path(scratch) / library.name
  command = [*compiler, *_FLAGS, "-isystem", jax.ffi.include_dir(), str(SOURCE), "-o", str(output)]
  logger.info("compiling the native kernels: %s", shlex.join(command))
  try:
    result = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S, check=False)
    if result.returncode != 0:
      raise KernelBuildError(f"{shlex.join(compiler)} failed with exit status {result.returncode}; its output "
                             f"ends:\n{result.stderr[-4000:]}")
    built = output.read_bytes()
    _write_atomically(library, built, 0o755)
    _write_atomically(library.with_suffix(".sha256"), _digest(built).encode(), 0o644)
  except subprocess.TimeoutExpired as e:
    raise KernelBuildError(f"{shlex.join(compiler)} did not finish within {_COMPILE_TIMEOUT_S} s") from e
  except OSError as e:
    raise KernelBuildError(f"building the native kernels into {library.parent} failed: {e}") from e
  finally:
    shutil.rmtree(scratch, ignore_errors=True)


def _register(library: pathlib.Path) -> None:
  global _registered
  if _registered is not None:
    return  # later builds of the same source define the same handlers
  try:
    handle = ctypes.CDLL(str(library))
    symbols = {target: getattr(handle, symbol) for target, symbol in TARGETS.items()}
  except (OSError, AttributeError) as e:
    # Remove it so that a fixed environment builds afresh; ignore a cache we cannot write.
    for path in (library, library.with_suffix(".sha256")):
      try:
        path.unlink(missing_ok=True)
      except OSError:
        pass
    raise KernelBuildError(f"the compiled kernels {library} cannot be loaded: {e}. Check that $CXX is a C++ "
                           "compiler (g++, clang++) and that the cache directory allows executables (not noexec)"
                           ) from e
  for target, capsule in symbols.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(capsule), platform="cpu")
  _registered = library


def load_kernels() -> pathlib.Path:
  """Compile the kernels unless an intact cached build matches, load them and register their FFI
  targets; returns the library's path.

  Raises KernelBuildError when no C++ compiler is found or the build or the load fails.
  """
  with _lock:
    compiler = find_compiler()
    if compiler is None:
      raise KernelBuildError("no C++ compiler found (looked for $CXX, g++, c++, clang++); install g++")
    key = (str(cache_dir()), *compiler)
    if key in _loaded:
      return _loaded[key]
    try:
      version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60,
                               check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
      raise KernelBuildError(f"cannot run the C++ compiler {shlex.join(compiler)!r}: {e}") from e

    library = cache_dir() / f"prism_native_{_build_key(compiler, version)}.so"
    if not _is_intact(library):
      if library.exists():
        logger.warning("the cached kernels %s do not match their recorded digest; rebuilding them", library)
      _compile(compiler, library)
    _register(library)
    _loaded[key] = library
    return library


def native_available() -> bool:
  """Return whether the kernels build and load here; logs the reason once when they do not."""
  global _available
  with _lock:
    if _available is None:
      try:
        load_kernels()
        _available = True
      except KernelBuildError as e:
        logger.warning("native CPU kernels unavailable, using the 'tiled' backend instead: %s", e)
        _available = False
    return _available
