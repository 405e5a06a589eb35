"""FastAPI application: OpenAI-style completions over an `Engine`, plus health and Prometheus metrics.

Routes: POST /v1/completions (JSON or server-sent events), GET /v1/models, GET /health,
GET /metrics. Errors are {"error": {"message", "type", "param", "code"}}. With an API key
set, /v1/* requires `Authorization: Bearer KEY`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve import protocol
from serve.engine import Engine
from serve.metrics import ServeMetrics
from serve.protocol import ApiError
from serve.request import Completion, EngineStopped, InvalidRequest, QueueFull, RequestHandle, TokenEvent

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServerConfig:
  """HTTP settings. default_max_tokens applies when a request omits max_tokens (OpenAI uses 16)."""

  model_name: str
  api_key: str | None = None
  default_max_tokens: int = 16
  max_body_bytes: int = 1 << 20

  def __post_init__(self):
    if not self.model_name:
      raise ValueError("model_name must be a non-empty string")
    if self.default_max_tokens < 1:
      raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")


def create_app(engine: Engine, config: ServerConfig, metrics: ServeMetrics | None = None) -> FastAPI:
  """Build the app. The engine must be started by the caller; the app never stops it."""
  metrics = metrics or ServeMetrics()
  if engine.observer is None:
    engine.observer = metrics
  app = FastAPI(title="prism-jax", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.engine, app.state.config, app.state.metrics = engine, config, metrics
  if engine.offload_stats() is not None:
    metrics.track_offload(engine.offload_stats)

  @app.exception_handler(ApiError)
  async def api_error(_: Request, error: ApiError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)

  @app.exception_handler(StarletteHTTPException)
  async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
    route = f"{request.method} {request.url.path}"
    if error.status_code == 404:
      message, kind = f"no route {route}; this server has POST /v1/completions, GET /v1/models, GET /health and " \
                      "GET /metrics", "not_found_error"
    elif error.status_code == 405:
      message, kind = f"method not allowed: {route}", "invalid_request_error"
    else:
      message, kind = f"{route}: {error.detail}", "invalid_request_error"
    return JSONResponse(protocol.error_body(message, kind, code=str(error.status_code)),
                        status_code=error.status_code, headers=getattr(error, "headers", None))

  @app.exception_handler(Exception)
  async def internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse(protocol.error_body(f"internal server error: {type(error).__name__}", "server_error",
                                            code="internal_error"), status_code=500)

  @app.get("/health")
  async def health() -> JSONResponse:
    stats = engine.stats()
    body = {"status": "ok" if stats.accepting else "draining", "model": config.model_name,
            "policy": engine.config.policy, **dataclasses.asdict(stats)}
    return JSONResponse(body, status_code=200 if stats.accepting else 503)

  @app.get("/metrics")
  async def prometheus() -> Response:
    stats = engine.stats()
    metrics.set_queue(stats.waiting, stats.running)
    text, content_type = metrics.render()
    return Response(text, media_type=content_type)

  @app.get("/v1/models")
  async def models(request: Request) -> JSONResponse:
    _authorize(request, config)
    return JSONResponse({"object": "list", "data": [_model_card(engine, config)]})

  @app.post("/v1/completions")
  async def completions(request: Request) -> Response:
    _authorize(request, config)
    body = await _read_json(request, config.max_body_bytes)
    parsed = protocol.parse_request(body)
    if parsed.model is not None and parsed.model != config.model_name:
      raise ApiError(404, f"model {parsed.model!r} is not served here; this server serves {config.model_name!r}",
                     type="not_found_error", param="model", code="model_not_found")
    prompts = [_prompt_ids(engine, p) for p in protocol.split_prompts(parsed)]
    response_id = f"cmpl-{uuid.uuid4().hex[:24]}"
    events: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    handles = _submit_all(engine, metrics, parsed, prompts, response_id, events, config)
    created = int(time.time())
    if parsed.stream:
      include_usage = parsed.stream_options is not None and parsed.stream_options.include_usage
      stream = _stream(handles, events, response_id, created, config.model_name, include_usage)
      return StreamingResponse(stream, media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache", "X-Request-Id": response_id})
    results = await _wait_all(request, handles, events)
    if results is None:
      return Response(status_code=499)  # the client disconnected, so this response is never read
    failed = [c for c in results if c.finish_reason in ("error", "cancelled")]
    if failed:
      status, kind = (500, "server_error") if failed[0].finish_reason == "error" else (503, "service_unavailable")
      raise ApiError(status, f"request {failed[0].request_id} failed: {failed[0].error}", type=kind,
                     code=failed[0].finish_reason)
    return JSONResponse(protocol.completion_body(response_id, created, config.model_name, results),
                        headers={"X-Request-Id": response_id})

  return app


def _authorize(request: Request, config: ServerConfig) -> None:
  if config.api_key is None:
    return
  header = request.headers.get("authorization", "")
  scheme, _, token = header.partition(" ")
  if scheme.lower() != "bearer" or not token:
    raise ApiError(401, "missing API key; send the header 'Authorization: Bearer YOUR_KEY'",
                   type="authentication_error", code="missing_api_key")
  if not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
    raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")


def _model_card(engine: Engine, config: ServerConfig) -> dict[str, Any]:
  return {"id": config.model_name, "object": "model", "created": 0, "owned_by": "prism-jax",
          "full_budget": engine.full_budget, "num_sub_experts": engine.num_sub_experts,
          "quality_tiers": engine.tiers, "max_len": engine.max_len, "policy": engine.config.policy}


async def _read_json(request: Request, limit: int) -> Any:
  declared = request.headers.get("content-length")
  if declared is not None and declared.isdigit() and int(declared) > limit:
    raise ApiError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="body_too_large")
  raw = await request.body()
  if len(raw) > limit:
    raise ApiError(413, f"request body of {len(raw)} bytes exceeds the limit of {limit} bytes", code="body_too_large")
  try:
    return json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None


def _prompt_ids(engine: Engine, prompt: str | list[int]) -> list[int]:
  if not isinstance(prompt, str):
    return prompt
  if engine.tokenizer is None:
    raise ApiError(400, "this server has no tokenizer; send the prompt as a list of token ids", param="prompt",
                   code="no_tokenizer")
  ids = engine.tokenizer.encode(prompt).ids
  bos = engine.bos_token_id
  if bos is not None and (not ids or ids[0] != bos):
    ids = [bos] + ids
  return ids


def _submit_all(engine: Engine, metrics: ServeMetrics, parsed: protocol.CompletionRequest, prompts: list[list[int]],
                response_id: str, events: asyncio.Queue, config: ServerConfig) -> list[RequestHandle]:
  """Submit one engine request per prompt; on any rejection cancel those already queued and raise."""
  loop = asyncio.get_running_loop()
  qos = _engine_call(protocol.qos, parsed)
  handles: list[RequestHandle] = []
  try:
    for index, ids in enumerate(prompts):
      default_max_tokens = max(1, min(config.default_max_tokens, engine.max_len - len(ids)))
      sampling = _engine_call(protocol.sampling_params, parsed, default_max_tokens)
      listener = _forwarder(loop, events, index, tokens=parsed.stream)
      handles.append(_engine_call(engine.submit, ids, sampling, qos, request_id=f"{response_id}-{index}",
                                  listener=listener))
  except ApiError as error:
    for handle in handles:
      handle.cancel()
    metrics.on_rejected({400: "invalid", 429: "queue_full", 503: "stopped"}.get(error.status, "other"))
    raise
  return handles


def _engine_call(function, *args, **kwargs):
  """Call into the engine, turning its errors into API errors."""
  try:
    return function(*args, **kwargs)
  except InvalidRequest as error:
    raise ApiError(400, str(error), param=error.field, code="invalid_value") from None
  except QueueFull as error:
    raise ApiError(429, str(error), type="rate_limit_error", code="queue_full") from None
  except EngineStopped as error:
    raise ApiError(503, str(error), type="service_unavailable", code="shutting_down") from None


def _forwarder(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, *, tokens: bool):
  """Build a listener that queues engine events on the request's event loop (completions only unless `tokens`)."""
  def forward(event) -> None:
    if not tokens and isinstance(event, TokenEvent):
      return
    try:
      loop.call_soon_threadsafe(events.put_nowait, (index, event))
    except RuntimeError:
      pass  # the event loop has closed: the server is gone, and so is the reader
  return forward


