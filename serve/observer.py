"""Engine reporting: step and completion events for an observer, and snapshots for health checks."""

from __future__ import annotations

import dataclasses
from typing import Protocol

from serve.request import Completion
from serve.step import StepRecord


class EngineObserver(Protocol):
  """Receiver of engine events (metrics), called on the engine thread. Its methods must not raise."""

  def on_step(self, record: StepRecord) -> None:
    ...

  def on_finish(self, completion: Completion) -> None:
    ...


@dataclasses.dataclass(frozen=True)
class EngineStats:
  """A snapshot for health checks: queue length, requests holding slots, steps run, programs."""

  waiting: int
  running: int
  steps: int
  programs: int
  accepting: bool
