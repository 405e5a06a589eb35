"""Profiled step times per (batch, tokens, budget), saved as JSON; the schedulers predict from them."""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from tqdm import tqdm

from serve.config import Program
from serve.runner import StepBatch, StepRunner

logger = logging.getLogger(__name__)

TABLE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """Median measured seconds of one step per compiled program, plus where it was measured.

  `predict` returns an estimate for any (batch, tokens, budget). It uses the exact entry when
  one exists. Otherwise it interpolates linearly in batch x tokens among entries of the same
  budget, then linearly in budget between the two nearest measured budgets. An empty table
  predicts 0 s.
  """

  seconds: dict[Program, float]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for program, value in self.seconds.items():
      if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"latency of {program} must be a finite non-negative number of seconds, got {value}")

  def predict(self, batch: int, tokens: int, budget: int) -> float:
    if not self.seconds:
      return 0.0
    exact = self.seconds.get(Program(batch, tokens, budget))
    if exact is not None:
      return exact
    budgets = sorted({p.budget for p in self.seconds})
    below = [b for b in budgets if b <= budget]
    above = [b for b in budgets if b >= budget]
    low = below[-1] if below else above[0]
    high = above[0] if above else below[-1]
    at_low = self._predict_at_budget(batch * tokens, low)
    if high == low:
      return at_low
    at_high = self._predict_at_budget(batch * tokens, high)
    return at_low + (at_high - at_low) * (budget - low) / (high - low)

  def _predict_at_budget(self, work: int, budget: int) -> float:
    points = sorted((p.batch * p.tokens, s) for p, s in self.seconds.items() if p.budget == budget)
    works = np.array([w for w, _ in points], float)
    times = np.array([s for _, s in points], float)
    if work > works[-1]:
      # Past the largest measured shape, scale the largest entry by the extra work.
      return float(times[-1] * work / works[-1])
    return float(np.interp(work, works, times))

  def to_json(self) -> str:
    entries = [{"batch": p.batch, "tokens": p.tokens, "budget": p.budget, "seconds": s}
               for p, s in sorted(self.seconds.items())]
    return json.dumps({"format_version": TABLE_FORMAT_VERSION, **self.meta, "entries": entries}, indent=2)

  def save(self, path: str | os.PathLike) -> Path:
    """Write the table as JSON (atomically: a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(self.to_json())
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> LatencyTable:
    path = Path(path)
    try:
      data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
      raise ValueError(f"cannot read latency table {path}: {error}; create one with `prism profile`") from error
    if data.get("format_version") != TABLE_FORMAT_VERSION:
      raise ValueError(f"{path}: latency table format {data.get('format_version')} is not the supported "
                       f"{TABLE_FORMAT_VERSION}; profile again with `prism profile`")
    seconds = {Program(int(e["batch"]), int(e["tokens"]), int(e["budget"])): float(e["seconds"])
               for e in data.pop("entries")}
    data.pop("format_version")
    return cls(seconds, data)

  def missing(self, programs: Sequence[Program]) -> list[Program]:
    return [p for p in programs if p not in self.seconds]


def measure_latency(runner: StepRunner, programs: Sequence[Program], *, repeats: int = 5,
                    progress: bool = True, meta: dict[str, Any] | None = None) -> LatencyTable:
  """Time each compiled program `repeats` times after one warm-up run and keep the median.

  The timed runs go round-robin over the programs, so a change in machine load during the
  measurement shifts every entry alike instead of skewing the programs measured at that moment.
  Runs filler batches in slots 0..B-1, so it overwrites their KV cache: call it before serving.
  Each run draws new tokens from the runner's vocabulary, so an offloaded model's expert cache
  misses as it would on real requests instead of hitting on the same tokens every time.
  """
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  programs = list(dict.fromkeys(programs))
  vocab_size = getattr(runner, "vocab_size", None)
  batch = lambda program, run: StepBatch.filler(program, vocab_size=vocab_size, seed=run)
  samples: dict[Program, list[float]] = {program: [] for program in programs}
  with tqdm(total=len(programs) * (repeats + 1), desc="timing steps", unit="step", disable=not progress) as bar:
    for program in programs:
      runner.run(batch(program, 0))
      bar.update(1)
    for run in range(1, repeats + 1):
      for program in programs:
        filler = batch(program, run)
        start = time.perf_counter()
        runner.run(filler)
        samples[program].append(time.perf_counter() - start)
        bar.update(1)
  seconds = {program: statistics.median(times) for program, times in samples.items()}
  info = {
      "device": str(jax.devices()[0].device_kind),
      "platform": jax.default_backend(),
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "repeats": repeats,
      **(meta or {}),
  }
  return LatencyTable(seconds, info)
