"""Timing helpers shared by the benchmark scripts."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def _call_seconds(fn: Callable[[], object]) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def _seconds(fn: Callable[[], object], repeats: int, warmup: int) -> list[float]:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  return [_call_seconds(fn) for _ in range(repeats)]


def median_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
  """Median wall time of `fn()` (results blocked on) after `warmup` untimed calls."""
  return statistics.median(_seconds(fn, repeats, warmup))


def min_seconds(fn: Callable[[], object], *, repeats: int = 5, warmup: int = 1) -> float:
  """Fastest wall time of `fn()` after `warmup` untimed calls, for peak figures such as bandwidth."""
  return min(_seconds(fn, repeats, warmup))


def interleaved_medians(fns: dict[str, Callable[[], object]], *, repeats: int = 5) -> dict[str, float]:
  """Median wall time of each function, timed in round-robin order.

  Each round calls every function once, so a slow spell of a shared machine falls on all
  of them alike and their ratios stay meaningful. Every function is called once, untimed,
  before the first round.
  """
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(_call_seconds(fn))
  return {name: statistics.median(values) for name, values in times.items()}
