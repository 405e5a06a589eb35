"""Host side of one step: pack planned rows into bucket-shaped arrays, then turn samples into events."""

from __future__ import annotations

import dataclasses

import numpy as np

from serve.config import Program
from serve.request import Completion, TokenEvent
from serve.runner import StepBatch
from serve.scheduler import StepPlan
from serve.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class StepRecord:
  """What one step did, for metrics, logs and tests.

  budgets lists the budget each row ran, and program.budget is the compiled static budget.
  measured_s is wall time of the model call; duration_s is the same step on the engine's
  clock (equal unless a test or simulation injects a clock).
  """

  kind: str
  program: Program
  request_ids: tuple[str, ...]
  budgets: tuple[int, ...]
  predicted_s: float
  measured_s: float
  started_at: float
  duration_s: float
  error: str | None
  waiting: int
  running: int


def build_step_batch(plan: StepPlan, *, scratch_slot: int, max_len: int) -> StepBatch:
  """Fill the bucket: each row feeds `num_tokens` of its sequence from position `cached` on.

  Padding rows point at the scratch slot and padding tokens at position max_len (dropped by
  the cache); both are marked invalid so routing ignores them.
  """
  batch, tokens, budget = plan.program
  slots_B = np.full(batch, scratch_slot, np.int32)
  tokens_BT = np.zeros((batch, tokens), np.int32)
  positions_BT = np.full((batch, tokens), max_len, np.int32)
  valid_BT = np.zeros((batch, tokens), bool)
  budget_B = np.ones(batch, np.int32)
  last_index_B = np.zeros(batch, np.int32)
  temperature_B = np.zeros(batch, np.float32)
  top_p_B = np.ones(batch, np.float32)
  seed_lo_B = np.zeros(batch, np.uint32)
  seed_hi_B = np.zeros(batch, np.uint32)
  counter_B = np.zeros(batch, np.int32)
  for i, row in enumerate(plan.rows):
    sequence, count = row.sequence, row.num_tokens
    start = sequence.cached
    slots_B[i] = sequence.slot
    tokens_BT[i, :count] = sequence.tokens[start:start + count]
    positions_BT[i, :count] = np.arange(start, start + count)
    valid_BT[i, :count] = True
    budget_B[i] = row.budget
    last_index_B[i] = count - 1
    temperature_B[i] = sequence.sampling.temperature
    top_p_B[i] = sequence.sampling.top_p
    seed = sequence.seed % 2**64
    seed_lo_B[i], seed_hi_B[i] = seed & 0xFFFFFFFF, seed >> 32
    counter_B[i] = len(sequence.generated)
  return StepBatch(budget, slots_B, tokens_BT, positions_BT, valid_BT, budget_B, last_index_B, temperature_B,
                   top_p_B, seed_lo_B, seed_hi_B, counter_B)


def process_token(sequence: Sequence, token: int, budget: int, now: float, eos_token_ids: tuple[int, ...],
                  vocab_size: int) -> str | None:
  """Append a sampled token, send its event, and return a finish reason once the request is done.

  An EOS token is kept in token_ids (as `generate_tokens` does) but adds no text.
  """
  if not 0 <= token < vocab_size:
    raise RuntimeError(f"the model returned token id {token}, outside the vocabulary 0..{vocab_size - 1}")
  sequence.tokens.append(token)
  if sequence.first_token_at is None:
    sequence.first_token_at = now
  is_eos = token in eos_token_ids
  text = ""
  if sequence.decoder is not None and not is_eos:
    text = sequence.stop.append(sequence.decoder.push(token))
  index = len(sequence.generated) - 1
  sequence.handle._emit(TokenEvent(sequence.request_id, index, token, text, budget))  # pylint: disable=protected-access
  if is_eos or (sequence.stop is not None and sequence.stop.stopped):
    return "stop"
  if len(sequence.generated) >= sequence.sampling.max_tokens:
    return "length"
  return None


def finish_completion(sequence: Sequence, reason: str, error: str | None, now: float) -> Completion:
  """Build the final record of a request, flushing text held back for stop strings."""
  text, unstreamed = None, ""
  if sequence.decoder is not None:
    if reason != "error" and not sequence.stop.stopped:
      sequence.stop.append(sequence.decoder.flush())
    unstreamed = sequence.stop.unstreamed()
    text = sequence.stop.text
  ttft = None if sequence.first_token_at is None else sequence.first_token_at - sequence.arrival
  deadline_met = None
  if sequence.deadline is not None:
    deadline_met = sequence.first_token_at is not None and sequence.first_token_at <= sequence.deadline
  runs = sequence.budgets_run
  return Completion(
      request_id=sequence.request_id,
      prompt_tokens=len(sequence.prompt_ids),
      token_ids=tuple(sequence.generated),
      text=text,
      finish_reason=reason,
      error=error,
      budget_requested=sequence.budget,
      budget_run=max(runs, default=0),
      budget_run_mean=float(np.mean(runs)) if runs else 0.0,
      ttft_s=ttft,
      latency_s=now - sequence.arrival,
      deadline_met=deadline_met,
      unstreamed_text=unstreamed,
  )
