"""Eviction policies of the expert cache: least recently used and least frequently used.

A key is (layer, unit). The cache calls `touch` on a hit, `admit` after inserting a miss,
and `evict(count, protected)` to choose victims. Keys in `protected`, the units the current
layer needs, are never chosen.
"""

from __future__ import annotations

import collections
import heapq
import itertools
from typing import Collection, Hashable, Literal, Protocol

PolicyName = Literal["lru", "lfu"]
POLICIES: tuple[str, ...] = ("lru", "lfu")


class EvictionPolicy(Protocol):
  """Chooses which resident keys to evict."""

  def touch(self, key: Hashable) -> None:
    ...

  def admit(self, key: Hashable) -> None:
    ...

  def evict(self, count: int, protected: Collection[Hashable]) -> list[Hashable]:
    """Remove and return `count` resident keys not in `protected`."""
    ...


class LRUPolicy:
  """Evict the key whose last use is oldest."""

  def __init__(self):
    self._order: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

  def touch(self, key: Hashable) -> None:
    self._order.move_to_end(key)

  def admit(self, key: Hashable) -> None:
    self._order[key] = None

  def evict(self, count: int, protected: Collection[Hashable]) -> list[Hashable]:
    victims = []
    for key in self._order:
      if len(victims) == count:
        break
      if key not in protected:
        victims.append(key)
    if len(victims) < count:
      raise RuntimeError(f"LRU cache: only {len(victims)} of {count} requested evictions are possible")
    for key in victims:
      del self._order[key]
    return victims


class LFUPolicy:
  """Evict the key used least often; ties go to the least recently used.

  Counts persist after a key is evicted, so a popular unit that returns keeps its history
  (frequency over the whole run, not only while resident). A lazy heap of (count, tick, key)
  entries makes each eviction O(log n); entries whose count or tick is stale are skipped.
  """

  def __init__(self):
    self._count: collections.Counter[Hashable] = collections.Counter()
    self._tick: dict[Hashable, int] = {}
    self._resident: set[Hashable] = set()
    self._heap: list[tuple[int, int, int, Hashable]] = []
    self._clock = itertools.count()
    self._serial = itertools.count()  # breaks ties between equal entries without comparing keys

  def _use(self, key: Hashable) -> None:
    self._count[key] += 1
    self._tick[key] = next(self._clock)
    heapq.heappush(self._heap, (self._count[key], self._tick[key], next(self._serial), key))
    if len(self._heap) > 4 * len(self._resident) + 64:
      self._rebuild()

  def _rebuild(self) -> None:
    self._heap = [(self._count[k], self._tick[k], next(self._serial), k) for k in self._resident]
    heapq.heapify(self._heap)

  def touch(self, key: Hashable) -> None:
    self._use(key)

  def admit(self, key: Hashable) -> None:
    self._resident.add(key)
    self._use(key)

  def evict(self, count: int, protected: Collection[Hashable]) -> list[Hashable]:
    victims, skipped = [], []
    while len(victims) < count and self._heap:
      entry = heapq.heappop(self._heap)
      uses, tick, _, key = entry
      if key not in self._resident or uses != self._count[key] or tick != self._tick[key]:
        continue  # stale: the key was used again or evicted since this entry was pushed
      if key in protected:
        skipped.append(entry)
        continue
      victims.append(key)
      self._resident.discard(key)
    for entry in skipped:
      heapq.heappush(self._heap, entry)
    if len(victims) < count:
      for key in victims:  # undo, so a failed eviction leaves the policy unchanged
        self._resident.add(key)
        heapq.heappush(self._heap, (self._count[key], self._tick[key], next(self._serial), key))
      raise RuntimeError(f"LFU cache: only {len(victims)} of {count} requested evictions are possible")
    return victims


def make_policy(name: PolicyName) -> EvictionPolicy:
  if name == "lru":
    return LRUPolicy()
  if name == "lfu":
    return LFUPolicy()
  raise ValueError(f"unknown cache policy {name!r}; expected one of {', '.join(POLICIES)}")
