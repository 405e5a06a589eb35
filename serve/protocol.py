"""The OpenAI completions protocol: request schema, validation into engine requests, response bodies.

QoS extensions (top-level request fields, not in the OpenAI API):
  budget: integer 1..N*K, sub-experts per token per MoE layer.
  quality_tier: a tier name configured on the server (e.g. "full", "balanced"), instead of budget.
  ttft_deadline_ms: time-to-first-token deadline in milliseconds, from arrival.
Every completion response and stream chunk carries `budget`, the budget actually run (the
largest over the request's steps). Responses also carry `token_ids` in each choice and a
`prism` object with the requested and run budgets, TTFT and whether the deadline was met.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from serve.request import Completion, QoS, SamplingParams

MAX_STOP_STRINGS = 4


class ApiError(Exception):
  """An error sent as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

  def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",  # pylint: disable=redefined-builtin
               param: str | None = None, code: str | None = None):
    super().__init__(message)
    self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

  def body(self) -> dict[str, Any]:
    return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None,  # pylint: disable=redefined-builtin
               code: str | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="forbid", strict=True)
  include_usage: bool = False


class CompletionRequest(BaseModel):
  """POST /v1/completions body. Unknown fields are rejected; see the module docstring for extensions."""

  model_config = ConfigDict(extra="forbid", strict=True)

  model: str | None = None
  prompt: str | list[int] | list[str] | list[list[int]]
  max_tokens: int | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  n: int = 1
  stream: bool = False
  stream_options: StreamOptions | None = None
  stop: str | list[str] | None = None
  seed: int | None = None
  user: str | None = None
  # OpenAI fields accepted only with their neutral value.
  suffix: str | None = None
  echo: bool = False
  logprobs: int | None = None
  best_of: int | None = None
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  logit_bias: dict[str, float] | None = None
  # prism extensions.
  budget: int | None = None
  quality_tier: str | None = None
  ttft_deadline_ms: float | None = None


_EXPECTED = {
    "model": "a string", "prompt": "a string, a list of token ids, or a list of strings or of token-id lists",
    "max_tokens": "an integer", "temperature": "a number", "top_p": "a number", "n": "an integer",
    "stream": "a boolean", "stream_options": 'an object like {"include_usage": true}',
    "stop": "a string or a list of strings", "seed": "an integer", "user": "a string", "budget": "an integer",
    "quality_tier": "a string", "ttft_deadline_ms": "a number",
}

