"""HTTP server on a stub engine: OpenAI-style bodies, every bad input, 429, streaming, disconnects, errors."""

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from serve.app import ServerConfig, create_app
from serve.config import EngineConfig
from serve.engine import Engine
from serve.metrics import ServeMetrics
from serve.testing import StubRunner, background_server, char_tokenizer

CONFIG = EngineConfig(batch_buckets=(1, 2), token_buckets=(16,), budgets=(4, 8), max_queue=8,
                      compilation_cache_dir=None, profile_repeats=0)
KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class SlowRunner(StubRunner):
  """A stub whose steps take `delay` seconds and wait while `gate` is clear."""

  def __init__(self, delay=0.0, **kwargs):
    super().__init__(**kwargs)
    self.delay = delay
    self.gate = threading.Event()
    self.gate.set()

  def run(self, batch):
    self.gate.wait(30)
    time.sleep(self.delay)
    return super().run(batch)


class FailingTokenizer:
  """Decoding token `bad_id` raises, as a broken detokenizer would."""

  def __init__(self, tokenizer, bad_id):
    self.tokenizer, self.bad_id = tokenizer, bad_id

  def encode(self, text):
    return self.tokenizer.encode(text)

  def decode(self, token_ids):
    if self.bad_id in token_ids:
      raise ValueError("injected decode failure")
    return self.tokenizer.decode(token_ids)


@pytest.fixture(scope="module")
def tokenizer():
  return char_tokenizer(128)


@pytest.fixture
def server(tokenizer):
  """Start a server on a fresh stub engine: server(delay=..., tokenizer=..., config=...) -> (client, engine, runner)."""
  stack = []

  def start(delay=0.0, config=CONFIG, tok=tokenizer, api_key=KEY):
    runner = SlowRunner(delay=delay, vocab_size=128, num_slots=config.max_batch)
    engine = Engine(runner, config, tokenizer=tok, progress=False).start()
    metrics = ServeMetrics()
    engine.observer = metrics
    app = create_app(engine, ServerConfig(model_name="stub", api_key=api_key), metrics)
    context = background_server(app)
    url = context.__enter__()
    client = httpx.Client(base_url=url, headers=AUTH, timeout=30)
    stack.append((context, client, engine, runner))
    return client, engine, runner

  yield start
  for context, client, engine, runner in stack:
    runner.gate.set()
    client.close()
    context.__exit__(None, None, None)
    engine.stop(drain=False)


def post(client, body, **kwargs):
  return client.post("/v1/completions", json=body, **kwargs)


def error_of(response):
  body = response.json()
  assert set(body) == {"error"}, body
  assert set(body["error"]) == {"message", "type", "param", "code"}, body
  return body["error"]


def sse_events(response):
  lines = [line for line in response.iter_lines() if line]
  assert lines[-1] == "data: [DONE]", lines[-3:]
  return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_completion_body_follows_openai(server):
  client, _, _ = server()
  response = post(client, {"model": "stub", "prompt": "the", "max_tokens": 4, "temperature": 0, "budget": 3})
  assert response.status_code == 200, response.text
  body = response.json()
  assert body["object"] == "text_completion"
  assert body["id"].startswith("cmpl-")
  assert body["model"] == "stub"
  assert len(body["choices"]) == 1
  assert body["choices"][0]["finish_reason"] == "length"
  assert body["choices"][0]["index"] == 0
  assert body["usage"]["completion_tokens"] == 4
  assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
  assert body["budget"] == 3
  assert body["prism"]["choices"][0]["budget_requested"] == 3
  assert response.headers["x-request-id"] == body["id"]


BAD_REQUESTS = [
    ({"prompt": "x", "foo": 1}, 400, "foo"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x" * 200}, 400, "prompt"),
    ({"prompt": [1, 500]}, 400, "prompt"),
    ({"prompt": "x", "budget": 0}, 400, "budget"),
    ({"prompt": "x", "budget": 99}, 400, "budget"),
    ({"prompt": "x", "budget": "5"}, 400, "budget"),
    ({"prompt": "x", "budget": True}, 400, "budget"),
    ({"prompt": "x", "budget": 2, "quality_tier": "full"}, 400, "budget"),
    ({"prompt": "x", "quality_tier": "gold"}, 400, "quality_tier"),
    ({"prompt": "x", "ttft_deadline_ms": -5}, 400, "ttft_deadline_ms"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 2.5}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 2}, 400, "n"),
    ({"prompt": "x", "echo": True}, 400, "echo"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "model": "other"}, 404, "model"),
]


