"""The engine's request life cycle on a stub runner: text, stops, cancellation, errors, queue, drain."""

import threading
import time

import pytest

from serve.config import EngineConfig
from serve.engine import Engine
from serve.request import Completion, EngineStopped, InvalidRequest, QoS, QueueFull, SamplingParams, TokenEvent
from serve.testing import StubRunner, char_tokenizer
from serve.text import IncrementalDecoder, StopMatcher

CONFIG = EngineConfig(batch_buckets=(1, 2), token_buckets=(8,), budgets=(4, 8), max_queue=4,
                      compilation_cache_dir=None, profile_repeats=0)


@pytest.fixture(scope="module")
def tokenizer():
  return char_tokenizer(128)


def make_engine(config=CONFIG, tokenizer=None, **runner_kwargs):
  runner_kwargs.setdefault("vocab_size", 128)
  runner = StubRunner(num_slots=config.max_batch, **runner_kwargs)
  return Engine(runner, config, tokenizer=tokenizer, progress=False), runner


def ids(tokenizer, text):
  return tokenizer.encode(text).ids


class FailingTokenizer:
  """Wraps a tokenizer; decoding a given token id raises, as a broken detokenizer would."""

  def __init__(self, tokenizer, bad_id):
    self.tokenizer, self.bad_id = tokenizer, bad_id

  def decode(self, token_ids):
    if self.bad_id in token_ids:
      raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
    return self.tokenizer.decode(token_ids)


def test_decoder_waits_for_whole_characters():
  class Bytes:
    def decode(self, token_ids):
      return bytes(token_ids).decode("utf-8", errors="replace")

  decoder = IncrementalDecoder(Bytes())
  e_acute = "é".encode()
  assert decoder.push(ord("a")) == "a"
  assert decoder.push(e_acute[0]) == ""
  assert decoder.push(e_acute[1]) == "é"
  assert decoder.push(ord("b")) == "b"


def test_stop_matcher_holds_back_prefixes():
  matcher = StopMatcher(["END"])
  assert matcher.append("abcE") == "abc"
  assert matcher.append("N") == ""
  assert matcher.append("X") == "ENX"
  assert matcher.append("yEND tail") == ""
  assert matcher.stopped
  assert matcher.text == "abcENXy"
  assert matcher.unstreamed() == "y"


def test_text_and_events_match(tokenizer):
  engine, _ = make_engine(tokenizer=tokenizer)
  prompt = ids(tokenizer, "the")
  handle = engine.submit(prompt, SamplingParams(max_tokens=5))
  engine.run_until_idle()
  events = list(handle)
  tokens = [e for e in events if isinstance(e, TokenEvent)]
  completion = events[-1]
  assert isinstance(completion, Completion)
  assert [e.token_id for e in tokens] == list(completion.token_ids)
  assert "".join(e.text for e in tokens) + completion.unstreamed_text == completion.text
  assert completion.text == tokenizer.decode(list(completion.token_ids))
  assert completion.finish_reason == "length"


def test_stop_string_truncates_text(tokenizer):
  engine, _ = make_engine(tokenizer=tokenizer)
  prompt = ids(tokenizer, "a")
  reference = engine.submit(prompt, SamplingParams(max_tokens=8))
  engine.run_until_idle()
  full = reference.result().text
  stop = full[3:5]
  handle = engine.submit(prompt, SamplingParams(max_tokens=8, stop=(stop,)))
  engine.run_until_idle()
  result = handle.result()
  assert result.finish_reason == "stop"
  assert result.text == full[:full.index(stop)]
  streamed = "".join(e.text for e in handle if isinstance(e, TokenEvent)) + result.unstreamed_text
  assert streamed == result.text


def test_eos_stops_and_adds_no_text(tokenizer):
  engine, _ = make_engine(tokenizer=tokenizer, next_token=lambda token: 0)
  handle = engine.submit(ids(tokenizer, "hello"), SamplingParams(max_tokens=5))
  engine.run_until_idle()
  result = handle.result()
  assert result.finish_reason == "stop"
  assert result.token_ids == (0,)
  assert result.text == ""


def test_invalid_requests_name_the_field(tokenizer):
  engine, runner = make_engine()
  cases = [
      (lambda: engine.submit([], SamplingParams()), "prompt"),
      (lambda: engine.submit([1] * runner.max_len, SamplingParams()), "prompt"),
      (lambda: engine.submit([1, 2], SamplingParams(max_tokens=runner.max_len)), "max_tokens"),
      (lambda: engine.submit([1, 999], SamplingParams()), "prompt"),
      (lambda: engine.submit([1], SamplingParams(), QoS(budget=9)), "budget"),
      (lambda: engine.submit([1], SamplingParams(), QoS(budget=0)), "budget"),
      (lambda: engine.submit([1], SamplingParams(), QoS(quality_tier="gold")), "quality_tier"),
      (lambda: engine.submit([1], SamplingParams(stop=("x",))), "stop"),  # no tokenizer
      (lambda: SamplingParams(max_tokens=-3), "max_tokens"),
      (lambda: SamplingParams(top_p=0.0), "top_p"),
      (lambda: QoS(budget=2, quality_tier="full"), "budget"),
      (lambda: QoS(ttft_deadline_s=-1.0), "ttft_deadline_ms"),
  ]
  for call, field in cases:
    with pytest.raises(InvalidRequest) as error:
      call()
    assert error.value.field == field, str(error.value)


