"""Engine-side state of one request while it waits, prefills and decodes."""

from __future__ import annotations

import dataclasses
import enum

from serve.request import RequestHandle, SamplingParams
from serve.text import IncrementalDecoder, StopMatcher


class Phase(enum.Enum):
  WAITING = "waiting"  # queued, no cache slot yet
  PREFILL = "prefill"  # has a slot, prompt not fully in the cache
  DECODE = "decode"  # prompt cached, generating one token per step


@dataclasses.dataclass(eq=False)
class Sequence:
  """A request's tokens and progress. Owned by the engine thread.

  tokens is prompt + generated ids; cached counts those already written to the slot's
  KV cache, so tokens[cached:] are what the next step of this row must feed.
  """

  request_id: str
  prompt_ids: tuple[int, ...]
  sampling: SamplingParams
  budget: int
  arrival: float
  deadline: float | None
  seed: int
  handle: RequestHandle
  decoder: IncrementalDecoder | None = None
  stop: StopMatcher | None = None
  slot: int | None = None
  cached: int = 0
  tokens: list[int] = dataclasses.field(default_factory=list)
  budgets_run: list[int] = dataclasses.field(default_factory=list)
  first_token_at: float | None = None
  last_run_at: float = 0.0

  def __post_init__(self):
    self.tokens = list(self.prompt_ids)
    self.last_run_at = self.arrival

  @property
  def phase(self) -> Phase:
    if self.slot is None:
      return Phase.WAITING
    return Phase.PREFILL if self.cached < len(self.prompt_ids) else Phase.DECODE

  @property
  def pending(self) -> int:
    """Tokens not yet in the cache: the rest of the prompt, or 1 (the last sampled token)."""
    return len(self.tokens) - self.cached

  @property
  def generated(self) -> list[int]:
    return self.tokens[len(self.prompt_ids):]

  def deadline_or(self, default: float) -> float:
    return default if self.deadline is None else self.deadline