_NEUTRAL = {"suffix": None, "echo": False, "logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0.0}


def parse_request(body: Any) -> CompletionRequest:
  """Validate the JSON body's shape and types; raise ApiError(400) naming the first bad field."""
  if not isinstance(body, dict):
    raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
  try:
    request = CompletionRequest.model_validate(body)
  except ValidationError as error:
    first = error.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else None
    if first["type"] == "extra_forbidden":
      raise ApiError(400, f"unknown field {field!r}; see the API documentation for the supported fields",
                     param=field, code="unknown_field") from None
    if first["type"] == "missing":
      raise ApiError(400, f"missing required field {field!r}", param=field, code="missing_field") from None
    expected = _EXPECTED.get(field, "a valid value")
    raise ApiError(400, f"invalid {field}: expected {expected}, got {body.get(field)!r}", param=field,
                   code="invalid_type") from None
  _check_values(request)
  return request


def _check_values(request: CompletionRequest) -> None:
  def bad(field: str, message: str) -> ApiError:
    return ApiError(400, message, param=field, code="invalid_value")

  for field, neutral in _NEUTRAL.items():
    if getattr(request, field) != neutral:
      raise bad(field, f"{field} is not supported by this server; leave it out")
  if request.best_of not in (None, 1):
    raise bad("best_of", "best_of is not supported by this server; leave it out or set 1")
  if request.logit_bias:
    raise bad("logit_bias", "logit_bias is not supported by this server; leave it out")
  if request.n != 1:
    raise bad("n", f"only n=1 is supported, got n={request.n}; send several requests instead")
  if request.max_tokens is not None and request.max_tokens < 1:
    raise bad("max_tokens", f"max_tokens must be >= 1, got {request.max_tokens}")
  if not (math.isfinite(request.temperature) and 0 <= request.temperature <= 2):
    raise bad("temperature", f"temperature must be in [0, 2], got {request.temperature}")
  if not (math.isfinite(request.top_p) and 0 < request.top_p <= 1):
    raise bad("top_p", f"top_p must be in (0, 1], got {request.top_p}")
  stops = stop_strings(request)
  if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
    raise bad("stop", f"stop takes up to {MAX_STOP_STRINGS} non-empty strings, got {stops!r}")
  if request.seed is not None and not -2**63 <= request.seed < 2**64:
    raise bad("seed", f"seed must fit in 64 bits, got {request.seed}")
  if request.budget is not None and request.quality_tier is not None:
    raise bad("budget", "give either budget or quality_tier, not both")
  deadline = request.ttft_deadline_ms
  if deadline is not None and not (math.isfinite(deadline) and 0 < deadline <= 86_400_000):
    raise bad("ttft_deadline_ms", f"ttft_deadline_ms must be a positive number of milliseconds up to one day, "
              f"got {deadline}")
  if isinstance(request.prompt, list) and not request.prompt:
    raise bad("prompt", "the prompt list is empty; give at least one prompt")


def stop_strings(request: CompletionRequest) -> list[str]:
  if request.stop is None:
    return []
  return [request.stop] if isinstance(request.stop, str) else list(request.stop)


def split_prompts(request: CompletionRequest) -> list[str | list[int]]:
  """Split the prompt field into one entry per choice: a text or a list of token ids."""
  prompt = request.prompt
  if isinstance(prompt, str):
    return [prompt]
  if all(isinstance(p, int) for p in prompt):
    return [list(prompt)]
  return list(prompt)


def sampling_params(request: CompletionRequest, default_max_tokens: int) -> SamplingParams:
  max_tokens = request.max_tokens if request.max_tokens is not None else default_max_tokens
  return SamplingParams(max_tokens=max_tokens, temperature=request.temperature, top_p=request.top_p,
                        stop=tuple(stop_strings(request)), seed=request.seed)


def qos(request: CompletionRequest) -> QoS:
  deadline = None if request.ttft_deadline_ms is None else request.ttft_deadline_ms / 1e3
  return QoS(budget=request.budget, quality_tier=request.quality_tier, ttft_deadline_s=deadline)


def choice(completion: Completion, index: int) -> dict[str, Any]:
  return {"text": completion.text or "", "index": index, "logprobs": None,
          "finish_reason": completion.finish_reason, "token_ids": list(completion.token_ids),
          "budget": completion.budget_run}


def usage(completions: list[Completion]) -> dict[str, int]:
  prompt = sum(c.prompt_tokens for c in completions)
  generated = sum(c.completion_tokens for c in completions)
  return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def prism_details(completions: list[Completion]) -> dict[str, Any]:
  """Per-choice QoS outcome: budgets requested and run, TTFT, whether the deadline was met."""
  return {"choices": [{
      "budget_requested": c.budget_requested,
      "budget_run": c.budget_run,
      "budget_run_mean": c.budget_run_mean,
      "ttft_ms": None if c.ttft_s is None else c.ttft_s * 1e3,
      "ttft_deadline_met": c.deadline_met,
  } for c in completions]}


def completion_body(response_id: str, created: int, model: str, completions: list[Completion]) -> dict[str, Any]:
  return {
      "id": response_id,
      "object": "text_completion",
      "created": created,
      "model": model,
      "choices": [choice(c, i) for i, c in enumerate(completions)],
      "usage": usage(completions),
      "budget": max(c.budget_run for c in completions),
      "prism": prism_details(completions),
  }


def chunk_body(response_id: str, created: int, model: str, index: int, text: str, budget: int,
               finish_reason: str | None = None) -> dict[str, Any]:
  return {
      "id": response_id,
      "object": "text_completion",
      "created": created,
      "model": model,
      "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}],
      "budget": budget,
  }
