"""Request types: sampling parameters and QoS in, token events and a completion out, and the handle."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Callable, Iterator, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineError(Exception):
  """Base class of the errors `Engine.submit` raises."""


class InvalidRequest(EngineError):
  """A request field is invalid; `field` names it (an OpenAI-style `param`)."""

  def __init__(self, field: str | None, message: str):
    super().__init__(message)
    self.field = field


class QueueFull(EngineError):
  """The waiting queue already contains `max_queue` requests; retry later."""


class EngineStopped(EngineError):
  """The engine is draining or stopped and accepts no new requests."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to pick tokens. temperature 0 is greedy; seed None draws one from the engine's generator."""

  max_tokens: int = 16
  temperature: float = 0.0
  top_p: float = 1.0
  stop: tuple[str, ...] = ()
  seed: int | None = None

  def __post_init__(self):
    if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
      raise InvalidRequest("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
    if not 0 <= self.temperature <= 100:
      raise InvalidRequest("temperature", f"temperature must be in [0, 100], got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise InvalidRequest("top_p", f"top_p must be in (0, 1], got {self.top_p}")
    if any(not isinstance(s, str) or not s for s in self.stop):
      raise InvalidRequest("stop", f"stop strings must be non-empty strings, got {list(self.stop)!r}")


@dataclasses.dataclass(frozen=True)
class QoS:
  """Quality of service: a budget or a named tier (not both), and a time-to-first-token deadline."""

  budget: int | None = None
  quality_tier: str | None = None
  ttft_deadline_s: float | None = None

  def __post_init__(self):
    if self.budget is not None and self.quality_tier is not None:
      raise InvalidRequest("budget", "give either budget or quality_tier, not both")
    if self.ttft_deadline_s is not None and not self.ttft_deadline_s > 0:
      raise InvalidRequest("ttft_deadline_ms", f"the time-to-first-token deadline must be positive, got "
                           f"{self.ttft_deadline_s} s")


@dataclasses.dataclass(frozen=True)
class TokenEvent:
  """One generated token: its id, the text it completed (may be empty), and the budget its row ran."""

  request_id: str
  index: int
  token_id: int
  text: str
  budget: int


@dataclasses.dataclass(frozen=True)
class Completion:
  """Final state of a request; every accepted request ends with exactly one.

  budget_requested is the request's budget after tier resolution and whole-expert rounding.
  budget_run is the largest budget any of its steps ran, and budget_run_mean the mean over its steps.
  ttft_s is None when no token was produced. deadline_met is None when there was no deadline.
  text is the whole completion text (None when the engine has no tokenizer); unstreamed_text is
  its tail that no TokenEvent carried, held back while it could still begin a stop string.
  """

  request_id: str
  prompt_tokens: int
  token_ids: tuple[int, ...]
  text: str | None
  finish_reason: FinishReason
  error: str | None
  budget_requested: int
  budget_run: int
  budget_run_mean: float
  ttft_s: float | None
  latency_s: float
  deadline_met: bool | None
  unstreamed_text: str = ""

  @property
  def completion_tokens(self) -> int:
    return len(self.token_ids)


Event = TokenEvent | Completion
Listener = Callable[[Event], None]


class RequestHandle:
  """A submitted request: iterate it for events, `result()` for the completion, `cancel()` to stop it.

  Events come from the engine thread. A listener, if given, is called on that thread for
  every event, and an exception it raises fails this request only. With a listener the handle
  keeps no event backlog, so iterate a handle only when it has none.
  """

  def __init__(self, request_id: str, cancel: Callable[[str], None], listener: Listener | None = None):
    self.request_id = request_id
    self._cancel = cancel
    self._listener = listener
    self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
    self._done = threading.Event()
    self._completion: Completion | None = None

  def _emit(self, event: Event) -> None:
    """Called by the engine; stores the event, then calls the listener (which may raise)."""
    if isinstance(event, Completion):
      self._completion = event
      self._done.set()
    if self._listener is None:
      self._events.put(event)
    else:
      self._listener(event)

  @property
  def done(self) -> bool:
    return self._done.is_set()

  def cancel(self) -> None:
    """Ask the engine to stop this request; it ends with finish_reason 'cancelled' unless already done."""
    if not self.done:
      self._cancel(self.request_id)

  def result(self, timeout: float | None = None) -> Completion:
    """Block until the request ends; raises TimeoutError after `timeout` seconds."""
    if not self._done.wait(timeout):
      raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
    assert self._completion is not None
    return self._completion

  def __iter__(self) -> Iterator[Event]:
    """Yield events as they arrive, ending with the Completion."""
    if self._listener is not None:
      raise RuntimeError(f"request {self.request_id} sends its events to a listener; use result() instead")
    while True:
      event = self._events.get()
      yield event
      if isinstance(event, Completion):
        return