async def _wait_disconnect(request: Request) -> None:
  while (await request.receive())["type"] != "http.disconnect":
    pass


async def _wait_all(request: Request, handles: list[RequestHandle], events: asyncio.Queue) -> list[Completion] | None:
  """Wait for every completion; cancel all and return None if the client disconnects first."""
  results: list[Completion | None] = [None] * len(handles)
  disconnect = asyncio.ensure_future(_wait_disconnect(request))
  try:
    while any(r is None for r in results):
      getter = asyncio.ensure_future(events.get())
      done, _ = await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
      if getter not in done:
        getter.cancel()
        logger.info("client of %s disconnected; cancelling", [h.request_id for h in handles])
        for handle in handles:
          handle.cancel()
        return None
      index, event = getter.result()
      results[index] = event
  finally:
    disconnect.cancel()
  return results  # type: ignore[return-value]


def _sse(data: Any) -> str:
  return f"data: {json.dumps(data)}\n\n"


async def _stream(handles: list[RequestHandle], events: asyncio.Queue, response_id: str, created: int, model: str,
                  include_usage: bool) -> AsyncIterator[str]:
  """Server-sent events: one chunk per text delta, a final chunk per choice, [DONE].

  A choice that fails sends an error event in place of its final chunk. If the client goes
  away, Starlette cancels this generator and `finally` cancels the engine requests.
  """
  finished: list[Completion | None] = [None] * len(handles)
  try:
    while any(f is None for f in finished):
      index, event = await events.get()
      if isinstance(event, TokenEvent):
        if event.text:
          yield _sse(protocol.chunk_body(response_id, created, model, index, event.text, event.budget))
        continue
      finished[index] = event
      if event.finish_reason in ("error", "cancelled"):
        kind = "server_error" if event.finish_reason == "error" else "service_unavailable"
        yield _sse(protocol.error_body(f"request {event.request_id} failed: {event.error}", kind,
                                       code=event.finish_reason))
      else:
        yield _sse(protocol.chunk_body(response_id, created, model, index, event.unstreamed_text, event.budget_run,
                                       event.finish_reason))
    if include_usage:
      done = [f for f in finished if f is not None]
      yield _sse({"id": response_id, "object": "text_completion", "created": created, "model": model,
                  "choices": [], "usage": protocol.usage(done)})
    yield "data: [DONE]\n\n"
  finally:
    for handle in handles:
      if not handle.done:
        logger.info("stream of %s closed early; cancelling", handle.request_id)
        handle.cancel()
