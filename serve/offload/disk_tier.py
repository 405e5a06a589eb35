"""The disk tier: sub-expert weights in raw .npy files, read on demand through np.memmap.

An offload directory holds, per MoE layer, `layer_LLL_gate.npy` and `layer_LLL_up.npy`
([G, D, F/N]) and `layer_LLL_down.npy` ([G, F/N, D]), already permuted into sub-experts, and
`offload.json` (written last) with the shapes and a digest of the weights' source. bfloat16
weights are stored as their uint16 bit patterns, because .npy has no bfloat16 type.

Every read first checks that the file still exists with its expected size and re-maps it
when it was replaced. A removed or truncated file therefore fails that read with
`SlowTierError`, and a restored file works again on the next read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from serve.offload.pagecache import drop_page_cache, page_cache_residency
from serve.offload.tier import SlowTierError, UnitData, unit_groups_index

logger = logging.getLogger(__name__)

MANIFEST = "offload.json"
FORMAT = "prism-offload"
FORMAT_VERSION = 1
PARTS = ("gate", "up", "down")


def layer_file(layer: int, part: str) -> str:
  return f"layer_{layer:03d}_{part}.npy"


@dataclasses.dataclass(frozen=True)
class OffloadManifest:
  """Contents of an offload directory; `digest` identifies the weights and partition they came from."""

  digest: str
  dtype: str
  hidden_size: int
  width: int
  num_groups: int
  layers: tuple[int, ...]

  def shape(self, part: str) -> tuple[int, int, int]:
    if part == "down":
      return (self.num_groups, self.width, self.hidden_size)
    return (self.num_groups, self.hidden_size, self.width)

  def storage_dtype(self) -> np.dtype:
    return np.dtype(np.uint16) if self.dtype == "bfloat16" else np.dtype(self.dtype)

  def to_json(self) -> str:
    return json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self)}, indent=2)

  @classmethod
  def read(cls, directory: Path) -> OffloadManifest | None:
    """Read the directory's manifest; return None when it is missing or in another format."""
    path = directory / MANIFEST
    try:
      data = json.loads(path.read_text())
    except FileNotFoundError:
      return None
    except (OSError, json.JSONDecodeError) as error:
      raise SlowTierError(f"cannot read {path}: {error}; delete the offload directory to rebuild it") from error
    if data.pop("format", None) != FORMAT or data.pop("format_version", None) != FORMAT_VERSION:
      return None
    data["layers"] = tuple(data["layers"])
    return cls(**data)


def prepare_offload_dir(directory: str | os.PathLike, manifest: OffloadManifest,
                        source: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                        progress: bool = False) -> Path:
  """Write every MoE layer's (gate, up, down) from `source(layer)` unless the directory already matches.

  An existing directory is reused when its manifest equals `manifest` and rewritten when it is
  an offload directory of other weights. A directory with any other contents is rejected.
  """
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  existing = OffloadManifest.read(directory)
  if existing == manifest and all((directory / layer_file(i, p)).is_file() for i in manifest.layers for p in PARTS):
    logger.info("reusing offload directory %s (digest %s)", directory, manifest.digest)
    return directory
  if existing is None and any(directory.iterdir()):
    raise ValueError(f"offload directory {directory} is not empty and has no {MANIFEST}; choose an empty or new "
                     "directory")
  (directory / MANIFEST).unlink(missing_ok=True)
  storage = manifest.storage_dtype()
  for layer in tqdm(manifest.layers, desc="writing offload files", unit="layer", disable=not progress):
    for part, array in zip(PARTS, source(layer)):
      array = np.asarray(array)
      if array.shape != manifest.shape(part):
        raise ValueError(f"layer {layer} {part} has shape {array.shape}, expected {manifest.shape(part)}")
      path = directory / layer_file(layer, part)
      partial = path.with_name(path.name + ".partial")
      with open(partial, "wb") as file:
        np.save(file, np.ascontiguousarray(array).view(storage), allow_pickle=False)
        file.flush()
        os.fsync(file.fileno())
      os.replace(partial, path)
  (directory / MANIFEST).write_text(manifest.to_json())
  logger.info("wrote offload directory %s: %d MoE layers", directory, len(manifest.layers))
  return directory


