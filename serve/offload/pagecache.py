"""Linux page-cache control for the disk tier: how much of a file is cached, and dropping it.

`drop_page_cache` makes the next reads of a file cold (from the block device) without root:
it flushes the file's dirty pages (fsync) and then advises the kernel to drop them
(posix_fadvise DONTNEED). Pages that some process still maps are not dropped, so the disk
tier closes its own maps first. `page_cache_residency` measures the result with mincore(2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os

import numpy as np

logger = logging.getLogger(__name__)

_libc = None


def _mincore():
  global _libc
  if _libc is None:
    name = ctypes.util.find_library("c")
    if name is None:
      raise OSError("the C library was not found, so mincore(2) is unavailable")
    _libc = ctypes.CDLL(name, use_errno=True)
  return _libc.mincore


def page_cache_residency(path: str | os.PathLike) -> float:
  """Fraction of the file's pages that are in the page cache (0.0 to 1.0), via mincore(2)."""
  size = os.path.getsize(path)
  if size == 0:
    return 1.0
  pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
  vector = (ctypes.c_ubyte * pages)()
  with open(path, "rb") as file, mmap.mmap(file.fileno(), size, prot=mmap.PROT_READ) as mapped:
    view = np.frombuffer(mapped, dtype=np.uint8)
    try:
      result = _mincore()(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), vector)
      if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"mincore failed on {path}: {os.strerror(error)}")
    finally:
      del view  # the map cannot close while a buffer export is alive
  return float(np.frombuffer(vector, dtype=np.uint8).__and__(1).sum()) / pages


def drop_page_cache(path: str | os.PathLike) -> None:
  """Flush and drop the file's cached pages (posix_fadvise DONTNEED); mapped pages stay."""
  if not hasattr(os, "posix_fadvise"):
    raise OSError("os.posix_fadvise is not available on this platform; page-cache dropping needs Linux")
  descriptor = os.open(path, os.O_RDONLY)
  try:
    os.fsync(descriptor)
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
  finally:
    os.close(descriptor)
