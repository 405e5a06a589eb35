"""Prefetch: read the next MoE layer's likely units in a background thread while this one computes.

The prefetcher only stages data; it never touches the cache. When the layer runs, its misses
are taken from the staged reads where present and read synchronously otherwise, and the
cache admits them exactly as it would without prefetching. So prefetching changes how long
a step waits for data, never which units are resident or what the model computes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging

import numpy as np

from serve.offload.tier import SlowTier, SlowTierError, UnitData

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StagedTake:
  """Staged data for some of a layer's misses, and what prefetching cost for that layer."""

  parts: list[UnitData]
  remaining: np.ndarray
  wasted_bytes: int


class Prefetcher:
  """One background reader thread; staged reads are keyed by MoE layer."""

  def __init__(self, tier: SlowTier, unit_bytes: int):
    self.tier, self.unit_bytes = tier, unit_bytes
    self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-prefetch")
    self._pending: dict[int, list[tuple[np.ndarray, concurrent.futures.Future]]] = {}

  def start(self, layer: int, units: np.ndarray) -> None:
    """Begin reading `units` of `layer`; returns at once."""
    units = np.asarray(units, np.int64)
    if len(units):
      future = self._executor.submit(self.tier.read, layer, units)
      self._pending.setdefault(layer, []).append((units, future))

  def take(self, layer: int, units: np.ndarray) -> StagedTake:
    """Staged data for those of `units` that were prefetched, waiting only for reads that have some.

    Every staged read of the layer is consumed: units not among `units` count as wasted. A
    read with nothing useful is cancelled, or left to finish in the background. A prefetch
    read that failed is ignored, so the caller's synchronous read reports the error.
    """
    needed = {int(u) for u in np.asarray(units).tolist()}
    parts, wasted = [], 0
    for staged_units, future in self._pending.pop(layer, []):
      useful = [u for u in staged_units.tolist() if u in needed]
      if not useful:
        wasted += 0 if future.cancel() else len(staged_units) * self.unit_bytes
        continue
      try:
        data = future.result()
      except SlowTierError as error:
        logger.debug("prefetch of layer %d failed (%s); reading synchronously instead", layer, error)
        continue
      parts.append(data.take(np.asarray(useful, np.int64)))
      needed -= set(useful)
      wasted += (len(staged_units) - len(useful)) * self.unit_bytes
    remaining = np.asarray([u for u in np.asarray(units).tolist() if u in needed], np.int64)
    return StagedTake(parts, remaining, wasted)

  def discard(self) -> int:
    """Drop every staged read (after a failed step); returns the bytes read, or being read, for nothing."""
    wasted = 0
    for entries in self._pending.values():
      for staged_units, future in entries:
        wasted += 0 if future.cancel() else len(staged_units) * self.unit_bytes
    self._pending.clear()
    return wasted

  def close(self) -> None:
    self.discard()
    self._executor.shutdown(wait=True)