class _MappedFile:
  """A .npy file mapped read-only and validated again before every use."""

  def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype):
    self.path, self.shape, self.dtype = path, shape, dtype
    self._array: np.memmap | None = None
    self._identity: tuple[int, int, int] | None = None
    self._size = 0
    self._lock = threading.Lock()

  def array(self) -> np.ndarray:
    with self._lock:
      try:
        status = os.stat(self.path)
      except FileNotFoundError:
        raise SlowTierError(f"offload file {self.path} is missing (removed while the model runs?); restore it or "
                            "rebuild the offload directory, then retry") from None
      identity = (status.st_ino, status.st_mtime_ns, status.st_size)
      if self._array is None or identity != self._identity:
        self._open(identity)
      if status.st_size != self._size:
        raise SlowTierError(f"offload file {self.path} has {status.st_size} bytes, expected {self._size} "
                            "(truncated?); restore it or rebuild the offload directory, then retry")
      return self._array

  def _open(self, identity: tuple[int, int, int]) -> None:
    self._array = None
    try:
      array = np.load(self.path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as error:
      raise SlowTierError(f"cannot map offload file {self.path}: {error}; restore it or rebuild the offload "
                          "directory, then retry") from error
    if array.shape != self.shape or array.dtype != self.dtype:
      raise SlowTierError(f"offload file {self.path} contains {array.dtype} {array.shape}, expected {self.dtype} "
                          f"{self.shape}; rebuild the offload directory")
    self._array, self._identity = array, identity
    self._size = array.offset + array.nbytes

  def close(self) -> None:
    with self._lock:
      self._array, self._identity = None, None


class DiskTier:
  """Reads units of MoE layers from an offload directory's memory-mapped files."""

  kind = "disk"

  def __init__(self, directory: str | os.PathLike, unit_groups: int):
    self.directory = Path(directory)
    manifest = OffloadManifest.read(self.directory)
    if manifest is None:
      raise SlowTierError(f"{self.directory} has no {MANIFEST}; write it with prepare_offload_dir")
    self.manifest, self.unit_groups = manifest, unit_groups
    self._dtype = jnp.dtype(manifest.dtype)
    self._files = {(layer, part): _MappedFile(self.directory / layer_file(layer, part), manifest.shape(part),
                                              manifest.storage_dtype())
                   for layer in manifest.layers for part in PARTS}

  def read(self, layer: int, units: np.ndarray) -> UnitData:
    units = np.asarray(units, np.int64)
    groups = unit_groups_index(units, self.unit_groups)
    parts = []
    for part in PARTS:
      mapped = self._files[(layer, part)]
      # NOTE: a file truncated between the size check in array() and this copy raises SIGBUS,
      # which kills the process: a memory map cannot report that as an exception.
      try:
        data = np.take(mapped.array(), groups, axis=0)
      except (OSError, ValueError, IndexError) as error:
        raise SlowTierError(f"reading {mapped.path} failed: {error}; restore it or rebuild the offload "
                            "directory, then retry") from error
      parts.append(data.view(self._dtype))
    return UnitData(units, *parts)

  def files(self) -> list[Path]:
    return [mapped.path for mapped in self._files.values()]

  def residency(self) -> float:
    """Fraction of the offload files' pages in the page cache."""
    sizes = [os.path.getsize(path) for path in self.files()]
    cached = [page_cache_residency(path) * size for path, size in zip(self.files(), sizes)]
    return sum(cached) / max(sum(sizes), 1)

  def drop_page_cache(self) -> float:
    """Unmap every file and drop it from the page cache; returns the residency left (0.0 = all cold)."""
    for mapped in self._files.values():
      mapped.close()
      drop_page_cache(mapped.path)
    return self.residency()

  def close(self) -> None:
    for mapped in self._files.values():
      mapped.close()
