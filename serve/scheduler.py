"""Scheduling policies: which rows run the next step, in which bucket, at which budget.

Every policy runs prefill first: while some request has a slot but part of its prompt uncached,
or a waiting request can take a free slot, the step is a prefill step; otherwise all (or
one group of) decoding rows run one token. The policies differ in admission order and in
the budget each row runs:

- fcfs: admit in arrival order; the step runs every row at the largest budget among its rows.
- edf: earliest TTFT deadline first (requests without one go last, by arrival), grouped by
  budget: a prefill step contains one compiled budget only, that of the most urgent request,
  and each row runs its own budget inside it (with every budget compiled, one budget per step).
  Prefill rows are added while the predicted step time does not make an admitted row miss a
  deadline it would otherwise meet. Decode steps carry no deadline, so they run every
  decoding row at its own budget (one group per decode step would split the batch into as
  many steps as there are budgets and keep slots busy longer).
- throughput: admit in ascending budget; once the running batch (occupied slots) is half
  full, admit no budget above the batch's largest. Rows run at the step's largest budget.
  NOTE: a steady stream of low budgets can starve high budgets in this mode.
- per_row: fcfs admission, but each row runs its own budget (per-row budgets in a program
  compiled for the step's largest).

The static budget of a step is the smallest compiled budget that covers its rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence as Seq

from serve.config import EngineConfig, Program, smallest_fitting
from serve.latency import LatencyTable
from serve.sequence import Phase, Sequence


@dataclasses.dataclass(frozen=True)
class RowPlan:
  """One row of a step: its sequence, how many tokens it feeds, and the budget it runs."""

  sequence: Sequence
  num_tokens: int
  budget: int


@dataclasses.dataclass(frozen=True)
class StepPlan:
  """The next step: kind, rows, bucket (batch x tokens), static budget, predicted seconds."""

  kind: Literal["prefill", "decode"]
  rows: tuple[RowPlan, ...]
  program: Program
  predicted_s: float


@dataclasses.dataclass(frozen=True)
class QueueView:
  """Scheduler input: the clock, sequences by phase (each in arrival order) and free slots."""

  now: float
  waiting: Seq[Sequence]
  prefilling: Seq[Sequence]
  decoding: Seq[Sequence]
  free_slots: int


class Scheduler:
  """FCFS; the other policies override admission (`prefill_sequences`), grouping and row budgets."""

  name = "fcfs"
  uniform_budget = True  # every row runs the step's largest budget

  def __init__(self, config: EngineConfig, compiled_budgets: Seq[int], latency: LatencyTable):
    self.config = config
    self.compiled_budgets = tuple(sorted(compiled_budgets))
    self.latency = latency

  def plan(self, view: QueueView) -> StepPlan | None:
    sequences = self.prefill_sequences(view)
    if sequences:
      return self._make_plan("prefill", sequences)
    sequences = self.decode_sequences(view)
    if sequences:
      return self._make_plan("decode", sequences)
    return None

  def prefill_sequences(self, view: QueueView) -> list[Sequence]:
    admitted = list(view.waiting[:view.free_slots])
    return (list(view.prefilling) + admitted)[:self.config.max_batch]

  def decode_sequences(self, view: QueueView) -> list[Sequence]:
    return list(view.decoding)[:self.config.max_batch]

  def compiled_budget(self, budget: int) -> int:
    for compiled in self.compiled_budgets:
      if compiled >= budget:
        return compiled
    raise ValueError(f"budget {budget} exceeds every compiled budget {self.compiled_budgets}")

  def chunk(self, sequence: Sequence) -> int:
    return min(sequence.pending, self.config.max_chunk)

  def bucket(self, kind: str, sequences: Seq[Sequence]) -> tuple[int, int]:
    batch = smallest_fitting(self.config.batch_buckets, len(sequences))
    tokens = 1 if kind == "decode" else smallest_fitting(self.config.step_token_sizes,
                                                         max(self.chunk(s) for s in sequences))
    return batch, tokens

  def predict(self, kind: str, sequences: Seq[Sequence]) -> float:
    batch, tokens = self.bucket(kind, sequences)
    return self.latency.predict(batch, tokens, self.compiled_budget(max(s.budget for s in sequences)))

  def _make_plan(self, kind: Literal["prefill", "decode"], sequences: list[Sequence]) -> StepPlan:
    largest = max(s.budget for s in sequences)
    batch, tokens = self.bucket(kind, sequences)
    rows = tuple(RowPlan(s, min(s.pending, tokens), largest if self.uniform_budget else s.budget)
                 for s in sequences)
    program = Program(batch, tokens, self.compiled_budget(largest))
    return StepPlan(kind, rows, program, self.latency.predict(*program))


class PerRowScheduler(Scheduler):
  name = "per_row"
  uniform_budget = False


class ThroughputScheduler(Scheduler):
  name = "throughput"

  def prefill_sequences(self, view: QueueView) -> list[Sequence]:
    chosen = list(view.prefilling)
    running = list(view.prefilling) + list(view.decoding)
    largest = max((s.budget for s in running), default=0)
    half = self.config.max_batch / 2
    free = view.free_slots
    for sequence in sorted(view.waiting, key=lambda s: (s.budget, s.arrival)):
      if free == 0 or len(chosen) == self.config.max_batch:
        break
      if len(running) >= half and sequence.budget > largest:
        break
      chosen.append(sequence)
      running.append(sequence)
      largest = max(largest, sequence.budget)
      free -= 1
    return chosen


class EdfScheduler(Scheduler):
  name = "edf"
  uniform_budget = False

  def prefill_sequences(self, view: QueueView) -> list[Sequence]:
    candidates = sorted([*view.prefilling, *view.waiting], key=lambda s: (s.deadline_or(math.inf), s.arrival))
    if not candidates or (not view.prefilling and view.free_slots == 0):
      return []
    group = self.compiled_budget(candidates[0].budget)
    chosen: list[Sequence] = []
    free = view.free_slots
    for sequence in candidates:
      if self.compiled_budget(sequence.budget) != group or len(chosen) == self.config.max_batch:
        continue
      waiting = sequence.phase is Phase.WAITING
      if waiting and free == 0:
        continue
      if chosen and self._delays_deadline(view.now, chosen, sequence):
        continue
      chosen.append(sequence)
      free -= int(waiting)
    return chosen

  def _delays_deadline(self, now: float, chosen: list[Sequence], candidate: Sequence) -> bool:
    """Return whether adding `candidate` makes a chosen row that would meet its deadline miss it."""
    before = now + self.predict("prefill", chosen)
    after = now + self.predict("prefill", [*chosen, candidate])
    return any(s.deadline is not None and before <= s.deadline < after for s in chosen)


SCHEDULERS: dict[str, type[Scheduler]] = {
    "fcfs": Scheduler,
    "edf": EdfScheduler,
    "throughput": ThroughputScheduler,
    "per_row": PerRowScheduler,
}


def make_scheduler(config: EngineConfig, compiled_budgets: Seq[int], latency: LatencyTable) -> Scheduler:
  return SCHEDULERS[config.policy](config, compiled_budgets, latency)