def test_bad_requests_name_the_field(server):
  client, engine, _ = server()
  for body, status, field in BAD_REQUESTS:
    response = post(client, body)
    assert response.status_code == status, (body, response.text)
    error = error_of(response)
    assert error["param"] == field, (body, error)
  assert engine.stats().waiting == 0
  assert engine.stats().running == 0


def test_malformed_json_and_non_object(server):
  client, _, _ = server()
  for raw in (b"{bad", b"\xff\xfe", b"[1, 2]", b""):
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, (raw, response.text)
    assert error_of(response)["type"] == "invalid_request_error"


def test_routes_and_methods(server):
  client, _, _ = server()
  assert client.get("/health").json()["status"] == "ok"
  models = client.get("/v1/models").json()
  assert models["data"][0]["id"] == "stub"
  assert models["data"][0]["full_budget"] == 8
  assert models["data"][0]["quality_tiers"]["balanced"] == 4
  missing = client.get("/v2/nothing")
  assert missing.status_code == 404
  assert error_of(missing)["type"] == "not_found_error"
  assert client.get("/v1/completions").status_code == 405


def test_api_key_required(server):
  client, _, _ = server()
  bare = httpx.Client(base_url=str(client.base_url), timeout=10)
  assert bare.get("/health").status_code == 200  # health stays open for probes
  missing = bare.post("/v1/completions", json={"prompt": "x"})
  assert missing.status_code == 401
  assert error_of(missing)["code"] == "missing_api_key"
  wrong = bare.post("/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer nope"})
  assert wrong.status_code == 401
  assert error_of(wrong)["code"] == "invalid_api_key"
  assert bare.get("/v1/models").status_code == 401


def test_streaming_matches_plain(server):
  client, _, _ = server()
  body = {"prompt": "hello", "max_tokens": 6, "temperature": 0, "budget": 4}
  plain = post(client, body).json()["choices"][0]["text"]
  with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                      "stream_options": {"include_usage": True}}) as response:
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
  chunks = [e for e in events if e["choices"]]
  assert "".join(c["choices"][0]["text"] for c in chunks) == plain
  assert chunks[-1]["choices"][0]["finish_reason"] == "length"
  assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
  assert all(c["budget"] == 4 for c in chunks)
  assert events[-1]["usage"]["completion_tokens"] == 6


def test_stop_string_in_stream(server):
  client, _, _ = server()
  plain = post(client, {"prompt": "a", "max_tokens": 8, "temperature": 0}).json()["choices"][0]["text"]
  stop = plain[4:6]
  body = {"prompt": "a", "max_tokens": 8, "temperature": 0, "stop": stop}
  cut = post(client, body).json()["choices"][0]
  assert cut["finish_reason"] == "stop"
  assert cut["text"] == plain[:plain.index(stop)]
  with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
    streamed = "".join(e["choices"][0]["text"] for e in sse_events(response))
  assert streamed == cut["text"]


def test_several_prompts_give_several_choices(server):
  client, _, _ = server()
  body = post(client, {"prompt": ["ab", "cd"], "max_tokens": 2, "temperature": 0}).json()
  assert [c["index"] for c in body["choices"]] == [0, 1]
  assert body["choices"][0]["text"] != body["choices"][1]["text"]
  ids = post(client, {"prompt": [[5, 6], [7]], "max_tokens": 2}).json()
  assert [c["token_ids"] for c in ids["choices"]] == [[7, 8], [8, 9]]