def test_queue_full_raises():
  engine, _ = make_engine()
  for _ in range(CONFIG.max_queue):
    engine.submit([1, 2], SamplingParams(max_tokens=1))
  with pytest.raises(QueueFull, match="max_queue=4"):
    engine.submit([1, 2], SamplingParams(max_tokens=1))
  engine.run_until_idle()
  engine.submit([1, 2], SamplingParams(max_tokens=1))  # room again


def test_cancel_waiting_and_running():
  engine, _ = make_engine()
  running = engine.submit([1, 2], SamplingParams(max_tokens=50))
  other = engine.submit([1, 2], SamplingParams(max_tokens=50))
  waiting = engine.submit([1, 2], SamplingParams(max_tokens=2))
  engine.step()
  assert engine.stats().running == 2
  running.cancel()
  waiting.cancel()
  engine.step()
  assert running.result(0).finish_reason == "cancelled"
  assert waiting.result(0).finish_reason == "cancelled"
  assert waiting.result(0).token_ids == ()
  assert engine.stats().running == 1
  assert engine.stats().waiting == 0
  engine.run_until_idle()
  assert other.result(0).finish_reason == "length"


def test_step_failure_fails_only_its_rows():
  engine, runner = make_engine(fail_when=lambda batch: (batch.tokens_BT == 77).any())
  bad = engine.submit([77], SamplingParams(max_tokens=3))
  engine.step()
  good = engine.submit([5], SamplingParams(max_tokens=3))
  engine.run_until_idle()
  assert bad.result(0).finish_reason == "error"
  assert "injected step failure" in bad.result(0).error
  assert good.result(0).finish_reason == "length"


def test_host_error_fails_only_that_request(tokenizer):
  bad_id = 50
  engine, _ = make_engine(tokenizer=FailingTokenizer(tokenizer, bad_id))
  bad = engine.submit([bad_id - 1], SamplingParams(max_tokens=3))  # the stub returns bad_id next
  good = engine.submit([5], SamplingParams(max_tokens=3))
  engine.run_until_idle()
  assert bad.result(0).finish_reason == "error"
  assert "UnicodeDecodeError" in bad.result(0).error
  assert good.result(0).finish_reason == "length"
  assert len(good.result(0).token_ids) == 3


def test_listener_error_fails_only_that_request():
  engine, _ = make_engine()

  def broken(event):
    if isinstance(event, TokenEvent):
      raise ValueError("listener broke")

  bad = engine.submit([3], SamplingParams(max_tokens=3), listener=broken)
  good = engine.submit([3], SamplingParams(max_tokens=3))
  engine.run_until_idle()
  assert bad.result(0).finish_reason == "error"
  assert good.result(0).finish_reason == "length"


def test_thread_serves_concurrent_submitters():
  engine, _ = make_engine(CONFIG.replace(max_queue=64))
  engine.start()
  results = []

  def client(seed):
    handle = engine.submit([seed % 100 + 1], SamplingParams(max_tokens=4))
    results.append(handle.result(30))

  threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)
  engine.stop()
  assert len(results) == 16
  assert all(r.finish_reason == "length" for r in results)
  assert all(len(r.token_ids) == 4 for r in results)


def test_stop_drains_then_rejects():
  engine, runner = make_engine()
  runner.next_token = lambda token: token % 100 + 1
  engine.start()
  slow = [engine.submit([1], SamplingParams(max_tokens=30)) for _ in range(3)]
  engine.stop(drain=True, timeout=30)
  assert [h.result(0).finish_reason for h in slow] == ["length"] * 3
  with pytest.raises(EngineStopped):
    engine.submit([1], SamplingParams())


def test_stop_without_drain_cancels_everything():
  engine, _ = make_engine()
  handles = [engine.submit([1], SamplingParams(max_tokens=30)) for _ in range(3)]
  engine.step()
  engine.stop(drain=False)
  assert [h.result(0).finish_reason for h in handles] == ["cancelled"] * 3


def test_idle_thread_does_not_spin():
  engine, _ = make_engine()
  engine.start()
  time.sleep(0.2)
  assert engine.stats().steps == 0
  engine.stop()


def test_engine_rejects_bad_default_budget():
  with pytest.raises(ValueError, match="default_budget"):
    make_engine(CONFIG.replace(default_budget=99))