def test_concurrent_requests_all_answered(server):
  client, _, _ = server(delay=0.002)

  def one(i):
    return post(client, {"prompt": [i % 100 + 1], "max_tokens": 5, "temperature": 0})

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    responses = list(pool.map(one, range(24)))
  assert [r.status_code for r in responses] == [200] * 24, [r.text for r in responses if r.status_code != 200]
  for i, response in enumerate(responses):
    first = i % 100 + 1
    assert response.json()["choices"][0]["token_ids"] == [first + k for k in range(1, 6)]


def test_full_queue_returns_429(server):
  client, engine, runner = server(config=CONFIG.replace(max_queue=2))
  runner.gate.clear()  # steps block until the gate opens

  def wait_for(condition):
    deadline = time.monotonic() + 10
    while not condition() and time.monotonic() < deadline:
      time.sleep(0.01)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    # The first request enters a (blocked) step; the next two fill the queue; a fourth is rejected.
    pending = [pool.submit(post, client, {"prompt": [3], "max_tokens": 2})]
    wait_for(lambda: engine.stats().running == 1)
    pending += [pool.submit(post, client, {"prompt": [3], "max_tokens": 2}) for _ in range(2)]
    wait_for(lambda: engine.stats().waiting == 2)
    rejected = post(client, {"prompt": [3], "max_tokens": 2})
    runner.gate.set()
    answered = [f.result(30) for f in pending]
  assert rejected.status_code == 429
  assert error_of(rejected)["code"] == "queue_full"
  assert rejected.headers["retry-after"] == "1"
  assert [r.status_code for r in answered] == [200] * 3
  assert 'prism_rejected_requests_total{reason="queue_full"} 1.0' in client.get("/metrics").text


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_frees_the_slot(server, stream):
  client, engine, _ = server(delay=0.02)
  body = {"prompt": [3], "max_tokens": 60, "stream": stream}
  if stream:
    # Read one event, then leave: closing the response closes the connection.
    with client.stream("POST", "/v1/completions", json=body) as response:
      lines = response.iter_lines()
      assert next(lines).startswith("data: ")
  else:
    with pytest.raises(httpx.ReadTimeout):
      post(client, body, timeout=0.3)
  deadline = time.monotonic() + 10
  while engine.stats().running and time.monotonic() < deadline:
    time.sleep(0.02)
  assert engine.stats().running == 0
  metrics = client.get("/metrics").text
  assert 'prism_requests_total{finish_reason="cancelled"} 1.0' in metrics
  assert post(client, {"prompt": [3], "max_tokens": 2}).status_code == 200


def test_internal_error_fails_one_request(server, tokenizer):
  bad_id = 40
  client, _, _ = server(tok=FailingTokenizer(tokenizer, bad_id))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    bad = pool.submit(post, client, {"prompt": [bad_id - 1], "max_tokens": 3})  # the stub returns bad_id next
    good = pool.submit(post, client, {"prompt": [5], "max_tokens": 3})
    bad, good = bad.result(30), good.result(30)
  assert bad.status_code == 500
  assert "injected decode failure" in error_of(bad)["message"]
  assert good.status_code == 200
  with client.stream("POST", "/v1/completions", json={"prompt": [bad_id - 1], "max_tokens": 3,
                                                      "stream": True}) as response:
    events = sse_events(response)
  assert events[-1]["error"]["type"] == "server_error"
  assert client.get("/health").status_code == 200


def test_draining_server_returns_503(server):
  client, engine, _ = server()
  engine.stop_accepting()
  response = post(client, {"prompt": "x"})
  assert response.status_code == 503
  assert error_of(response)["code"] == "shutting_down"
  assert client.get("/health").status_code == 503


def test_metrics_exposition(server):
  client, _, _ = server()
  post(client, {"prompt": [3], "max_tokens": 3, "ttft_deadline_ms": 60000})
  text = client.get("/metrics").text
  for name in ("prism_queue_length", "prism_batch_budget", "prism_time_to_first_token_seconds_bucket",
               "prism_time_per_output_token_seconds_bucket", "prism_step_seconds_bucket", "prism_slo_attainment"):
    assert name in text, name
  assert "prism_slo_met_total 1.0" in text
  assert "prism_slo_attainment 1.0" in text
  assert "prism_offload_" not in text  # the expert-cache metrics exist only in offloading mode
